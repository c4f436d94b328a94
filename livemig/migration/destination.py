"""The destination side of a migration: receive RAM and device state, start the guest.

Theory of operation
-------------------
A :class:`DestinationMigration` listens on a URI (``migrate-incoming``), accepts the
main channel and runs a *load thread* that feeds the channel's bytes to the sans-IO
:class:`~livemig.wire.decoder.Decoder` and acts on its events:

- ``PageBatch``: many whole pages already buffered: one vectorised NumPy copy into
  guest RAM;
- ``PageHeader``: a page whose payload has not fully arrived: what is buffered is
  copied, the rest is read with ``recv_into`` straight into guest RAM;
- ``ZeroPages``: pages that must read as zero (written only where RAM is not already
  zero, so untouched memory stays unallocated);
- ``DeviceState``: CPU and serial state, decoded and kept until EOF;
- ``StreamEnd``: restore the device state, start the vCPUs (RESUME), ``completed``.

Anything the decoder rejects (corrupt, truncated, unknown block, out-of-range page)
arrives as a typed :class:`~livemig.errors.StreamError`: the migration fails, the guest
is never started, and nothing was written outside guest RAM (every write goes through a
bounds-checked view of a block).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError, MigrationError, RemoteProtocolError
from livemig.kernel.mman import PAGE_SIZE
from livemig.kernel.shared import ProcessLock, SharedMemory
from livemig.kernel.uffd import (
    FEATURE_MISSING_HUGETLBFS,
    FEATURE_THREAD_ID,
    Userfaultfd,
    feature_names,
)
from livemig.migration.channel import Channel, Listener, MigrationUri, quiet_background
from livemig.migration.faultserver import FaultServer
from livemig.migration.postcopy import (
    RECV_CHUNK,
    ChannelPlacer,
    FaultThread,
    PostcopyChannelReceiver,
    PostcopyState,
    read_payload,
    shared_layout,
    uffd_block_states,
)
from livemig.migration.returnpath import ReturnPathWriter
from livemig.migration.source import URGENT_PROCESS_OPTION, agreed_capabilities, block_table
from livemig.migration.state import (
    Capabilities,
    MigrationInfo,
    MigrationStatus,
    StatusMachine,
    log_failure,
)
from livemig.vmm.serial import SerialState
from livemig.vmm.state import VcpuState, VmState
from livemig.vmm.vm import RunState, Vm
from livemig.wire import events as ev
from livemig.wire.channel import ChannelKind, identify_channel
from livemig.wire.decoder import Decoder

log = logging.getLogger("livemig.destination")

# While postcopy runs, a thread woken by a fault must get the GIL quickly (the default
# 5 ms switch interval would add up to 5 ms to every page request).
POSTCOPY_SWITCH_INTERVAL = 50e-6
EventSink = Callable[[str, dict[str, Any]], None]


class RamLoader:
    """Places decoded pages into guest RAM (precopy: straight into the final place)."""

    def __init__(self, vm: Vm) -> None:
        self._pages: dict[str, npt.NDArray[np.uint8]] = {}
        self._words: dict[str, npt.NDArray[np.uint64]] = {}
        self._views: dict[str, memoryview] = {}
        for name, block in vm.blocks.items():
            arr = block.array()
            self._pages[name] = arr.reshape(-1, PAGE_SIZE)
            self._words[name] = arr.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
            self._views[name] = block.view()
        self.pages = 0
        self.zeros = 0

    def batch(self, e: ev.PageBatch) -> None:
        self._pages[e.block][e.offsets // PAGE_SIZE] = e.data
        self.pages += len(e.offsets)

    def zero(self, e: ev.ZeroPages) -> None:
        idx = e.offsets // PAGE_SIZE
        words = self._words[e.block]
        dirty = idx[words[idx].any(axis=1)]
        if len(dirty):
            words[dirty] = 0
        self.zeros += len(idx)

    def page_slot(self, e: ev.PageHeader) -> memoryview:
        """Where a single page's payload goes (the decoder checked the offset)."""
        self.pages += 1
        return self._views[e.block][e.offset : e.offset + PAGE_SIZE]

    def release(self) -> None:
        self._pages.clear()
        self._words.clear()
        for v in self._views.values():
            v.release()
        self._views.clear()


