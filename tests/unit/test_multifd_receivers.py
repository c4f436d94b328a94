"""The destination's multifd receivers over socketpairs: pages land in RAM straight
from the socket, a flush waits for every channel's SYNC, and a channel that lies about
who it is, or ends before its SYNC, fails the load with a RemoteProtocolError."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fake_ram import FakeBlock

from livemig.errors import RemoteProtocolError
from livemig.migration.channel import Channel
from livemig.migration.multifd import MultifdReceivers
from livemig.migration.pagesink import RamLoader
from livemig.units import PAGE_SIZE
from livemig.wire.multifd import InitPacket, encode_packet, sync_packet

UUID = bytes(range(16))
PAGES = 1024


@contextmanager
def receivers(channels: int, blocks: dict[str, Any] | None = None,
              loader: RamLoader | None = None
              ) -> Iterator[tuple[MultifdReceivers, dict[str, Any],
                                  list[socket.socket], list[Exception]]]:
    if blocks is None or loader is None:
        blocks = {"pc.ram": FakeBlock(PAGES)}
        loader = RamLoader(blocks)
    errors: list[Exception] = []
    rx = MultifdReceivers(blocks, loader, channels, UUID, errors.append)
    senders = []
    try:
        yield rx, blocks, senders, errors
    finally:
        for s in senders:
            s.close()
        rx.close()
        loader.release()


def connect(rx: MultifdReceivers, senders: list[socket.socket], channel: int,
            uuid: bytes = UUID) -> None:
    a, b = socket.socketpair()
    senders.append(a)
    a.sendall(InitPacket(uuid, channel).encode())
    rx.add(Channel(sock=b, name="test"))


def send_pages(s: socket.socket, num: int, pages: list[int], zeros: list[int],
               fill: int) -> None:
    normal = np.array(pages, dtype=np.int64)
    s.sendall(encode_packet(num, "pc.ram", normal, np.array(zeros, dtype=np.int64)))
    s.sendall(bytes([fill]) * (PAGE_SIZE * len(pages)))


def test_pages_land_in_ram_and_a_flush_waits_for_every_sync() -> None:
    with receivers(2) as (rx, blocks, senders, errors):
        connect(rx, senders, 0)
        connect(rx, senders, 1)
        send_pages(senders[0], 1, [0, 2, 4], [], 0xAA)
        send_pages(senders[1], 2, [1, 3], [5], 0xBB)
        senders[0].sendall(sync_packet(3))
        flushed = threading.Event()
        t = threading.Thread(target=lambda: (rx.flush(), flushed.set()))
        t.start()
        assert not flushed.wait(0.3)  # channel 1 has not synced yet
        senders[1].sendall(sync_packet(4))
        assert flushed.wait(10)
        t.join()
        ram = blocks["pc.ram"].array().reshape(-1, PAGE_SIZE)
        assert (ram[[0, 2, 4]] == 0xAA).all() and (ram[[1, 3]] == 0xBB).all()
        assert (ram[5:] == 0).all()
        assert (rx.pages, rx.zero_pages) == (5, 1)
        for s in senders:
            s.shutdown(socket.SHUT_WR)
        rx.finish(10)
        assert errors == []


def test_pages_a_channel_loaded_before_postcopy_was_advised_are_reported_with_later_ones(
        ) -> None:
    """Multifd channels run ahead of the main channel: what they loaded before it
    reached POSTCOPY_ADVISE must still count as brought by precopy."""
    blocks: dict[str, Any] = {"pc.ram": FakeBlock(PAGES)}
    loader = RamLoader(blocks)
    reported: set[int] = set()

    def on_loaded(block: str, offsets: npt.NDArray[np.uint64]) -> None:
        assert block == "pc.ram"
        reported.update((offsets // PAGE_SIZE).tolist())

    with receivers(1, blocks, loader) as (rx, _blocks, senders, errors):
        connect(rx, senders, 0)
        send_pages(senders[0], 1, [0, 9], [3], 0xCC)
        senders[0].sendall(sync_packet(2))
        rx.flush()
        loader.report_to(on_loaded)  # the main channel reaches POSTCOPY_ADVISE
        assert reported == {0, 3, 9}
        send_pages(senders[0], 3, [12], [13], 0xDD)
        senders[0].sendall(sync_packet(4))
        rx.flush()
        assert reported == {0, 3, 9, 12, 13}
        senders[0].shutdown(socket.SHUT_WR)
        rx.finish(10)
        assert errors == []


def test_a_channel_of_another_migration_is_refused() -> None:
    with receivers(1) as (rx, _blocks, senders, _errors), \
            pytest.raises(RemoteProtocolError, match="belongs to migration"):
        connect(rx, senders, 0, uuid=bytes(16))


def test_a_channel_id_seen_twice_is_refused() -> None:
    with receivers(2) as (rx, _blocks, senders, _errors):
        connect(rx, senders, 1)
        with pytest.raises(RemoteProtocolError, match="arrives twice"):
            connect(rx, senders, 1)


def test_a_channel_that_ends_before_its_sync_fails_the_flush() -> None:
    with receivers(1) as (rx, _blocks, senders, _errors):
        connect(rx, senders, 0)
        send_pages(senders[0], 1, [7], [], 1)
        senders[0].shutdown(socket.SHUT_WR)
        with pytest.raises(RemoteProtocolError, match="ended before the SYNC"):
            rx.flush()


def test_a_bad_packet_is_reported_as_the_receivers_error() -> None:
    with receivers(1) as (rx, _blocks, senders, errors):
        connect(rx, senders, 0)
        senders[0].sendall(b"\0" * 320)
        with pytest.raises(RemoteProtocolError, match="magic"):
            rx.flush()
        assert errors and isinstance(errors[0], RemoteProtocolError)
