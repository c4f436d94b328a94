"""Host-side checks of the test guests' memory on a paused VM.

Theory of operation
-------------------
Both built-in guests (``livemig.guests``) keep an invariant in the first bytes of
every 4 KiB page of their range ``[start, end)``.  After a migration, or any time the
VM is paused, the host can verify it directly in guest RAM; a page that lost an
update (a dirty page that was never resent, a postcopy page placed at the wrong
address, ...) breaks the invariant.  ``ram`` is the whole guest-physical RAM as one
contiguous buffer, guest-physical address 0 at index 0.

*ab* sweeps the pages in order, bumping each page's first byte from ``v`` to ``v+1``
(mod 256).  Paused anywhere, pages ``[0, k)`` hold ``v+1`` and pages ``[k, n)`` hold
``v``; ``k`` may be 0 or ``n``.  Corruption makes that pattern approximate, so
:func:`ab_check` finds the ``(v, k)`` that explains the most pages and reports the
others.  For a fixed ``v``, the pages that do *not* fit are::

    bad(v, k) = n - count(v) - (#{i < k: a[i] = v+1} - #{i < k: a[i] = v})

so the best ``k`` maximises a walk that steps +1 at each page holding ``v+1`` and -1
at each page holding ``v``.  Each page takes part in exactly two walks (``v = a[i]-1``
and ``v = a[i]``), so all 256 walks together have ``2n`` steps: we lay the steps out,
group them by ``v`` with a stable (radix) sort, which keeps each group in page order,
and take per-group prefix sums and maxima -- linear-time NumPy, no Python loop over
pages.  Ties prefer the smallest ``k`` and then the smallest ``v``; in particular a
uniform range holding ``x`` is reported as ``v = x, k = 0``.

*random* keeps each page's page number (address >> 12) in its first u32 LE;
:func:`random_check` compares all of them at once.

*os* (``livemig.guests.os``) tags every page of its regions and keeps per-vCPU pass
counters in them: :func:`os_check`.

Bad pages are always reported as absolute guest page numbers (guest-physical address
>> 12), the same numbering the random guest uses and the migration stream speaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import ConfigError
from livemig.guests.os import OsParams, Pattern
from livemig.units import PAGE_SHIFT, PAGE_SIZE

RamLike = memoryview | bytes | bytearray | npt.NDArray[Any]


@dataclass(frozen=True)
class AbCheckResult:
    """Outcome of :func:`ab_check`.

    ``value`` is ``v`` (the value of pages the current pass has not reached yet) and
    ``boundary`` is ``k`` (how many pages, from ``start``, already hold ``v+1``), for
    the pattern that fits best.  ``bad_pages`` are absolute page numbers.
    """

    pages: int
    bad_pages: tuple[int, ...]
    value: int
    boundary: int

    @property
    def ok(self) -> bool:
        return not self.bad_pages

    def summary(self) -> str:
        head = f"ab: {self.pages} pages, value {self.value}, boundary {self.boundary}"
        return f"{head}: {_bad_summary(self.bad_pages)}"


@dataclass(frozen=True)
class PageCheckResult:
    """Outcome of :func:`random_check` or :func:`os_check` (``guest`` says which);
    ``bad_pages`` are absolute page numbers."""

    guest: str
    pages: int
    bad_pages: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.bad_pages

    def summary(self) -> str:
        return f"{self.guest}: {self.pages} pages: {_bad_summary(self.bad_pages)}"


def ab_check(ram: RamLike, start: int, end: int) -> AbCheckResult:
    """Check the ab guest's pattern in ``ram[start:end]`` (see the module docstring)."""
    first = _page_heads(ram, start, end)[:, 0]
    n = len(first)
    value, boundary = _best_ab_split(first)
    expected_done = np.uint8((value + 1) & 0xFF)
    bad = np.concatenate((first[:boundary] != expected_done, first[boundary:] != np.uint8(value)))
    return AbCheckResult(
        pages=n,
        bad_pages=_absolute(np.flatnonzero(bad), start),
        value=value,
        boundary=boundary,
    )


def random_check(ram: RamLike, start: int, end: int) -> PageCheckResult:
    """Check that every page in ``[start, end)`` starts with its own page number."""
    tags = np.ascontiguousarray(_page_heads(ram, start, end)[:, :4]).view("<u4")[:, 0]
    expected = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.uint32)
    return PageCheckResult(
        guest="random",
        pages=len(tags),
        bad_pages=_absolute(np.flatnonzero(tags != expected), start),
    )


