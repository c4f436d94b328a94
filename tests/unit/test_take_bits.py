"""Taking dirty pages from a bitmap (bitmap.take_bits): the first ``most`` dirty pages
of a range, in order, each cleared exactly once, however the dirty pages lie -- dense,
scattered, found only far into the range, or a range running past the bitmap's end."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.migration.bitmap import take_bits


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    n = draw(st.integers(1, 6000))
    density = draw(st.sampled_from([0.0, 0.001, 0.05, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    bits = np.random.default_rng(seed).random(n) < density
    first = draw(st.integers(0, n - 1))
    count = draw(st.integers(0, 2 * n))  # the range may run past the end
    most = draw(st.integers(1, 1200))
    return bits, first, count, most


@given(bitmaps())
def test_the_first_most_dirty_pages_of_the_range_are_taken_in_order_and_cleared(
        case: tuple[np.ndarray, int, int, int]) -> None:
    bits, first, count, most = case
    before = bits.copy()
    taken = take_bits(bits, first, count, threading.Lock(), most)
    expected = np.flatnonzero(before[first : first + count])[:most] + first
    assert taken.tolist() == expected.tolist()
    after = before.copy()
    after[expected] = False
    assert (bits == after).all()


def test_a_dirty_page_far_into_the_range_is_found() -> None:
    bits = np.zeros(1 << 16, dtype=np.bool_)
    bits[[5, (1 << 16) - 1]] = True
    taken = take_bits(bits, 0, 1 << 16, threading.Lock(), 512)
    assert taken.tolist() == [5, (1 << 16) - 1]
    assert not bits.any()
