"""Guest RAM in a shared 4 KiB memfd (``4K-memfd``, QEMU's memory-backend-memfd
share=on): another process mapping the memfd sees guest RAM as it is, and a discard
drops the pages from the file itself -- every mapping then reads zeroes (or, under
userfaultfd, faults: tests/unit/test_uffd.py), never the old bytes."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from livemig.kernel.mman import MIB, PAGE_SIZE, Backing, Mapping, map_guest_ram

SIZE = 4 * MIB


@pytest.fixture
def ram() -> Iterator[Mapping]:
    mapping = map_guest_ram(SIZE, Backing.MEMFD_4K, "memfd-test")
    yield mapping
    mapping.close()


def other_mapping(mapping: Mapping) -> mmap.mmap:
    """The memfd mapped again, as a helper process maps it (through its own fd)."""
    fd = os.open(f"/proc/self/fd/{mapping.fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, mapping.size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def test_memfd_ram_is_a_shared_file_of_4k_pages(ram: Mapping) -> None:
    assert ram.fd >= 0
    assert ram.backing.host_page_size == PAGE_SIZE
    assert os.readlink(f"/proc/self/fd/{ram.fd}").startswith("/memfd:memfd-test")


def test_another_mapping_of_the_memfd_sees_guest_writes(ram: Mapping) -> None:
    other = other_mapping(ram)
    try:
        ram.mm[PAGE_SIZE + 7 : PAGE_SIZE + 12] = b"guest"
        assert other[PAGE_SIZE + 7 : PAGE_SIZE + 12] == b"guest"
    finally:
        other.close()


def test_discard_drops_memfd_pages_for_every_mapping_and_keeps_the_rest(
        ram: Mapping) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(1, 256, SIZE, dtype=np.uint8).tobytes()
    ram.mm[:] = data
    other = other_mapping(ram)
    try:
        ram.discard(2 * PAGE_SIZE, 3 * PAGE_SIZE)
        dropped = slice(2 * PAGE_SIZE, 5 * PAGE_SIZE)
        assert ram.mm[dropped] == bytes(3 * PAGE_SIZE)
        assert other[dropped] == bytes(3 * PAGE_SIZE)
        assert ram.mm[: 2 * PAGE_SIZE] == data[: 2 * PAGE_SIZE]
        assert other[5 * PAGE_SIZE :] == data[5 * PAGE_SIZE :]
    finally:
        other.close()


def test_discarded_memfd_pages_are_gone_from_memory(ram: Mapping) -> None:
    ram.populate()
    ram.discard(PAGE_SIZE, 2 * PAGE_SIZE)
    placed = ram.placed_host_pages()
    assert not placed[1:3].any()
    assert placed[0] and placed[3:].all()
