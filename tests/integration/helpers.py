"""Shared helpers for the precopy integration tests: VMs, livemig processes, QMP waits.

Migrations are driven the way a user drives QEMU: over QMP, with the real ``qemu.qmp``
client (through :class:`~livemig.control.client.QmpClient`).  In-process
:class:`~livemig.instance.Instance` objects are used where the test needs to look
inside (guest RAM, dirty logging); ``python -m livemig run`` child processes where a
separate process is needed (to kill it).  Every wait is bounded: this machine is a
nested VM, so the bounds are generous, but a hang always becomes a failure.  Instances
are closed with :meth:`~livemig.instance.Instance.close` (what ``quit`` does); an error
while closing fails the test.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from conftest import hugetlb_kib, others_map_hugepages

from livemig.control.client import QmpClient
from livemig.errors import KvmError
from livemig.guests import DEFAULT_RANGE_START
from livemig.instance import Instance
from livemig.kernel.mman import Backing
from livemig.migration.state import MigrationStatus
from livemig.units import MIB, PAGE_SIZE
from livemig.vmm.boot import boot_guest, boot_image
from livemig.vmm.memory import new_bitmap
from livemig.vmm.vm import Vm, VmConfig
from livemig.vmmprocess import VmmProcess

MEM = 32 * MIB
# The statuses a migration ends in, as MigrationStatus defines them (for "until" tuples).
FINISHED = tuple(s.value for s in MigrationStatus if s.finished)
# Converge at once: the ab guest dirties all its RAM all the time, so with QEMU's default
# downtime limit a precopy would only end at the iteration cap.
FAST_CONVERGENCE = {"downtime-limit": 5000, "x-max-iterations": 2}
EVENTS_ON = [{"capability": "events", "state": True}]


def _boot_sector(code: bytes) -> bytes:
    return code + bytes(510 - len(code)) + b"\x55\xaa"


# cli; hlt; jmp back to hlt: a guest that never writes RAM, so a destination that runs
# it keeps the RAM it received byte for byte.
HALT_IMAGE = _boot_sector(bytes([0xFA, 0xF4, 0xEB, 0xFD]))


HUGEPAGE_POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


@contextlib.contextmanager
def hugepages_given_back(backing: Backing) -> Iterator[None]:
    """Assert that the VMs of the block gave back every 2M huge page they reserved.

    Like conftest's ``hugepages_restored`` (the pool size must not change), but the pool
    is machine-wide: when another process maps huge pages at the end, a different pool
    size may be theirs, so then only this process's own mappings are checked.
    """
    if not backing.is_hugetlb:
        yield
        return
    before = HUGEPAGE_POOL.read_text()
    yield
    assert hugetlb_kib("self") == 0, "this process still maps huge pages"
    after = HUGEPAGE_POOL.read_text()
    assert after == before or others_map_hugepages(), \
        f"huge pages were not given back: pool {before.strip()} -> {after.strip()}"


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qmp_path(inst: Instance) -> str:
    assert inst.qmp is not None
    return str(inst.qmp.path)


@contextlib.contextmanager
def ab_instance(tmp_path: Path, name: str = "src", mem: int = MEM,
                backing: Backing = Backing.ANON_4K, start: bool = True) -> Iterator[Instance]:
    """An ab guest with a QMP socket, running (and through two passes) if ``start``."""
    inst = Instance(Vm(VmConfig(mem, backing)), str(tmp_path / f"{name}.qmp"))
    try:
        boot_guest(inst.vm, "ab")
        if start:
            inst.vm.start()
            assert inst.vm.serial.wait_for(2, timeout=60), inst.vm.serial.output
        yield inst
    finally:
        inst.close()


@contextlib.contextmanager
def halt_instance(tmp_path: Path, name: str = "src", mem: int = MEM,
                  backing: Backing = Backing.ANON_4K, seed: int = 1) -> Iterator[Instance]:
    """A running guest that halts at once, with random data in every third page of the
    test range (the other pages stay zero, so the stream has PAGE and ZERO records)."""
    inst = Instance(Vm(VmConfig(mem, backing)), str(tmp_path / f"{name}.qmp"))
    try:
        boot_image(inst.vm, HALT_IMAGE)
        rng = np.random.default_rng(seed)
        ram = inst.vm.main_block.array().reshape(-1, 4096)
        first = DEFAULT_RANGE_START // 4096
        ram[first::3] = rng.integers(0, 256, ram[first::3].shape, dtype=np.uint8)
        del ram  # a live view of guest RAM would keep the VM from unmapping it
        inst.vm.start()
        yield inst
    finally:
        inst.close()


@contextlib.contextmanager
def empty_instance(tmp_path: Path, name: str = "dst", mem: int = MEM,
                   backing: Backing = Backing.ANON_4K) -> Iterator[Instance]:
    """A VM with nothing loaded: a migration destination."""
    inst = Instance(Vm(VmConfig(mem, backing)), str(tmp_path / f"{name}.qmp"))
    try:
        yield inst
    finally:
        inst.close()


@contextlib.contextmanager
def client(path: str) -> Iterator[QmpClient]:
    c = QmpClient(path, timeout=30)
    try:
        yield c
    finally:
        c.close()


def wait_migration(qmp: QmpClient, timeout: float = 60,
                   until: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    """Poll query-migrate until its status is in ``until``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        if info.get("status") in until:
            return info
        assert time.monotonic() < deadline, f"migration still {info.get('status')}: {info}"
        time.sleep(0.02)


