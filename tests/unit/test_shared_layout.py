"""SharedLayout: named, aligned NumPy views over memory a helper process maps too."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from livemig.kernel.shared import (
    Counters,
    Field,
    SharedLayout,
    SharedMemory,
    counters_field,
    grouped,
)

PAGE_FIELDS = [Field.of("fault_ns", np.int64, 5), Field.of("received", np.bool_, 5),
               Field.of("owner", np.int8, 5)]


def as_bytes(a: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    return a.reshape(-1).view(np.uint8)


def make_layout() -> SharedLayout:
    return SharedLayout([
        counters_field("counters", ["requests", "zero_filled"]),
        *grouped("pc.ram", PAGE_FIELDS),
        *grouped("mem-huge", PAGE_FIELDS[:2]),
        Field.of("grid", np.uint16, (3, 7)),
    ])


@pytest.fixture
def shared() -> Iterator[tuple[SharedLayout, SharedMemory]]:
    layout = make_layout()
    memory = SharedMemory.create("test-layout", layout.size)
    yield layout, memory
    memory.close()


def test_fields_start_aligned_and_fit_inside_the_size() -> None:
    layout = make_layout()
    ends = 0
    for f in layout.fields:
        start = layout.offsets[f.name]
        assert start % 8 == 0 and start >= ends
        ends = start + f.nbytes
    assert layout.size >= ends and layout.size % 8 == 0


def test_coarser_alignment_is_honoured() -> None:
    layout = SharedLayout([Field.of("a", np.uint8, 3), Field.of("b", np.uint8, 1)], align=64)
    assert layout.offsets == {"a": 0, "b": 64} and layout.size == 128


def test_views_have_the_declared_dtypes_and_shapes() -> None:
    views = make_layout().private()
    assert views["grid"].shape == (3, 7) and views["grid"].dtype == np.uint16
    assert views["pc.ram/fault_ns"].shape == (5,) and views["pc.ram/fault_ns"].dtype == np.int64


def test_writing_one_field_leaves_every_other_field_untouched() -> None:
    layout = make_layout()
    views = layout.private()
    for name in views:
        as_bytes(views[name])[...] = 0xFF
        assert all(not as_bytes(views[other]).any() for other in views if other != name)
        as_bytes(views[name])[...] = 0


def test_two_mappings_of_one_memfd_see_each_others_writes(
        shared: tuple[SharedLayout, SharedMemory]) -> None:
    layout, memory = shared
    mine = layout.views(memory)
    other = SharedMemory.attach(os.dup(memory.fd), memory.size)  # as a helper would
    theirs = layout.views(other)
    mine["pc.ram/fault_ns"][3] = 123456789
    theirs["grid"][2, 6] = 77
    assert theirs["pc.ram/fault_ns"][3] == 123456789
    assert mine["grid"][2, 6] == 77
    mine.release()
    theirs.release()
    other.close()


def test_a_child_process_bumps_counters_the_parent_reads_by_name(
        shared: tuple[SharedLayout, SharedMemory]) -> None:
    layout, memory = shared
    views = layout.views(memory)
    pid = os.fork()
    if pid == 0:  # the child: its own views of the inherited memfd
        child = layout.views(SharedMemory.attach(memory.fd, memory.size)).counters("counters")
        child.add("zero_filled", 41)
        child.add("zero_filled")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    counters = views.counters("counters")
    assert counters["zero_filled"] == 42 and counters["requests"] == 0
    assert counters.as_dict() == {"requests": 0, "zero_filled": 42}
    views.release()


def test_private_views_are_zeroed_and_independent() -> None:
    layout = make_layout()
    a, b = layout.private(), layout.private()
    a.counters("counters").add("requests", 5)
    assert b.counters("counters")["requests"] == 0
    assert not any(as_bytes(b[name]).any() for name in b)


def test_counters_refuse_unknown_names_and_plain_fields() -> None:
    views = make_layout().private()
    with pytest.raises(KeyError):
        views.counters("counters").add("no-such-counter")
    with pytest.raises(ValueError, match="counters_field"):
        Counters(views["grid"])


def test_group_gives_one_blocks_arrays_by_their_own_names() -> None:
    layout = SharedLayout([*grouped("a", PAGE_FIELDS), *grouped("a/b", PAGE_FIELDS[:1])])
    views = layout.private()
    assert sorted(views.group("a")) == ["fault_ns", "owner", "received"]
    assert list(views.group("a/b")) == ["fault_ns"]
    assert views.group("a")["fault_ns"] is views["a/fault_ns"]


def test_layout_errors_are_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="twice"):
        SharedLayout([Field.of("x", np.int8, 1), Field.of("x", np.int8, 1)])
    with pytest.raises(ValueError, match="power of two"):
        SharedLayout([], align=12)
    with pytest.raises(ValueError, match="contains '/'"):
        grouped("blk", [Field.of("a/b", np.int8, 1)])
    with pytest.raises(ValueError, match="no counters"):
        counters_field("c", [])


def test_views_refuse_memory_smaller_than_the_layout() -> None:
    layout = make_layout()
    memory = SharedMemory.create("test-small", layout.size - 8)
    with pytest.raises(ValueError, match="smaller"):
        layout.views(memory)
    memory.close()


def test_released_views_let_the_memory_unmap_cleanly(
        caplog: pytest.LogCaptureFixture) -> None:
    memory, views = make_layout().create("test-release")
    views.counters("counters").add("requests")
    views.release()
    with caplog.at_level(logging.WARNING, logger="livemig.shared"):
        memory.close()
    assert not caplog.records
