"""A 16550 UART at I/O port 0x3f8 (COM1, IRQ 4): output, input and its interrupt.

Theory of operation
-------------------
Writes to THR (0x3f8 with DLAB clear) are guest output, appended to a sink (a file or
stdout) and to a bounded in-memory tail that tests and the demo read.  Transmission is
instant: LSR always says "transmitter empty", so polling guests never wait.

Input (:meth:`Serial.feed`, from the console) goes into a receive FIFO; RBR reads take
from it and LSR bit 0 (data ready) says whether it holds anything.  The UART has two
interrupt sources, as on the real chip: *received data available* (IER bit 0, while the
FIFO is not empty) and *THR empty* (IER bit 1; pending after a THR write or after the
guest enables it, cleared by reading IIR while it is the reported source or by writing
THR).  The interrupt line is the OR of the enabled pending sources; every change of it is
sent to the ``irq`` callback (the VM drives GSI 4 of the in-kernel PIC and IOAPIC), so a
level-triggered interrupt stays asserted until the guest drains the cause.

Everything the guest can observe -- the registers, the FIFO contents and the pending THR
interrupt -- is :class:`SerialState`, saved and restored with the VM.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from livemig.errors import RemoteProtocolError

COM1 = 0x3F8
COM1_IRQ = 4
_LSR_THR_EMPTY = 0x60
_LSR_DATA_READY = 0x01
_IER_RDA, _IER_THRE = 0x01, 0x02
_IIR_NONE, _IIR_THRE, _IIR_RDA = 0x01, 0x02, 0x04
_TAIL_LIMIT = 1 << 16
RX_FIFO_LIMIT = 4096

IrqLine = Callable[[bool], None]


class Sink(Protocol):
    """Where guest output goes: a file, stdout, or an interactive console."""

    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


@dataclass(frozen=True)
class SerialState:
    """The UART as the guest sees it (versioned with the VM state)."""

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0
    dlm: int = 0
    thre_pending: bool = False
    rx: bytes = b""

    _FMT = struct.Struct("<4sH7BH")
    _MAGIC = b"LMSR"
    VERSION = 2

    def to_bytes(self) -> bytes:
        return self._FMT.pack(self._MAGIC, self.VERSION, self.ier, self.lcr, self.mcr,
                              self.scr, self.dll, self.dlm, int(self.thre_pending),
                              len(self.rx)) + self.rx

    @classmethod
    def from_bytes(cls, data: bytes) -> SerialState:
        if len(data) < cls._FMT.size:
            raise RemoteProtocolError(f"serial state is {len(data)} bytes, expected at "
                                      f"least {cls._FMT.size}")
        magic, version, ier, lcr, mcr, scr, dll, dlm, thre, nrx = cls._FMT.unpack_from(data)
        if magic != cls._MAGIC or version != cls.VERSION:
            raise RemoteProtocolError(f"unknown serial state {magic!r} v{version}")
        if nrx > RX_FIFO_LIMIT or len(data) != cls._FMT.size + nrx:
            raise RemoteProtocolError(f"serial state holds {len(data) - cls._FMT.size} "
                                      f"FIFO bytes, its header says {nrx}")
        return cls(ier, lcr, mcr, scr, dll, dlm, bool(thre), bytes(data[cls._FMT.size:]))


class Serial:
    """COM1, writing guest output to ``sink`` (may be None) and to ``tail``."""

    def __init__(self, sink: Sink | None = None, irq: IrqLine | None = None) -> None:
        self.sink = sink
        self._irq = irq
        self._regs = SerialState()
        self._rx = bytearray()
        self._line = False
        self._tail = bytearray()
        self._total = 0
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # registers, FIFO and line (vCPU threads + console)

    def handles(self, port: int) -> bool:
        return COM1 <= port < COM1 + 8

    def write(self, port: int, value: int) -> None:
        reg = port - COM1
        with self._lock:
            dlab = bool(self._regs.lcr & 0x80)
            if reg == 0 and not dlab:
                self._output(value)
                self._regs = replace(self._regs, thre_pending=True)
            else:
                fields = {0: "dll", 1: "dlm" if dlab else "ier", 3: "lcr", 4: "mcr", 7: "scr"}
                if reg in fields:
                    old_ier = self._regs.ier
                    self._regs = _with_register(self._regs, fields[reg], value & 0xFF)
                    if fields[reg] == "ier" and value & _IER_THRE and not old_ier & _IER_THRE:
                        self._regs = replace(self._regs, thre_pending=True)
            self._update_line()

    def read(self, port: int) -> int:
        reg = port - COM1
        with self._lock:
            r = self._regs
            dlab = bool(r.lcr & 0x80)
            if reg == 0 and not dlab:
                value = self._rx.pop(0) if self._rx else 0
            elif reg == 2:
                value = self._iir()
                if value == _IIR_THRE:
                    self._regs = replace(r, thre_pending=False)
            else:
                lsr = _LSR_THR_EMPTY | (_LSR_DATA_READY if self._rx else 0)
                value = {0: r.dll, 1: r.dlm if dlab else r.ier, 3: r.lcr, 4: r.mcr, 5: lsr,
                         6: 0xB0, 7: r.scr}.get(reg, 0xFF)
            self._update_line()
            return value

    def feed(self, data: bytes) -> int:
        """Console input: queue ``data`` for the guest; returns how many bytes fitted."""
        with self._lock:
            n = min(len(data), RX_FIFO_LIMIT - len(self._rx))
            self._rx += data[:n]
            self._update_line()
            return n

    def _iir(self) -> int:
        if self._regs.ier & _IER_RDA and self._rx:
            return _IIR_RDA
        if self._regs.ier & _IER_THRE and self._regs.thre_pending:
            return _IIR_THRE
        return _IIR_NONE

    def _update_line(self) -> None:
        line = self._iir() != _IIR_NONE
        if line != self._line:
            self._line = line
            if self._irq is not None:
                self._irq(line)

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

    def wait_output(self, predicate: Callable[[bytes], bool], timeout: float = 30.0) -> bool:
        """Wait until ``predicate(output)`` holds (bounded)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(bytes(self._tail)), timeout)

    def save(self) -> SerialState:
        with self._lock:
            return replace(self._regs, rx=bytes(self._rx))

    def restore(self, state: SerialState) -> None:
        """Take over a saved UART, including the level of its interrupt line."""
        with self._lock:
            self._regs = replace(state, rx=b"")
            self._rx = bytearray(state.rx)
            self._line = self._iir() == _IIR_NONE  # force the line to be driven
            self._update_line()


def _with_register(state: SerialState, name: str, value: int) -> SerialState:
    regs = {"ier": state.ier, "lcr": state.lcr, "mcr": state.mcr, "scr": state.scr,
            "dll": state.dll, "dlm": state.dlm, name: value}
    return SerialState(regs["ier"], regs["lcr"], regs["mcr"], regs["scr"], regs["dll"],
                       regs["dlm"], state.thre_pending, state.rx)
