"""Cut a QMP input byte stream into JSON texts, the way QEMU's JSON streamer does.

Theory of operation
-------------------
QMP clients write JSON values back to back on a stream socket, with no framing: no
length prefix and (for ``qemu.qmp``) no trailing newline.  A value may arrive split
over many reads, and one read may carry several values.  Trying ``json.loads`` on the
whole buffer cannot tell "incomplete, wait for more" from "malformed, report it", so,
like QEMU's ``json-streamer.c``, :class:`JsonSplitter` does not parse at all: it only
tracks the bracket nesting and whether it is inside a string, and cuts the stream
where a top-level value ends.  Each cut piece is then decoded on its own by
:func:`decode_json`; a piece that fails to decode becomes one error reply and the
stream carries on after it, which is how a session resynchronises after bad input.

The scan is incremental (state survives between reads, bytes are looked at once) and
works on raw bytes: the structural characters are ASCII and never occur inside a
multi-byte UTF-8 sequence, so decoding can wait until a piece is complete.

Memory is bounded: when an unfinished value outgrows ``limit`` bytes its bytes are
dropped while the scan goes on, and when it finally ends a :class:`Rejected` stands in
for it.  Nesting is bounded too, because the decoder recurses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from livemig.errors import QmpError

DEFAULT_LIMIT = 1 << 20
DEFAULT_MAX_DEPTH = 512

# Inside a structure only quotes and brackets matter; inside a string only the quote
# that ends it and the backslash that may escape that quote.
_STRUCTURAL = re.compile(rb'["{}\[\]]')
_STRING_SPECIAL = re.compile(rb'["\\]')
# A bare scalar (number, true, false, null) ends at whitespace or any JSON punctuation.
_SCALAR_END = re.compile(rb'[\s{}\[\],:"]')
_WHITESPACE = b" \t\r\n"
_SCALAR_START = b"-0123456789tfn"
_OPENERS: Mapping[int, int] = MappingProxyType({ord("{"): ord("}"), ord("["): ord("]")})
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


@dataclass(frozen=True)
class Rejected:
    """A piece of input dropped without decoding; ``reason`` completes "JSON parse error, "."""

    reason: str


class JsonSplitter:
    """Incrementally split a byte stream into top-level JSON texts (see module doc)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._limit = limit
        self._max_depth = max_depth
        self._buf = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._pos = 0  # next byte of _buf to scan
        self._mode = "idle"  # idle | nested | scalar
        self._closers: list[int] = []  # expected closing brackets, innermost last
        self._in_string = False
        self._escape = False
        self._dropped = 0  # bytes of the current value already discarded (too large)
        self._too_deep = False

    def feed(self, data: bytes) -> list[bytes | Rejected]:
        """Add ``data``; return every piece completed by it, in stream order."""
        self._buf += data
        pieces: list[bytes | Rejected] = []
        while (piece := self._next_piece()) is not None:
            pieces.append(piece)
        self._bound_buffer()
        return pieces

    def _next_piece(self) -> bytes | Rejected | None:
        if self._mode == "idle" and not self._start_value():
            return None
        if self._mode == "scalar":
            return self._scan_scalar()
        if self._mode == "nested":
            return self._scan_nested()
        # _start_value found junk that can never be JSON: hand it over at once.
        return self._cut(self._junk_end())

    def _start_value(self) -> bool:
        """Skip whitespace and classify the next value; False if the buffer is empty."""
        start = 0
        while start < len(self._buf) and self._buf[start] in _WHITESPACE:
            start += 1
        del self._buf[:start]
        if not self._buf:
            return False
        first = self._buf[0]
        self._pos = 1
        if first in _OPENERS:
            self._mode = "nested"
            self._closers = [_OPENERS[first]]
        elif first == _QUOTE:
            self._mode = "nested"  # a top-level string: nested with nothing open
            self._in_string = True
        elif first in _SCALAR_START:
            self._mode = "scalar"
        else:
            self._mode = "junk"
        return True

    def _junk_end(self) -> int:
        # Resynchronise at the next object opener: one error for a run of garbage.
        end = self._buf.find(b"{", 1)
        return len(self._buf) if end < 0 else end

    def _scan_scalar(self) -> bytes | Rejected | None:
        match = _SCALAR_END.search(self._buf, self._pos)
        if match is None:
            self._pos = len(self._buf)
            return None
        return self._cut(match.start())

    def _scan_nested(self) -> bytes | Rejected | None:
        while True:
            if self._in_string:
                if not self._scan_string():
                    return None
                if not self._closers:
                    return self._cut(self._pos)
                continue
            match = _STRUCTURAL.search(self._buf, self._pos)
            if match is None:
                self._pos = len(self._buf)
                return None
            self._pos = match.end()
            if self._structural(self._buf[match.start()]):
                return self._cut(self._pos)

    def _scan_string(self) -> bool:
        """Advance through a string; True once its closing quote has been consumed."""
        while True:
            if self._escape:
                if self._pos >= len(self._buf):
                    return False
                self._pos += 1
                self._escape = False
            match = _STRING_SPECIAL.search(self._buf, self._pos)
            if match is None:
                self._pos = len(self._buf)
                return False
            self._pos = match.end()
            if self._buf[match.start()] == _BACKSLASH:
                self._escape = True
                continue
            self._in_string = False
            return True

    def _structural(self, char: int) -> bool:
        """Account for one quote or bracket; True if the value ends (or breaks) here."""
        if char == _QUOTE:
            self._in_string = True
            return False
        if char in _OPENERS:
            self._closers.append(_OPENERS[char])
            self._too_deep = len(self._closers) > self._max_depth
            return self._too_deep
        if self._closers[-1] != char:
            return True  # mismatched bracket: cut here, decoding will report it
        self._closers.pop()
        return not self._closers

    def _cut(self, end: int) -> bytes | Rejected:
        piece = bytes(self._buf[:end])
        del self._buf[:end]
        dropped, too_deep = self._dropped, self._too_deep
        self._reset()
        if too_deep:
            return Rejected(f"nesting deeper than {self._max_depth} levels")
        if dropped:
            return Rejected(f"value larger than {self._limit} bytes")
        return piece

    def _bound_buffer(self) -> None:
        # Whatever is left is one unfinished value; past the limit keep only its scan state.
        if len(self._buf) > self._limit:
            self._dropped += len(self._buf)
            self._buf.clear()
            self._pos = 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def parse_error(reason: str) -> QmpError:
    """The error QEMU answers bad JSON with (class GenericError)."""
    return QmpError(f"JSON parse error, {reason}")


def decode_json(piece: bytes) -> Any:
    """Decode one piece cut by :class:`JsonSplitter`; raise :class:`QmpError` if invalid.

    Stricter than ``json.loads``: NaN/Infinity and duplicate keys are refused, as QEMU's
    parser refuses them.
    """
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise parse_error("invalid UTF-8 sequence") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise parse_error("nesting too deep") from exc
    except ValueError as exc:  # JSONDecodeError is a ValueError
        reason = str(exc)
        raise parse_error(reason[:1].lower() + reason[1:]) from exc
