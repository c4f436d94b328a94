"""A vCPU that touches guest RAM registered with userfaultfd blocks until a handler
thread places the page, then runs on the placed bytes (a postcopy in miniature)."""

from __future__ import annotations

import select
import threading

import pytest

from livemig.kernel.mman import Backing
from livemig.kernel.uffd import FEATURE_MISSING_SHMEM, FEATURE_THREAD_ID, Userfaultfd
from livemig.units import MIB
from livemig.vmm.boot import boot_guest, guest_range
from livemig.vmm.checks import ab_check
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm
MEM = 32 * MIB


def _serve_faults(uffd: Userfaultfd, dst: Vm, src: Vm, stop: threading.Event,
                  faults: list[tuple[int, int]]) -> None:
    """Place each faulting host page with UFFDIO_COPY from the source VM's RAM."""
    page = dst.main_block.host_page_size
    base, src_base = dst.main_block.host_addr, src.main_block.host_addr
    while not stop.is_set():
        ready, _, _ = select.select([uffd], [], [], 0.05)
        if not ready:
            continue
        for fault in uffd.read_events():
            offset = (fault.address - base) // page * page
            faults.append((offset, fault.thread_id))
            # Both RAM mappings stay mapped: the VMs outlive this thread (joined below).
            uffd.copy(base + offset, src_base + offset, page)


@pytest.mark.parametrize("backing", [Backing.ANON_4K, Backing.MEMFD_4K, Backing.HUGETLB_2M],
                         ids=["4K", "4K-memfd", "2M"])
def test_vcpu_blocks_on_a_missing_page_until_it_is_placed(backing: Backing,
                                                          hugepages_restored: None) -> None:
    with Vm(VmConfig(MEM, backing)) as src:
        boot_guest(src, "ab")
        src.start()
        assert src.serial.wait_for(2, timeout=60)
        src.pause()
        state = src.save_state()
        with Vm(VmConfig(MEM, backing)) as dst, Userfaultfd.open() as uffd:
            uffd.api(FEATURE_THREAD_ID | FEATURE_MISSING_SHMEM)
            block = dst.main_block
            uffd.register(block.host_addr, block.size)
            dst.restore_state(state)
            faults: list[tuple[int, int]] = []
            stop = threading.Event()
            handler = threading.Thread(target=_serve_faults,
                                       args=(uffd, dst, src, stop, faults))
            handler.start()
            try:
                dst.start()
                # Every B needs a full pass over pages that only the handler can supply.
                assert dst.serial.wait_for(2, timeout=60), dst.serial.output
                dst.pause()
            finally:
                stop.set()
                handler.join(timeout=10)
            vcpu_tid = dst.vcpus[0].native_id
            assert faults, "the guest never faulted"
            assert all(tid == vcpu_tid for _off, tid in faults), "faults not from the vCPU"
            start, end = guest_range(dst)
            # The whole range was touched, so every host page in it was placed once.
            assert len({off for off, _ in faults}) >= (end - start) // block.host_page_size
            assert b"E" not in dst.serial.output
            assert ab_check(block.array(), start, end).bad_pages == ()
