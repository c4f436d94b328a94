"""Shared fixtures: skip real-KVM tests where KVM is missing, and build small VMs."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.netlab import unavailable_reason

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None

needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="/dev/kvm is not available")
needs_qemu = pytest.mark.skipif(not (HAVE_KVM and HAVE_QEMU),
                                reason="qemu-system-x86_64 or /dev/kvm is not available")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (huge page reservation)")
_NETLAB_MISSING = unavailable_reason()
needs_netlab = pytest.mark.skipif(_NETLAB_MISSING is not None, reason=_NETLAB_MISSING or "")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="dropping traffic needs nft (Debian package nftables)")


def helper_reads(pid: int, memfd: str) -> tuple[bool, bool]:
    """How helper process ``pid`` reads this process's guest RAM: does it map the memfd
    named ``memfd``, and has it this process's ``/proc/PID/mem`` open?"""
    maps = Path(f"/proc/{pid}/maps").read_text()
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # an fd closed while we look
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return f"/memfd:{memfd} " in maps, f"/proc/{os.getpid()}/mem" in fds


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="/dev/kvm is not available"))


def hugetlb_kib(pid: str) -> int:
    """Huge pages a process maps (HugetlbPages in /proc/PID/status), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("HugetlbPages:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass  # the process has exited: it maps nothing
    return 0


def others_map_hugepages() -> bool:
    me = str(os.getpid())
    return any(hugetlb_kib(d.name) for d in Path("/proc").iterdir()
               if d.name.isdigit() and d.name != me)


def _peak_allocated(read: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``read`` returned, and the most memory it held allocated at once."""
    tracemalloc.start()
    try:
        data = read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return data, peak


@pytest.fixture
def peak_allocated() -> Callable[[Callable[[], bytes]], tuple[bytes, int]]:
    """``peak_allocated(read)``: what ``read`` returned and the most memory it held at
    once (tracemalloc)."""
    return _peak_allocated


@pytest.fixture
def hugepages_restored() -> Iterator[None]:
    """Assert that a test gives back every huge page it reserved.

    The pool is machine-wide: when another process (a benchmark, another test run)
    maps huge pages at the end, a changed pool size may be theirs, so then only this
    process's own mappings are checked.
    """
    knobs = [f"/sys/kernel/mm/hugepages/{d}/nr_hugepages"
             for d in ("hugepages-2048kB", "hugepages-1048576kB")]

    def read() -> list[str]:
        return [Path(k).read_text() for k in knobs if os.path.exists(k)]

    before = read()
    yield
    assert hugetlb_kib("self") == 0, "this process still maps huge pages"
    assert read() == before or others_map_hugepages(), "huge pages were not given back"


@pytest.fixture(autouse=True)
def _livemig_logs_not_retained(request: pytest.FixtureRequest,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Real-KVM tests: keep livemig's log records away from pytest's capture.

    livemig logs failed migrations with the exception as an argument; a handler that
    keeps records (pytest's) keeps the traceback, whose frames may hold views of guest
    RAM, and the VM then cannot unmap it (BufferError at close).  Records still reach
    stderr through logging's last-resort handler.  (Unit tests keep the capture: some
    assert on log records.)"""
    if "kvm" in request.keywords:
        monkeypatch.setattr(logging.getLogger("livemig"), "propagate", False)
