"""The RAM block table both ends must agree on.

Theory of operation: QEMU names every region of guest RAM ("RAMBlock") and
addresses pages as (block name, byte offset).  The decoder is handed the
destination's table so it can refuse anything that does not fit it: unknown
names, offsets past the end, a MEM_SIZE announcement that disagrees.  Lengths
and page sizes are validated here once, so the codec can trust them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from livemig.errors import ConfigError, LocalProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire.constants import MAX_IDSTR


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One RAM block: ``length`` bytes backed by pages of ``page_size`` bytes."""

    length: int
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps < PAGE_SIZE or ps & (ps - 1):
            raise ConfigError(
                f"RAM block page size {ps} is not a power of two of at least {PAGE_SIZE}."
            )
        if self.length <= 0 or self.length % ps:
            raise ConfigError(
                f"RAM block length {self.length} is not a positive multiple of its "
                f"page size {ps}."
            )


def check_block_name(name: str) -> bytes:
    """Return the wire form of a block or section name, or raise ConfigError."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_IDSTR:
        raise ConfigError(f"Name {name!r} must be 1 to {MAX_IDSTR} bytes of UTF-8.")
    return raw


def local_name(name: str) -> bytes:
    """Like check_block_name, for names we are about to send: a LocalProtocolError."""
    try:
        return check_block_name(name)
    except ConfigError as exc:
        raise LocalProtocolError(str(exc)) from None


def host_page_summary(blocks: Mapping[str, BlockInfo]) -> int:
    """OR of all block page sizes: what QEMU sends in POSTCOPY_ADVISE."""
    summary = 0
    for info in blocks.values():
        summary |= info.page_size
    return summary
