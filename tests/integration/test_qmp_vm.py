"""Drive a running VM over QMP with the real qemu.qmp client, as one drives QEMU."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from livemig.instance import Instance
from livemig.units import MIB
from livemig.vmm.boot import boot_guest
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    inst = Instance(Vm(VmConfig(32 * MIB)), str(tmp_path / "qmp.sock"))
    boot_guest(inst.vm, "ab")
    inst.vm.start()
    yield inst
    inst.close()


async def _session(path: str) -> list[object]:
    client = QMPClient("test")
    seen: list[object] = []
    await client.connect(path)
    try:
        with client.listener() as listener:
            seen.append(await client.execute("query-status"))
            await client.execute("stop")
            seen.append((await asyncio.wait_for(listener.get(), 10))["event"])
            seen.append(await client.execute("query-status"))
            with pytest.raises(ExecuteError) as err:
                await client.execute("no-such-command")
            seen.append(err.value.error_class)
            await client.execute("cont")
            seen.append((await asyncio.wait_for(listener.get(), 10))["event"])
            seen.append(await client.execute("query-status"))
    finally:
        await client.disconnect()
    return seen


def test_stop_cont_query_status_and_errors_over_qmp(instance: Instance) -> None:
    assert instance.qmp is not None
    seen = asyncio.run(_session(instance.qmp.path))
    assert seen == [
        {"status": "running", "running": True, "singlestep": False},
        "STOP",
        {"status": "paused", "running": False, "singlestep": False},
        "CommandNotFound",
        "RESUME",
        {"status": "running", "running": True, "singlestep": False},
    ]
    assert instance.vm.serial.wait_for(1, timeout=30)


async def _quit(path: str) -> None:
    client = QMPClient("test")
    await client.connect(path)
    try:
        await client.execute("quit")
    finally:
        await client.disconnect()


def test_quit_over_qmp_releases_the_instance(instance: Instance) -> None:
    assert instance.qmp is not None
    asyncio.run(_quit(instance.qmp.path))
    assert instance.wait(10)
