"""Coverage-guided fuzz targets (atheris) for every parser of untrusted input in livemig.

Theory of operation
-------------------
Each target takes one input (bytes) and drives one parser the way livemig drives it,
then checks the parser's promise:

* only livemig's typed errors (:class:`~livemig.errors.LivemigError`) may escape;
  anything else (``IndexError``, ``struct.error``, ``UnicodeDecodeError``, a JSON
  error, an assertion of the target's own) is a finding;
* events hold only checked values (a page inside its block, a request of whole pages);
* every input ends: the drivers bound their own loops, and libFuzzer's ``-timeout``
  and ``-rss_limit_mb`` catch hangs and unbounded memory.

The first byte of an input chooses options (chunk size, postcopy MEM_SIZE layout, ...),
so one corpus explores how the bytes arrive as well as what they are.  Targets
(:data:`TARGETS`): ``stream`` (main channel: header, sections, RAM records, commands,
packaged blobs, the VM description), ``postcopy`` (the postcopy channel's records),
``returnpath``, ``recovery`` (postcopy recovery's resumed main channel and its return
path), ``qmp`` (JSON splitter + protocol + command argument checks),
``multifd`` (a multifd channel: its initial packet, then packet headers and their page
offsets, as the destination's receivers read them), ``helper`` (helper control
messages), ``devstate`` (saved CPU/serial state, the
capabilities section, the VM description checks).

Run one target: ``python fuzz/targets.py TARGET [libFuzzer flags] [corpus dirs]``;
``fuzz/run.py`` runs them all with a budget and reports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["livemig"]):
    from livemig.control.commands import CommandTable, Param
    from livemig.control.protocol import QmpProtocol
    from livemig.errors import LivemigError
    from livemig.migration import handshake as hs
    from livemig.migration.handshake import Handshake
    from livemig.migration.helper import decode_message, error_from
    from livemig.migration.state import Capabilities, Parameters
    from livemig.migration.vmdesc import check_description
    from livemig.units import PAGE_SIZE
    from livemig.vmm.serial import SerialState
    from livemig.vmm.state import VcpuState
    from livemig.wire import events as ev
    from livemig.wire.blocks import BlockInfo
    from livemig.wire.channel import ChannelKind
    from livemig.wire.decoder import Decoder
    from livemig.wire.multifd import (
        HEADER_SIZE,
        INIT_SIZE,
        PACKET_PAGES,
        InitPacket,
        decode_header,
        decode_offsets,
    )
    from livemig.wire.returnpath import ReqPages, ReturnPathDecoder
    from livemig.wire.vmdesc import parse_description

# The block table of the recorded seeds (fuzz/record_seeds.py): one small pc.ram block
# and one of 2 MiB pages, so huge-page rules are reachable too.
MEM = 2 << 20
BLOCKS = {"pc.ram": BlockInfo(MEM, PAGE_SIZE), "mem-huge": BlockInfo(2 << 20, 2 << 20)}
SEED_BLOCKS = {"pc.ram": BlockInfo(MEM, PAGE_SIZE)}
CHUNKS = (1, 7, 64, 4096, 4105, 65536, 1 << 22)
MAX_STEPS = 1_000_000  # events one input may produce: more is a hang
# Chunks of 1 or 7 bytes split every header and record at every byte, which matters
# where the records are (the first KiB); over a 64 KiB input they would cost 64 K decoder
# calls per input, so past this point the chunks are at least a page.
TINY_CHUNKS_UNTIL = 4096


class Finding(AssertionError):
    """A target's own check failed: the parser broke a promise."""


def _options(data: bytes) -> tuple[int, bytes]:
    return (data[0], data[1:]) if data else (0, b"")


def _check_event(e: Any, blocks: dict[str, BlockInfo]) -> None:
    if isinstance(e, (ev.PageBatch, ev.ZeroPages)):
        length = blocks[e.block].length
        if len(e.offsets) and (int(e.offsets.max()) > length - PAGE_SIZE
                               or (e.offsets % PAGE_SIZE).any()):
            raise Finding(f"page event outside {e.block}: {e.offsets[:4]}")
        if isinstance(e, ev.PageBatch) and e.data.shape != (len(e.offsets), PAGE_SIZE):
            raise Finding("page batch of the wrong shape")
    elif isinstance(e, ev.PageHeader) and (e.offset > blocks[e.block].length - PAGE_SIZE
                                           or e.offset % PAGE_SIZE):
        raise Finding(f"page header outside {e.block}: {e.offset:#x}")


