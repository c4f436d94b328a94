"""The source side of a migration: setup, dirty-page rounds, stop-and-copy.

Theory of operation
-------------------
A :class:`SourceMigration` is one outgoing migration of one VM, run by its own
*migration thread* (:meth:`SourceMigration._run`)::

    setup    connect, QEVM preamble, "ram" START section with the block list,
             dirty logging on, every page marked dirty
    active   rounds: sync the dirty log, decide whether to converge, send every
             dirty page (PART sections); MIGRATION_PASS per round
    stop     pause the vCPUs (runstate finish-migrate), last sync, send what is
             left in the "ram" END section, then the CPU and serial state (FULL
             sections) and EOF
    postcopy (migrate-start-postcopy) close the multifd channels, if any, and
             discard while the guest still runs (catch-up); pause, discard what the
             guest dirtied since, the device state in a package with LISTEN and RUN;
             then send background pages while the urgent-sender design answers
             requests
    done     completed (source runstate postmigrate) / failed / cancelled

The order of the stream is written by module-level functions (:func:`write_stream_head`,
:func:`device_sections`, :func:`end_postcopy_stream`) that the protocol tests drive too.
How page requests are served is one :class:`~livemig.migration.urgent_sender.UrgentSender`
chosen in the constructor from the parameters at ``migrate``; a later
``migrate-set-parameters`` changes only bandwidth and the downtime limit.

Convergence starts as QEMU's: when the time to send what remains at the bandwidth
measured in the last round is below ``downtime-limit``, the migration may stop and copy.
``downtime-limit`` is a ceiling, not a target (:class:`Convergence`): while the last
round still shrank what is left to at most three quarters (so the next round will
likely shrink it again) and the pause would last more than a few milliseconds, livemig
runs one more round with the guest running instead of pausing it for what that round
would have sent: a shorter pause for a somewhat longer migration.  The first round is
no evidence that rounds stopped shrinking: it sends every page, into a destination
that touches its memory for the first time, so a guest writing a quarter of the link's
speed can dirty all of RAM meanwhile, and the second round shows the real race.  The
iteration cap
(``x-max-iterations``) forces the stop-and-copy so a migration always ends.

Failure or cancel in precopy leaves the source VM as it was: dirty logging off, the
vCPUs running if they were, guest RAM untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from livemig.errors import ChannelClosedError, MigrationCancelled, MigrationError
from livemig.kernel.sock import Buffer
from livemig.migration import handshake as hs
from livemig.migration.channel import (
    Channel,
    ChannelWriter,
    MigrationUri,
    connect,
    quiet_background,
)
from livemig.migration.handshake import Handshake, block_table
from livemig.migration.helper import HelperServer
from livemig.migration.multifd import PrecopyPages, choose_precopy_pages, require_socket_uri
from livemig.migration.ratelimit import BandwidthMeter, RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue, ReturnPathReader
from livemig.migration.sender import OutChannel, PageSender
from livemig.migration.state import (
    Capabilities,
    MigrationInfo,
    MigrationStatus,
    Parameters,
    StatusMachine,
    detached,
    log_failure,
)
from livemig.migration.tls import TlsEndpoint
from livemig.migration.trace import Tracer
from livemig.migration.urgent_sender import UrgentSender, choose_urgent_sender
from livemig.migration.vmdesc import (
    DevicePayload,
    capabilities_payload,
    describe,
    device_payloads,
)
from livemig.runtime import NamedThread, SwitchInterval
from livemig.units import PAGE_SIZE
from livemig.vmm.vm import RunState, Vm
from livemig.wire.blocks import BlockInfo, host_page_summary
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder

log = logging.getLogger("livemig.source")

EventSink = Callable[[str, dict[str, Any]], None]
# Postcopy recovery: how long the destination may take to send its bitmaps and ack.
RESUME_TIMEOUT_S = 30.0
# PING values: 1 asks whether the destination took POSTCOPY_ADVISE; SWITCHOVER_PING + i
# marks the end of the switchover's catch-up round i.  How long a PONG may take.
ADVISE_PING = 1
ADVISE_DEAD_LINKS = 4  # dead-link timeouts the PONG after ADVISE may take
SWITCHOVER_PING = 2
PONG_TIMEOUT_S = 30.0
# How long a failing migration waits for the return-path reader to say why it ended.
RETURN_PATH_JOIN_S = 1.0
# Postcopy switchover: catch-up rounds while the guest still runs, at most this many,
# ending once a round discards no more than this many ranges.
CATCH_UP_ROUNDS = 4
CATCH_UP_FEW_RANGES = 64
# Precopy: once what is left fits in downtime-limit, one more round while the last one
# left at most this fraction of what the one before left, and the pause would be longer
# than SHORT_PAUSE_S.
KEEP_SHRINKING = 0.75
SHORT_PAUSE_S = 0.005


# --- the order of the stream (docs/STREAM.md); also driven by the protocol tests -------
def write_stream_head(main: OutChannel, blocks: Mapping[str, BlockInfo],
                      handshake: Handshake) -> None:
    """Preamble, the capabilities section, the return path and postcopy advice, and
    the ``ram`` section's START with the block table."""
    enc, writer = main.encoder, main.writer
    writer.write([enc.preamble()])
    # Capabilities both sides must agree on, before anything else (QEMU validates its
    # own in the configuration section).
    writer.write(device_sections(enc, [capabilities_payload(handshake)]))
    if handshake.postcopy_ram:
        writer.write([enc.open_return_path(), enc.postcopy_advise(host_page_summary(blocks))])
    writer.write([enc.ram_start(hs.RAM.section_id), enc.mem_size(blocks),
                  enc.close_ram_section()])
    writer.flush()


