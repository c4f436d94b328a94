"""The source's multifd channels (threads of one MultifdSource) against the
destination's receivers, in one process over a unix socket: a round moves every dirty
page into the destination's RAM and clears its bit, each window on the channel
that owns it; a page dirtied again goes in the next round and its newer copy wins; a
channel whose connection is gone fails the round, naming that channel, while the other
channels still end their round with a SYNC."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fake_ram import FakeBlock

from livemig.errors import MigrationError
from livemig.migration.channel import Channel, MigrationUri, connect
from livemig.migration.multifd import MultifdReceivers, MultifdSource
from livemig.migration.pagesink import RamLoader
from livemig.wire.multifd import INIT_SIZE, PACKET_PAGES, InitPacket

WINDOWS = 6
PAGES = WINDOWS * PACKET_PAGES  # six windows of one packet each


@dataclass
class Pair:
    source: MultifdSource
    rx: MultifdReceivers
    bits: npt.NDArray[np.bool_]
    src: FakeBlock
    dst: FakeBlock
    errors: list[Exception]


def channel_of(conn: socket.socket) -> int:
    """Which channel an accepted connection is (its initial packet, left in place)."""
    return InitPacket.decode(conn.recv(INIT_SIZE, socket.MSG_PEEK | socket.MSG_WAITALL)).channel


@contextmanager
def multifd_pair(tmp_path: Path, channels: int, *, refuse: int | None = None
                 ) -> Iterator[Pair]:
    """A source with ``channels`` channels connected to receivers; the connection of
    channel ``refuse`` is closed by the destination instead of received."""
    src, dst = FakeBlock(PAGES), FakeBlock(PAGES)
    path = tmp_path / "multifd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    bits = np.zeros(PAGES, dtype=np.bool_)
    source = MultifdSource(MigrationUri.parse(f"unix:{path}"), channels, 5000)
    src_blocks: dict[str, Any] = {"pc.ram": src}
    source.start({"pc.ram": bits}, src_blocks)  # connects into the backlog
    dst_blocks: dict[str, Any] = {"pc.ram": dst}
    loader = RamLoader(dst_blocks)
    errors: list[Exception] = []
    rx = MultifdReceivers(dst_blocks, loader, channels - (refuse is not None), source.uuid,
                          errors.append)
    try:
        for _ in range(channels):
            conn, _addr = listener.accept()
            if channel_of(conn) == refuse:
                conn.close()
            else:
                rx.add(Channel(sock=conn, name="multifd"))
        yield Pair(source, rx, bits, src, dst, errors)
    finally:
        source.end()
        rx.close()
        loader.release()
        listener.close()


def fill(block: FakeBlock, pages: npt.NDArray[np.int64], seed: int) -> None:
    """Distinct non-zero contents in ``pages`` (every other one left zero)."""
    rows = block.pages()
    for n, p in enumerate(pages.tolist()):
        rows[p] = 0 if n % 2 else (p * 7 + seed) % 251 + 1


def test_a_round_moves_every_dirty_page_each_window_on_the_channel_that_owns_it(
        tmp_path: Path) -> None:
    with multifd_pair(tmp_path, 2) as p:
        dirty = np.sort(np.random.default_rng(1).choice(PAGES, 900, replace=False))
        fill(p.src, dirty, seed=3)
        p.bits[dirty] = True
        p.source.round(0, lambda: False)
        p.rx.flush()
        assert (p.dst.pages()[dirty] == p.src.pages()[dirty]).all()
        assert not p.bits.any()
        assert p.source.counter("normal") + p.source.counter("zero") == len(dirty)
        assert p.source.counter("zero") == len(dirty) // 2
        # Window w belongs to channel w % 2: each channel sent the pages of its own.
        per_window = np.bincount(dirty // PACKET_PAGES, minlength=WINDOWS)
        normal = [p.source.senders[c].normal + p.source.senders[c].zero for c in (0, 1)]
        assert normal == [int(per_window[0::2].sum()), int(per_window[1::2].sum())]
        assert p.errors == []


def test_a_page_dirtied_again_goes_in_the_next_round_and_its_newer_copy_wins(
        tmp_path: Path) -> None:
    with multifd_pair(tmp_path, 3) as p:
        pages = np.arange(0, PAGES, 97, dtype=np.int64)
        fill(p.src, pages, seed=5)
        p.bits[pages] = True
        p.source.round(0, lambda: False)
        p.rx.flush()
        again = pages[::3]
        p.src.pages()[again] = 0xEE
        p.bits[again] = True
        p.source.round(0, lambda: False)
        p.rx.flush()
        assert (p.dst.pages()[pages] == p.src.pages()[pages]).all()
        assert (p.dst.pages()[again] == 0xEE).all()
        assert p.source.counter("normal") + p.source.counter("zero") == len(pages) + len(again)


def test_a_channel_whose_connection_is_gone_fails_the_round_by_name(tmp_path: Path) -> None:
    with multifd_pair(tmp_path, 2, refuse=1) as p:
        p.bits[:] = True
        p.src.array()[:] = 1
        with pytest.raises(MigrationError, match="multifd channel 1 failed") as e:
            p.source.round(0, lambda: False)
        assert "multifd channel 0" not in str(e.value)
        p.rx.flush()  # channel 0 still ended its round (early or not) with a SYNC
        assert p.errors == []


@pytest.mark.parametrize("channels", [2, 4])
def test_the_channels_together_have_one_connections_send_buffer(tmp_path: Path,
                                                                channels: int) -> None:
    """More channels must not mean more data in flight (it only evicts what is being
    copied from the caches): N channels share the send buffer of one connection."""
    with multifd_pair(tmp_path, channels) as p:
        one = connect(MigrationUri.parse(f"unix:{tmp_path / 'multifd.sock'}"))
        try:
            budget = one.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        finally:
            one.close()
        buffers = [s.channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                   for s in p.source.senders]
        assert len(set(buffers)) == 1
        assert sum(buffers) == budget