def _feed(dec: Decoder | ReturnPathDecoder, data: bytes, pos: int, chunk: int) -> int:
    """The decoder wants data: the next ``chunk`` bytes of ``data`` from ``pos``, or EOF
    at its end; returns the new position."""
    if pos >= len(data):
        dec.receive_eof()
        return pos
    if pos >= TINY_CHUNKS_UNTIL:
        chunk = max(chunk, 4096)
    dec.receive_data(data[pos : pos + chunk])
    return min(pos + chunk, len(data))


def drive_decoder(dec: Decoder, data: bytes, chunk: int,
                  blocks: dict[str, BlockInfo]) -> list[type]:
    """Feed ``data`` in ``chunk``-byte pieces as the destination does (single-page
    payloads partly straight from the "socket"); returns the event types seen."""
    pos, seen, slot = 0, [], bytearray(PAGE_SIZE)
    for _ in range(MAX_STEPS):
        e = dec.next_event()
        if e is ev.NEED_DATA:
            pos = _feed(dec, data, pos, chunk)
            continue
        _check_event(e, blocks)
        seen.append(type(e))
        if isinstance(e, ev.PageHeader):
            dec.take_payload(slot)
            left = dec.payload_remaining
            if left:
                k = min(left, len(data) - pos)
                if k == 0:
                    dec.receive_eof()
                    continue
                dec.payload_received(k)
                pos += k
                if k < left:
                    dec.receive_eof()
        if isinstance(e, ev.Closed):
            return seen
    raise Finding("the decoder produced events without end")


def stream(data: bytes) -> None:
    opts, body = _options(data)
    blocks = BLOCKS if opts & 0x30 == 0x30 else SEED_BLOCKS
    dec = Decoder(blocks, postcopy=bool(opts & 0x40), max_record=1 << 22)
    with contextlib.suppress(LivemigError):
        drive_decoder(dec, body, CHUNKS[opts % len(CHUNKS)], blocks)


def postcopy(data: bytes) -> None:
    opts, body = _options(data)
    dec = Decoder(BLOCKS, channel=ChannelKind.POSTCOPY, postcopy=True, max_record=1 << 22)
    with contextlib.suppress(LivemigError):
        drive_decoder(dec, body, CHUNKS[opts % len(CHUNKS)], BLOCKS)


def returnpath(data: bytes) -> None:
    _drive_returnpath(*_options(data))


def recovery(data: bytes) -> None:
    """Postcopy recovery's handshake, as after ``migrate resume=true``: the resumed main
    channel (MIG_CMD_RECV_BITMAP, MIG_CMD_POSTCOPY_RESUME, then the rest of RAM, with
    RAM's section already started) or, with option bit 0x80, its return path (the
    RECV_BITMAP answers with their bitmaps, RESUME_ACK)."""
    opts, body = _options(data)
    if opts & 0x80:
        _drive_returnpath(opts & 0x7F, body)
        return
    blocks = BLOCKS if opts & 0x30 == 0x30 else SEED_BLOCKS
    dec = Decoder(blocks, postcopy=True, resumed=[hs.RAM.section_id], max_record=1 << 22)
    with contextlib.suppress(LivemigError):
        drive_decoder(dec, body, CHUNKS[opts % len(CHUNKS)], blocks)


def _drive_returnpath(opts: int, body: bytes) -> None:
    dec = ReturnPathDecoder(BLOCKS if opts & 1 else None)
    chunk = CHUNKS[(opts >> 1) % len(CHUNKS)]
    pos = 0
    try:
        for _ in range(MAX_STEPS):
            e = dec.next_event()
            if e is ev.NEED_DATA:
                pos = _feed(dec, body, pos, chunk)
                continue
            if isinstance(e, ReqPages) and (e.length == 0 or e.start % PAGE_SIZE):
                raise Finding(f"request of partial pages {e}")
            if isinstance(e, ev.Closed):
                return
        raise Finding("the return path decoder produced events without end")
    except LivemigError:
        pass


