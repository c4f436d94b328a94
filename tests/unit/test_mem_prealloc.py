"""Preallocated guest RAM (``--mem-prealloc``, QEMU's ``prealloc=on``).

A preallocated mapping has every host page present before anything touches it (so a
migration writing it later pays no first-touch fault); a discard still empties it (what
postcopy needs of a destination's RAM at POSTCOPY_ADVISE).
"""

from __future__ import annotations

import pytest
from conftest import needs_root

from livemig.kernel.mman import MIB, Backing, map_guest_ram

SIZE = 8 * MIB


@pytest.fixture(params=[pytest.param(Backing.ANON_4K, id="4K"),
                        pytest.param(Backing.MEMFD_4K, id="4K-memfd"),
                        pytest.param(Backing.HUGETLB_2M, id="2M", marks=needs_root)])
def backing(request: pytest.FixtureRequest) -> Backing:
    b: Backing = request.param
    if b.is_hugetlb:
        request.getfixturevalue("hugepages_restored")
    return b


def test_preallocated_guest_ram_is_present_before_any_touch(backing: Backing) -> None:
    mapping = map_guest_ram(SIZE, backing, "prealloc-test", reserve=True, prealloc=True)
    try:
        assert mapping.placed_host_pages().all()
        assert not any(mapping.mm[:SIZE:4096])  # and reads as zeroes
    finally:
        mapping.close()


def test_guest_ram_without_prealloc_stays_unallocated(backing: Backing) -> None:
    mapping = map_guest_ram(SIZE, backing, "prealloc-test", reserve=True)
    try:
        assert not mapping.placed_host_pages().any()
    finally:
        mapping.close()


def test_discarding_preallocated_ram_empties_it(backing: Backing) -> None:
    mapping = map_guest_ram(SIZE, backing, "prealloc-test", reserve=True, prealloc=True)
    try:
        mapping.discard(0, SIZE)
        assert not mapping.placed_host_pages().any()
    finally:
        mapping.close()
