"""Which migration channel a fresh connection is.

Theory of operation: a postcopy-preempt migration opens two connections from
source to destination, and the network may deliver them in either order.
QEMU 7.2 assumes the first accepted connection is the main one; we do not.
Every livemig channel starts with four distinctive bytes -- ``QEVM`` for the
main channel (QEMU's own file magic) and ``LMPC`` for the postcopy channel --
so the destination peeks at them and routes the connection, whatever order
the connections arrived in.  The four bytes stay part of the stream: hand
them to the channel's decoder too.  A multifd channel starts with QEMU's
``MULTIFD_MAGIC`` (be32 0x11223344), the first field of its initial packet.

With TLS the main and multifd channels are TLS from their first byte (QEMU's), while
the postcopy channel's preamble (magic and version) goes in clear before its TLS session
(:func:`clear_prefix`): it routes the connection before any process holds a session on
it (docs/STREAM.md).
"""

from __future__ import annotations

from enum import Enum

from livemig.errors import RemoteProtocolError
from livemig.wire.constants import (
    MULTIFD_MAGIC_BYTES,
    POSTCOPY_MAGIC,
    POSTCOPY_PREAMBLE_SIZE,
    QEVM_MAGIC_BYTES,
)


class ChannelKind(Enum):
    """The kinds of source-to-destination channel."""

    MAIN = "main"
    POSTCOPY = "postcopy"
    MULTIFD = "multifd"


def identify_channel(first4: bytes | bytearray | memoryview) -> ChannelKind:
    """Classify a connection by its first four bytes, or raise RemoteProtocolError."""
    head = bytes(first4)
    if len(head) != 4:
        raise RemoteProtocolError(
            f"Cannot identify the channel from {len(head)} bytes; exactly 4 are needed."
        )
    if head == QEVM_MAGIC_BYTES:
        return ChannelKind.MAIN
    if head == POSTCOPY_MAGIC:
        return ChannelKind.POSTCOPY
    if head == MULTIFD_MAGIC_BYTES:
        return ChannelKind.MULTIFD
    raise RemoteProtocolError(
        f"Unknown channel magic {head!r}: expected {QEVM_MAGIC_BYTES!r} (main), "
        f"{POSTCOPY_MAGIC!r} (postcopy) or {MULTIFD_MAGIC_BYTES!r} (multifd)."
    )


def clear_prefix(kind: ChannelKind) -> int:
    """With TLS, how many bytes of a channel travel in clear before its session: the
    postcopy channel's preamble, nothing of the main channel."""
    return POSTCOPY_PREAMBLE_SIZE if kind is ChannelKind.POSTCOPY else 0