def multifd(data: bytes) -> None:
    """One multifd connection as a receiver reads it: the initial packet (unless option
    bit 0x40 starts past it), then packets -- a header, its page offsets, its pages'
    data -- until the input ends; option bits 0x30 choose the block table."""
    opts, body = _options(data)
    blocks = BLOCKS if opts & 0x30 == 0x30 else SEED_BLOCKS
    pos = 0
    try:
        if not opts & 0x40:
            if len(body) < INIT_SIZE:
                return
            InitPacket.decode(body[:INIT_SIZE])
            pos = INIT_SIZE
        while pos + HEADER_SIZE <= len(body):
            h = decode_header(body[pos : pos + HEADER_SIZE], blocks)
            pos += HEADER_SIZE
            if h.normal + h.zero > PACKET_PAGES or h.data_size != h.normal * PAGE_SIZE:
                raise Finding(f"a packet header beyond its limits: {h}")
            if pos + h.offsets_size > len(body):
                return  # the connection ended inside the packet
            offsets = decode_offsets(h, body[pos : pos + h.offsets_size], blocks)
            pos += h.offsets_size + h.data_size
            if len(offsets) != h.normal + h.zero:
                raise Finding(f"{len(offsets)} offsets for {h.normal} + {h.zero} pages")
            if len(offsets) and (int(offsets.max()) > blocks[h.block].length - PAGE_SIZE
                                 or (offsets % PAGE_SIZE).any()):
                raise Finding(f"page offsets outside {h.block}: {offsets[:4]}")
    except LivemigError:
        pass


class _Complaints(logging.Handler):
    """A command handler's bug is logged, not raised (the session goes on): count it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_COMPLAINTS = _Complaints()
logging.getLogger("livemig").addHandler(_COMPLAINTS)
logging.getLogger("livemig").propagate = False


def _qmp_table() -> CommandTable:
    """Commands whose argument checks are the migration layer's own (pure: no VM)."""
    table = CommandTable()
    state: dict[str, Any] = {"caps": Capabilities(), "params": Parameters()}

    def set_caps(a: dict[str, Any]) -> None:
        state["caps"] = state["caps"].updated(a["capabilities"])

    def set_params(a: dict[str, Any]) -> None:
        state["params"] = state["params"].updated(a)

    table.register("migrate-set-capabilities", set_caps,
                   params=(Param("capabilities", "array"),))
    table.register("migrate-set-parameters", set_params, params=None)
    table.register("query-migrate-parameters", lambda _a: state["params"].to_qmp(), params=())
    table.register("query-migrate-capabilities", lambda _a: state["caps"].to_qmp(),
                   params=())
    table.register("migrate", lambda a: None,
                   params=(Param("uri", "str"), Param("blk", "bool", True),
                           Param("detach", "bool", True), Param("resume", "bool", True)))
    return table


def qmp(data: bytes) -> None:
    opts, body = _options(data)
    proto = QmpProtocol(_qmp_table(), max_input=1 << 16)
    if opts & 1:  # most inputs skip negotiation to reach the commands
        list(proto.handle(b'{"execute": "qmp_capabilities"}'))
    chunk = CHUNKS[(opts >> 1) % len(CHUNKS)]
    _COMPLAINTS.records.clear()
    for pos in range(0, len(body), chunk):
        for reply in proto.handle(body[pos : pos + chunk]):
            if not reply.endswith(b"\n") or b"\n" in reply[:-1]:
                raise Finding(f"a reply that is not one line: {reply[:80]!r}")
    if _COMPLAINTS.records:
        raise Finding(f"QMP logged a bug: {_COMPLAINTS.records[0].getMessage()}")


def helper(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except LivemigError:
        return
    err = error_from(msg)
    if not isinstance(err, LivemigError):
        raise Finding(f"error_from gave {err!r}")


def devstate(data: bytes) -> None:
    opts, body = _options(data)
    parsers: list[Callable[[bytes], Any]] = [
        VcpuState.from_bytes, SerialState.from_bytes, Handshake.decode, _description]
    with contextlib.suppress(LivemigError):
        parsers[opts % len(parsers)](body)


def _description(body: bytes) -> None:
    desc = parse_description(body)
    loaded = [ev.DeviceState(hs.SERIAL.section_id, hs.SERIAL.name, 0, 1, bytes(10))]
    check_description(desc, loaded)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "stream": stream, "postcopy": postcopy, "returnpath": returnpath, "qmp": qmp,
    "helper": helper, "devstate": devstate, "recovery": recovery, "multifd": multifd,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