def postcopy_out_channel(writer: ChannelWriter) -> OutChannel:
    """The postcopy channel's sending end, its preamble sent."""
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
    ch = OutChannel("postcopy", enc, writer)
    ch.writer.write_now([enc.preamble()])
    return ch


def device_sections(enc: Encoder, payloads: Sequence[DevicePayload]) -> list[Buffer]:
    """The device sections (:func:`~livemig.migration.vmdesc.device_payloads`: the run
    state the guest had before migration -- the destination starts the guest only if it
    was running here --, each vCPU, the serial)."""
    out: list[Buffer] = []
    for p in payloads:
        out += enc.device_state(p.section.section_id, p.section.name, p.data,
                                instance_id=p.instance_id, version_id=p.section.version)
    return out


def end_postcopy_stream(sender: PageSender, urgent: UrgentSender) -> dict[str, int]:
    """Every page is sent: end the postcopy channel (after the last urgent page), then
    the ``ram`` section and the main stream.  Returns the urgent design's trace counts."""
    counts = urgent.finish()
    enc, writer = sender.main.encoder, sender.main.writer
    writer.write([enc.ram_end(hs.RAM.section_id), enc.close_ram_section(), enc.eof()])
    writer.flush()
    sender.reset_channel()
    return counts


class Convergence:
    """When precopy may stop and copy (see the module docstring): fed what each sync
    left, in order."""

    def __init__(self) -> None:
        self._previous: int | None = None  # what the sync before left

    def ready(self, remaining: int, bytes_per_second: float, limit_s: float,
              rounds: int) -> bool:
        """After a sync that left ``remaining`` bytes, the last round having sent
        ``bytes_per_second``: whether to stop now (``rounds`` done so far)."""
        pause_s = remaining / bytes_per_second if bytes_per_second > 0 else float("inf")
        shrinking = self._previous is not None and remaining <= self._previous * KEEP_SHRINKING
        self._previous = remaining
        if rounds == 0 or pause_s > limit_s:
            return False
        if pause_s <= SHORT_PAUSE_S:
            return True
        # Stalled rounds stop it, but only from the second: see the module docstring.
        return rounds >= 2 and not shrinking


