"""The destination side of a migration: accept the channels, load, start the guest.

Theory of operation
-------------------
A :class:`DestinationMigration` listens on a URI (``migrate-incoming``), accepts the
main channel and runs a *load thread*: an :class:`~livemig.migration.load.IncomingLoad`
(the stream's state machine: precopy, advised, listening, running, ended) that places
pages, restores the device state and starts the guest.  This class owns what lives
longer than one stream: the listener, the channels, the migration status and
``query-migrate``.

With postcopy preemption the postcopy channel may arrive before or after the main
channel; each is identified by its first four bytes (:func:`identify_channel`).  The
load asks for the postcopy channel (:meth:`DestinationMigration.accept_postcopy_channel`)
when the capabilities section arrives, before anything that can fault is loaded.

Anything the decoder rejects (corrupt, truncated, unknown block, out-of-range page)
arrives as a typed :class:`~livemig.errors.StreamError`: the migration fails, the guest
is never started, and nothing was written outside guest RAM (every write goes through a
bounds-checked view of a block).  A postcopy that fails with the guest running here
stops the guest: its memory is incomplete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.errors import ChannelClosedError, LivemigError, MigrationError, RemoteProtocolError
from livemig.kernel.uffd import Userfaultfd
from livemig.migration.channel import Channel, Listener, MigrationUri, identify_incoming
from livemig.migration.helper import HelperServer
from livemig.migration.load import IncomingLoad, answer_resume_after_completion
from livemig.migration.state import (
    Capabilities,
    MigrationInfo,
    MigrationStatus,
    StatusMachine,
    detached,
    log_failure,
)
from livemig.migration.tls import TlsEndpoint
from livemig.runtime import NamedThread, SwitchInterval, UrgentPriority
from livemig.vmm.vm import RunState, Vm
from livemig.wire.channel import ChannelKind

log = logging.getLogger("livemig.destination")

EventSink = Callable[[str, dict[str, Any]], None]


class DestinationMigration:
    """One incoming migration (see the module docstring)."""

    def __init__(self, vm: Vm, uri: MigrationUri, caps: Capabilities,
                 emit: EventSink | None = None,
                 on_finished: Callable[[DestinationMigration], None] | None = None, *,
                 helpers: HelperServer, switch: SwitchInterval | None = None,
                 dead_link_timeout_ms: int = 0, tls: TlsEndpoint | None = None,
                 urgent_priority: UrgentPriority | None = None) -> None:
        """``helpers``: the process's helper server (livemig.migration.helper).
        ``switch``: the process's owner of the GIL switch interval (one per process,
        shared by every migration in it).  ``dead_link_timeout_ms``: a TCP peer silent
        that long is gone (0: wait for ever).  ``tls``: every connection accepted, the
        recovery ones too, must be TLS with it (tls-creds); others are refused.
        ``urgent_priority``: of the threads or helper that take faults in postcopy
        (x-postcopy-urgent-priority; default: its default)."""
        self.tls = tls
        self.dead_link_timeout_ms = dead_link_timeout_ms
        self.vm = vm
        self.switch = switch or SwitchInterval()
        self.urgent_priority = urgent_priority or UrgentPriority()
        self.helpers = helpers
        self.uri = uri
        self.caps = caps
        self._emit = emit or (lambda _e, _d: None)
        self._on_finished = on_finished
        self.info = MigrationInfo()
        self.status = StatusMachine(self._on_status)
        self._listener = Listener(uri)  # bind now: errors reach the migrate-incoming caller
        self._channel: Channel | None = None
        self._post_channel: Channel | None = None
        self._multifd_channels: list[Channel] = []  # in the order they were accepted
        self._load: IncomingLoad | None = None
        # Postcopy recovery: the listener migrate-recover opened, and quitting.
        self._recover_cond = threading.Condition()
        self._recover_listener: Listener | None = None
        self._aborted = False
        # After a completed postcopy: the thread answering a resume (the source lost
        # our SHUT), and the connection it answers on.
        self._answerer: threading.Thread | None = None
        self._answering: Channel | None = None
        self._thread = NamedThread(target=self._run, name="incoming", daemon=True)
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
        """Wait for the load thread to finish its cleanup (after wait()), and for a
        resume after completion being answered."""
        for thread in (self._thread, self._answerer):
            if thread is not None and thread.is_alive():
                thread.join(timeout)

    def abort(self) -> None:
        """Stop waiting or receiving (the process is shutting down)."""
        with self._recover_cond:
            self._aborted = True
            if self._recover_listener is not None:
                self._recover_listener.close()
            self._recover_cond.notify_all()
        self._listener.close()
        self._shutdown_channels()

    def _shutdown_channels(self) -> None:
        for ch in (self._channel, self._post_channel, *self._multifd_channels,
                   self._answering):
            if ch is not None:
                ch.shutdown()

    def pause(self) -> None:
        """migrate-pause: in postcopy, drop the connections; the migration pauses and
        waits for :meth:`recover`, as when the network fails."""
        self.status.status.require_pausable()
        self._shutdown_channels()

    def recover(self, uri: MigrationUri) -> None:
        """migrate-recover: listen on ``uri`` for the source's resumed connections.

        Also after a postcopy that completed here: its source may have lost the final
        SHUT with the connection and paused.  Its resume is then answered with SHUT
        (:func:`~livemig.migration.load.answer_resume_after_completion`), and the
        status stays completed."""
        with self._recover_cond:
            completed = (self.status.status is MigrationStatus.COMPLETED
                         and self._load is not None and self._load.ran_postcopy)
            if self.status.status is not MigrationStatus.POSTCOPY_PAUSED and not completed:
                raise MigrationError("Migrate recover can only be run when postcopy is "
                                     "paused.")
            if self._recover_listener is not None:
                raise MigrationError("Migrate recovery is triggered already")
            listener = self._recover_listener = Listener(uri)  # bind now: errors reach
            if completed:                                      # the caller
                self._answerer = NamedThread(target=self._answer_completed,
                                                  args=(listener,), name="resume-completed",
                                                  daemon=True)
                self._answerer.start()
            self._recover_cond.notify_all()

    def _answer_completed(self, listener: Listener) -> None:
        """The migration completed here: answer one resume on ``listener`` with SHUT;
        then another migrate-recover may listen again."""
        try:
            while self._answering is None:
                ch = listener.accept(timeout=None)
                ch.detect_dead_peer(self.dead_link_timeout_ms)
                if identify_incoming(ch, self.tls) is ChannelKind.MAIN:
                    self._answering = ch
                else:
                    ch.close()  # a resuming source's postcopy channel: not needed
            answer_resume_after_completion(self.vm, self._answering)
        except Exception as e:
            log_failure(log, "a resume after the migration completed", e)
        finally:
            with self._recover_cond:
                listener.close()
                if self._recover_listener is listener:
                    self._recover_listener = None
                if self._answering is not None:
                    self._answering.close()
                    self._answering = None

    @property
    def recover_port(self) -> int:
        """The TCP port migrate-recover listens on (useful with port 0)."""
        listener = self._recover_listener
        return listener.port if listener is not None else 0

    def _await_recovery(self, failure: Exception) -> tuple[Channel, Channel | None]:
        """The load thread in postcopy-paused: until migrate-recover and the source's
        new connections, then postcopy-recover.  A connection that fails to come
        pauses again (another migrate-recover is needed); only quitting raises."""
        while True:
            self.info.error_desc = self._pause_reason(failure)
            self._drop_channels()
            with self._recover_cond:
                if self._recover_listener is not None:  # a failure during a recovery
                    self._recover_listener.close()
                    self._recover_listener = None
                self.status.set(MigrationStatus.POSTCOPY_PAUSED)
                self._recover_cond.wait_for(lambda: self._recover_listener is not None
                                            or self._aborted)
                if self._aborted:
                    raise MigrationError("the destination quit in postcopy-paused: the "
                                         f"source was not heard from again ({failure})")
                listener = self._recover_listener
            assert listener is not None
            try:
                while self._channel is None or (self.caps.postcopy_preempt
                                                and self._post_channel is None):
                    self._accept_one(listener, timeout=None if self._channel is None else 30)
            except Exception as e:
                failure = detached(e)
                continue
            self.status.set(MigrationStatus.POSTCOPY_RECOVER)
            return self._channel, self._post_channel

    @staticmethod
    def _pause_reason(failure: Exception) -> str:
        """What query-migrate says while paused: a lost connection says so plainly (the
        source may be gone for good: then the VM cannot be saved)."""
        if isinstance(failure, (ChannelClosedError, OSError)):
            return f"lost the connection to the source: {failure}"
        return str(failure)

    def _drop_channels(self) -> None:
        for ch in (self._channel, self._post_channel):
            if ch is not None:
                ch.close()
        self._channel = self._post_channel = None

    def _on_resumed(self) -> None:
        with self._recover_cond:
            if self._recover_listener is not None:
                self._recover_listener.close()
                self._recover_listener = None
        self.info.error_desc = ""
        self.status.set(MigrationStatus.POSTCOPY_ACTIVE)

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
            self._load = IncomingLoad(
                self.vm, self._channel, self.caps,
                accept_postcopy_channel=self.accept_postcopy_channel,
                accept_multifd_channels=self.accept_multifd_channels,
                on_postcopy_active=self._on_postcopy_active,
                uffd_features=self.uffd_features, switch=self.switch,
                urgent_priority=self.urgent_priority,
                helpers=self.helpers, await_recovery=self._await_recovery,
                on_resumed=self._on_resumed)
            self._load.run()
            self._finish(self._load)
        except Exception as e:
            self._fail(e)
        finally:
            if self._load is not None:
                self._load.close()
            self._listener.close()
            with self._recover_cond:
                # A listener a paused postcopy opened.  One opened after completion is
                # the answering thread's (COMPLETED is final and recover() checks it
                # under this lock, so the two cannot be confused).
                if (self._recover_listener is not None
                        and self.status.status is not MigrationStatus.COMPLETED):
                    self._recover_listener.close()
                    self._recover_listener = None
            for ch in (self._channel, self._post_channel, *self._multifd_channels):
                if ch is not None:
                    ch.close()
            self.info.end_ns = time.monotonic_ns()
            if self._on_finished is not None:
                self._on_finished(self)

    def _accept_channels(self) -> None:
        """Accept the main channel; with preemption the postcopy channel may come first.
        Each is identified by its first four bytes, so the order does not matter."""
        while self._channel is None:
            self._accept_one(self._listener, timeout=None)

    def accept_postcopy_channel(self) -> Channel:
        """Preemption: the postcopy channel, accepted now if it has not come yet.
        Called before anything that can fault is loaded (see load.py)."""
        if self._post_channel is None:
            self._accept_one(self._listener, timeout=30)
        if self._post_channel is None:
            raise RemoteProtocolError("a second main channel arrived instead of the "
                                      "postcopy channel")
        return self._post_channel

    def accept_multifd_channels(self, count: int) -> list[Channel]:
        """Multifd: ``count`` multifd connections, accepted now if they have not come
        yet (called when the capabilities section announces them)."""
        while len(self._multifd_channels) < count:
            self._accept_one(self._listener, timeout=30)
        return list(self._multifd_channels)

    def _accept_one(self, listener: Listener, timeout: float | None) -> None:
        ch = listener.accept(timeout=timeout)
        ch.detect_dead_peer(self.dead_link_timeout_ms)
        kind = identify_incoming(ch, self.tls)  # closes a refused connection
        if kind is ChannelKind.MAIN and self._channel is None:
            self._channel = ch
        elif (kind is ChannelKind.POSTCOPY and self._post_channel is None
              and self.caps.postcopy_preempt):
            ch.name = "postcopy"
            self._post_channel = ch
        elif kind is ChannelKind.MULTIFD and self.caps.multifd:
            ch.name = f"multifd{len(self._multifd_channels)}"
            self._multifd_channels.append(ch)
        else:
            ch.close()
            raise RemoteProtocolError(
                f"unexpected {kind.name.lower()} channel: are postcopy-preempt and multifd "
                "set alike on both sides?")

    def _finish(self, load: IncomingLoad) -> None:
        loaded = load.finish()
        st = self.info.ram
        st.normal, st.duplicate = loaded.normal, loaded.zero
        st.postcopy_requests = loaded.postcopy_requests
        st.total = sum(b.size for b in self.vm.blocks.values())
        st.transferred = sum(ch.bytes_received for ch in (self._channel, self._post_channel,
                                                          *self._multifd_channels)
                             if ch is not None)
        self.status.set(MigrationStatus.COMPLETED)

    def _fail(self, e: Exception) -> None:
        log_failure(log, "incoming migration failed", e)
        if not isinstance(e, LivemigError):
            e = MigrationError(f"internal error: {e}")
        self.info.error_desc = str(e)
        # A VM still in "inmigrate" stays there, as in QEMU: its RAM and device state are
        # partly loaded, so ``cont`` is refused (only a new migrate-incoming can load it).
        if self.vm.running:
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

    def _on_postcopy_active(self) -> None:
        self.info.postcopy_ns = time.monotonic_ns()
        self.status.set(MigrationStatus.POSTCOPY_ACTIVE)

    def latency_samples(self) -> tuple[list[int], list[int]]:
        """Raw postcopy page-request latencies (ns) and when each fault was read (ns
        after postcopy started: guest RAM registered, faults taken); empty without
        postcopy."""
        stats = self._load.postcopy_stats if self._load is not None else None
        return stats.samples_ns(self.info.postcopy_ns) if stats is not None else ([], [])

    def slow_pages(self, min_ns: int) -> list[dict[str, Any]]:
        """The postcopy requests that waited at least ``min_ns`` (see LatencyStats)."""
        stats = self._load.postcopy_stats if self._load is not None else None
        return stats.slow_pages(min_ns) if stats is not None else []

    def query(self) -> dict[str, Any]:
        out = self.info.to_qmp()
        stats = self._load.postcopy_stats if self._load is not None else None
        if stats is not None:
            out.update(stats.to_qmp(len(self.vm.vcpus)))
        return out
