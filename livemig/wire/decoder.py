"""Sans-IO decoder of a livemig migration channel (QEMU 7.2 stream format).

Theory of operation
-------------------
The decoder never touches a socket.  Feed it bytes with ``receive_data()``,
signal the end of the transport with ``receive_eof()``, and pull typed events
(see ``livemig.wire.events``) with ``next_event()`` until it returns
``NEED_DATA``.  Parsing is a small state machine::

    PREAMBLE --> TOP <--> RAM (inside a "ram" section) --> ... --> DONE --> CLOSED
                            \\--> PAYLOAD (a PageHeader's bytes are pending)

The postcopy channel skips TOP: after its ``LMPC`` preamble it is all RAM
records and ends with an EOS record.

Every record is parsed whole from a contiguous buffer; if it is not all there,
the decoder joins just enough received chunks and retries, or asks for more
data.  A record may never need more than ``max_record`` bytes, so a hostile
peer cannot make the decoder buffer without bound.  Errors are sticky: after a
``RemoteProtocolError`` or ``ChannelClosedError`` every later call raises again.

Hot paths
---------
*Batch path*: when the buffer holds a run of ``CONTINUE|PAGE`` records of one
block, one ``PageBatch`` covers all of them: flags and bounds are checked with
NumPy and ``data`` is a strided (N, 4096) view into the received bytes, so the
caller places every page with one vectorised copy, e.g.
``ram2d[batch.offsets // 4096] = batch.data``.

*Single-page path*: when a PAGE record's header has arrived but its 4096-byte
payload has not, the decoder yields ``PageHeader(block, offset)`` and enters
payload mode.  The caller then

1. calls ``n = take_payload(dest)`` with ``dest`` = the page's 4096-byte slot
   (a writable memoryview): it moves whatever is already buffered, at most
   ``payload_remaining`` bytes, and returns the count;
2. may read the rest straight from the socket into ``dest[n:]`` (``recv_into``)
   and report each read with ``payload_received(k)`` -- allowed only while the
   decoder holds no buffered bytes, so stream order is kept;
3. continues with ``next_event()`` once ``payload_remaining`` is 0 (calling it
   earlier raises LocalProtocolError; after ``receive_eof()`` it reports the
   truncation instead).

Alternatively, keep calling ``receive_data()`` + ``take_payload()``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np

from livemig.errors import (
    ChannelClosedError,
    LocalProtocolError,
    RemoteProtocolError,
)
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo
from livemig.wire.buffer import Reader, ReceiveBuffer, Short, StickyError, decode_name
from livemig.wire.channel import ChannelKind
from livemig.wire.commands import parse_command
from livemig.wire.constants import (
    COMMAND_LENGTHS,
    DEVICE_PREFIX,
    FLAG_MASK,
    KNOWN_RAM_FLAGS,
    MACHINE_NAME,
    MAX_DEVICE_STATE,
    MAX_MACHINE_NAME,
    MAX_RECORD,
    MAX_VMDESC,
    OFFSET_MASK,
    PAGE_CONT,
    PAGE_RECORD_SIZE,
    POSTCOPY_MAGIC,
    POSTCOPY_VERSION,
    QEVM_MAGIC,
    QEVM_VERSION,
    QEVM_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    ZERO_CONT,
    ZERO_RECORD_SIZE,
    Command,
    RamFlag,
    SectionType,
)
from livemig.wire.events import (
    NEED_DATA,
    Closed,
    DeviceState,
    Event,
    MemSize,
    MultifdFlush,
    NeedData,
    Packaged,
    PackagedEnd,
    PageBatch,
    PageHeader,
    SectionBegin,
    SectionComplete,
    StreamEnd,
    StreamStart,
    VmDescriptionEvent,
    ZeroPages,
)
from livemig.wire.ram import page_view, parse_mem_size, scan_pages, scan_zeros
from livemig.wire.vmdesc import parse_description

_PACKAGED_HEADER = 1 + 2 + 2 + 4  # COMMAND byte, cmd, len, be32 blob length


class _State(Enum):
    PREAMBLE = auto()
    TOP = auto()
    RAM = auto()
    PAYLOAD = auto()
    DONE = auto()
    CLOSED = auto()


@dataclass(frozen=True, slots=True)
class _OpenSection:
    kind: SectionType
    section_id: int


class Decoder:
    """Decode one channel; ``blocks`` is the destination's RAM block table.

    ``postcopy`` must match the source's postcopy-ram capability (it changes the
    MEM_SIZE layout).  ``devices`` restricts the FULL section idstrs accepted;
    by default any ``livemig/...`` idstr is.
    """

    def __init__(
        self,
        blocks: Mapping[str, BlockInfo],
        *,
        channel: ChannelKind = ChannelKind.MAIN,
        postcopy: bool = False,
        machine: str = MACHINE_NAME,
        devices: Collection[str] | None = None,
        max_record: int = MAX_RECORD,
        max_device_state: int = MAX_DEVICE_STATE,
        resumed: Collection[int] = (),
    ) -> None:
        """``resumed``: ids of iterable sections started on an earlier connection of the
        same migration (postcopy recovery): their PART and END sections may follow the
        preamble without a START."""
        self._blocks = dict(blocks)
        self._channel = channel
        self._postcopy = postcopy
        self._machine = machine
        self._devices = None if devices is None else frozenset(devices)
        self._max_record = max_record
        self._max_device_state = min(max_device_state, max_record)
        self._buf = ReceiveBuffer()
        self._state = _State.PREAMBLE
        self._eof = False
        self._sticky = StickyError()
        self._last_block: str | None = None  # per channel, like QEMU's last_recv_block
        self._iterables: dict[int, bool] = {sid: False for sid in resumed}  # -> has ENDed
        self._device_ids: set[int] = set()
        self._section: _OpenSection | None = None
        self._mem_size_seen = bool(resumed)
        self._pkg_end: int | None = None  # stream offset where the PACKAGED blob ends
        self._payload_left = 0
        self._described = False  # the VM description after EOF has been read

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` means EOF, as in h11.

        ``bytes`` are kept as they are; other buffers are copied once, because the
        caller may reuse them.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() was called after receive_eof().")
        if len(data) == 0:
            self.receive_eof()
            return
        self._buf.feed(data if isinstance(data, bytes) else bytes(data))

    def receive_eof(self) -> None:
        """The transport reached EOF; the stream must already be complete."""
        self._eof = True

    @property
    def last_block(self) -> str | None:
        """Block a CONTINUE record on this channel would refer to."""
        return self._last_block

    # ----------------------------------------------------------------- events
    def next_event(self) -> Event | NeedData:
        """Return the next event, or NEED_DATA; raise StreamError subclasses."""
        return self._sticky.guard(self._next_event)

    def _next_event(self) -> Event | NeedData:
        if self._state is _State.PAYLOAD:
            return self._payload_pending()
        if self._state in (_State.DONE, _State.CLOSED) and not self._description_next():
            return self._after_end()
        if self._pkg_end is not None and self._buf.consumed == self._pkg_end:
            return self._end_package()
        while True:
            start, head, limit = self._buf.pos, self._buf.head, self._limit()
            if self._state is _State.RAM:
                run = self._try_run(head, start, limit)
                if run is not None:
                    return run
            reader = Reader(head, start, limit)
            try:
                event = self._parse(reader)
            except Short as short:
                if not self._grow(short.end - start):
                    return self._starved()
                continue
            self._buf.advance(reader.pos - start)
            return event

    def _limit(self) -> int:
        head_end = len(self._buf.head)
        if self._pkg_end is None:
            return head_end
        return min(head_end, self._buf.pos + self._pkg_end - self._buf.consumed)

    def _grow(self, need: int) -> bool:
        if need > self._max_record:
            raise RemoteProtocolError(
                f"A record needs {need} bytes, more than the {self._max_record}-byte limit."
            )
        if self._pkg_end is not None:
            raise RemoteProtocolError("A record runs past the end of its PACKAGED blob.")
        return self._buf.contiguous(need)

    def _starved(self) -> NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf.available() == 0:
            raise ChannelClosedError(
                f"The peer closed the {self._channel.value} channel before the end of the stream."
            )
        raise RemoteProtocolError(
            f"The {self._channel.value} channel is truncated: it ended in the middle of a "
            f"record ({self._buf.available()} bytes of it arrived)."
        )

    def _description_next(self) -> bool:
        """After the main channel's EOF: do the buffered bytes start the one VM
        description a stream may carry?"""
        if (self._state is not _State.DONE or self._channel is not ChannelKind.MAIN
                or self._described or not self._buf.available()):
            return False
        self._buf.contiguous(1)
        return self._buf.head[self._buf.pos] == SectionType.VMDESCRIPTION

    def _after_end(self) -> Event | NeedData:
        extra = self._buf.available()
        if extra:
            raise RemoteProtocolError(
                f"{extra} bytes of trailing garbage follow the end of the stream."
            )
        if self._eof:
            self._state = _State.CLOSED
            return Closed()
        return NEED_DATA

    def _end_package(self) -> PackagedEnd:
        if self._state is not _State.TOP:
            raise RemoteProtocolError("The PACKAGED blob ends in the middle of a section.")
        self._pkg_end = None
        return PackagedEnd()

    def _parse(self, r: Reader) -> Event:
        # Parsers read every field before changing any state (see buffer.py).
        if self._state is _State.PREAMBLE:
            if self._channel is ChannelKind.MAIN:
                return self._parse_main_preamble(r)
            return self._parse_postcopy_preamble(r)
        if self._state is _State.RAM:
            return self._parse_ram(r)
        if self._state is _State.DONE:
            return self._parse_description(r)
        return self._parse_top(r)

    def _parse_description(self, r: Reader) -> VmDescriptionEvent:
        r.u8()  # QEMU_VM_VMDESCRIPTION, seen by _description_next
        n = r.be32()
        if n > MAX_VMDESC:
            raise RemoteProtocolError(
                f"The VM description of {n} bytes exceeds the {MAX_VMDESC}-byte limit."
            )
        description = parse_description(r.take(n))
        self._described = True
        return VmDescriptionEvent(description)

    # --------------------------------------------------------------- preamble
    def _parse_main_preamble(self, r: Reader) -> StreamStart:
        magic = r.be32()
        if magic != QEVM_MAGIC:
            raise RemoteProtocolError(
                f"Not a migration stream: magic {magic:#010x}, expected {QEVM_MAGIC:#010x} (QEVM)."
            )
        version = r.be32()
        if version == QEVM_VERSION_COMPAT:
            raise RemoteProtocolError("Stream format version 2 is obsolete and not supported.")
        if version != QEVM_VERSION:
            raise RemoteProtocolError(f"Unsupported stream format version {version}.")
        kind = r.u8()
        if kind != SectionType.CONFIGURATION:
            raise RemoteProtocolError(
                f"The CONFIGURATION section is missing (found type {kind:#04x})."
            )
        n = r.be32()
        if n > MAX_MACHINE_NAME:
            raise RemoteProtocolError(f"Machine name length {n} exceeds {MAX_MACHINE_NAME}.")
        machine = decode_name(r.take(n), "Machine")
        if machine != self._machine:
            raise RemoteProtocolError(
                f"Machine type received is {machine!r} but local is {self._machine!r}."
            )
        self._state = _State.TOP
        return StreamStart(ChannelKind.MAIN, machine)

    def _parse_postcopy_preamble(self, r: Reader) -> StreamStart:
        magic = r.take(4)
        if magic != POSTCOPY_MAGIC:
            raise RemoteProtocolError(
                f"Not a postcopy channel: magic {magic!r}, expected {POSTCOPY_MAGIC!r}."
            )
        version = r.be32()
        if version != POSTCOPY_VERSION:
            raise RemoteProtocolError(f"Unsupported postcopy channel version {version}.")
        self._state = _State.RAM
        return StreamStart(ChannelKind.POSTCOPY, None)

    # ---------------------------------------------------------- top level
    def _parse_top(self, r: Reader) -> Event:
        kind = r.u8()
        if kind == SectionType.EOF:
            return self._end_of_stream()
        if kind in (SectionType.START, SectionType.FULL):
            sid = r.be32()
            idstr = decode_name(r.counted(), "Section")
            instance_id, version_id = r.be32(), r.be32()
            if kind == SectionType.START:
                return self._begin_iterable(sid, idstr, instance_id, version_id)
            return self._parse_device(r, sid, idstr, instance_id, version_id)
        if kind in (SectionType.PART, SectionType.END):
            return self._resume_iterable(SectionType(kind), r.be32())
        if kind == SectionType.COMMAND:
            return self._parse_command(r)
        raise RemoteProtocolError(f"Unknown or misplaced section type {kind:#04x}.")

    def _end_of_stream(self) -> StreamEnd:
        if self._pkg_end is not None:
            raise RemoteProtocolError("QEMU_VM_EOF inside a PACKAGED blob.")
        self._state = _State.DONE
        return StreamEnd()

    def _begin_iterable(self, sid: int, idstr: str, instance_id: int, version_id: int) -> Event:
        if idstr != RAM_IDSTR:
            raise RemoteProtocolError(
                f"Unknown live section {idstr!r}: only {RAM_IDSTR!r} is iterated."
            )
        if instance_id != RAM_INSTANCE_ID or version_id != RAM_VERSION_ID:
            raise RemoteProtocolError(
                f"Section 'ram' has instance {instance_id} version {version_id}; "
                f"expected instance {RAM_INSTANCE_ID} version {RAM_VERSION_ID}."
            )
        if sid in self._iterables or sid in self._device_ids:
            raise RemoteProtocolError(f"Section id {sid} is started twice.")
        self._iterables[sid] = False
        return self._open(SectionType.START, sid)

    def _resume_iterable(self, kind: SectionType, sid: int) -> Event:
        ended = self._iterables.get(sid)
        if ended is None:
            raise RemoteProtocolError(f"Unknown section id {sid} in a {kind.name} section.")
        if ended:
            raise RemoteProtocolError(f"Section id {sid} continues after its END section.")
        if kind is SectionType.END:
            self._iterables[sid] = True
        return self._open(kind, sid)

    def _open(self, kind: SectionType, sid: int) -> SectionBegin:
        self._section = _OpenSection(kind, sid)
        self._state = _State.RAM
        return SectionBegin(kind, sid, RAM_IDSTR, RAM_INSTANCE_ID, RAM_VERSION_ID)

    def _parse_device(
        self, r: Reader, sid: int, idstr: str, instance_id: int, version_id: int
    ) -> DeviceState:
        if not self._device_allowed(idstr):
            raise RemoteProtocolError(f"Unknown device section {idstr!r}.")
        if sid in self._iterables:
            raise RemoteProtocolError(f"FULL section {idstr!r} reuses live section id {sid}.")
        n = r.be32()
        if n > self._max_device_state:
            raise RemoteProtocolError(
                f"Device state {idstr!r} of {n} bytes exceeds the "
                f"{self._max_device_state}-byte limit."
            )
        data = r.take(n)
        self._check_footer(r, sid, idstr)
        self._device_ids.add(sid)
        return DeviceState(sid, idstr, instance_id, version_id, data)

    def _device_allowed(self, idstr: str) -> bool:
        if self._devices is not None:
            return idstr in self._devices
        return idstr.startswith(DEVICE_PREFIX) and len(idstr) > len(DEVICE_PREFIX)

    @staticmethod
    def _check_footer(r: Reader, sid: int, idstr: str) -> None:
        mark = r.u8()
        if mark != SectionType.FOOTER:
            raise RemoteProtocolError(
                f"Missing section footer for {idstr!r} (found byte {mark:#04x})."
            )
        footer_id = r.be32()
        if footer_id != sid:
            raise RemoteProtocolError(
                f"Mismatched section id in footer for {idstr!r}: read {footer_id}, "
                f"expected {sid}."
            )

    def _parse_command(self, r: Reader) -> Event:
        number, length = r.be16(), r.be16()
        try:
            cmd = Command(number)
        except ValueError:
            raise RemoteProtocolError(f"Unknown or unsupported command {number:#x}.") from None
        expected = COMMAND_LENGTHS[cmd]
        if expected is not None and length != expected:
            raise RemoteProtocolError(
                f"Command {cmd.name} has length {length}; expected {expected}."
            )
        if cmd is Command.PACKAGED:
            return self._parse_packaged(r)
        return parse_command(cmd, r.take(length), self._blocks)

    def _parse_packaged(self, r: Reader) -> Packaged:
        length = r.be32()
        if self._pkg_end is not None:
            raise RemoteProtocolError("A PACKAGED blob is nested inside another.")
        if length > self._max_record - _PACKAGED_HEADER:
            raise RemoteProtocolError(
                f"PACKAGED blob of {length} bytes exceeds the {self._max_record}-byte limit."
            )
        r.need(length)  # the whole blob must be buffered before its events are decoded
        self._pkg_end = self._buf.consumed + (r.pos - self._buf.pos) + length
        return Packaged(length)

    # -------------------------------------------------------------- RAM records
    def _parse_ram(self, r: Reader) -> Event:
        word = r.be64()
        flags, addr = word & FLAG_MASK, word & OFFSET_MASK
        if flags & ~KNOWN_RAM_FLAGS:
            raise RemoteProtocolError(
                f"RAM record word {word:#018x} has unknown flag bits "
                f"{flags & ~KNOWN_RAM_FLAGS:#x} (or a page offset that is not {PAGE_SIZE}-aligned)."
            )
        if flags == RamFlag.EOS:
            return self._parse_eos(r, addr)
        if flags == RamFlag.MEM_SIZE:
            return self._parse_mem_size(r, addr)
        if flags == RamFlag.MULTIFD_FLUSH:
            if addr:
                raise RemoteProtocolError(f"MULTIFD_FLUSH record carries a non-zero "
                                          f"offset {addr:#x}.")
            return MultifdFlush()
        kind = flags & ~RamFlag.CONTINUE
        if kind not in (RamFlag.PAGE, RamFlag.ZERO):
            raise RemoteProtocolError(f"RAM record has an invalid flag combination {flags:#x}.")
        name = self._record_block(r, flags)
        length = self._blocks[name].length
        if addr > length - PAGE_SIZE:
            raise RemoteProtocolError(
                f"Page offset {addr:#x} lies outside RAM block {name!r} ({length} bytes)."
            )
        if kind == RamFlag.ZERO:
            return self._parse_zero(r, name, addr)
        return self._parse_page(r, name, addr)

    def _record_block(self, r: Reader, flags: int) -> str:
        if flags & RamFlag.CONTINUE:
            if self._last_block is None:
                raise RemoteProtocolError(
                    f"A CONTINUE record arrived before any block on the "
                    f"{self._channel.value} channel."
                )
            return self._last_block
        name = decode_name(r.counted(), "RAM block")
        if name not in self._blocks:
            raise RemoteProtocolError(f"Unknown RAM block {name!r}.")
        return name

    def _parse_zero(self, r: Reader, name: str, addr: int) -> ZeroPages:
        fill = r.u8()
        if fill != 0:
            raise RemoteProtocolError(
                f"ZERO record for {name!r} at {addr:#x} has fill byte {fill:#04x}; only 0 is valid."
            )
        self._last_block = name
        return ZeroPages(name, np.array([addr], dtype=np.uint64))

    def _parse_page(self, r: Reader, name: str, addr: int) -> Event:
        buffered = self._buf.available() - (r.pos - self._buf.pos)
        if buffered >= PAGE_SIZE or self._pkg_end is not None or self._eof:
            r.need(PAGE_SIZE)  # joins chunks and retries, or reports the truncation
            data = page_view(r.buf, r.pos, 1)
            r.pos += PAGE_SIZE
            self._last_block = name
            return PageBatch(name, np.array([addr], dtype=np.uint64), data)
        self._last_block = name
        self._state = _State.PAYLOAD
        self._payload_left = PAGE_SIZE
        return PageHeader(name, addr)

    def _parse_eos(self, r: Reader, addr: int) -> Event:
        if addr:
            raise RemoteProtocolError(f"EOS record carries a non-zero offset {addr:#x}.")
        if self._channel is ChannelKind.POSTCOPY:
            self._state = _State.DONE
            return StreamEnd()
        section = self._section
        assert section is not None  # RAM state on the main channel implies a section
        self._check_footer(r, section.section_id, RAM_IDSTR)
        self._section = None
        self._state = _State.TOP
        return SectionComplete(section.kind, section.section_id)

    def _parse_mem_size(self, r: Reader, total: int) -> MemSize:
        in_start = self._section is not None and self._section.kind is SectionType.START
        if not in_start or self._mem_size_seen:
            raise RemoteProtocolError(
                "MEM_SIZE is only valid once, in the START section of 'ram'."
            )
        event = parse_mem_size(r, total, self._blocks, self._postcopy)
        self._mem_size_seen = True
        return event

    def _try_run(self, head: bytes, pos: int, limit: int) -> Event | None:
        """Batch path: a run of CONTINUE records of the current block, validated at once."""
        block = self._last_block
        if block is None or limit - pos < 8:
            return None
        flags = ((head[pos + 6] & 0x0F) << 8) | head[pos + 7]
        length = self._blocks[block].length
        if flags == PAGE_CONT:
            offsets = scan_pages(head, pos, limit, length)
            if not len(offsets):
                return None
            data = page_view(head, pos + 8, len(offsets))
            self._buf.advance(len(offsets) * PAGE_RECORD_SIZE)
            return PageBatch(block, offsets, data)
        if flags == ZERO_CONT:
            offsets = scan_zeros(head, pos, limit, length)
            if not len(offsets):
                return None
            self._buf.advance(len(offsets) * ZERO_RECORD_SIZE)
            return ZeroPages(block, offsets)
        return None

    # ------------------------------------------------------------ payload mode
    @property
    def payload_remaining(self) -> int:
        """Bytes of the current PageHeader's payload not yet delivered (0 if none)."""
        return self._payload_left

    def take_payload(self, dest: memoryview | bytearray) -> int:
        """Copy already-buffered payload bytes into ``dest``; return how many.

        Copies at most ``min(len(dest), payload_remaining)`` bytes.
        """
        if self._state is not _State.PAYLOAD:
            raise LocalProtocolError("take_payload() was called with no page payload pending.")
        view = _byte_view(dest)
        n = self._buf.read_into(view[: self._payload_left])
        self._payload_consumed(n)
        return n

    def payload_received(self, n: int) -> None:
        """Account for ``n`` payload bytes the caller read from the transport itself."""
        if self._state is not _State.PAYLOAD:
            raise LocalProtocolError("payload_received() was called with no payload pending.")
        if self._buf.available():
            raise LocalProtocolError(
                "payload_received() with bytes still buffered: call take_payload() first."
            )
        if not 0 <= n <= self._payload_left:
            raise LocalProtocolError(
                f"payload_received({n}) but only {self._payload_left} bytes are pending."
            )
        self._buf.consumed += n
        self._payload_consumed(n)

    def _payload_consumed(self, n: int) -> None:
        self._payload_left -= n
        if self._payload_left == 0:
            self._state = _State.RAM

    def _payload_pending(self) -> NeedData:
        if self._eof and self._buf.available() < self._payload_left:
            raise RemoteProtocolError(
                f"The {self._channel.value} channel is truncated inside a page payload."
            )
        raise LocalProtocolError(
            f"A page payload of {self._payload_left} bytes is pending: "
            "take it with take_payload() first."
        )


def _byte_view(dest: memoryview | bytearray) -> memoryview:
    view = memoryview(dest)
    if view.readonly:
        raise LocalProtocolError("The payload destination buffer is read-only.")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
