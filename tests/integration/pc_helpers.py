"""Helpers for the postcopy and preemption integration tests: VM pairs, QMP waits,
the switch to postcopy, and a hostile destination.

Theory of operation
-------------------
A test builds a :class:`Pair`: two in-process :class:`~livemig.instance.Instance`
objects (a running source guest and an empty destination), each with its QMP socket
and a real ``qemu.qmp`` client (:class:`~livemig.control.client.QmpClient`), and
drives the migration only through QMP, as one drives QEMU.  The Python objects stay
reachable for what QMP cannot show (serial output, RAM, test hooks).

Postcopy is started the way ``livemig demo`` does it: a bandwidth limit keeps precopy
from converging, and ``migrate-start-postcopy`` is sent once ``query-migrate`` shows
that the first round is over (``ram.dirty-sync-count >= 2``).

Every wait is bounded (this machine is a nested VM: bounds are generous) so a hang
becomes a failure.  Instances are closed with :meth:`~livemig.instance.Instance.close`,
what ``quit`` does, whatever state their migrations are in (it stops a source even in
postcopy, where ``migrate_cancel`` is refused); an error while closing fails the test.

:class:`FakeDestination` is a raw socket that accepts a source's main channel,
decodes it with livemig's sans-IO decoder, answers PINGs on the return path and lets
a test send whatever it wants back at chosen points of the stream.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import pytest

from livemig.control.client import QmpClient
from livemig.errors import ChannelClosedError
from livemig.guests import DEFAULT_RANGE_START
from livemig.instance import Instance
from livemig.kernel.mman import Backing
from livemig.migration.state import MigrationStatus
from livemig.runtime import SwitchInterval
from livemig.units import MIB
from livemig.vmm.boot import boot_guest
from livemig.vmm.vm import Vm, VmConfig
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.decoder import Decoder
from livemig.wire.returnpath import ReturnPathEncoder

MEM = 32 * MIB
GUEST_PAGES = (MEM - DEFAULT_RANGE_START) // 4096  # what x-guest-check covers
FINISHED = helpers.FINISHED
# Precopy must not converge before the test switches to postcopy: with this limit a
# round over 32 MiB of pages the guests keep dirtying takes about a second.
SLOW_PRECOPY = 30_000_000
# ... and a downtime limit no stop-and-copy can meet keeps it from converging even when
# the guest dirties little during a round (a busy machine slows the guest down).
NO_CONVERGENCE = {"max-bandwidth": SLOW_PRECOPY, "downtime-limit": 1}
LATENCY_KEYS = ("postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-vcpu-latency",
                "postcopy-latency",
                "postcopy-latency-dist", "x-postcopy-latency-percentiles")


def capabilities(*, postcopy: bool = True, preempt: bool = False,
                 events: bool = True, multifd: bool = False) -> list[dict[str, Any]]:
    """The ``migrate-set-capabilities`` argument for this combination."""
    return [{"capability": "events", "state": events},
            {"capability": "postcopy-ram", "state": postcopy},
            {"capability": "postcopy-preempt", "state": preempt},
            {"capability": "multifd", "state": multifd}]


def hugepages_checked(request: pytest.FixtureRequest, *backings: Backing) -> None:
    """Use conftest's ``hugepages_restored`` check when a VM reserves huge pages.

    Only then: the check reads the system-wide pool, which anything else running on the
    machine may change, so tests that reserve nothing do not take that risk."""
    if any(b.is_hugetlb for b in backings):
        request.getfixturevalue("hugepages_restored")


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --- instances ----------------------------------------------------------------------------
@contextlib.contextmanager
def guest_instance(tmp_path: Path, guest: str | None, name: str, mem: int = MEM,
                   backing: Backing = Backing.ANON_4K,
                   switch: SwitchInterval | None = None) -> Iterator[Instance]:
    """An instance with a QMP socket: running ``guest`` (two passes done), or empty."""
    inst = Instance(Vm(VmConfig(mem, backing)), str(tmp_path / f"{name}.qmp"), switch=switch)
    try:
        if guest is not None:
            boot_guest(inst.vm, guest)
            inst.vm.start()
            assert inst.vm.serial.wait_for(2, timeout=60), inst.vm.serial.output[-80:]
        yield inst
    finally:
        inst.close()


@contextlib.contextmanager
def client(inst: Instance) -> Iterator[QmpClient]:
    assert inst.qmp is not None
    c = QmpClient(str(inst.qmp.path), timeout=30)
    try:
        yield c
    finally:
        c.close()


@dataclass
class Pair:
    """A source and a destination instance with their QMP clients."""

    src: Instance
    dst: Instance
    sq: QmpClient
    dq: QmpClient
    uri: str
    guest: str

    def listen(self) -> None:
        self.dq.execute("migrate-incoming", uri=self.uri)

    def migrate(self) -> None:
        self.sq.execute("migrate", uri=self.uri)


@dataclass(frozen=True)
class PairConfig:
    guest: str = "ab"
    backing: Backing = Backing.ANON_4K
    dst_backing: Backing | None = None  # None: same as the source
    mem: int = MEM
    src_caps: tuple[tuple[str, bool], ...] = ()
    dst_caps: tuple[tuple[str, bool], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    dst_prealloc: bool = False  # the destination's RAM is preallocated (--mem-prealloc)


def caps_of(**flags: bool) -> tuple[tuple[str, bool], ...]:
    """``caps_of(postcopy=True, preempt=True)`` for :class:`PairConfig`."""
    return tuple(flags.items())


@contextlib.contextmanager
def migration_pair(tmp_path: Path, cfg: PairConfig) -> Iterator[Pair]:
    """A running source and a waiting destination, capabilities and parameters set.

    The destination is closed first, so a source still streaming to it fails (and
    ends) instead of waiting for a peer that is gone."""
    switch = SwitchInterval()  # both instances run in this process: one owner
    with guest_instance(tmp_path, cfg.guest, "src", cfg.mem, cfg.backing, switch) as src, \
            client(src) as sq:
        dst = Instance(Vm(VmConfig(cfg.mem, cfg.dst_backing or cfg.backing,
                                   prealloc=cfg.dst_prealloc)),
                       str(tmp_path / "dst.qmp"), switch=switch)
        try:
            with client(dst) as dq:
                sq.execute("migrate-set-capabilities", capabilities=capabilities(
                    **dict(cfg.src_caps or caps_of(postcopy=True))))
                dq.execute("migrate-set-capabilities", capabilities=capabilities(
                    **dict(cfg.dst_caps or cfg.src_caps or caps_of(postcopy=True))))
                if cfg.params:
                    sq.execute("migrate-set-parameters", **dict(cfg.params))
                yield Pair(src, dst, sq, dq, f"unix:{tmp_path / 'mig.sock'}", cfg.guest)
        finally:
            dst.close()
            out = src.outgoing
            if out is not None:
                # A source still streaming to it fails (precopy) or pauses (postcopy:
                # the guest ran over there); closing the source then ends it.
                assert wait_until(lambda: out.status.status.finished
                                  or out.status.status is MigrationStatus.POSTCOPY_PAUSED,
                                  30), out.status.status


# --- QMP waits ----------------------------------------------------------------------------
def wait_migration(qmp: QmpClient, timeout: float = 90,
                   until: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    """helpers.wait_migration with the longer default postcopy runs need."""
    return helpers.wait_migration(qmp, timeout, until)


def start_postcopy_after_first_round(qmp: QmpClient, timeout: float = 90) -> dict[str, Any]:
    """Send migrate-start-postcopy once the first precopy round is over."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        assert info.get("status") in ("setup", "active"), f"no postcopy switch: {info}"
        if info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 2:
            qmp.execute("migrate-start-postcopy")
            return info
        assert time.monotonic() < deadline, f"first round not over: {info}"
        time.sleep(0.02)


