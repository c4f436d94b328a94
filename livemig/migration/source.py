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
    done     completed (source runstate postmigrate) / failed / cancelled

Convergence follows QEMU: when the time to send what remains at the bandwidth measured
in the last round is below ``downtime-limit``, stop and copy.  The iteration cap
(``x-max-iterations``) forces the stop-and-copy so a migration always ends.

Failure or cancel in precopy leaves the source VM as it was: dirty logging off, the
vCPUs running if they were, guest RAM untouched.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.errors import MigrationCancelled, MigrationError, QmpError, RemoteProtocolError
from livemig.migration.channel import (
    Channel,
    ChannelWriter,
    MigrationUri,
    connect,
    quiet_background,
)
from livemig.migration.ratelimit import BandwidthMeter, RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue, ReturnPathReader
from livemig.migration.sender import OutChannel, PageSender
from livemig.migration.state import (
    Capabilities,
    MigrationInfo,
    MigrationStatus,
    Parameters,
    StatusMachine,
    log_failure,
)
from livemig.migration.trace import Tracer
from livemig.migration.urgent import SharedBits, UrgentServer
from livemig.vmm.vm import RunState, Vm
from livemig.wire.blocks import BlockInfo, host_page_summary
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder

log = logging.getLogger("livemig.source")

RAM_SECTION_ID = 0
POSTCOPY_SWITCH_INTERVAL = 50e-6
CPU_SECTION_ID = 1
SERIAL_SECTION_ID = 2
GLOBALSTATE_SECTION_ID = 3
CAPS_SECTION_ID = 4


def agreed_capabilities(caps: Capabilities) -> str:
    """The capabilities source and destination must both have (or both lack)."""
    names = [name for name, on in (("postcopy-ram", caps.postcopy_ram),
                                   ("postcopy-preempt", caps.postcopy_preempt)) if on]
    return ",".join(names)


# In the capabilities section, after the capabilities: the destination's fault handler
# must send its page requests on the postcopy channel (urgent.py reads them there).
URGENT_PROCESS_OPTION = "urgent=process"

EventSink = Callable[[str, dict[str, Any]], None]


def block_table(vm: Vm) -> dict[str, BlockInfo]:
    return {name: BlockInfo(b.size, b.host_page_size) for name, b in vm.blocks.items()}


