"""RAM record helpers: MEM_SIZE parsing and vectorized page-record scans.

Theory of operation: every RAM record starts with a be64 word whose low 12
bits are RAM_SAVE_FLAG_* and whose high bits are a page-aligned byte offset
(or, for MEM_SIZE, the total RAM size).  Page records of one block usually
come in long runs of ``CONTINUE|PAGE`` records with a fixed 4104-byte stride,
so the decoder validates a whole run at once here: a strided NumPy view picks
out the header words, one vector compare checks every flag and bound, and the
page payloads are returned as a strided (N, 4096) view -- no per-page Python.
The scans stop at the first record that does not qualify; the decoder's
record-at-a-time path then handles (and, if need be, rejects) that record.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from livemig.errors import RemoteProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo
from livemig.wire.buffer import Reader, decode_name
from livemig.wire.constants import (
    FLAG_MASK,
    OFFSET_MASK,
    PAGE_CONT,
    PAGE_RECORD_SIZE,
    ZERO_CONT,
    ZERO_RECORD_SIZE,
)
from livemig.wire.events import MemSize, MemSizeEntry

U64Array = npt.NDArray[np.uint64]
_EMPTY: U64Array = np.zeros(0, dtype=np.uint64)


def parse_mem_size(
    r: Reader, total: int, blocks: Mapping[str, BlockInfo], postcopy: bool
) -> MemSize:
    """Read the per-block list of a MEM_SIZE record and check it against ``blocks``.

    QEMU's rule: a be64 page size follows a block's length only when postcopy is
    enabled and the (local) block's page size differs from 4096.
    """
    entries: list[MemSizeEntry] = []
    left = total
    while left > 0:
        entry = _mem_size_entry(r, blocks, postcopy, {e.name for e in entries})
        if entry.length > left:
            raise RemoteProtocolError(
                f"MEM_SIZE total {total} is smaller than the sum of its block lengths."
            )
        left -= entry.length
        entries.append(entry)
    missing = set(blocks) - {e.name for e in entries}
    if missing:
        raise RemoteProtocolError(
            f"MEM_SIZE does not announce local RAM block(s) {sorted(missing)}."
        )
    return MemSize(total, tuple(entries))


def _mem_size_entry(
    r: Reader, blocks: Mapping[str, BlockInfo], postcopy: bool, seen: set[str]
) -> MemSizeEntry:
    name = decode_name(r.counted(), "MEM_SIZE block")
    info = blocks.get(name)
    if info is None:
        raise RemoteProtocolError(f"MEM_SIZE announces unknown RAM block {name!r}.")
    if name in seen:
        raise RemoteProtocolError(f"MEM_SIZE announces RAM block {name!r} twice.")
    length = r.be64()
    if length != info.length:
        raise RemoteProtocolError(
            f"RAM block {name!r} is {length} bytes on the source but {info.length} here."
        )
    page_size = None
    if postcopy and info.page_size != PAGE_SIZE:
        page_size = r.be64()
        if page_size != info.page_size:
            raise RemoteProtocolError(
                f"RAM block {name!r} uses {page_size}-byte pages on the source but "
                f"{info.page_size} here; postcopy needs them equal."
            )
    return MemSizeEntry(name, length, page_size)


def scan_pages(head: bytes, pos: int, limit: int, block_len: int) -> U64Array:
    """Offsets of the leading run of valid ``CONTINUE|PAGE`` records at ``head[pos:limit]``."""
    return _scan(head, pos, limit, block_len, PAGE_RECORD_SIZE, PAGE_CONT)


def scan_zeros(head: bytes, pos: int, limit: int, block_len: int) -> U64Array:
    """Offsets of the leading run of valid ``CONTINUE|ZERO`` records (fill byte 0)."""
    return _scan(head, pos, limit, block_len, ZERO_RECORD_SIZE, ZERO_CONT)


def page_view(head: bytes, first_payload: int, count: int) -> npt.NDArray[np.uint8]:
    """Read-only (count, 4096) view of ``count`` page payloads, 4104 bytes apart."""
    return np.ndarray(
        (count, PAGE_SIZE), dtype=np.uint8, buffer=head, offset=first_payload,
        strides=(PAGE_RECORD_SIZE, 1),
    )


def _scan(
    head: bytes, pos: int, limit: int, block_len: int, stride: int, flags: int
) -> U64Array:
    """The run is checked in windows that start small and double while every record
    qualifies, so the work is proportional to the run found (plus one first window),
    not to the bytes buffered: a buffer of short runs stays linear to decode."""
    total = (limit - pos) // stride
    if total == 0 or block_len < PAGE_SIZE:
        return _EMPTY
    runs: list[U64Array] = []
    done, window = 0, _FIRST_WINDOW
    while done < total:
        k = min(window, total - done)
        offsets, n = _scan_window(head, pos + done * stride, k, block_len, stride, flags)
        runs.append(offsets[:n])
        done += n
        if n < k:
            break
        window *= 2
    result: U64Array = runs[0] if len(runs) == 1 else np.concatenate(runs)
    return result


_FIRST_WINDOW = 64  # records checked before the window doubles


def _scan_window(head: bytes, pos: int, k: int, block_len: int, stride: int,
                 flags: int) -> tuple[U64Array, int]:
    """Offsets of ``k`` records at ``pos`` and how many lead the run."""
    words = np.ndarray((k,), dtype=">u8", buffer=head, offset=pos, strides=(stride,))
    words = words.astype(np.uint64)
    offsets: U64Array = words & np.uint64(OFFSET_MASK)
    ok = (words & np.uint64(FLAG_MASK)) == flags
    ok &= offsets <= np.uint64(block_len - PAGE_SIZE)
    if stride == ZERO_RECORD_SIZE:
        fill = np.ndarray((k,), dtype=np.uint8, buffer=head, offset=pos + 8, strides=(stride,))
        ok &= fill == 0
    return offsets, (k if ok.all() else int(np.argmin(ok)))