def run_postcopy(pair: Pair, timeout: float = 90) -> tuple[dict[str, Any], dict[str, Any]]:
    """Listen, migrate, switch after one round; the final query-migrate of both sides."""
    pair.listen()
    pair.migrate()
    start_postcopy_after_first_round(pair.sq, timeout)
    src_info = wait_migration(pair.sq, timeout)
    dst_info = wait_migration(pair.dq, timeout)
    return src_info, dst_info


def events(qmp: QmpClient, until: Callable[[list[dict[str, Any]]], bool] = lambda _e: True,
           timeout: float = 10) -> list[dict[str, Any]]:
    """Events received so far, plus any arriving until ``until(events)`` holds."""
    got: list[dict[str, Any]] = list(qmp.events())
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        got += qmp.events(wait=0.1)
    return got


def migration_statuses(evs: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in evs if e["event"] == "MIGRATION"]


def ends_migration(evs: list[dict[str, Any]]) -> bool:
    return any(MigrationStatus(s).finished for s in migration_statuses(evs))


def guest_check(qmp: QmpClient, guest: str) -> dict[str, Any]:
    """Pause the VM if it runs, then run the host-side check of ``guest``'s RAM."""
    if qmp.execute("query-status")["running"]:
        qmp.execute("stop")
    result: dict[str, Any] = qmp.execute("x-guest-check", guest=guest)
    return result


def runs_on(vm: Vm, passes: int = 2, timeout: float = 60) -> bool:
    """The guest prints ``passes`` more B's, and never an E, within ``timeout``."""
    before = vm.serial.output.count(b"B")
    vm.serial.wait_for(passes, timeout=timeout)  # also returns at an E
    out = vm.serial.output
    return b"E" not in out and out.count(b"B") - before >= passes


