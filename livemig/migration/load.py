"""The destination's load: one incoming stream, as an explicit state machine.

Theory of operation
-------------------
:class:`IncomingLoad` runs on the destination's load thread.  It feeds the main
channel's bytes to the sans-IO :class:`~livemig.wire.decoder.Decoder` and acts on its
events.  Where it is in the stream is a :class:`LoadPhase`, changed only through
:data:`LOAD_TRANSITIONS`; a command that arrives in a phase that does not allow it is
the peer's protocol error::

    precopy --ADVISE--> advised --LISTEN--> listening --RUN--> running --EOF--> ended
       |                   |
       +------EOF----------+-----------------------------------------------> ended

* Page events go to the current :class:`~livemig.migration.pagesink.PageSink` through
  the one dispatcher (:func:`~livemig.migration.pagesink.dispatch_page_event`): the
  :class:`~livemig.migration.pagesink.RamLoader` until LISTEN, the main channel's
  :class:`~livemig.migration.postcopy.ChannelPlacer` after it.
* The capabilities section (:class:`~livemig.migration.handshake.Handshake`) is checked
  against ours and chooses the :class:`~livemig.migration.fault_handler.FaultHandler`;
  with preemption the postcopy channel is accepted then, before anything that can
  fault is loaded.
* ADVISE checks that postcopy can work here (userfaultfd features) before the source
  stops its guest; LISTEN registers guest RAM and starts the fault handler; RUN
  restores the device state and starts the guest; EOF checks that every host page
  arrived (:meth:`~livemig.migration.postcopy.PostcopyState.missing`), then stops the
  fault handler.

The load knows nothing of its owner: it gets callables (accept the postcopy channel,
report postcopy-active, the userfaultfd features of this host) and reports what it
loaded through :meth:`IncomingLoad.stats`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from livemig.errors import ChannelClosedError, MigrationError, RemoteProtocolError
from livemig.kernel.uffd import (
    FEATURE_MISSING_HUGETLBFS,
    FEATURE_MISSING_SHMEM,
    FEATURE_THREAD_ID,
    Userfaultfd,
    feature_names,
)
from livemig.migration import handshake as hs
from livemig.migration.channel import Channel, quiet_background
from livemig.migration.fault_handler import FaultHandler, choose_fault_handler
from livemig.migration.handshake import Handshake, block_table
from livemig.migration.helper import HelperServer
from livemig.migration.multifd import MultifdReceivers
from livemig.migration.pagesink import PageSink, RamLoader, dispatch_page_event, read_payload
from livemig.migration.postcopy import RECV_CHUNK, ChannelPlacer, LatencyStats, PostcopyState
from livemig.migration.returnpath import ReturnPathWriter
from livemig.migration.state import Capabilities, detached
from livemig.migration.vmdesc import check_description
from livemig.runtime import NamedThread, SwitchInterval, UrgentPriority
from livemig.vmm.serial import SerialState
from livemig.vmm.state import PlatformState, VcpuState, VmState
from livemig.vmm.vm import RunState, Vm
from livemig.wire import events as ev
from livemig.wire.decoder import Decoder

log = logging.getLogger("livemig.destination")
MULTIFD_END_TIMEOUT = 30.0  # for the source to close its multifd channels
AwaitRecovery = Callable[[Exception], tuple[Channel, Channel | None]]


def _pages(gaps: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{n} host pages of {name} (first at {off:#x})"
                     for name, (n, off) in gaps.items())


class LoadPhase(Enum):
    PRECOPY = "precopy"
    ADVISED = "advised"      # postcopy may follow: userfaultfd is open, nothing registered
    LISTENING = "listening"  # guest RAM registered, faults taken, guest not started yet
    RUNNING = "running"      # the guest runs here; missing pages are requested
    ENDED = "ended"


_P = LoadPhase
LOAD_TRANSITIONS: dict[LoadPhase, frozenset[LoadPhase]] = {
    _P.PRECOPY: frozenset({_P.ADVISED, _P.ENDED}),
    _P.ADVISED: frozenset({_P.LISTENING, _P.ENDED}),
    _P.LISTENING: frozenset({_P.RUNNING}),
    _P.RUNNING: frozenset({_P.ENDED}),
    _P.ENDED: frozenset(),
}


@dataclass(frozen=True)
class LoadStats:
    """What one load brought, for query-migrate."""

    normal: int  # whole pages received, on every channel
    zero: int  # zero pages
    postcopy_requests: int


class GuestStarter:
    """Postcopy: restores the device state and starts the guest on a thread of its own.

    Restoring can touch guest pages that have not arrived (KVM writes the wall clock
    into guest memory when its MSR is set), and only the load thread reads the main
    channel they may come on, so the load thread must not restore them itself.  (QEMU
    likewise starts the guest outside its listen thread.)  The thread starts at ADVISE
    and waits: POSTCOPY_RUN, inside the switchover pause, only hands it the state.
    """

    def __init__(self, start: Callable[[VmState], None]) -> None:
        """``start(state)``: restore and start; it handles its own failure."""
        self._start = start
        self._states: queue.SimpleQueue[VmState | None] = queue.SimpleQueue()
        self._requested = False
        self._done = threading.Event()
        self._thread = NamedThread(target=self._run, name="postcopy/run", daemon=True)
        self._thread.start()

    def run(self, state: VmState) -> None:
        self._requested = True
        self._states.put(state)

    def wait(self, timeout: float) -> bool:
        """Whether the guest start has finished (at once True if it was never asked)."""
        return not self._requested or self._done.wait(timeout)

    def _run(self) -> None:
        state = self._states.get()
        try:
            if state is not None:
                self._start(state)
        finally:
            self._done.set()

    def close(self) -> None:
        self._states.put(None)  # never asked to start: end the thread
        self._thread.join(10)


def resumed_decoder(vm: Vm) -> Decoder:
    """The decoder of a main channel opened by a postcopy recovery: it goes on with the
    ``ram`` section begun on the first connection (docs/STREAM.md)."""
    return Decoder(block_table(vm.blocks), postcopy=True, resumed=[hs.RAM.section_id])


def answer_resume_after_completion(vm: Vm, channel: Channel) -> None:
    """A postcopy completed here, and its source resumes on ``channel``: the old
    connection lost the SHUT that ended it.  Answer the first RECV_BITMAP with SHUT 0
    (every page is here and the guest runs here: the source has nothing left to send),
    then read until the source closes (closing first, with its other requests unread,
    would reset the connection, perhaps before the source has read the SHUT)."""
    dec = resumed_decoder(vm)
    while True:
        e = dec.next_event()
        if e is ev.NEED_DATA:
            dec.receive_data(channel.recv(RECV_CHUNK))  # b"" = EOF: the decoder raises
        elif isinstance(e, ev.RecvBitmapRequest):
            break
        elif not isinstance(e, ev.StreamStart):
            raise RemoteProtocolError(f"unexpected {type(e).__name__} in a resume after "
                                      "the migration completed")
    ReturnPathWriter(channel).shut(0)
    log.info("a resume after completion: answered with SHUT")
    while channel.recv(RECV_CHUNK):
        pass


class IncomingLoad:
    """The load thread's work on one incoming stream (see the module docstring)."""

    def __init__(self, vm: Vm, channel: Channel, caps: Capabilities, *,
                 accept_postcopy_channel: Callable[[], Channel],
                 accept_multifd_channels: Callable[[int], list[Channel]] | None = None,
                 on_postcopy_active: Callable[[], None],
                 uffd_features: Callable[[], int], switch: SwitchInterval,
                 helpers: HelperServer, urgent_priority: UrgentPriority,
                 await_recovery: AwaitRecovery | None = None,
                 on_resumed: Callable[[], None] = lambda: None) -> None:
        """``await_recovery(failure)``: postcopy paused; returns the new main channel
        and postcopy channel once ``migrate-recover`` connected them (raises if the
        process quits).  Without it a failure in postcopy fails the load."""
        self.vm = vm
        self._switch = switch
        self._urgent_priority = urgent_priority
        self._helpers = helpers
        self._await_recovery = await_recovery
        self._on_resumed = on_resumed
        self.channel = channel
        self.caps = caps
        self._accept_postcopy_channel = accept_postcopy_channel
        self._accept_multifd_channels = accept_multifd_channels
        self._multifd: MultifdReceivers | None = None
        self._on_postcopy_active = on_postcopy_active
        self._uffd_features = uffd_features
        self.phase = LoadPhase.PRECOPY
        self.history: list[LoadPhase] = [self.phase]
        self.loader = RamLoader(vm.blocks)
        self._sink: PageSink = self.loader
        self._dec = Decoder(block_table(vm.blocks), postcopy=caps.postcopy_ram)
        self._cpus: dict[int, VcpuState] = {}
        self._serial: SerialState | None = None
        self._platform: PlatformState | None = None
        # Postcopy: the device state is restored and the guest started on a thread of
        # their own (see _run_guest); its failure, if any.
        self._starter: GuestStarter | None = None
        self._start_error: Exception | None = None
        self._runstate: str | None = None  # the source's run state (globalstate section)
        self._theirs: Handshake | None = None  # the source's capabilities section
        self._loaded: list[ev.DeviceState] = []  # device sections, in stream order
        self._rp: ReturnPathWriter | None = None
        self._handler: FaultHandler | None = None
        self._post_channel: Channel | None = None
        self._uffd: Userfaultfd | None = None
        self._postcopy: PostcopyState | None = None
        self._placer: ChannelPlacer | None = None
        self._fault_error: Exception | None = None
        self.started = False
        self._events: dict[type[ev.Event], Callable[[Any], None]] = {
            ev.DeviceState: self._device_state,
            ev.OpenReturnPath: self._open_return_path,
            ev.Ping: self._ping,
            ev.PostcopyAdvise: self._advise,
            ev.PostcopyRamDiscard: self._discard,
            ev.PostcopyListen: self._listen,
            ev.PostcopyRun: self._run_guest,
            ev.MultifdFlush: self._multifd_flush,
        }
        self._devices: dict[str, Callable[[ev.DeviceState], None]] = {
            hs.CPU_NAME: self._cpu_state,
            hs.SERIAL.name: self._serial_state,
            hs.GLOBALSTATE.name: self._globalstate,
            hs.CAPABILITIES.name: self._capabilities,
            hs.PLATFORM.name: self._platform_state,
        }

    # --- the state machine --------------------------------------------------------------
    def _enter(self, new: LoadPhase, what: str) -> None:
        if new not in LOAD_TRANSITIONS[self.phase]:
            raise RemoteProtocolError(f"{what} in the {self.phase.value} phase of the "
                                      "stream")
        log.info("load phase %s -> %s", self.phase.value, new.value)
        self.phase = new
        self.history.append(new)

    def run(self) -> None:
        """Handle events until EOF; the guest may be started before (postcopy RUN).

        Once the guest runs here, a failure pauses instead: the fault handler stops,
        everything received stays, and the load goes on over new connections after a
        recovery (:meth:`_recover`); a failure during the recovery pauses again."""
        while True:
            try:
                self._receive()
                return
            except Exception as e:
                self._check_started()  # a guest that cannot start is no link failure
                if self.phase is not LoadPhase.RUNNING or self._await_recovery is None:
                    raise
                failure = detached(e)
            while True:
                self._pause(failure)
                # Until migrate-recover connected the source again; raises (ending the
                # load) only if the process quits meanwhile.
                channels = self._await_recovery(failure)
                try:
                    self._recover(*channels)
                    break
                except Exception as e:
                    failure = detached(e)

    def _receive(self) -> None:
        while True:
            if self._fault_error is not None:
                raise self._fault_error
            e = self._dec.next_event()
            if e is ev.NEED_DATA:
                self._dec.receive_data(self.channel.recv(RECV_CHUNK))  # b"" = EOF
                continue
            if isinstance(e, ev.StreamEnd):
                self._read_description()
                self._check_nothing_follows()
                self._end()
                return
            self._handle(e)

    def _handle(self, e: ev.Event) -> None:
        if dispatch_page_event(e, self._sink, self._fill):
            return
        handler = self._events.get(type(e))
        if handler is not None:
            handler(e)
        elif not isinstance(e, (ev.StreamStart, ev.SectionBegin, ev.SectionComplete,
                                ev.MemSize, ev.Packaged, ev.PackagedEnd)):
            raise RemoteProtocolError(f"unexpected {type(e).__name__} in the main stream")

    def _fill(self, slot: memoryview) -> None:
        read_payload(self._dec, self.channel, slot)

    def _read_description(self) -> None:
        """A stream that ends in precopy brings the VM description it announced
        (docs/STREAM.md); it must describe exactly the device sections loaded."""
        if self._theirs is None or not self._theirs.vmdesc or self.phase is LoadPhase.RUNNING:
            return
        while (e := self._dec.next_event()) is ev.NEED_DATA:
            self._dec.receive_data(self.channel.recv(RECV_CHUNK))
        if not isinstance(e, ev.VmDescriptionEvent):
            raise RemoteProtocolError("the stream ended without the VM description it "
                                      "announced")
        check_description(e.description, self._loaded)

    def _check_nothing_follows(self) -> None:
        """A saved stream (file:) must end at its EOF record: trailing bytes mean a
        corrupt or concatenated file.  (A socket stays open for the return path.)"""
        if not self.channel.is_file:
            return
        while data := self.channel.recv(RECV_CHUNK):
            self._dec.receive_data(data)
        self._dec.receive_eof()
        e = self._dec.next_event()
        if not isinstance(e, ev.Closed):
            raise RemoteProtocolError(f"data after the end of the stream ({type(e).__name__})")

    # --- device state ---------------------------------------------------------------------
    def _device_state(self, e: ev.DeviceState) -> None:
        """Each device section once, with the section id, instance id and version this
        livemig writes (handshake.py)."""
        handler = self._devices.get(e.idstr)
        if handler is None:
            raise RemoteProtocolError(f"unknown device section {e.idstr!r}")
        section = hs.device_section(e.idstr, e.instance_id, len(self.vm.vcpus))
        if section is None:
            raise RemoteProtocolError(f"device section {e.idstr!r} has instance id "
                                      f"{e.instance_id}, which this VM does not have")
        if (e.section_id, e.version_id) != (section.section_id, section.version):
            raise RemoteProtocolError(
                f"device section {e.idstr!r} instance {e.instance_id} has section id "
                f"{e.section_id} version {e.version_id}; expected section id "
                f"{section.section_id} version {section.version}")
        if any((d.idstr, d.instance_id) == (e.idstr, e.instance_id) for d in self._loaded):
            raise RemoteProtocolError(f"device section {e.idstr!r} instance "
                                      f"{e.instance_id} arrives twice")
        handler(e)
        self._loaded.append(e)

    def _cpu_state(self, e: ev.DeviceState) -> None:
        self._cpus[e.instance_id] = VcpuState.from_bytes(e.data)

    def _serial_state(self, e: ev.DeviceState) -> None:
        self._serial = SerialState.from_bytes(e.data)

    def _platform_state(self, e: ev.DeviceState) -> None:
        self._platform = PlatformState.from_bytes(e.data)

    def _globalstate(self, e: ev.DeviceState) -> None:
        try:
            self._runstate = RunState(e.data.decode("ascii")).value
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError(f"unknown run state {e.data[:64]!r} in the "
                                      "globalstate section") from None

    def _capabilities(self, e: ev.DeviceState) -> None:
        """Both sides must agree on postcopy-ram and postcopy-preempt; the source's
        options choose the fault handler.  With preemption the postcopy channel is
        accepted now, before anything that can fault is loaded."""
        theirs = Handshake.decode(e.data)
        theirs.check_matches(self.caps)
        self._theirs = theirs
        if self.caps.postcopy_preempt:
            self._post_channel = self._accept_postcopy_channel()
        if theirs.multifd:
            self._start_multifd(theirs)
        self._handler = choose_fault_handler(theirs, self._post_channel, self._switch,
                                             self._helpers, self._urgent_priority)

    # --- multifd ----------------------------------------------------------------------------
    def _start_multifd(self, theirs: Handshake) -> None:
        """Accept the multifd channels the source announced and start their receivers."""
        if self._accept_multifd_channels is None:
            raise MigrationError("multifd channels cannot be accepted here")
        self._multifd = MultifdReceivers(self.vm.blocks, self.loader, theirs.multifd_channels,
                                         theirs.multifd_uuid, self._fault_failed)
        for ch in self._accept_multifd_channels(theirs.multifd_channels):
            self._multifd.add(ch)

    def _multifd_flush(self, _e: ev.MultifdFlush) -> None:
        if self._multifd is None:
            raise RemoteProtocolError("MULTIFD_FLUSH without multifd channels")
        self._multifd.flush()

    def _end_multifd(self) -> None:
        """Precopy is over (LISTEN or EOF): every multifd receiver must have ended."""
        if self._multifd is not None:
            self._multifd.finish(MULTIFD_END_TIMEOUT)

    def _vm_state(self) -> VmState:
        if self._serial is None or sorted(self._cpus) != list(range(len(self.vm.vcpus))):
            raise RemoteProtocolError("the stream ended without the CPU and serial state")
        return VmState(tuple(self._cpus[i] for i in range(len(self._cpus))), self._serial,
                       self._platform)

    # --- return path and postcopy ---------------------------------------------------------
    def _open_return_path(self, _e: ev.OpenReturnPath) -> None:
        self._rp = ReturnPathWriter(self.channel)

    def _require_rp(self, what: str) -> ReturnPathWriter:
        if self._rp is None:
            raise RemoteProtocolError(f"{what} before OPEN_RETURN_PATH")
        return self._rp

    def _ping(self, e: ev.Ping) -> None:
        """PONG; once postcopy is advised, only when the fault handler can take faults
        (answered from its helper's watching thread if that is still starting: the
        precopy stream goes on meanwhile)."""
        rp = self._require_rp("PING")
        if self.phase is LoadPhase.ADVISED and self._handler is not None:
            self._handler.when_ready(lambda: rp.pong(e.value))
        else:
            rp.pong(e.value)

    def _advise(self, _e: ev.PostcopyAdvise) -> None:
        """Refuse early (before the source stops its guest) if postcopy cannot work."""
        self._enter(LoadPhase.ADVISED, "POSTCOPY_ADVISE")
        if not self.caps.postcopy_ram:
            raise MigrationError("the source advised postcopy but postcopy-ram is not "
                                 "enabled on the destination")
        needed = FEATURE_THREAD_ID
        for block in self.vm.blocks.values():
            if block.backing.is_hugetlb:
                needed |= FEATURE_MISSING_HUGETLBFS
            elif block.backing.is_memfd:
                needed |= FEATURE_MISSING_SHMEM
        have = self._uffd_features()
        if needed & ~have:
            raise MigrationError("this host's userfaultfd lacks "
                                 f"{', '.join(feature_names(needed & ~have))}, which postcopy "
                                 "of this guest's RAM needs")
        rp = self._require_rp("POSTCOPY_ADVISE")
        if self._handler is None:  # a stream without the capabilities section
            self._handler = choose_fault_handler(Handshake.of(self.caps), self._post_channel,
                                                 self._switch, self._helpers,
                                                 self._urgent_priority)
        self._uffd = Userfaultfd.open()
        self._uffd.api(needed)
        self._postcopy = self._handler.advise(self.vm.blocks, self._uffd, self._vcpu_tids(),
                                              rp, self._fault_failed)
        self.loader.report_to(self._postcopy.mark_precopy)
        self._starter = GuestStarter(self._start_guest)

    def _vcpu_tids(self) -> dict[int, int]:
        return {i: v.native_id or 0 for i, v in enumerate(self.vm.vcpus)}

    def _discard(self, e: ev.PostcopyRamDiscard) -> None:
        if self.phase is not LoadPhase.ADVISED:
            raise RemoteProtocolError(f"POSTCOPY_RAM_DISCARD in the {self.phase.value} phase "
                                      "of the stream (only between ADVISE and LISTEN)")
        assert self._postcopy is not None
        self._postcopy.discard(e.block, e.ranges)

    def _listen(self, _e: ev.PostcopyListen) -> None:
        """Register guest RAM with userfaultfd and start taking faults."""
        self._enter(LoadPhase.LISTENING, "POSTCOPY_LISTEN")
        self._end_multifd()  # nothing may write guest RAM behind userfaultfd's back
        self._require_rp("LISTEN")
        if self.caps.postcopy_preempt and self._post_channel is None:
            raise RemoteProtocolError("POSTCOPY_LISTEN before the postcopy channel is up")
        pc, handler = self._postcopy, self._handler
        assert pc is not None and handler is not None
        for st in pc.blocks.values():
            st.placer.register()
        self._placer = ChannelPlacer(pc, "main")
        self._sink = self._placer
        quiet_background(self.channel)  # a short queue of background pages here too
        handler.listen()
        self._on_postcopy_active()

    # --- postcopy recovery ------------------------------------------------------------------
    def _pause(self, failure: Exception) -> None:
        """Stop taking faults; forget the half-assembled huge pages (they come again);
        keep every page placed."""
        log.warning("postcopy paused: %s", str(failure))
        assert self._handler is not None and self._placer is not None
        self.channel.shutdown()
        if self._post_channel is not None:
            self._post_channel.shutdown()
        self._handler.pause()
        self._placer.reset()
        self._fault_error = None

    def _recover(self, main: Channel, post: Channel | None) -> None:
        """Over the connections ``migrate-recover`` accepted: answer RECV_BITMAP for
        each block with what is here, acknowledge POSTCOPY_RESUME, take faults again."""
        assert self._handler is not None and self._postcopy is not None
        self.channel, self._post_channel = main, post
        self._dec = resumed_decoder(self.vm)
        rp = self._rp = ReturnPathWriter(self.channel)
        while True:
            e = self._dec.next_event()
            if e is ev.NEED_DATA:
                self._dec.receive_data(self.channel.recv(RECV_CHUNK))
            elif isinstance(e, ev.RecvBitmapRequest):
                rp.recv_bitmap(e.block, self._postcopy.received_pages(e.block))
            elif isinstance(e, ev.PostcopyResume):
                break
            elif not isinstance(e, ev.StreamStart):
                raise RemoteProtocolError(f"unexpected {type(e).__name__} while resuming "
                                          "postcopy")
        rp.resume_ack()
        quiet_background(self.channel)
        self._handler.resume(rp, self._post_channel, self._fault_failed)
        log.info("postcopy resumed")
        self._on_resumed()

    def _fault_failed(self, e: Exception) -> None:
        """The fault handler failed (any thread): the load thread raises it."""
        self._fault_error = detached(e)
        self.channel.shutdown()

    def _run_guest(self, _e: ev.PostcopyRun) -> None:
        """Hand the device state to the :class:`GuestStarter` (started at ADVISE)."""
        self._enter(LoadPhase.RUNNING, "POSTCOPY_RUN")
        state = self._vm_state()  # a missing section fails here, at once
        assert self._starter is not None
        self._starter.run(state)

    def _start_guest(self, state: VmState) -> None:
        try:
            self.vm.restore_state(state)
            self._start_or_keep_paused()
        except Exception as e:
            # Not a link failure: this state cannot be restored here; no recovery helps.
            self._start_error = detached(e)
            self.channel.shutdown()

    def _check_started(self, timeout: float | None = None) -> None:
        """Raise the guest start's failure; with ``timeout``, wait for it to finish."""
        if (self._starter is not None and timeout is not None
                and not self._starter.wait(timeout)):
            raise MigrationError("restoring the device state did not finish")
        if self._start_error is not None:
            raise MigrationError(f"cannot start the guest here: {self._start_error}")

    def _start_or_keep_paused(self) -> None:
        """Start the guest if it was running on the source; else keep its run state."""
        self.started = True
        if self._runstate in (None, RunState.RUNNING.value):
            self.vm.start()
            return
        try:
            state = RunState(self._runstate)
        except ValueError:
            raise RemoteProtocolError(f"unknown run state {self._runstate!r}") from None
        # A guest that had not started yet stays so; any other stopped guest is paused.
        self.vm.set_runstate(state if state is RunState.PRELAUNCH else RunState.PAUSED)

    def _end(self) -> None:
        postcopy = self.phase is LoadPhase.RUNNING
        if postcopy:
            self._await_postcopy_channel_end()
        self._enter(LoadPhase.ENDED, "EOF")
        if postcopy:
            self._end_postcopy()
        else:
            self._end_multifd()
            self.loader.check_complete()
            self.vm.restore_state(self._vm_state())
        if self._rp is not None:
            self._shut(postcopy)

    def _shut(self, postcopy: bool) -> None:
        """SHUT 0: every page arrived.  After a postcopy a SHUT the connection fails to
        carry does not fail the migration (the guest runs here, whole): the source
        pauses without it and learns it when it resumes
        (:func:`answer_resume_after_completion`).  After a precopy it does: the source,
        which never heard it, restarts its guest, which must then not run here too."""
        assert self._rp is not None
        try:
            self._rp.shut(0)
        except (ChannelClosedError, OSError) as e:
            if not postcopy:
                raise
            log.warning("postcopy completed, but its SHUT was lost (%s): the source "
                        "learns it when it resumes", str(e))

    def _await_postcopy_channel_end(self) -> None:
        """Main channel's EOF in postcopy: the source ended the postcopy channel first;
        wait for that end and its pages.  Still in the running phase: a connection that
        fails now (the EOF came, the channel's end was lost) pauses the migration like
        any failure in postcopy, and the end comes again after a recovery."""
        assert self._handler is not None
        self._check_started(timeout=60)
        self._handler.wait_channel_end(30)
        if self._fault_error is not None:
            raise self._fault_error

    def _end_postcopy(self) -> None:
        handler, placer, pc = self._handler, self._placer, self._postcopy
        assert handler is not None and placer is not None and pc is not None
        if placer.pending():
            raise RemoteProtocolError(f"stream ended inside huge pages {placer.pending()}")
        missing = pc.missing()
        if missing:
            # The guest would hang on these forever: fail loudly instead.
            raise RemoteProtocolError("the stream ended without " + _pages(missing))
        # Huge pages stay in memory once placed: the kernel can confirm every placement.
        lost = pc.lost({name: b.mapping.placed_host_pages()
                        for name, b in self.vm.blocks.items() if b.backing.is_hugetlb})
        if lost:
            raise MigrationError(f"placed but not in memory: {_pages(lost)} (no free huge "
                                 "page when they were placed?)")
        handler.stop()
        for st in pc.blocks.values():
            st.placer.unregister()

    # --- for the owner --------------------------------------------------------------------
    @property
    def ran_postcopy(self) -> bool:
        """Whether the guest was started here before the stream ended (postcopy)."""
        return LoadPhase.RUNNING in self.history

    def finish(self) -> LoadStats:
        """After :meth:`run`: the guest runs (or keeps the source's run state)."""
        if not self.started:
            self._start_or_keep_paused()
        return self.stats()

    def stats(self) -> LoadStats:
        normal = self.loader.pages
        zero = self.loader.zero_pages
        if self._multifd is not None:
            normal += self._multifd.pages
            zero += self._multifd.zero_pages
        if self._placer is not None:
            normal += self._placer.pages
        if self._handler is not None:
            normal += self._handler.pages
        requests = self._postcopy.requests if self._postcopy is not None else 0
        return LoadStats(normal, zero, requests)

    @property
    def postcopy_stats(self) -> LatencyStats | None:
        return self._postcopy.stats if self._postcopy is not None else None

    def release_faults(self) -> None:
        """Close the userfaultfd: every thread blocked on a missing page wakes up."""
        if self._handler is not None:
            self._handler.stop()
        if self._uffd is not None:
            self._uffd.close()

    def close(self) -> None:
        # Every step runs even if one fails: a view still held somewhere must not
        # leave the userfaultfd open or the loader's views of guest RAM alive.
        steps: list[Callable[[], None]] = []
        if self._multifd is not None:
            steps.append(self._multifd.close)
        if self._handler is not None:
            steps.append(self._handler.close)
        if self._placer is not None:
            steps.append(self._placer.close)
        if self._postcopy is not None:
            steps.append(self._postcopy.close)
        if self._uffd is not None:
            steps.append(self._uffd.close)
        if self._starter is not None:
            steps.append(self._starter.close)
        steps.append(self.loader.release)
        for step in steps:
            try:
                step()
            except BufferError as err:
                log.error("cleanup: %s", str(err))
