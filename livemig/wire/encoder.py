"""Sans-IO encoder of a livemig migration channel (QEMU 7.2 stream format).

Theory of operation: every method returns the bytes of one or more records
and updates a little state, so that the encoder can refuse (LocalProtocolError)
anything the decoder on the other side would reject: records before the
preamble, pages outside a "ram" section, commands inside one, reused section
ids, anything after EOF.  It never touches a socket.

Page data is never copied.  ``pages()`` builds all record headers of a batch
in one NumPy big-endian array and returns a list that alternates header
memoryviews with ``ram[off:off+4096]`` slices of the caller's buffer, ready
for ``socket.sendmsg`` (which takes at most IOV_MAX = 1024 buffers per call,
so send long lists in slices).  Methods whose result embeds caller data
(``device_state``, ``packaged``) also return such lists.

Like QEMU, the encoder names the block (u8 length + idstr) only when it
differs from the last block sent on this channel; otherwise it sets CONTINUE.
Use one Encoder per channel.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np
import numpy.typing as npt

from livemig.errors import LocalProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo, local_name
from livemig.wire.channel import ChannelKind
from livemig.wire.commands import DiscardRanges, encode_command, encode_discard
from livemig.wire.constants import (
    DEVICE_PREFIX,
    FLAG_MASK,
    MACHINE_NAME,
    MAX_DEVICE_STATE,
    MAX_RECORD,
    MAX_VMDESC,
    PAGE_CONT,
    PAGE_RECORD_SIZE,
    POSTCOPY_MAGIC,
    POSTCOPY_VERSION,
    QEVM_MAGIC,
    QEVM_VERSION,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    ZERO_CONT,
    Command,
    RamFlag,
    SectionType,
)
from livemig.wire.vmdesc import VmDescription

Buffers = list[bytes | memoryview]

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_FOOTER = struct.Struct(">BI")
_SECTION_ID = struct.Struct(">BI")
_ZERO_DTYPE = np.dtype([("word", ">u8"), ("fill", "u1")])  # packed: 9 bytes a record


@dataclass(frozen=True, eq=False)
class PageRecords:
    """PAGE record headers for a batch: ``words[i]`` precedes the page at
    ``offsets[i]``; ``prefix`` (the block idstr, or b"") follows ``words[0]``."""

    offsets: npt.NDArray[np.uint64]
    words: npt.NDArray[np.generic]  # big-endian u64
    prefix: bytes

    @property
    def nbytes(self) -> int:
        return self.bytes_of(len(self.offsets))

    def bytes_of(self, records: int) -> int:
        """The bytes of the first ``records`` records."""
        return records * PAGE_RECORD_SIZE + (len(self.prefix) if records else 0)


class _State(Enum):
    FRESH = auto()
    TOP = auto()
    RAM = auto()
    DONE = auto()


class Encoder:
    """Encode one channel: ``ChannelKind.MAIN`` or ``ChannelKind.POSTCOPY``.

    ``postcopy`` is the postcopy-ram capability: it adds page sizes to MEM_SIZE.
    """

    def __init__(
        self,
        *,
        channel: ChannelKind = ChannelKind.MAIN,
        postcopy: bool = False,
        machine: str = MACHINE_NAME,
        resumed: Collection[int] = (),
    ) -> None:
        """``resumed``: ids of iterable sections started on an earlier connection of the
        same migration (postcopy recovery): their PART and END sections may follow the
        preamble without a START."""
        self._channel = channel
        self._postcopy = postcopy
        self._machine = local_name(machine)
        self._state = _State.FRESH
        self._packaged_child = False
        self._last_block: str | None = None
        self._iterables: dict[int, bool] = {sid: False for sid in resumed}  # -> has ENDed
        self._device_ids: set[int] = set()
        self._section: tuple[SectionType, int] | None = None
        self._mem_size_sent = bool(resumed)
        self._described = False

    def package(self) -> Encoder:
        """A child encoder for the records of a PACKAGED blob (no preamble, no EOF)."""
        self._require(_State.TOP, "build a PACKAGED blob")
        child = Encoder(channel=ChannelKind.MAIN, postcopy=self._postcopy)
        child._state = _State.TOP
        child._packaged_child = True
        # Section ids are one namespace for the whole channel, blob included.
        child._iterables = self._iterables
        child._device_ids = self._device_ids
        return child

    # --------------------------------------------------------------- framing
    def preamble(self) -> bytes:
        """First bytes of the channel: QEVM header + CONFIGURATION, or LMPC + version."""
        self._require(_State.FRESH, "send the preamble")
        if self._channel is ChannelKind.POSTCOPY:
            self._state = _State.RAM
            return POSTCOPY_MAGIC + _BE32.pack(POSTCOPY_VERSION)
        self._state = _State.TOP
        config = bytes([SectionType.CONFIGURATION]) + _BE32.pack(len(self._machine))
        return _BE32.pack(QEVM_MAGIC) + _BE32.pack(QEVM_VERSION) + config + self._machine

    def eof(self) -> bytes:
        """End the channel: QEMU_VM_EOF on the main channel, an EOS record on postcopy."""
        if self._packaged_child:
            raise LocalProtocolError("A PACKAGED blob cannot contain QEMU_VM_EOF.")
        if self._channel is ChannelKind.POSTCOPY:
            self._require(_State.RAM, "end the postcopy channel")
            self._state = _State.DONE
            return _BE64.pack(RamFlag.EOS)
        self._require(_State.TOP, "send EOF")
        self._state = _State.DONE
        return bytes([SectionType.EOF])

    def vm_description(self, description: VmDescription) -> bytes:
        """QEMU_VM_VMDESCRIPTION after EOF: the JSON description of the device sections
        (QEMU writes it after precopy, never after postcopy)."""
        if self._channel is not ChannelKind.MAIN or self._state is not _State.DONE:
            raise LocalProtocolError("The VM description goes after the main channel's EOF.")
        if self._described:
            raise LocalProtocolError("The VM description is sent once.")
        raw = description.encode()
        if len(raw) > MAX_VMDESC:
            raise LocalProtocolError(f"The VM description is over {MAX_VMDESC} bytes.")
        self._described = True
        return bytes([SectionType.VMDESCRIPTION]) + _BE32.pack(len(raw)) + raw

    # -------------------------------------------------------------- sections
    def ram_start(self, section_id: int) -> bytes:
        """Open the "ram" START section (setup: follow with mem_size())."""
        self._require_main(_State.TOP, "open a section")
        if section_id in self._iterables or section_id in self._device_ids:
            raise LocalProtocolError(f"Section id {section_id} is already in use.")
        self._iterables[section_id] = False
        self._open(SectionType.START, section_id)
        name = RAM_IDSTR.encode()
        return (
            _SECTION_ID.pack(SectionType.START, section_id)
            + bytes([len(name)]) + name
            + _BE32.pack(RAM_INSTANCE_ID) + _BE32.pack(RAM_VERSION_ID)
        )

    def ram_part(self, section_id: int) -> bytes:
        """Open a PART section of a started "ram" section (an iteration)."""
        return self._resume(SectionType.PART, section_id)

    def ram_end(self, section_id: int) -> bytes:
        """Open the END section of a started "ram" section (completion)."""
        return self._resume(SectionType.END, section_id)

    def close_ram_section(self) -> bytes:
        """End the open "ram" section: EOS record + section footer."""
        self._require_main(_State.RAM, "close a section")
        assert self._section is not None
        _, sid = self._section
        self._section = None
        self._state = _State.TOP
        return _BE64.pack(RamFlag.EOS) + _FOOTER.pack(SectionType.FOOTER, sid)

    def device_state(
        self,
        section_id: int,
        idstr: str,
        data: bytes | memoryview,
        *,
        instance_id: int = 0,
        version_id: int = 1,
    ) -> Buffers:
        """A FULL section: be32 length + opaque ``data`` (passed through untouched)."""
        self._require_main(_State.TOP, "send device state")
        name = local_name(idstr)
        if idstr == RAM_IDSTR or not idstr.startswith(DEVICE_PREFIX):
            raise LocalProtocolError(f"Device idstr {idstr!r} must start with {DEVICE_PREFIX!r}.")
        if section_id in self._iterables:
            raise LocalProtocolError(f"Section id {section_id} belongs to a live section.")
        if len(data) > MAX_DEVICE_STATE:
            raise LocalProtocolError(f"Device state {idstr!r} is over {MAX_DEVICE_STATE} bytes.")
        self._device_ids.add(section_id)
        head = (
            _SECTION_ID.pack(SectionType.FULL, section_id) + bytes([len(name)]) + name
            + _BE32.pack(instance_id) + _BE32.pack(version_id) + _BE32.pack(len(data))
        )
        return [head, data, _FOOTER.pack(SectionType.FOOTER, section_id)]

    def _resume(self, kind: SectionType, section_id: int) -> bytes:
        self._require_main(_State.TOP, "open a section")
        ended = self._iterables.get(section_id)
        if ended is None or ended:
            raise LocalProtocolError(f"Section id {section_id} is not an open live section.")
        if kind is SectionType.END:
            self._iterables[section_id] = True
        self._open(kind, section_id)
        return _SECTION_ID.pack(kind, section_id)

    def _open(self, kind: SectionType, section_id: int) -> None:
        self._section = (kind, section_id)
        self._state = _State.RAM

    # ------------------------------------------------------------ RAM records
    def mem_size(self, blocks: Mapping[str, BlockInfo]) -> bytes:
        """The MEM_SIZE record announcing every block (once, in the START section)."""
        self._require_main(_State.RAM, "send MEM_SIZE")
        assert self._section is not None
        if self._section[0] is not SectionType.START or self._mem_size_sent:
            raise LocalProtocolError("MEM_SIZE is only valid once, in the START section.")
        total = sum(info.length for info in blocks.values())
        parts = [_BE64.pack(total | RamFlag.MEM_SIZE)]
        for name, info in blocks.items():
            raw = local_name(name)
            parts += [bytes([len(raw)]), raw, _BE64.pack(info.length)]
            if self._postcopy and info.page_size != PAGE_SIZE:
                parts.append(_BE64.pack(info.page_size))
        self._mem_size_sent = True
        return b"".join(parts)

    def page_records(self, block: str, offsets: npt.ArrayLike, ram_size: int) -> PageRecords:
        """The headers of PAGE records for ``offsets`` of ``block``, without payloads.

        For the zero-copy fast path: the caller sends ``words[i]`` (8 bytes, the block
        idstr ``prefix`` after the first one) followed by the 4096 bytes of guest RAM at
        ``offsets[i]``, e.g. with one scatter-gather ``sendmsg`` built without a Python
        object per page.  ``pages()`` is the same, as a list of buffers.
        """
        self._require_ram_records()
        offs = _offsets(offsets)
        if offs.size and int(offs.max()) > ram_size - PAGE_SIZE:
            raise LocalProtocolError(f"A page offset lies outside the {ram_size}-byte buffer.")
        words = (offs | np.uint64(PAGE_CONT)).astype(">u8")
        prefix = self._block_prefix(block, words) if offs.size else b""
        return PageRecords(offs, words, prefix)

    def pages(
        self, block: str, offsets: npt.ArrayLike, ram: memoryview | bytearray | bytes
    ) -> Buffers:
        """PAGE records for ``offsets`` of ``block`` whose memory is ``ram``.

        Returns header views interleaved with ``ram[off:off+4096]`` slices.
        """
        mem = memoryview(ram)
        if mem.format != "B" or mem.ndim != 1:
            mem = mem.cast("B")
        rec = self.page_records(block, offsets, len(mem))
        offs, words, prefix = rec.offsets, rec.words, rec.prefix
        if not offs.size:
            return []
        hdr = memoryview(words.data).cast("B")
        out: Buffers = [b""] * (2 * len(words))
        out[0::2] = [hdr[i : i + 8] for i in range(0, 8 * len(words), 8)]
        out[1::2] = [mem[o : o + PAGE_SIZE] for o in offs.tolist()]
        if prefix:
            out.insert(1, prefix)
        return out

    def zero_pages(self, block: str, offsets: npt.ArrayLike) -> bytes:
        """ZERO records (fill byte 0) for ``offsets`` of ``block``."""
        self._require_ram_records()
        offs = _offsets(offsets)
        if not offs.size:
            return b""
        records = np.zeros(len(offs), dtype=_ZERO_DTYPE)
        records["word"] = offs | np.uint64(ZERO_CONT)
        prefix = self._block_prefix(block, records["word"])
        raw = records.tobytes()
        return raw[:8] + prefix + raw[8:] if prefix else raw

    def page_header(self, block: str, offset: int, *, zero: bool = False) -> bytes:
        """One PAGE record's header (its 4 KiB payload must follow), or one whole ZERO
        record: the same bytes as :meth:`page_records` / :meth:`zero_pages` for a single
        page, without NumPy (the path of one requested page, where each µs counts)."""
        self._require_ram_records()
        if offset < 0 or offset % PAGE_SIZE:
            raise LocalProtocolError(f"page offset {offset:#x} is not 4 KiB aligned")
        word = offset | (ZERO_CONT if zero else PAGE_CONT)
        prefix = b""
        if block != self._last_block:
            raw = local_name(block)
            word &= ~int(RamFlag.CONTINUE)
            prefix = bytes([len(raw)]) + raw
            self._last_block = block
        head = _BE64.pack(word) + prefix
        return head + b"\0" if zero else head

    def _block_prefix(self, block: str, words: npt.NDArray[np.generic]) -> bytes:
        """Clear CONTINUE on the first word and return the idstr if the block changed."""
        if block == self._last_block:
            return b""
        raw = local_name(block)
        words[0] &= ~np.uint64(RamFlag.CONTINUE)
        self._last_block = block
        return bytes([len(raw)]) + raw

    def multifd_flush(self) -> bytes:
        """RAM_SAVE_FLAG_MULTIFD_FLUSH: the multifd channels are synced up to here."""
        self._require_ram_records()
        return _BE64.pack(RamFlag.MULTIFD_FLUSH)

    def _require_ram_records(self) -> None:
        self._require(_State.RAM, "send RAM pages")

    # --------------------------------------------------------------- commands
    def open_return_path(self) -> bytes:
        return self._command(Command.OPEN_RETURN_PATH)

    def ping(self, value: int) -> bytes:
        return self._command(Command.PING, _BE32.pack(value))

    def postcopy_advise(self, host_page_summary: int, target_page_size: int = PAGE_SIZE) -> bytes:
        payload = _BE64.pack(host_page_summary) + _BE64.pack(target_page_size)
        return self._command(Command.POSTCOPY_ADVISE, payload)

    def postcopy_listen(self) -> bytes:
        return self._command(Command.POSTCOPY_LISTEN)

    def postcopy_run(self) -> bytes:
        return self._command(Command.POSTCOPY_RUN)

    def recv_bitmap(self, block: str) -> bytes:
        """Postcopy recovery: ask for the bitmap of ``block``'s received pages."""
        raw = local_name(block)
        return self._command(Command.RECV_BITMAP, bytes([len(raw)]) + raw)

    def postcopy_resume(self) -> bytes:
        """Postcopy recovery: the source goes on (after the bitmaps)."""
        return self._command(Command.POSTCOPY_RESUME)

    def postcopy_ram_discard(self, block: str, ranges: DiscardRanges) -> bytes:
        """Discard byte ranges (start, length); split over several commands if long."""
        self._require_main(_State.TOP, "send a command")
        return encode_discard(block, ranges)

    def packaged(self, blob: bytes | memoryview) -> Buffers:
        """MIG_CMD_PACKAGED followed by ``blob`` (built with a ``package()`` child)."""
        if self._packaged_child:
            raise LocalProtocolError("PACKAGED blobs cannot be nested.")
        if len(blob) > MAX_RECORD - 9:
            raise LocalProtocolError(f"PACKAGED blob of {len(blob)} bytes is too large.")
        header = self._command(Command.PACKAGED, _BE32.pack(len(blob)))
        # Pages inside the blob may have moved the receiver's "last block".
        self._last_block = None
        return [header, blob]

    def _command(self, cmd: Command, payload: bytes = b"") -> bytes:
        self._require_main(_State.TOP, "send a command")
        return encode_command(cmd, payload)

    # ------------------------------------------------------------------ state
    def _require_main(self, state: _State, action: str) -> None:
        if self._channel is not ChannelKind.MAIN:
            raise LocalProtocolError(f"Cannot {action} on the postcopy channel.")
        self._require(state, action)

    def _require(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(
                f"Cannot {action} now: the {self._channel.value} channel encoder is in "
                f"state {self._state.name}, not {state.name}."
            )


def _offsets(offsets: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    offs = np.asarray(offsets)
    if offs.ndim != 1 or (offs.size and offs.dtype.kind not in "iu"):
        raise LocalProtocolError("Page offsets must be a 1-D integer array.")
    if offs.dtype.kind == "i" and offs.size and int(offs.min()) < 0:
        raise LocalProtocolError("Page offsets cannot be negative.")
    offs = offs.astype(np.uint64, copy=False)
    if (offs & np.uint64(FLAG_MASK)).any():
        raise LocalProtocolError(f"Page offsets must be multiples of {PAGE_SIZE}.")
    return offs
