"""``memory-backend-memfd`` objects (QEMU's spelling of shared guest RAM): what each
spelling backs guest RAM with, and the object text livemig writes for QEMU and for
``livemig run`` reads back as the same backend."""

from __future__ import annotations

import pytest

from livemig.errors import ConfigError
from livemig.kernel.mman import Backing
from livemig.objects import parse_object
from livemig.units import GIB, MIB
from livemig.vmm.membackend import MemoryBackend, guest_ram_backend, run_memory_args


def backend(spec: str) -> MemoryBackend:
    return MemoryBackend.from_object(*parse_object(spec))


@pytest.mark.parametrize("spec,backing", [
    ("memory-backend-memfd,id=m,size=1G", Backing.MEMFD_4K),
    ("memory-backend-memfd,id=m,size=1G,share=on", Backing.MEMFD_4K),
    ("memory-backend-memfd,id=m,size=1G,share=on,hugetlb=on", Backing.HUGETLB_2M),
    ("memory-backend-memfd,id=m,size=1G,hugetlb=on,hugetlbsize=1G", Backing.HUGETLB_1G),
])
def test_memfd_backend_spellings_back_guest_ram_as_qemu_does(spec: str,
                                                             backing: Backing) -> None:
    b = backend(spec)
    assert (b.id, b.size, b.backing, b.prealloc) == ("m", GIB, backing, False)


@pytest.mark.parametrize("backing", [Backing.MEMFD_4K, Backing.HUGETLB_2M,
                                     Backing.HUGETLB_1G])
@pytest.mark.parametrize("prealloc", [False, True])
def test_the_object_livemig_writes_reads_back_as_the_same_backend(
        backing: Backing, prealloc: bool) -> None:
    b = MemoryBackend("ram0", 256 * MIB, backing, prealloc)
    assert backend(b.qemu_object()) == b


@pytest.mark.parametrize("spec,says", [
    ("memory-backend-ram,id=m,size=1G", "memory-backend-memfd objects only"),
    ("memory-backend-memfd,size=1G", "'id' is missing"),
    ("memory-backend-memfd,id=m", "'size' is missing"),
    ("memory-backend-memfd,id=m,size=1G,share=off", "share=on"),
    ("memory-backend-memfd,id=m,size=1G,share=maybe", "'share' expects"),
    ("memory-backend-memfd,id=m,size=1G,hugetlb=on,hugetlbsize=4M", "2M or 1G"),
    ("memory-backend-memfd,id=m,size=1G,hugetlbsize=2M", "needs hugetlb=on"),
    ("memory-backend-memfd,id=m,size=1G,seal=on", "'seal' is unexpected"),
])
def test_bad_memfd_backends_are_refused(spec: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        backend(spec)


def test_guest_ram_is_the_backend_the_machine_names() -> None:
    b = MemoryBackend("ram0", GIB, Backing.MEMFD_4K)
    assert guest_ram_backend({"ram0": b}, "memory-backend=ram0") is b
    assert guest_ram_backend({}, None) is None
    with pytest.raises(ConfigError, match="not used"):
        guest_ram_backend({"ram0": b}, None)
    with pytest.raises(ConfigError, match="'other' not found"):
        guest_ram_backend({}, "memory-backend=other")
    with pytest.raises(ConfigError, match="memory-backend=ID"):
        guest_ram_backend({"ram0": b}, "accel=kvm")


def test_run_memory_args_give_4k_memfd_as_a_backend_object_and_the_rest_as_page_sizes(
        ) -> None:
    memfd = run_memory_args(Backing.MEMFD_4K, 64, prealloc=True)
    assert memfd[0::2] == ["--object", "--machine"]
    assert backend(memfd[1]) == MemoryBackend("ram0", 64 * MIB, Backing.MEMFD_4K, True)
    assert run_memory_args(Backing.HUGETLB_2M, 64) == ["--mem", "64M", "--page-size", "2M"]
