"""Shared fixtures: skip real-KVM tests where KVM is missing, and build small VMs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None

needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="/dev/kvm is not available")
needs_qemu = pytest.mark.skipif(not (HAVE_KVM and HAVE_QEMU),
                                reason="qemu-system-x86_64 or /dev/kvm is not available")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (huge page reservation)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="/dev/kvm is not available"))


@pytest.fixture
def hugepages_restored() -> Iterator[None]:
    """Assert that a test gives back every huge page it reserved."""
    knobs = [f"/sys/kernel/mm/hugepages/{d}/nr_hugepages"
             for d in ("hugepages-2048kB", "hugepages-1048576kB")]
    def read() -> list[str]:
        return [Path(k).read_text() for k in knobs if os.path.exists(k)]

    before = read()
    yield
    after = read()
    assert before == after, "huge pages were not given back"
