"""Drive a running VM over QMP with the real qemu.qmp client, as one drives QEMU."""

from __future__ import annotations

import asyncio
import os
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


async def _cpus(path: str) -> object:
    client = QMPClient("test")
    await client.connect(path)
    try:
        return await client.execute("query-cpus-fast")
    finally:
        await client.disconnect()


def test_query_cpus_fast_names_the_thread_that_runs_each_vcpu(instance: Instance) -> None:
    """What libvirt reads to pin vCPUs: the thread id is the vCPU's thread, which the
    kernel knows as ``vcpu0`` (``ps -L``, ``top -H``)."""
    assert instance.qmp is not None
    cpus = asyncio.run(_cpus(instance.qmp.path))
    assert isinstance(cpus, list) and len(cpus) == 1
    cpu = cpus[0]
    assert (cpu["cpu-index"], cpu["target"]) == (0, "x86_64")
    comm = Path(f"/proc/{os.getpid()}/task/{cpu['thread-id']}/comm").read_text().strip()
    assert comm == "vcpu0"


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