class DestinationMigration:
    """One incoming migration (see the module docstring)."""

    def __init__(self, vm: Vm, uri: MigrationUri, caps: Capabilities,
                 emit: EventSink | None = None,
                 on_finished: Callable[[DestinationMigration], None] | None = None) -> None:
        self.vm = vm
        self.uri = uri
        self.caps = caps
        self._emit = emit or (lambda _e, _d: None)
        self._on_finished = on_finished
        self.info = MigrationInfo()
        self.status = StatusMachine(self._on_status)
        self._listener = Listener(uri)  # bind now: errors reach the migrate-incoming caller
        self._channel: Channel | None = None
        self._post_channel: Channel | None = None
        self._load: _Load | None = None
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        # Injectable so tests can play a host whose userfaultfd lacks features.
        self.uffd_features: Callable[[], int] = Userfaultfd.supported_features

    @property
    def port(self) -> int:
        return self._listener.port

    def start(self) -> None:
        self.vm.set_runstate(RunState.INMIGRATE)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self.status.wait_finished(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the load thread to finish its cleanup (after wait())."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def abort(self) -> None:
        """Stop waiting or receiving (the process is shutting down)."""
        self._listener.close()
        for ch in (self._channel, self._post_channel):
            if ch is not None:
                ch.shutdown()

    def _on_status(self, status: MigrationStatus) -> None:
        self.info.status = status
        if self.caps.events:
            self._emit("MIGRATION", {"status": status.value})

    # --- the load thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.status.set(MigrationStatus.SETUP)
            self._accept_channels()
            assert self._channel is not None
            self.info.start_ns = time.monotonic_ns()
            self.status.set(MigrationStatus.ACTIVE)
            self._load = _Load(self, self._channel)
            self._load.run()
            self._finish(self._load)
        except Exception as e:
            self._fail(e)
        finally:
            if self._load is not None:
                self._load.close()
            self._listener.close()
            for ch in (self._channel, self._post_channel):
                if ch is not None:
                    ch.close()
            self.info.end_ns = time.monotonic_ns()
            if self._on_finished is not None:
                self._on_finished(self)

    def _accept_channels(self) -> None:
        """Accept the main channel; with preemption the postcopy channel may come first.
        Each is identified by its first four bytes, so the order does not matter."""
        while self._channel is None:
            self._accept_one(timeout=None)

    def accept_postcopy_channel(self) -> Channel:
        """Preemption: the postcopy channel, accepted now if it has not come yet.
        Called before anything that can fault is loaded (see _Load)."""
        if self._post_channel is None:
            self._accept_one(timeout=30)
        if self._post_channel is None:
            raise RemoteProtocolError("a second main channel arrived instead of the "
                                      "postcopy channel")
        return self._post_channel

    def _accept_one(self, timeout: float | None) -> None:
        ch = self._listener.accept(timeout=timeout)
        kind = ChannelKind.MAIN if ch.is_file else identify_channel(ch.peek(4))
        if kind is ChannelKind.MAIN and self._channel is None:
            self._channel = ch
        elif (kind is ChannelKind.POSTCOPY and self._post_channel is None
              and self.caps.postcopy_preempt):
            ch.name = "postcopy"
            self._post_channel = ch
        else:
            ch.close()
            raise RemoteProtocolError(
                f"unexpected {kind.name.lower()} channel: is postcopy-preempt set on both "
                "sides?")

    def _finish(self, load: _Load) -> None:
        st = self.info.ram
        st.normal, st.duplicate = load.loader.pages, load.loader.zeros
        if load.postcopy is not None:
            st.normal += load.placer.pages if load.placer else 0
            st.postcopy_requests = load.postcopy.requests
            if load.post_placer is not None:
                st.normal += load.post_placer.pages
            if load.fault_server is not None:
                st.normal += load.fault_server.pages
        st.total = sum(b.size for b in self.vm.blocks.values())
        st.transferred = self._channel.bytes_received if self._channel else 0
        if not load.started:
            load.start_or_keep_paused()
        self.status.set(MigrationStatus.COMPLETED)

    def _fail(self, e: Exception) -> None:
        log_failure(log, "incoming migration failed", e)
        if not isinstance(e, LivemigError):
            e = MigrationError(f"internal error: {e}")
        self.info.error_desc = str(e)
        if self.vm.runstate is RunState.INMIGRATE:
            self.vm.set_runstate(RunState.PAUSED)
        elif self.vm.running:
            # Postcopy failed with the guest running here: its memory is incomplete, so
            # stop it.  vCPUs blocked on missing pages can only stop once their faults
            # are released, so: ask them to stop, release the faults, then wait.
            for vcpu in self.vm.vcpus:
                vcpu.request_pause()
            if self._load is not None:
                self._load.release_faults()
            self.vm.pause()
        # Last, so that whoever waits for "failed" finds the guest already stopped.
        self.status.try_set(MigrationStatus.FAILED)

    def latency_samples(self) -> list[int]:
        """Raw postcopy page-request latencies (ns); empty without postcopy."""
        load = self._load
        if load is None or load.postcopy is None:
            return []
        return load.postcopy.stats.samples_ns()

    def query(self) -> dict[str, Any]:
        out = self.info.to_qmp()
        load = self._load
        if load is not None and load.postcopy is not None:
            out.update(load.postcopy.stats.to_qmp(len(self.vm.vcpus)))
        return out


class _Load:
    """The load thread's work on one incoming stream (precopy, then maybe postcopy)."""

    def __init__(self, mig: DestinationMigration, channel: Channel) -> None:
        self.mig = mig
        self.vm = mig.vm
        self.channel = channel
        self.post_channel: Channel | None = None
        self.post_placer: ChannelPlacer | None = None
        self.post_thread: threading.Thread | None = None
        self.loader = RamLoader(self.vm)
        self.dec = Decoder(block_table(self.vm), postcopy=mig.caps.postcopy_ram)
        self.cpus: dict[int, VcpuState] = {}
        self.serial: SerialState | None = None
        self.rp: ReturnPathWriter | None = None
        self.uffd: Userfaultfd | None = None
        self.postcopy: PostcopyState | None = None
        self.placer: ChannelPlacer | None = None
        self.fault_thread: FaultThread | None = None
        # x-postcopy-urgent-sender=process: a helper owns the uffd and postcopy channel.
        self.fault_server: FaultServer | None = None
        self.shared: SharedMemory | None = None
        self.fault_error: Exception | None = None
        self.started = False
        self.runstate: str | None = None  # the source's run state (globalstate section)
        self._old_switch: float | None = None

    def run(self) -> None:
        """Handle events until EOF; the guest may be started before (postcopy RUN)."""
        while True:
            if self.fault_error is not None:
                raise self.fault_error
            e = self.dec.next_event()
            if e is ev.NEED_DATA:
                self.dec.receive_data(self.channel.recv(RECV_CHUNK))  # b"" = EOF
                continue
            if isinstance(e, ev.StreamEnd):
                self._check_nothing_follows()
                self._end()
                return
            self._handle(e)

    def _check_nothing_follows(self) -> None:
        """A saved stream (file:) must end at its EOF record: trailing bytes mean a
        corrupt or concatenated file.  (A socket stays open for the return path.)"""
        if not self.channel.is_file:
            return
        while data := self.channel.recv(RECV_CHUNK):
            self.dec.receive_data(data)
        self.dec.receive_eof()
        e = self.dec.next_event()
        if not isinstance(e, ev.Closed):
            raise RemoteProtocolError(f"data after the end of the stream ({type(e).__name__})")

    def _handle(self, e: ev.Event) -> None:  # noqa: C901 - one dispatch table
        if isinstance(e, ev.PageBatch):
            if self.placer is not None:
                self.placer.batch(e)
            else:
                self.loader.batch(e)
                self._mark_precopy(e.block, e.offsets)
        elif isinstance(e, ev.ZeroPages):
            if self.placer is not None:
                self.placer.zeros(e)
            else:
                self.loader.zero(e)
                self._mark_precopy(e.block, e.offsets)
        elif isinstance(e, ev.PageHeader):
            self._single_page(e)
        elif isinstance(e, ev.DeviceState):
            self._device_state(e)
        elif isinstance(e, ev.OpenReturnPath):
            self.rp = ReturnPathWriter(self.channel)
        elif isinstance(e, ev.Ping):
            self._require_rp("PING").pong(e.value)
        elif isinstance(e, ev.PostcopyAdvise):
            self._advise()
        elif isinstance(e, ev.PostcopyRamDiscard):
            pc = self._require_postcopy("DISCARD")
            for start, length in e.ranges:
                pc.discard(e.block, start, length)
        elif isinstance(e, ev.PostcopyListen):
            self._listen()
        elif isinstance(e, ev.PostcopyRun):
            self._run_guest()
        elif not isinstance(e, (ev.StreamStart, ev.SectionBegin, ev.SectionComplete,
                                ev.MemSize, ev.Packaged, ev.PackagedEnd)):
            raise RemoteProtocolError(f"unexpected {type(e).__name__} in the main stream")

    def _mark_precopy(self, block: str, offsets: npt.NDArray[np.uint64]) -> None:
        if self.postcopy is not None:
            self.postcopy.mark_precopy(block, offsets)

    def _single_page(self, e: ev.PageHeader) -> None:
        if self.placer is not None:
            # `with` releases the view at once, even on error: a view left in a
            # traceback would keep the temporary huge page (or guest RAM) mapped.
            with self.placer.single_slot(e) as slot:
                read_payload(self.dec, self.channel, slot)
            self.placer.single_done(e)
        else:
            with self.loader.page_slot(e) as slot:
                read_payload(self.dec, self.channel, slot)
            self._mark_precopy(e.block, np.array([e.offset], dtype=np.uint64))


    def _device_state(self, e: ev.DeviceState) -> None:
        if e.idstr == "livemig/cpu":
            self.cpus[e.instance_id] = VcpuState.from_bytes(e.data)
        elif e.idstr == "livemig/serial":
            self.serial = SerialState.from_bytes(e.data)
        elif e.idstr == "livemig/globalstate":
            self.runstate = e.data.decode("ascii", "replace")
        elif e.idstr == "livemig/capabilities":
            self._check_capabilities(e.data.decode("ascii", "replace"))
        else:
            raise RemoteProtocolError(f"unknown device section {e.idstr!r}")

    def _vm_state(self) -> VmState:
        if self.serial is None or sorted(self.cpus) != list(range(len(self.vm.vcpus))):
            raise RemoteProtocolError("the stream ended without the CPU and serial state")
        return VmState(tuple(self.cpus[i] for i in range(len(self.cpus))), self.serial)

    def _check_capabilities(self, theirs: str) -> None:
        """Both sides must agree on postcopy-ram and postcopy-preempt (QEMU 7.2 trusts
        the user; a mismatch there loses pages sent on a connection nobody reads)."""
        ours = agreed_capabilities(self.mig.caps)
        theirs, _, options = theirs.partition(";")
        if theirs != ours:
            raise MigrationError(f"capability mismatch: the source has [{theirs}], this "
                                 f"destination has [{ours}]; set the same on both sides")
        if self.mig.caps.postcopy_preempt:
            if URGENT_PROCESS_OPTION in options.split(","):
                self.fault_server = FaultServer()  # imports while precopy runs
            self.post_channel = self.mig.accept_postcopy_channel()

    # --- postcopy ------------------------------------------------------------------------
    def _require_rp(self, what: str) -> ReturnPathWriter:
        if self.rp is None:
            raise RemoteProtocolError(f"{what} before OPEN_RETURN_PATH")
        return self.rp

    def _require_postcopy(self, what: str) -> PostcopyState:
        if self.postcopy is None:
            raise RemoteProtocolError(f"{what} without POSTCOPY_ADVISE")
        return self.postcopy

    def _advise(self) -> None:
        """Refuse early (before the source stops its guest) if postcopy cannot work."""
        if not self.mig.caps.postcopy_ram:
            raise MigrationError("the source advised postcopy but postcopy-ram is not "
                                 "enabled on the destination")
        needed = FEATURE_THREAD_ID
        for block in self.vm.blocks.values():
            if block.backing.is_hugetlb:
                needed |= FEATURE_MISSING_HUGETLBFS
        have = self.mig.uffd_features()
        if needed & ~have:
            raise MigrationError("this host's userfaultfd lacks "
                                 f"{', '.join(feature_names(needed & ~have))}, which postcopy "
                                 "of this guest's RAM needs")
        self._require_rp("POSTCOPY_ADVISE")
        self.uffd = Userfaultfd.open()
        self.uffd.api(needed)
        tids = {i: v.native_id or 0 for i, v in enumerate(self.vm.vcpus)}
        if self.fault_server is None:
            self.postcopy = PostcopyState(uffd_block_states(self.vm.blocks, self.uffd),
                                          self.uffd, tids)
            return
        # Shared with the fault server, which places the requested pages.
        size, _ = shared_layout({n: b.size // b.host_page_size
                                 for n, b in self.vm.blocks.items()})
        self.shared = SharedMemory.create("livemig-postcopy", size)
        self.postcopy = PostcopyState(uffd_block_states(self.vm.blocks, self.uffd, self.shared),
                                      self.uffd, tids, lock=ProcessLock(self.shared.fd),
                                      shared=self.shared)

    def _listen(self) -> None:
        """Register guest RAM with userfaultfd and start taking faults."""
        pc = self._require_postcopy("LISTEN")
        rp = self._require_rp("LISTEN")
        if self.mig.caps.postcopy_preempt and self.post_channel is None:
            raise RemoteProtocolError("POSTCOPY_LISTEN before the postcopy channel is up")
        for st in pc.blocks.values():
            st.placer.register()
        self.placer = ChannelPlacer(pc, "main")
        quiet_background(self.channel)  # a short queue of background pages here too
        if self.fault_server is not None:
            assert self.uffd is not None and self.shared is not None
            assert self.post_channel is not None
            tids = {i: v.native_id or 0 for i, v in enumerate(self.vm.vcpus)}
            self.fault_server.start(self.vm.blocks, self.uffd, self.post_channel,
                                    self.shared, tids, self._fault_failed)
            self.mig.status.set(MigrationStatus.POSTCOPY_ACTIVE)
            return
        self.fault_thread = FaultThread(pc, rp.request, self._fault_failed)
        self.fault_thread.start()
        if self.post_channel is not None:
            self.post_placer = ChannelPlacer(pc, "postcopy")
            self.post_thread = threading.Thread(target=self._receive_postcopy_channel,
                                                name="postcopy/recv", daemon=True)
            self.post_thread.start()
        # A fault wakes the fault thread, which then needs the GIL: keep the wait short.
        self._old_switch = sys.getswitchinterval()
        sys.setswitchinterval(POSTCOPY_SWITCH_INTERVAL)
        self.mig.status.set(MigrationStatus.POSTCOPY_ACTIVE)

    def _receive_postcopy_channel(self) -> None:
        """The postcopy channel's own thread: requested pages only, until its EOS."""
        assert self.post_channel is not None and self.post_placer is not None
        try:
            PostcopyChannelReceiver(self.post_channel, self.post_placer,
                                    block_table(self.vm)).run()
        except Exception as e:
            self._fault_failed(e)

    def _fault_failed(self, e: Exception) -> None:
        # Without its traceback or chained exceptions: their frames would pin
        # memoryviews of guest RAM or of a temporary huge page.
        e.__context__ = e.__cause__ = None
        self.fault_error = e.with_traceback(None)
        self.channel.shutdown()

    def _run_guest(self) -> None:
        if self.placer is None:
            raise RemoteProtocolError("POSTCOPY_RUN before POSTCOPY_LISTEN")
        self.vm.restore_state(self._vm_state())
        self.start_or_keep_paused()

    def start_or_keep_paused(self) -> None:
        """Start the guest if it was running on the source; else keep its run state."""
        self.started = True
        if self.runstate in (None, RunState.RUNNING.value):
            self.vm.start()
            return
        try:
            state = RunState(self.runstate)
        except ValueError:
            raise RemoteProtocolError(f"unknown run state {self.runstate!r}") from None
        # A guest that had not started yet stays so; any other stopped guest is paused.
        self.vm.set_runstate(state if state is RunState.PRELAUNCH else RunState.PAUSED)

    def _end(self) -> None:
        if self.fault_server is not None and self.placer is not None:
            self.fault_server.wait_done(30)  # the source ends the postcopy channel first
        if self.post_thread is not None:
            # The source ends the postcopy channel before the main one.
            self.post_thread.join(30)
            if self.post_thread.is_alive():
                raise MigrationError("the postcopy channel did not end")
            if self.fault_error is not None:
                raise self.fault_error
        if self.placer is not None:
            if self.placer.pending():
                raise RemoteProtocolError(f"stream ended inside huge pages "
                                          f"{self.placer.pending()}")
            assert self.postcopy is not None
            missing = self.postcopy.missing()
            if missing:
                # The guest would hang on these forever: fail loudly instead.
                raise RemoteProtocolError(
                    "the stream ended without " + ", ".join(
                        f"{n} host pages of {name} (first at {off:#x})"
                        for name, (n, off) in missing.items()))
            self._stop_postcopy()
        else:
            self.vm.restore_state(self._vm_state())
        if self.rp is not None:
            self.rp.shut(0)

    def _stop_postcopy(self) -> None:
        if self.fault_thread is not None:
            self.fault_thread.stop()
            self.fault_thread = None
        self._stop_fault_server()
        if self.postcopy is not None:
            for st in self.postcopy.blocks.values():
                st.placer.unregister()
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def _stop_fault_server(self) -> None:
        """Stop the helper, then keep the postcopy statistics in our own memory."""
        if self.fault_server is not None:
            self.fault_server.close()
        if self.postcopy is not None and self.shared is not None:
            self.postcopy.unshare()
            self.shared.close()
            self.shared = None

    def release_faults(self) -> None:
        """Close the userfaultfd: every thread blocked on a missing page wakes up."""
        if self.fault_thread is not None:
            self.fault_thread.stop()
            self.fault_thread = None
        if self.fault_server is not None:
            self.fault_server.close()  # its copy of the userfaultfd too
        if self.uffd is not None:
            self.uffd.close()

    def close(self) -> None:
        if self.fault_thread is not None:
            self.fault_thread.stop()
            self.fault_thread = None
        self._stop_fault_server()
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
        if self.post_channel is not None:
            self.post_channel.shutdown()
        if self.post_thread is not None:
            self.post_thread.join(10)
        # Every step runs even if one fails: a view still held somewhere must not
        # leave the userfaultfd open or the loader's views of guest RAM alive.
        steps = [p.close for p in (self.placer, self.post_placer) if p is not None]
        if self.postcopy is not None:
            steps.append(self.postcopy.close)
        if self.uffd is not None:
            steps.append(self.uffd.close)
        steps.append(self.loader.release)
        for step in steps:
            try:
                step()
            except BufferError as err:
                log.error("cleanup: %s", str(err))

