"""Zero-page detection on the source: a page is sent as zero only if every byte of it is
zero, whichever word holds its data and however the pages asked about are spread."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.migration.bitmap import split_zero_pages
from livemig.units import PAGE_SIZE

WORDS = PAGE_SIZE // 8
PAGES = 64


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, WORDS - 1)),
                     max_size=40),
       asked=st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=PAGES, unique=True))
def test_a_page_is_zero_only_when_every_word_of_it_is_zero(
        data: list[tuple[int, int]], asked: list[int]) -> None:
    words = np.zeros((PAGES, WORDS), dtype=np.uint64)
    for page, word in data:
        words[page, word] = np.uint64(1) << np.uint64(word % 64)
    rows = np.array(sorted(asked), dtype=np.int64)
    w = split_zero_pages(words, rows, rows + 1000)
    holds_data = {p for p, _ in data}
    assert sorted(w.pages.tolist()) == [p + 1000 for p in rows.tolist() if p in holds_data]
    assert sorted(w.zeros.tolist()) == [p + 1000 for p in rows.tolist()
                                        if p not in holds_data]


def test_zero_pages_are_found_in_guest_ram_without_writing_it() -> None:
    """The test reads RAM in place: a read-only view of it is enough."""
    words = np.zeros((PAGES, WORDS), dtype=np.uint64)
    words[5, WORDS - 1] = 7
    words[40, 0] = 1
    words.setflags(write=False)
    rows = np.arange(PAGES, dtype=np.int64)
    w = split_zero_pages(words, rows, rows)
    assert w.pages.tolist() == [5, 40]
    assert len(w.zeros) == PAGES - 2
