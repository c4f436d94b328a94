"""A minimal 16550 UART at I/O port 0x3f8: enough for guests that poll and print.

Theory of operation
-------------------
Writes to THR (0x3f8 with DLAB clear) are guest output, appended to a sink (a file or
stdout) and to a bounded in-memory tail that tests and the demo read.  LSR (0x3fd)
always reads "transmitter empty" (0x60), so polling guests never wait.  The other
registers just hold what was written, and are saved and restored with the VM so a
migrated guest sees the same UART.  No interrupts are raised: livemig guests poll.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO

from livemig.errors import RemoteProtocolError

COM1 = 0x3F8
_LSR_THR_EMPTY = 0x60
_TAIL_LIMIT = 1 << 16


@dataclass(frozen=True)
class SerialState:
    """The UART registers a guest can observe (versioned with the VM state)."""

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0
    dlm: int = 0

    _FMT = struct.Struct("<4sH6B")
    _MAGIC = b"LMSR"
    VERSION = 1

    def to_bytes(self) -> bytes:
        return self._FMT.pack(self._MAGIC, self.VERSION, self.ier, self.lcr, self.mcr,
                              self.scr, self.dll, self.dlm)

    @classmethod
    def from_bytes(cls, data: bytes) -> SerialState:
        if len(data) != cls._FMT.size:
            raise RemoteProtocolError(f"serial state is {len(data)} bytes, expected "
                                      f"{cls._FMT.size}")
        magic, version, *regs = cls._FMT.unpack(data)
        if magic != cls._MAGIC or version != cls.VERSION:
            raise RemoteProtocolError(f"unknown serial state {magic!r} v{version}")
        return cls(*regs)


class Serial:
    """COM1, writing guest output to ``sink`` (may be None) and to ``tail``."""

    def __init__(self, sink: BinaryIO | None = None) -> None:
        self.sink = sink
        self._regs = SerialState()
        self._tail = bytearray()
        self._total = 0
        self._cond = threading.Condition()

    def handles(self, port: int) -> bool:
        return COM1 <= port < COM1 + 8

    def write(self, port: int, value: int) -> None:
        reg = port - COM1
        dlab = bool(self._regs.lcr & 0x80)
        if reg == 0 and not dlab:
            self._output(value)
            return
        fields = {0: "dll", 1: "dlm" if dlab else "ier", 3: "lcr", 4: "mcr", 7: "scr"}
        if reg in fields:
            self._regs = _replace(self._regs, fields[reg], value)

    def read(self, port: int) -> int:
        reg = port - COM1
        dlab = bool(self._regs.lcr & 0x80)
        values = {0: self._regs.dll if dlab else 0, 1: self._regs.dlm if dlab else self._regs.ier,
                  2: 0x01, 3: self._regs.lcr, 4: self._regs.mcr, 5: _LSR_THR_EMPTY,
                  6: 0xB0, 7: self._regs.scr}
        return values.get(reg, 0xFF)

    def _output(self, byte: int) -> None:
        if self.sink is not None:
            self.sink.write(bytes([byte]))
            self.sink.flush()
        with self._cond:
            self._tail.append(byte)
            if len(self._tail) > _TAIL_LIMIT:
                del self._tail[: len(self._tail) - _TAIL_LIMIT]
            self._total += 1
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        """The last 64 KiB the guest printed."""
        with self._cond:
            return bytes(self._tail)

    @property
    def total_bytes(self) -> int:
        with self._cond:
            return self._total

    def wait_for(self, count: int, byte: bytes = b"B", timeout: float = 30.0) -> bool:
        """Wait until ``byte`` was printed ``count`` more times than now (bounded)."""
        with self._cond:
            start = self._tail.count(byte)
            return self._cond.wait_for(lambda: self._tail.count(byte) - start >= count
                                       or b"E" in self._tail, timeout)

    def save(self) -> SerialState:
        return self._regs

    def restore(self, state: SerialState) -> None:
        self._regs = state


def _replace(state: SerialState, field: str, value: int) -> SerialState:
    from dataclasses import replace
    return replace(state, **{field: value & 0xFF})