def _best_ab_split(first: npt.NDArray[np.uint8]) -> tuple[int, int]:
    """The ``(v, k)`` that leaves the fewest pages unexplained (ties: smallest k, v)."""
    n = len(first)
    if n == 0:
        return 0, 0
    # Step 2i: page i holds v+1 for v = a[i]-1 (+1); step 2i+1: it holds v = a[i] (-1).
    step_v = np.empty(2 * n, dtype=np.uint8)
    step_v[0::2] = first - np.uint8(1)  # uint8 arithmetic wraps 0 -> 255
    step_v[1::2] = first
    order = np.argsort(step_v, kind="stable")  # radix sort; page order kept per group
    group_v = step_v[order]
    walk = np.cumsum(np.where(order % 2 == 0, 1, -1), dtype=np.int64)
    sizes = np.bincount(group_v, minlength=256)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    # Rebase the global prefix sum so each group's walk starts at 0.
    before = np.where(starts > 0, walk[np.maximum(starts - 1, 0)], 0)
    walk -= np.repeat(before, sizes)
    peak = np.zeros(256, dtype=np.int64)  # k = 0 (an empty prefix) is always allowed
    present = sizes > 0
    peak[present] = np.maximum(np.maximum.reduceat(walk, starts[present]), 0)
    count_v = np.bincount(first, minlength=256)
    unexplained = n - count_v - peak
    best: tuple[int, int] | None = None
    for v in np.flatnonzero(unexplained == unexplained.min()):
        k = _split_for(walk, order, int(starts[v]), int(ends[v]), int(peak[v]))
        if best is None or k < best[1]:
            best = (int(v), k)
    assert best is not None
    return best


def _split_for(
    walk: npt.NDArray[np.int64], order: npt.NDArray[np.intp], lo: int, hi: int, peak: int
) -> int:
    """Smallest k reaching ``peak`` in the walk of one group (``walk[lo:hi]``)."""
    if peak == 0:
        return 0
    j = lo + int(np.argmax(walk[lo:hi] == peak))
    return int(order[j]) // 2 + 1  # the step at page i makes k = i + 1 pages


def _page_heads(ram: RamLike, start: int, end: int) -> npt.NDArray[np.uint8]:
    """A (pages, 4096) uint8 view of ``ram[start:end]`` (no copy)."""
    buf = np.frombuffer(ram, dtype=np.uint8)
    if start % PAGE_SIZE or end % PAGE_SIZE:
        raise ConfigError(f"Range [{start:#x}, {end:#x}) must be aligned to {PAGE_SIZE} bytes.")
    if not 0 <= start <= end <= len(buf):
        raise ConfigError(
            f"Range [{start:#x}, {end:#x}) does not fit in {len(buf):#x} bytes of RAM."
        )
    return buf[start:end].reshape(-1, PAGE_SIZE)


def _absolute(indexes: npt.NDArray[np.intp], start: int) -> tuple[int, ...]:
    return tuple((indexes + (start >> PAGE_SHIFT)).tolist())


def _bad_summary(bad: tuple[int, ...]) -> str:
    if not bad:
        return "OK"
    shown = ", ".join(f"{p:#x}" for p in bad[:8])
    more = f", ... ({len(bad)} in all)" if len(bad) > 8 else ""
    return f"{len(bad)} bad page(s): {shown}{more}"


def os_check(ram: RamLike, params: OsParams) -> PageCheckResult:
    """Check the os guest's regions on a paused VM (layout in ``livemig.guests.os``).

    Every page of a region must carry its tag (``gpa | owner``) in its first qword.  Each
    vCPU's pass counters -- one slot per private page, its own slot in every shared page
    -- hold two values at most, ``g`` and ``g + 1`` (a pass is under way); with the hot
    pattern, pages outside the hot set were visited only once, at start, and hold 0.
    """
    bad: list[npt.NDArray[np.intp]] = []
    pages = 0
    hot = params.hot_pages if params.pattern is Pattern.HOT else None
    for cpu in range(params.ncpus):
        counters = []
        for base, n, owner, slot in ((params.private_base(cpu), params.private_pages,
                                      cpu + 1, 1),
                                     (params.shared_base, params.shared_pages, 0xFFF,
                                      1 + cpu)):
            heads = _page_heads(ram, base, base + n * PAGE_SIZE).view("<u8")
            expected = np.arange(base, base + n * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            bad.append(np.flatnonzero(heads[:, 0] != (expected | np.uint64(owner)))
                       + (base >> PAGE_SHIFT))
            counts = heads[:, slot]
            if hot is not None:
                bad.append(np.flatnonzero(counts[hot:] != 0) + hot + (base >> PAGE_SHIFT))
                counts = counts[:hot]
            counters.append((counts, base))
            if cpu == 0 or owner != 0xFFF:
                pages += n
        low = min(int(c.min()) for c, _ in counters)
        for counts, base in counters:
            bad.append(np.flatnonzero((counts < low) | (counts > low + 1))
                       + (base >> PAGE_SHIFT))
    flat = np.unique(np.concatenate(bad)) if bad else np.empty(0, dtype=np.intp)
    return PageCheckResult("os", pages, tuple(int(p) for p in flat))