class SourceMigration:
    """One outgoing migration (see the module docstring for its phases)."""

    def __init__(self, vm: Vm, uri: MigrationUri, caps: Capabilities, params: Parameters,
                 emit: EventSink | None = None, tracer: Tracer | None = None, *,
                 postcopy_channel_first: bool = False) -> None:
        self.vm = vm
        self.uri = uri
        self.caps = caps
        self.params = params
        self._emit = emit or (lambda _e, _d: None)
        self.info = MigrationInfo()
        self.status = StatusMachine(self._on_status)
        self._cancel = threading.Event()
        self._postcopy_requested = threading.Event()
        self.requests = RequestQueue()
        self._rp: ReturnPathReader | None = None
        self._channel: Channel | None = None
        self._post_channel: Channel | None = None
        self._sender: PageSender | None = None
        self._urgent: UrgentServer | None = None
        self._shared_bits: SharedBits | None = None
        self.trace = tracer or Tracer()
        # Test hook: connect the postcopy channel before the main one (the destination
        # must tell them apart whatever order they arrive in).
        self.postcopy_channel_first = postcopy_channel_first
        self._paused_by_us = False
        self._was_running = False
        self._runstate_before = RunState.PAUSED.value
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)

    # --- control (any thread) -------------------------------------------------------------
    def start(self) -> None:
        self.info.start_ns = time.monotonic_ns()
        self.status.set(MigrationStatus.SETUP)
        self._thread.start()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the next opportunity."""
        if not self.caps.postcopy_ram:
            raise QmpError("Enable postcopy with migrate-set-capabilities before the start "
                           "of migration")
        if self.status.status not in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            raise QmpError(f"Postcopy must be started after migration has been started "
                           f"(status {self.status.status.value})")
        self._postcopy_requested.set()

    def abort(self) -> None:
        """The process is shutting down: stop whatever phase we are in."""
        self._cancel.set()
        for ch in (self._channel, self._post_channel):
            if ch is not None:
                ch.shutdown()

    def update_params(self, params: Parameters) -> None:
        """migrate-set-parameters during a migration: bandwidth applies at once."""
        self.params = params
        sender = self._sender
        if sender is not None:
            postcopy = self.status.status is MigrationStatus.POSTCOPY_ACTIVE
            sender.limiter.limit = (params.max_postcopy_bandwidth if postcopy
                                    else params.max_bandwidth)

    def cancel(self) -> None:
        if self.status.status.finished:
            return
        if self.status.status is MigrationStatus.POSTCOPY_ACTIVE:
            raise QmpError("Postcopy is active: the guest's memory is split between the "
                           "two hosts, cancel is not possible")
        self._cancel.set()
        self.status.try_set(MigrationStatus.CANCELLING)
        if self._channel is not None:
            self._channel.shutdown()

    def refresh_stats(self) -> None:
        """Live counters for query-migrate (the migration thread updates the rest once a
        round; a throttled round can last seconds)."""
        sender = self._sender
        if sender is None or self.status.status not in (MigrationStatus.ACTIVE,
                                                          MigrationStatus.POSTCOPY_ACTIVE):
            return
        st = self.info.ram
        st.transferred = sender.main.writer.bytes_sent + (
            sender.post.writer.bytes_sent if sender.post is not None else 0)
        st.remaining = sender.dirty_pages() * 4096
        self._urgent_stats()

    def _urgent_stats(self) -> None:
        """The urgent helper's counters (shared memory) into our statistics."""
        if self._shared_bits is not None:
            st = self.info.ram
            st.postcopy_requests = self._shared_bits.counter("requests")
            st.x_postcopy_urgent_bytes = self._shared_bits.counter("urgent_bytes")
            st.transferred += st.x_postcopy_urgent_bytes

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
            self._fail(e)
        finally:
            if self._urgent is not None:
                self._urgent.close()
            if self._sender is not None:
                self._sender.release()
            if self._shared_bits is not None:
                self._urgent_stats()
                self._shared_bits.close()
            for ch in (self._channel, self._post_channel):
                if ch is not None:
                    ch.shutdown()
                    ch.close()
            if self._rp is not None:
                self._rp.join(5)
            self.info.end_ns = time.monotonic_ns()

    def _setup(self) -> PageSender:
        if self.caps.postcopy_preempt and self.params.x_postcopy_urgent_sender == "process":
            # Started first: the helper imports while we set up.
            self._urgent = UrgentServer()
            self._shared_bits = SharedBits({n: b.pages for n, b in self.vm.blocks.items()})
        preempt_first = self.caps.postcopy_preempt and self.postcopy_channel_first
        post = self._open_postcopy_channel() if preempt_first else None
        channel = self._channel = connect(self.uri)
        stats = self.info.ram
        stats.total = sum(b.size for b in self.vm.blocks.values())
        blocks = block_table(self.vm)
        main = OutChannel("precopy", Encoder(postcopy=self.caps.postcopy_ram),
                          ChannelWriter(channel))
        enc, writer = main.encoder, main.writer
        shared = self._shared_bits
        sender = PageSender(self.vm.blocks, main, RAM_SECTION_ID, stats,
                            RateLimiter(self.params.max_bandwidth), self.trace,
                            bits=shared.bits if shared else None,
                            lock=shared.lock if shared else None)
        self._sender = sender
        sender.post = post
        writer.write([enc.preamble()])
        # Capabilities both sides must agree on, before anything else (QEMU validates
        # its own in the configuration section): a preempt/no-preempt mismatch would
        # otherwise lose the pages sent on a connection nobody reads.
        writer.write(enc.device_state(CAPS_SECTION_ID, "livemig/capabilities",
                                      self._agreed_caps().encode()))
        if self.caps.postcopy_ram:
            writer.write([enc.open_return_path(),
                          enc.postcopy_advise(host_page_summary(blocks))])
        writer.write([enc.ram_start(RAM_SECTION_ID), enc.mem_size(blocks),
                      enc.close_ram_section()])
        writer.flush()
        if self.caps.postcopy_preempt and sender.post is None:
            sender.post = self._open_postcopy_channel()
        if self.caps.postcopy_ram:
            # The destination checks page sizes and userfaultfd at ADVISE; its PONG
            # tells us it agreed, before anything could stop our guest.
            writer.write([enc.ping(1)])
            writer.flush()
            self._rp = ReturnPathReader(channel, blocks, self._on_request)
            self._rp.start()
            self._rp.wait_pong(1, timeout=30)
        if self._urgent is not None and self._shared_bits is not None:
            assert self._post_channel is not None
            self._urgent.start(self.vm.blocks, self._shared_bits, self._post_channel,
                               self.trace.patterns)
        self.vm.set_dirty_logging(True)
        self.info.setup_ns = time.monotonic_ns() - self.info.start_ns
        return sender

    def _agreed_caps(self) -> str:
        caps = agreed_capabilities(self.caps)
        return f"{caps};{URGENT_PROCESS_OPTION}" if self._urgent is not None else caps

    def _open_postcopy_channel(self) -> OutChannel:
        """The second connection, for requested pages only (postcopy preemption)."""
        self.trace("postcopy_preempt_enabled")
        self._post_channel = connect(self.uri, name="postcopy")
        enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
        ch = OutChannel("postcopy", enc, ChannelWriter(self._post_channel))
        ch.writer.write_now([enc.preamble()])
        return ch

    def _iterate(self, sender: PageSender) -> None:
        meter = BandwidthMeter()
        limit_s = self.params.downtime_limit / 1000
        last_sync = time.monotonic()
        while True:
            self._check_cancel()
            before = sender.dirty_pages()
            remaining = sender.sync() * 4096
            now = time.monotonic()
            # Pages that became dirty since the last sync (ours: new bits only).
            self.info.ram.dirty_pages_rate = int(max(0, remaining // 4096 - before)
                                                 / max(now - last_sync, 1e-3))
            last_sync = now
            self._update_stats(sender, remaining, meter.bytes_per_second)
            converged = (self.info.rounds > 0 and meter.bytes_per_second > 0
                         and remaining / meter.bytes_per_second <= limit_s)
            if self._postcopy_requested.is_set():
                return
            if converged or self.info.rounds >= self.params.x_max_iterations:
                log.info("converging after %d rounds, %d bytes left", self.info.rounds,
                         remaining)
                return
            self.info.rounds += 1
            if self.caps.events:
                self._emit("MIGRATION_PASS", {"pass": self.info.rounds})
            meter.start(sender.writer.bytes_sent)
            sender.send_round(self._interrupted)
            meter.stop(sender.writer.bytes_sent)

    def _update_stats(self, sender: PageSender, remaining: int, bandwidth: float) -> None:
        st = self.info.ram
        st.remaining = remaining
        st.transferred = sender.writer.bytes_sent
        st.precopy_bytes = st.transferred
        st.mbps = bandwidth * 8 / 1e6
        st.pages_per_second = int(bandwidth / 4096)
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

    def _complete(self, sender: PageSender) -> None:
        """Stop-and-copy: pause, send the rest and the device state, EOF."""
        t0 = self._stop_guest(sender)
        before = sender.writer.bytes_sent
        enc, writer = sender.encoder, sender.writer
        writer.write([enc.ram_end(RAM_SECTION_ID)])
        sender.send_all_remaining()
        writer.write([enc.close_ram_section()])
        device: list[bytes | memoryview] = []
        self._send_device_state(enc, device)
        writer.write(device)
        writer.write([enc.eof()])
        writer.flush()
        if self._rp is not None:
            self._rp.wait_shut(timeout=60)
        st = self.info.ram
        st.transferred = writer.bytes_sent
        st.downtime_bytes = writer.bytes_sent - before
        st.precopy_bytes = before
        st.remaining = 0
        self.info.downtime_ms = int((time.monotonic() - t0) * 1000)
        self.vm.set_dirty_logging(False)
        self.vm.set_runstate(RunState.POSTMIGRATE)
        self._paused_by_us = False
        self.status.set(MigrationStatus.COMPLETED)

    # --- postcopy ---------------------------------------------------------------------------
    def _on_request(self, req: PageRequest) -> None:
        """Return-path thread: queue a request for the migration thread, or (QEMU 8.0
        style, with preemption) send the page right here on the postcopy channel."""
        if self._urgent is not None:
            raise RemoteProtocolError("a page request on the return path, but the "
                                      "destination was told to use the postcopy channel")
        sender = self._sender
        if (sender is not None and sender.post is not None
                and self.params.x_postcopy_urgent_sender == "return-path"):
            sender.send_urgent(req)
        else:
            self.requests.put(req)

    def _postcopy(self, sender: PageSender) -> None:
        """Switch the guest over to the destination, then send the rest on demand."""
        assert self._rp is not None
        t0 = self._stop_guest(sender)
        before = sender.writer.bytes_sent
        enc, writer = sender.encoder, sender.writer
        for name, ranges in sender.prepare_postcopy():
            if ranges:
                writer.write([enc.postcopy_ram_discard(name, ranges)])
        package = enc.package()
        blob: list[bytes | memoryview] = [package.postcopy_listen()]
        self._send_device_state(package, blob)
        blob.append(package.postcopy_run())
        writer.write(enc.packaged(b"".join(blob)))
        writer.flush()
        self.info.downtime_ms = int((time.monotonic() - t0) * 1000)
        self.info.ram.downtime_bytes = writer.bytes_sent - before
        self.info.ram.precopy_bytes = before
        # From here the guest runs on the destination: failing no longer restarts it here.
        self._paused_by_us = False
        self.vm.set_dirty_logging(False)
        self.status.set(MigrationStatus.POSTCOPY_ACTIVE)
        sender.limiter = RateLimiter(self.params.max_postcopy_bandwidth)
        sender.break_huge = (self.params.x_postcopy_preempt_break_huge
                             and self.params.x_postcopy_urgent_sender == "migration")
        sender.locality = self.params.x_postcopy_locality
        if self._channel is not None:
            # Requests (vanilla) or the background stream (preempt) must not wait
            # behind megabytes queued in the kernel.
            quiet_background(self._channel)
        # The return-path thread must get the GIL quickly when a request arrives; the
        # default 5 ms switch interval would add up to 5 ms to every request.
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(POSTCOPY_SWITCH_INTERVAL)
        try:
            sender.postcopy_loop(self.requests, self._postcopy_failed)
        finally:
            sys.setswitchinterval(old_switch)
        self._check_postcopy_alive()
        if self._urgent is not None:
            self.trace.counts.update(self._urgent.finish())
        else:
            sender.finish_postcopy_channel()
        writer.write([enc.ram_end(RAM_SECTION_ID), enc.close_ram_section(), enc.eof()])
        writer.flush()
        sender.reset_channel()
        self._rp.wait_shut(timeout=60)
        st = self.info.ram
        st.transferred = writer.bytes_sent
        st.postcopy_bytes = writer.bytes_sent - before - st.downtime_bytes
        st.remaining = 0
        self.vm.set_runstate(RunState.POSTMIGRATE)
        self.status.set(MigrationStatus.COMPLETED)

    def _postcopy_failed(self) -> bool:
        return self._rp is None or (self._rp.finished and self._rp.shut_status is None)

    def _check_postcopy_alive(self) -> None:
        if self._postcopy_failed():
            err = self._rp.error if self._rp is not None else None
            raise MigrationError(f"the destination vanished during postcopy: {err}")

    def _send_device_state(self, enc: Encoder, out: list[bytes | memoryview]) -> None:
        # The run state the guest had before migration (QEMU's "globalstate"): the
        # destination starts the guest only if it was running here.
        runstate = RunState.RUNNING.value if self._was_running else self._runstate_before
        out += enc.device_state(GLOBALSTATE_SECTION_ID, "livemig/globalstate",
                                runstate.encode())
        state = self.vm.save_state()
        for i, cpu in enumerate(state.vcpus):
            out += enc.device_state(CPU_SECTION_ID + 16 * i, "livemig/cpu", cpu.to_bytes(),
                                    instance_id=i)
        out += enc.device_state(SERIAL_SECTION_ID, "livemig/serial", state.serial.to_bytes())

    def _fail(self, e: Exception) -> None:
        """Leave the source VM exactly as it was before the migration."""
        cancelled = isinstance(e, MigrationCancelled) or self._cancel.is_set()
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
