"""Receive buffering and bounded readers shared by the sans-IO decoders.

Theory of operation: received data is kept as a queue of immutable ``bytes``
chunks.  Parsing happens on the *head* chunk through a ``Reader``; when a
record straddles chunks, just enough of them are joined into a new head.
Because chunks are never mutated, NumPy views handed out in events stay valid
forever, and joining only happens when a whole record is known to be present,
so each byte is copied at most once more (no quadratic re-buffering).

A parse that runs off the end of the head raises ``Short`` with the head index
it needed; the decoder then joins chunks and retries, or reports NEED_DATA.
Parsers therefore read everything before changing any state, so a retry from
the record start is always safe.  ``Short`` is internal and never escapes a
decoder's public methods.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import NoReturn, TypeVar

from livemig.errors import ChannelClosedError, RemoteProtocolError, StreamError

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Short(Exception):
    """A parse needs the head to extend up to index ``end``."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


class Reader:
    """Big-endian field reader over ``buf[pos:limit]``; overruns raise ``Short``."""

    __slots__ = ("buf", "pos", "limit")

    def __init__(self, buf: bytes, pos: int, limit: int) -> None:
        self.buf = buf
        self.pos = pos
        self.limit = limit

    def remaining(self) -> int:
        return self.limit - self.pos

    def need(self, n: int) -> None:
        """Make sure ``n`` more bytes are readable without consuming them."""
        if self.pos + n > self.limit:
            self.overrun(self.pos + n)

    def overrun(self, end: int) -> NoReturn:
        raise Short(end)

    def u8(self) -> int:
        self.need(1)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def be16(self) -> int:
        self.need(2)
        (value,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def be32(self) -> int:
        self.need(4)
        (value,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def be64(self) -> int:
        self.need(8)
        (value,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def take(self, n: int) -> bytes:
        self.need(n)
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def counted(self) -> bytes:
        """A u8 length followed by that many bytes (QEMU's counted string)."""
        return self.take(self.u8())


class PayloadReader(Reader):
    """Reader over a length-delimited payload: an overrun is a protocol error."""

    __slots__ = ("what",)

    def __init__(self, buf: bytes, what: str) -> None:
        super().__init__(buf, 0, len(buf))
        self.what = what

    def overrun(self, end: int) -> NoReturn:
        raise RemoteProtocolError(
            f"{self.what} payload is too short: needs at least {end} bytes, has {len(self.buf)}."
        )

    def finish(self) -> None:
        """Refuse leftover bytes: a payload must be consumed exactly."""
        if self.pos != self.limit:
            raise RemoteProtocolError(
                f"{self.what} payload has {self.limit - self.pos} unexpected trailing bytes."
            )


def decode_name(raw: bytes, what: str) -> str:
    """Decode a counted name; invalid UTF-8 is the peer's fault."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} name {raw!r} is not valid UTF-8.") from None


class ReceiveBuffer:
    """FIFO of received chunks with a parse position in the head chunk."""

    __slots__ = ("head", "pos", "_chunks", "_tail", "consumed")

    def __init__(self) -> None:
        self.head = b""
        self.pos = 0
        self._chunks: deque[bytes] = deque()
        self._tail = 0  # bytes held in _chunks
        self.consumed = 0  # stream offset of head[pos]

    def feed(self, data: bytes) -> None:
        if self.pos == len(self.head) and not self._chunks:
            self.head, self.pos = data, 0
        else:
            self._chunks.append(data)
            self._tail += len(data)

    def available(self) -> int:
        return len(self.head) - self.pos + self._tail

    def contiguous(self, n: int) -> bool:
        """Make ``head[pos:pos+n]`` contiguous; False if fewer bytes are buffered."""
        have = len(self.head) - self.pos
        if have >= n:
            return True
        if have + self._tail < n:
            return False
        parts: list[bytes | memoryview] = [memoryview(self.head)[self.pos :]]
        while have < n:
            chunk = self._chunks.popleft()
            self._tail -= len(chunk)
            parts.append(chunk)
            have += len(chunk)
        self.head, self.pos = b"".join(parts), 0
        return True

    def advance(self, n: int) -> None:
        self.pos += n
        self.consumed += n
        self._next_chunk_if_exhausted()

    def read_into(self, dest: memoryview) -> int:
        """Move up to ``len(dest)`` buffered bytes into ``dest``; return how many."""
        done = 0
        while done < len(dest):
            self._next_chunk_if_exhausted()
            k = min(len(self.head) - self.pos, len(dest) - done)
            if k == 0:
                break
            dest[done : done + k] = memoryview(self.head)[self.pos : self.pos + k]
            done += k
            self.pos += k
            self.consumed += k
        self._next_chunk_if_exhausted()
        return done

    def _next_chunk_if_exhausted(self) -> None:
        # Dropping the exhausted head lets it be freed once no event views it.
        if self.pos == len(self.head) and self._chunks:
            self.head, self.pos = self._chunks.popleft(), 0
            self._tail -= len(self.head)


T = TypeVar("T")


class StickyError:
    """A decoder's first protocol error is final: every later call raises it again
    (a stream that broke once cannot be resynchronised; h11 has its ERROR state)."""

    def __init__(self) -> None:
        self._error: StreamError | None = None

    def guard(self, step: Callable[[], T]) -> T:
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        try:
            return step()
        except (RemoteProtocolError, ChannelClosedError) as exc:
            self._error = exc
            raise