class SourceMigration:
    """One outgoing migration (see the module docstring for its phases).

    ``params`` is the snapshot taken at ``migrate``: the urgent-sender design is chosen
    from it once, here; :meth:`update_params` later changes only the live fields.
    """

    def __init__(self, vm: Vm, uri: MigrationUri, caps: Capabilities, params: Parameters,
                 emit: EventSink | None = None, tracer: Tracer | None = None, *,
                 helpers: HelperServer, switch: SwitchInterval | None = None,
                 postcopy_channel_first: bool = False,
                 tls: TlsEndpoint | None = None) -> None:
        """``helpers``: the process's helper server (livemig.migration.helper).
        ``switch``: the process's owner of the GIL switch interval (one per process,
        shared by every migration in it).  ``tls``: secures every connection (tls-creds)."""
        require_socket_uri(caps, uri)
        self.vm = vm
        self.switch = switch or SwitchInterval()
        self.uri = uri
        self.tls = tls
        self.caps = caps
        self.params = params
        self.urgent = choose_urgent_sender(caps, params, helpers)
        self._emit = emit or (lambda _e, _d: None)
        self.info = MigrationInfo()
        self.status = StatusMachine(self._on_status)
        self._cancel = threading.Event()
        self._postcopy_requested = threading.Event()
        self.requests = RequestQueue()
        self._rp: ReturnPathReader | None = None
        self._channels: list[Channel] = []  # every connection, for shutdown
        self._main: Channel | None = None
        self._sender: PageSender | None = None
        # How precopy pages travel (multifd or the main channel), chosen at setup.
        self._precopy: PrecopyPages | None = None
        self.trace = tracer or Tracer()
        # Test hook: connect the postcopy channel before the main one (the destination
        # must tell them apart whatever order they arrive in).
        self.postcopy_channel_first = postcopy_channel_first
        self._paused_by_us = False
        self._was_running = False
        self._runstate_before = RunState.PAUSED.value
        self._handshake = self.urgent.handshake()
        # Postcopy recovery: what cut the link (any thread), the resume request, and the
        # bytes sent on connections that are gone.
        self._link_error: Exception | None = None
        self._resume_cond = threading.Condition()
        self._previous_bytes = 0
        self._thread = NamedThread(target=self._run, name="migration", daemon=True)

    # --- control (any thread) -------------------------------------------------------------
    def start(self) -> None:
        self.info.start_ns = time.monotonic_ns()
        self.status.set(MigrationStatus.SETUP)
        self._thread.start()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the next opportunity.  As in QEMU, not an
        error once precopy is over (completed, failed, or already in postcopy): the
        command races with the migration's end, and a client cannot avoid that race."""
        if not self.caps.postcopy_ram:
            raise MigrationError("Enable postcopy with migrate-set-capabilities before the "
                                 "start of migration")
        if self.status.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            self._postcopy_requested.set()

    def abort(self) -> None:
        """The process is shutting down: stop whatever phase we are in."""
        self._cancel.set()
        self.disconnect()
        with self._resume_cond:
            self._resume_cond.notify_all()

    def pause(self) -> None:
        """migrate-pause: in postcopy, drop the connections; the migration pauses and
        waits for :meth:`resume`, as when the network fails."""
        self.status.status.require_pausable()
        self._link_failed(MigrationError("paused by migrate-pause"))

    def resume(self, uri: MigrationUri) -> None:
        """migrate resume=true: go on with a paused postcopy over a new connection."""
        with self._resume_cond:
            if self.status.status is not MigrationStatus.POSTCOPY_PAUSED:
                raise MigrationError("Cannot resume if there is no paused migration")
            self.uri = uri
            self.status.set(MigrationStatus.POSTCOPY_RECOVER_SETUP)
            self._resume_cond.notify_all()

    def _link_failed(self, e: Exception) -> None:
        """A connection of this migration failed (any thread): the migration thread
        notices at once, because every connection is shut down."""
        if self._link_error is None:
            self._link_error = detached(e)
        self.disconnect()

    def disconnect(self) -> None:
        """Shut down every connection of this migration, as a dead network would."""
        for ch in list(self._channels):
            ch.shutdown()

    def update_params(self, params: Parameters) -> None:
        """migrate-set-parameters during a migration: only the live fields change;
        bandwidth applies at once."""
        self.params = self.params.live_update(params)
        sender = self._sender
        if sender is not None:
            postcopy = self.status.status.postcopy
            sender.limiter.limit = (self.params.max_postcopy_bandwidth if postcopy
                                    else self.params.max_bandwidth)

    def cancel(self) -> None:
        if self.status.status.finished:
            return
        if self.status.status.postcopy:
            raise MigrationError("Postcopy is active: the guest's memory is split between "
                                 "the two hosts, cancel is not possible")
        self._cancel.set()
        self.status.try_set(MigrationStatus.CANCELLING)
        if self._main is not None:
            self._main.shutdown()

    def refresh_stats(self) -> None:
        """Live counters for query-migrate (the migration thread updates the rest once a
        round; a throttled round can last seconds)."""
        sender = self._sender
        if sender is None or self.status.status not in (MigrationStatus.ACTIVE,
                                                          MigrationStatus.POSTCOPY_ACTIVE):
            return
        st = self.info.ram
        if self._precopy is not None:
            self._precopy.update_stats(st)
        st.transferred = self._transferred(sender)
        st.remaining = sender.dirty_pages() * PAGE_SIZE
        self.urgent.update_stats(st)

    def _transferred(self, sender: PageSender) -> int:
        """Bytes sent on every channel of this migration (one definition for the live
        and the final figure)."""
        extra = self._precopy.bytes_sent() if self._precopy is not None else 0
        return (self._previous_bytes + sender.main.writer.bytes_sent
                + self.urgent.bytes_sent() + extra)

    def query(self) -> dict[str, Any]:
        """query-migrate's answer for this migration."""
        self.refresh_stats()
        precopy = self._precopy.to_qmp() if self._precopy is not None else {}
        return {**self.info.to_qmp(), "x-postcopy-urgent-sender": self.urgent.mode.value,
                **precopy, **self.trace.to_qmp("postcopy_preempt")}

    def wait(self, timeout: float | None = None) -> bool:
        return self.status.wait_finished(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _on_status(self, status: MigrationStatus) -> None:
        self.info.status = status
        if self.caps.events:
            self._emit("MIGRATION", {"status": status.value})

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        if self._rp is not None and self._rp.finished:
            raise MigrationError(f"the destination closed the return path: {self._rp.error}")

    def _interrupted(self) -> bool:
        """Stop the current round: cancel, a dead return path, or a postcopy switch."""
        return (self._cancel.is_set() or self._postcopy_requested.is_set()
                or (self._rp is not None and self._rp.finished))

    # --- the migration thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._was_running = self.vm.running
            self._runstate_before = self.vm.runstate.value
            sender = self._setup()
            self.status.set(MigrationStatus.ACTIVE)
            self._iterate(sender)
            if self._postcopy_requested.is_set():
                self._postcopy(sender)
            else:
                self._complete(sender)
        except Exception as e:
            self._fail(self._root_cause(e))
        finally:
            self.urgent.close()
            if self._precopy is not None:
                self._precopy.update_stats(self.info.ram)
                self._precopy.close()
            if self._sender is not None:
                self.urgent.update_stats(self.info.ram)
                self._sender.release()
            for ch in self._channels:
                ch.shutdown()
                ch.close()
            if self._rp is not None:
                self._rp.join(5)
            self.info.end_ns = time.monotonic_ns()

    def _connect(self, kind: ChannelKind) -> Channel:
        ch = connect(self.uri, name=kind.value, tls=self.tls, kind=kind)
        self._channels.append(ch)
        ch.detect_dead_peer(self.params.x_dead_link_timeout)
        return ch

    def _setup(self) -> PageSender:
        self.urgent.prepare(self.vm.blocks)
        preempt_first = self.caps.postcopy_preempt and self.postcopy_channel_first
        post = self._open_postcopy_channel() if preempt_first else None
        channel = self._main = self._connect(ChannelKind.MAIN)
        self.info.ram.total = sum(b.size for b in self.vm.blocks.values())
        blocks = block_table(self.vm.blocks)
        main = OutChannel("precopy", Encoder(postcopy=self.caps.postcopy_ram),
                          ChannelWriter(channel))
        shared = self.urgent.shared_bits()
        sender = PageSender(self.vm.blocks, main, hs.RAM.section_id, self.info.ram,
                            RateLimiter(self.params.max_bandwidth), self.trace,
                            bits=shared.bits if shared else None,
                            lock=shared.lock if shared else None)
        self._sender = sender
        self.urgent.attach(sender)
        sender.post = post
        precopy = self._precopy = choose_precopy_pages(self.caps, self.params, self.uri,
                                                       sender, self.vm.blocks, self.tls)
        # QEMU's suppress-vmdesc: no VM description after EOF.
        self._handshake = replace(self.urgent.handshake(),
                                  vmdesc=not self.params.x_suppress_vmdesc,
                                  **precopy.handshake())
        write_stream_head(main, blocks, self._handshake)
        if self.caps.postcopy_preempt and sender.post is None:
            sender.post = self._open_postcopy_channel()
        precopy.start()  # before the PING: the destination accepts them first
        if self.caps.postcopy_ram:
            # The destination checks page sizes and userfaultfd at ADVISE; its PONG
            # tells us it agreed (_postcopy_agreed waits for it).
            main.writer.write([main.encoder.ping(ADVISE_PING)])
            main.writer.flush()
            self._rp = ReturnPathReader(channel, blocks, self._on_request)
            self._rp.start()
        self.vm.set_dirty_logging(True)
        self.info.setup_ns = time.monotonic_ns() - self.info.start_ns
        return sender

    def _answer_timeout(self) -> float:
        """Seconds the destination may take to answer ADVISE (the PONG): a few dead-link
        timeouts when that is set (a silent peer that keeps its socket open never fills
        our buffers here, so TCP alone would not notice), else RESUME_TIMEOUT_S.  Not
        one: the destination answers once it has prepared postcopy, which includes
        starting its fault server process (seconds on a loaded host)."""
        ms = self.params.x_dead_link_timeout
        return ADVISE_DEAD_LINKS * ms / 1000 if ms > 0 else RESUME_TIMEOUT_S

    def _open_postcopy_channel(self) -> OutChannel:
        """The second connection, for requested pages only (postcopy preemption)."""
        self.trace("postcopy_preempt_enabled")
        return postcopy_out_channel(ChannelWriter(self._connect(ChannelKind.POSTCOPY)))

    def _iterate(self, sender: PageSender) -> None:
        meter = BandwidthMeter()
        last_sync = time.monotonic()
        convergence = Convergence()
        while True:
            self._check_cancel()
            before = sender.dirty_pages()
            remaining = sender.sync() * PAGE_SIZE
            now = time.monotonic()
            # Pages that became dirty since the last sync (ours: new bits only).
            self.info.ram.dirty_pages_rate = int(max(0, remaining // PAGE_SIZE - before)
                                                 / max(now - last_sync, 1e-3))
            last_sync = now
            self._update_stats(sender, remaining, meter.bytes_per_second)
            limit_s = self.params.downtime_limit / 1000  # live: may change between rounds
            converged = convergence.ready(remaining, meter.bytes_per_second, limit_s,
                                          self.info.rounds)
            if self._postcopy_requested.is_set():
                return
            if converged or self.info.rounds >= self.params.x_max_iterations:
                log.info("converging after %d rounds, %d bytes left", self.info.rounds,
                         remaining)
                return
            self.info.rounds += 1
            if self.caps.events:
                self._emit("MIGRATION_PASS", {"pass": self.info.rounds})
            meter.start(self._transferred(sender))
            self._precopy_pages.send_round(self._interrupted)
            meter.stop(self._transferred(sender))
            self._precopy_pages.update_stats(self.info.ram)

    @property
    def _precopy_pages(self) -> PrecopyPages:
        assert self._precopy is not None, "set up first"
        return self._precopy

    def _update_stats(self, sender: PageSender, remaining: int, bandwidth: float) -> None:
        st = self.info.ram
        st.remaining = remaining
        st.transferred = self._transferred(sender)
        st.precopy_bytes = st.transferred
        st.mbps = bandwidth * 8 / 1e6
        st.pages_per_second = int(bandwidth / PAGE_SIZE)
        if bandwidth > 0:
            self.info.expected_downtime_ms = int(remaining / bandwidth * 1000)

    def _stop_guest(self, sender: PageSender) -> float:
        """Downtime starts: pause the vCPUs (finish-migrate) and take the last dirty
        pages.  Returns the time it started."""
        self._check_cancel()
        t0 = time.monotonic()
        if self._was_running:
            self.vm.pause(RunState.FINISH_MIGRATE)
            self._paused_by_us = True
        else:
            self.vm.set_runstate(RunState.FINISH_MIGRATE)
        sender.sync()
        return t0

    def _device_payloads(self) -> list[DevicePayload]:
        runstate = RunState.RUNNING.value if self._was_running else self._runstate_before
        return device_payloads(self.vm.save_state(), runstate)

    def _complete(self, sender: PageSender) -> None:
        """Stop-and-copy: pause, send the rest and the device state, EOF."""
        t0 = self._stop_guest(sender)
        before = self._transferred(sender)
        enc, writer = sender.encoder, sender.writer
        writer.write([enc.ram_end(hs.RAM.section_id)])
        self._precopy_pages.send_rest()
        writer.write([enc.close_ram_section()])
        devices = self._device_payloads()
        writer.write(device_sections(enc, devices))
        writer.write([enc.eof()])
        if self._handshake.vmdesc:  # what QEMU's analyze-migration.py reads
            desc = describe([capabilities_payload(self._handshake), *devices])
            writer.write([enc.vm_description(desc)])
        writer.flush()
        writer.channel.seal()  # a file: image gets its checksum
        if self._rp is not None:
            self._rp.wait_shut(timeout=60)
        st = self.info.ram
        st.transferred = self._transferred(sender)
        st.downtime_bytes = st.transferred - before
        st.precopy_bytes = before
        st.remaining = 0
        self.info.downtime_ms = int((time.monotonic() - t0) * 1000)
        self.vm.set_dirty_logging(False)
        self.vm.set_runstate(RunState.POSTMIGRATE)
        self._paused_by_us = False
        self.status.set(MigrationStatus.COMPLETED)

    # --- postcopy ---------------------------------------------------------------------------
    def _on_request(self, req: PageRequest) -> None:
        """Return-path thread: the urgent-sender design serves or queues it."""
        self.urgent.on_request(req, self.requests)

    def _postcopy(self, sender: PageSender) -> None:
        """Switch the guest over to the destination, then send the rest on demand."""
        # The multifd channels synced at the end of the last round (and the destination
        # placed their pages before it reads past that round's flush): close them now,
        # while the guest still runs here, so that neither the pause nor the
        # destination's LISTEN waits for the helpers' round trips and EOFs.  The pages
        # still dirty go in postcopy, on the main and postcopy channels.
        self._precopy_pages.end()
        self._postcopy_agreed(sender)
        self._catch_up(sender)
        t0 = self._stop_guest(sender)
        before = self._transferred(sender)
        enc, writer = sender.encoder, sender.writer
        self._write_discards(sender)  # only what the guest dirtied in the last round
        package = enc.package()
        blob: list[Buffer] = [package.postcopy_listen(),
                              *device_sections(package, self._device_payloads()),
                              package.postcopy_run()]
        writer.write(enc.packaged(b"".join(blob)))
        writer.flush()
        self.info.downtime_ms = int((time.monotonic() - t0) * 1000)
        st = self.info.ram
        st.downtime_bytes = self._transferred(sender) - before
        st.precopy_bytes = before
        # From here the guest runs on the destination: failing no longer restarts it here.
        self._paused_by_us = False
        self.vm.set_dirty_logging(False)
        self.status.set(MigrationStatus.POSTCOPY_ACTIVE)
        # The limiter's pause ends early for a request (vanilla and migration-thread
        # preemption serve requests on this thread: they must not sleep off the limit).
        sender.limiter = RateLimiter(self.params.max_postcopy_bandwidth,
                                     sleep=self.requests.wait)
        # Requests (vanilla) or the background stream (preempt) must not wait behind
        # megabytes queued in the kernel.
        self.urgent.switchover(quiet_background(sender.writer.channel))
        with self.urgent.postcopy_gil(self.switch):
            self._postcopy_until_done(sender)
        st.transferred = self._transferred(sender)
        st.postcopy_bytes = st.transferred - before - st.downtime_bytes
        st.remaining = 0
        self.urgent.update_stats(st)
        self.vm.set_runstate(RunState.POSTMIGRATE)
        self.status.set(MigrationStatus.COMPLETED)

    def _postcopy_agreed(self, sender: PageSender) -> None:
        """Before anything stops our guest: the destination's PONG to ADVISE (its checks
        passed and its fault handler is up), then our urgent-sender design starts.  Not
        at setup: the helper processes of the urgent-process design import for a few
        hundred ms on both sides, and precopy pages flow meanwhile."""
        assert self._rp is not None
        self._rp.wait_pong(ADVISE_PING, timeout=self._answer_timeout())
        self.urgent.start(self.vm.blocks, sender.post.writer.channel if sender.post else None,
                          self.trace, self._link_failed, self._rp.thread_id)

    def _catch_up(self, sender: PageSender) -> None:
        """Before the guest stops: the destination drops what it holds of every page
        dirty here, and reads everything sent so far (PING, PONG), while the guest
        still runs here; again for what the guest dirtied meanwhile, until few pages
        are left.  The pause then covers only the pages dirtied after the last round,
        not the backlog of precopy pages queued in the sockets and thousands of
        discards (QEMU does both inside the pause).  Nothing is sent from here on but
        discards, so the destination receives no page it would have to drop again."""
        assert self._rp is not None
        enc, writer = sender.encoder, sender.writer
        for i in range(CATCH_UP_ROUNDS):
            self._check_cancel()
            sender.sync()
            ranges = self._write_discards(sender)
            writer.write([enc.ping(SWITCHOVER_PING + i)])
            writer.flush()
            self._rp.wait_pong(SWITCHOVER_PING + i, timeout=PONG_TIMEOUT_S)
            if ranges <= CATCH_UP_FEW_RANGES:
                return

    def _write_discards(self, sender: PageSender) -> int:
        """POSTCOPY_RAM_DISCARD for the dirty pages not discarded yet; returns how many
        ranges."""
        enc, writer = sender.encoder, sender.writer
        count = 0
        for name, ranges in sender.postcopy_discards():
            if len(ranges):
                writer.write([enc.postcopy_ram_discard(name, ranges)])
                count += len(ranges)
        return count

    def _postcopy_until_done(self, sender: PageSender) -> None:
        """Send the rest, requested pages first.  A failure of any connection pauses
        the migration until ``migrate resume=true`` (the guest runs on the destination
        and its memory is split: failing would lose it); only quitting ends it."""
        while True:
            try:
                sender.postcopy_loop(self.requests, self._postcopy_failed)
                self._check_postcopy_alive()
                self.trace.counts.update(end_postcopy_stream(sender, self.urgent))
                assert self._rp is not None
                self._rp.wait_shut(timeout=60)
                return
            except Exception as e:
                failure = detached(e)
            while True:
                self._pause(sender, failure)
                try:
                    if not self._resume(sender):
                        return  # the destination had completed; its SHUT was lost
                    break
                except Exception as e:
                    failure = detached(e)

    def _pause(self, sender: PageSender, failure: Exception) -> None:
        """Drop the connections, keep everything else (RAM, bitmaps), and wait for a
        resume; raise if the process quits meanwhile."""
        if self._cancel.is_set():
            raise MigrationError("the source quit in postcopy: the guest's memory is split "
                                 f"between the two hosts ({failure})")
        error = self._link_error or failure
        log_failure(log, "postcopy paused", error)
        self.info.error_desc = str(error)
        self._previous_bytes += sender.main.writer.bytes_sent + (
            sender.post.writer.bytes_sent if sender.post is not None else 0)
        self.disconnect()
        if self._rp is not None:
            self._rp.join(5)
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        self.urgent.pause()
        while self.requests.pop() is not None:
            pass  # the destination asks again for what it still misses
        self._link_error = None
        with self._resume_cond:
            self.status.set(MigrationStatus.POSTCOPY_PAUSED)
            self._resume_cond.wait_for(
                lambda: self.status.status is MigrationStatus.POSTCOPY_RECOVER_SETUP
                or self._cancel.is_set())
        if self._cancel.is_set():
            raise MigrationError("the source quit in postcopy-paused: the guest's memory "
                                 "is split between the two hosts")

    def _resume(self, sender: PageSender) -> bool:
        """Connect anew, learn what the destination has (RECV_BITMAP per block), mark
        everything else dirty, POSTCOPY_RESUME, and go on when it is acknowledged.

        False if the destination answered SHUT 0 instead of the bitmaps: it had
        received everything and completed, and only its SHUT was lost with the old
        connection; the migration is then complete here too."""
        channel = self._main = self._connect(ChannelKind.MAIN)
        post_ch = self._connect(ChannelKind.POSTCOPY) if self.caps.postcopy_preempt else None
        self.status.set(MigrationStatus.POSTCOPY_RECOVER)
        main = OutChannel("precopy", Encoder(postcopy=True, resumed=[hs.RAM.section_id]),
                          ChannelWriter(channel))
        post = postcopy_out_channel(ChannelWriter(post_ch)) if post_ch is not None else None
        sender.reconnect(main, post)
        blocks = block_table(self.vm.blocks)
        self._rp = ReturnPathReader(channel, blocks, self._on_request)
        self._rp.start()
        enc = main.encoder
        main.writer.write([enc.preamble(), *(enc.recv_bitmap(name) for name in blocks)])
        main.writer.flush()
        received = self._rp.wait_bitmaps(list(blocks), RESUME_TIMEOUT_S)
        if received is None:
            log.info("the destination had completed: its SHUT came on the new connection")
            self.info.error_desc = ""
            return False
        dirty = sum(sender.bitmaps[name].resync(bits) for name, bits in received.items())
        log.info("resuming postcopy: %d pages to send", dirty)
        main.writer.write_now([enc.postcopy_resume()])
        self._rp.wait_resume_ack(RESUME_TIMEOUT_S)
        quiet_background(channel)
        self.urgent.start(self.vm.blocks, post_ch, self.trace, self._link_failed,
                          self._rp.thread_id)
        self.info.error_desc = ""
        self.status.set(MigrationStatus.POSTCOPY_ACTIVE)
        return True

    def _postcopy_failed(self) -> bool:
        return (self._link_error is not None or self._rp is None
                or (self._rp.finished and self._rp.shut_status is None))

    def _check_postcopy_alive(self) -> None:
        if self._postcopy_failed():
            err = self._link_error or (self._rp.error if self._rp is not None else None)
            raise MigrationError(f"the destination vanished during postcopy: {err}")

    def _root_cause(self, e: Exception) -> Exception:
        """A dead link fails every thread that uses the connection, and the kernel
        reports why (ETIMEDOUT after the dead-link timeout) to the first of them only: if
        that was the return-path reader, this thread saw just a closed connection.
        Report both."""
        if not isinstance(e, ChannelClosedError) or self._rp is None:
            return e
        self._rp.join(RETURN_PATH_JOIN_S)  # its connection is dead: it ends at once
        why = self._rp.error
        if why is None:
            return e
        return MigrationError(f"{e} (the return path: {why})")

    def _fail(self, e: Exception) -> None:
        """Leave the source VM exactly as it was before the migration."""
        # In postcopy nothing is cancelled any more (the guest runs on the destination):
        # quitting then ends the migration as failed.
        cancelled = ((isinstance(e, MigrationCancelled) or self._cancel.is_set())
                     and not self.status.status.postcopy)
        if not cancelled:
            log_failure(log, "migration failed", e)
        self.info.error_desc = "" if cancelled else str(e)
        try:
            self.vm.set_dirty_logging(False)
            if self._paused_by_us:
                self.vm.set_runstate(RunState.PAUSED)
                self.vm.start()
            elif self.vm.runstate is RunState.FINISH_MIGRATE:
                self.vm.set_runstate(RunState.PAUSED)
        finally:
            self._paused_by_us = False
            if cancelled:
                self.status.try_set(MigrationStatus.CANCELLING)
                self.status.try_set(MigrationStatus.CANCELLED)
            else:
                self.status.try_set(MigrationStatus.FAILED)