# --- a link that can be cut -------------------------------------------------------------
class Relay:
    """A unix-socket relay between a source and a destination, so a test can cut the
    migration's connections the way a dead link does, without touching either side.

    Every connection to :attr:`uri` (the main channel, and with preemption the
    postcopy channel) is joined to a new connection to ``target`` (a unix path) by
    two copying threads.  :meth:`cut` shuts every socket down: both sides see their
    channels end at once.
    """

    def __init__(self, path: str, target: str, *, record: bool = False) -> None:
        """``record``: keep every byte relayed, per connection (:attr:`captured`: one
        [source to destination, destination to source] pair per connection)."""
        self.path, self._target = path, target
        self.captured: list[tuple[bytearray, bytearray]] | None = [] if record else None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="relay", daemon=True)]
        self._threads[0].start()

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._listener.accept()
            except OSError:
                return  # cut
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(self._target)
            self._socks += [a, b]
            sinks: tuple[bytearray | None, bytearray | None] = (None, None)
            if self.captured is not None:
                sinks = (bytearray(), bytearray())
                self.captured.append(sinks)  # type: ignore[arg-type]
            for (src, dst), sink in zip(((a, b), (b, a)), sinks, strict=True):
                t = threading.Thread(target=self._copy, args=(src, dst, sink), daemon=True,
                                     name="relay")
                t.start()
                self._threads.append(t)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, sink: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 20):
                if sink is not None:
                    sink += data
                dst.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the other end is gone (or cut): pass the end on
        _shut(dst, socket.SHUT_WR)

    def cut(self) -> None:
        """Shut every connection (and the listener) down and wait for the threads."""
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in self._socks:
            _shut(s, socket.SHUT_RDWR)
        for t in self._threads:
            t.join(30)
            assert not t.is_alive(), "a relay thread did not end"
        for s in self._socks:
            s.close()
        os.unlink(self.path)


def _shut(sock: socket.socket, how: int) -> None:
    """shutdown(); a socket whose peer has already gone is shut already (ENOTCONN)."""
    try:
        sock.shutdown(how)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


# --- a hostile destination ----------------------------------------------------------------
def raw_request(block: str, start: int, length: int) -> bytes:
    """A REQ_PAGES_ID message built by hand: ReturnPathEncoder refuses bad requests."""
    name = block.encode()
    payload = struct.pack(">QI", start, length) + bytes([len(name)]) + name
    return struct.pack(">HH", 3, len(payload)) + payload


Attack = Callable[[ev.Event | ev.NeedData], bytes | None]


class FakeDestination:
    """Accepts one main channel on a unix socket and plays a destination (see module doc).

    ``attack(event)`` is called for every decoded event; bytes it returns are sent on
    the return path at once.  ``error`` is what the decoder refused (None: every record
    the source sent was valid for ``blocks``); ``ended`` says the source closed.
    """

    def __init__(self, path: str, blocks: Mapping[str, BlockInfo], attack: Attack) -> None:
        self.path = path
        self._dec = Decoder(blocks, postcopy=True)
        self._rp = ReturnPathEncoder()
        self._attack = attack
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener.bind(path)
        self._listener.listen(4)
        self._conn: socket.socket | None = None
        self.seen: list[str] = []
        self.error: Exception | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-destination", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def _run(self) -> None:
        try:
            self._listener.settimeout(60)
            conn, _ = self._listener.accept()
            conn.settimeout(120)
            self._conn = conn
            self._serve(conn)
        except (ChannelClosedError, OSError):
            pass  # the source went away: what the tests expect in the end
        except Exception as e:
            self.error = e
        finally:
            self.ended.set()

    def _serve(self, conn: socket.socket) -> None:
        page = bytearray(4096)
        while True:
            e = self._dec.next_event()
            if e is ev.NEED_DATA:
                self._dec.receive_data(conn.recv(1 << 20))
                continue
            self.seen.append(type(e).__name__)
            if isinstance(e, ev.PageHeader):
                self._payload(conn, page)
            elif isinstance(e, ev.Ping):
                conn.sendall(self._rp.pong(e.value))
            reply = self._attack(e)
            if reply:
                conn.sendall(reply)
            if isinstance(e, ev.StreamEnd):
                return

    def _payload(self, conn: socket.socket, page: bytearray) -> None:
        got = self._dec.take_payload(page)
        while self._dec.payload_remaining:
            data = conn.recv(1 << 20)
            if not data:
                raise ChannelClosedError("source closed inside a page")
            self._dec.receive_data(data)
            got += self._dec.take_payload(memoryview(page)[got:])

    def close(self) -> None:
        for s in (self._conn, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        self._thread.join(30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