def status(qmp: QmpClient) -> str:
    return str(qmp.execute("query-status")["status"])


def guest_check(qmp: QmpClient) -> dict[str, Any]:
    """Pause the VM (if it runs) and run the host-side ab check over QMP."""
    if qmp.execute("query-status")["running"]:
        qmp.execute("stop")
    result: dict[str, Any] = qmp.execute("x-guest-check", guest="ab")
    return result


def collect_events(qmp: QmpClient, until: Callable[[list[dict[str, Any]]], bool],
                   timeout: float = 10) -> list[dict[str, Any]]:
    """Events received so far plus any arriving until ``until(events)`` holds."""
    events = qmp.events()
    deadline = time.monotonic() + timeout
    while not until(events) and time.monotonic() < deadline:
        events += qmp.events(wait=0.1)
    return events


def migration_statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def same_ram(a: Vm, b: Vm) -> bool:
    """Byte-for-byte equal RAM (no view of guest RAM outlives the call)."""
    return all(np.array_equal(block.array(), b.blocks[name].array())
               for name, block in a.blocks.items())


CANARY_PAGE = np.frombuffer(b"CANARY\xc3\x5a" * (PAGE_SIZE // 8), dtype=np.uint8)


def fill_with_canary(vm: Vm) -> None:
    """Every page of guest RAM holds :data:`CANARY_PAGE` before an incoming migration: a
    page the destination never writes keeps it (fresh RAM reads as zero, which would hide
    a page that should have been zeroed, or one never placed in a zero guest)."""
    for block in vm.blocks.values():
        block.array().reshape(-1, PAGE_SIZE)[:] = CANARY_PAGE


def canary_pages(vm: Vm) -> int:
    """Pages of guest RAM that still hold :data:`CANARY_PAGE`."""
    return sum(int((block.array().reshape(-1, PAGE_SIZE) == CANARY_PAGE).all(axis=1).sum())
               for block in vm.blocks.values())


def page_differences(src: Vm, dst: Vm) -> dict[str, int]:
    """Pages of ``dst`` unlike the same page of ``src``: still the canary, zero where the
    source page is not (a silent zero), or otherwise different."""
    out = {"canary": 0, "silent zero": 0, "other": 0}
    for name, block in src.blocks.items():
        a = block.array().reshape(-1, PAGE_SIZE)
        b = dst.blocks[name].array().reshape(-1, PAGE_SIZE)
        differ = (a != b).any(axis=1)
        canary = (b == CANARY_PAGE).all(axis=1)
        zero = ~b.any(axis=1)
        out["canary"] += int((differ & canary).sum())
        out["silent zero"] += int((differ & zero).sum())
        out["other"] += int((differ & ~canary & ~zero).sum())
    return out


def nonzero_bytes(vm: Vm) -> int:
    return sum(int(np.count_nonzero(block.array())) for block in vm.blocks.values())


def dirty_logging_off(vm: Vm) -> bool:
    """Ask KVM itself: KVM_GET_DIRTY_LOG fails with ENOENT on a slot that is not logged."""
    for block in vm.blocks.values():
        if block.logging:
            return False
        try:
            block.vm_fd.get_dirty_log(block.slot, new_bitmap(block.pages).ctypes.data)
        except KvmError as e:
            if e.errno != errno.ENOENT:
                raise
        else:
            return False
    return True


@contextlib.contextmanager
def livemig_process(workdir: Path, name: str, args: list[str]) -> Iterator[VmmProcess]:
    proc = VmmProcess(workdir, name, args)
    try:
        yield proc
    finally:
        proc.stop()
