"""Who sends requested pages in postcopy: one class per design, chosen once per migration.

Theory of operation
-------------------
In postcopy the destination asks for the pages its vCPUs fault on; how the source
answers is a design choice (``x-postcopy-urgent-sender``, :class:`UrgentMode`).  Each
design is one class behind the small :class:`UrgentSender` interface, and
:func:`choose_urgent_sender` picks one from the parameters as they were at ``migrate``.
Nothing outside this module tests the mode.

================================  =======================================================
:class:`MigrationThreadSender`    (QEMU 7.1) the return-path thread queues a request; the
                                  migration thread serves it between background pieces
                                  and may interrupt a huge page for it (break-huge).
                                  Also vanilla postcopy (no preemption): requested pages
                                  then go on the main channel.
:class:`ReturnPathSender`         (QEMU 8.0) the return-path thread sends the requested
                                  page itself on the postcopy channel; the two threads
                                  share the bitmaps under their lock.
:class:`ProcessSender`            a helper process (urgent.py) owns the postcopy
                                  channel: the destination's fault server sends requests
                                  there and the helper answers from guest RAM; the
                                  bitmaps' bits live in memory both processes map.
================================  =======================================================

The interface, in the order a migration uses it: :meth:`~UrgentSender.prepare` (setup,
before any connection), :meth:`~UrgentSender.handshake` (what the capabilities section
announces), :meth:`~UrgentSender.shared_bits` (where the page sender keeps its bits),
:meth:`~UrgentSender.start` (the channels and the return path are up),
:meth:`~UrgentSender.on_request` (the return-path thread got REQ_PAGES),
:meth:`~UrgentSender.switchover` (postcopy starts: huge-page breaking and locality),
:meth:`~UrgentSender.finish` (every page is sent: end the postcopy channel),
:meth:`~UrgentSender.update_stats` / :meth:`~UrgentSender.bytes_sent` (query-migrate),
:meth:`~UrgentSender.close`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import ClassVar

from livemig.errors import RemoteProtocolError
from livemig.migration.bitmap import SourceBlock
from livemig.migration.channel import Channel
from livemig.migration.handshake import Handshake
from livemig.migration.helper import HelperBlock, HelperServer
from livemig.migration.returnpath import PageRequest, RequestQueue
from livemig.migration.sender import PageSender
from livemig.migration.state import Capabilities, Parameters, RamStats, UrgentMode
from livemig.migration.trace import Tracer
from livemig.migration.urgent import SharedBits, UrgentServer
from livemig.runtime import (
    POSTCOPY_SWITCH_INTERVAL,
    SwitchInterval,
    UrgentPriority,
)


class UrgentSender(ABC):
    """One design for serving page requests (see the module docstring)."""

    mode: ClassVar[UrgentMode]

    def __init__(self, caps: Capabilities, params: Parameters, helpers: HelperServer) -> None:
        """``helpers``: the process's helper server (a design that runs a helper)."""
        self.caps = caps
        self.params = params
        self.helpers = helpers
        self.priority = UrgentPriority(params.x_postcopy_urgent_priority)
        self._sender: PageSender | None = None

    def prepare(self, blocks: Mapping[str, SourceBlock]) -> None:  # noqa: B027 - optional hook
        """Setup, before any connection is made."""

    def handshake(self) -> Handshake:
        return Handshake.of(self.caps)

    def shared_bits(self) -> SharedBits | None:
        """The bitmaps' bits (in memory another process maps) and their lock, when
        another process takes pages too."""
        return None

    def attach(self, sender: PageSender) -> None:
        self._sender = sender

    @property
    def sender(self) -> PageSender:
        assert self._sender is not None, "attach() the page sender first"
        return self._sender

    def start(self, blocks: Mapping[str, HelperBlock], post_channel: Channel | None,
              tracer: Tracer, on_error: Callable[[Exception], None], return_path: int) -> None:
        """The channels and the return path are up (the destination agreed): before the
        switch to postcopy, and again after each postcopy recovery.  ``on_error`` hears
        of a failure the migration thread would not see (a helper's).

        ``return_path``: the kernel id of the thread that reads page requests (and in
        some designs answers them); it enters the urgent class here, as it is the
        first hop of every request."""
        self.priority.apply(return_path)

    def pause(self) -> None:  # noqa: B027 - optional hook
        """Postcopy paused: the channels are gone; keep what a resume needs."""

    @abstractmethod
    def on_request(self, req: PageRequest, queue: RequestQueue) -> None:
        """The return-path thread read a page request."""

    def postcopy_gil(self, switch: SwitchInterval) -> AbstractContextManager[object]:
        """Held while postcopy runs.  A request reaches a thread of this process (the
        return-path thread), which must get the GIL quickly while the migration thread
        streams: the default 5 ms switch interval would add up to 5 ms to every
        request."""
        return switch.switch_interval(POSTCOPY_SWITCH_INTERVAL)

    def switchover(self, background_queue: int) -> None:
        """Postcopy starts: how the background stream treats huge pages and requests
        (``background_queue``: the bytes the main channel's kernel queue holds now)."""
        self.sender.break_huge = False
        self.sender.locality = self.params.x_postcopy_locality
        self.sender.widen_background(background_queue)

    def finish(self) -> dict[str, int]:
        """Every page is sent: end the postcopy channel after the last urgent page.
        Returns trace counters gathered elsewhere (the helper's)."""
        self.sender.finish_postcopy_channel()
        return {}

    def bytes_sent(self) -> int:
        """Bytes put on the postcopy channel so far (0 without one)."""
        post = self._sender.post if self._sender is not None else None
        return post.writer.bytes_sent if post is not None else 0

    def update_stats(self, ram: RamStats) -> None:  # noqa: B027 - optional hook
        """Request counters kept outside the page sender, into ``ram``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the design holds (idempotent)."""


class MigrationThreadSender(UrgentSender):
    mode = UrgentMode.MIGRATION

    def on_request(self, req: PageRequest, queue: RequestQueue) -> None:
        queue.put(req)

    def switchover(self, background_queue: int) -> None:
        super().switchover(background_queue)
        self.sender.break_huge = self.params.x_postcopy_preempt_break_huge


class ReturnPathSender(UrgentSender):
    mode = UrgentMode.RETURN_PATH

    def on_request(self, req: PageRequest, queue: RequestQueue) -> None:
        self.sender.send_urgent(req)


class ProcessSender(UrgentSender):
    mode = UrgentMode.PROCESS

    def __init__(self, caps: Capabilities, params: Parameters, helpers: HelperServer) -> None:
        super().__init__(caps, params, helpers)
        self._server: UrgentServer | None = None
        self._bits: SharedBits | None = None
        self._last_counters = (0, 0)  # requests, urgent bytes: kept after close

    def prepare(self, blocks: Mapping[str, SourceBlock]) -> None:
        self._server = UrgentServer(self.helpers)  # forked: ready in a few ms
        self._bits = SharedBits({n: b.pages for n, b in blocks.items()})

    def handshake(self) -> Handshake:
        return Handshake.of(self.caps, urgent_process=True)

    def shared_bits(self) -> SharedBits | None:
        assert self._bits is not None, "prepare() first"
        return self._bits

    def start(self, blocks: Mapping[str, HelperBlock], post_channel: Channel | None,
              tracer: Tracer, on_error: Callable[[Exception], None], return_path: int) -> None:
        """Requests come to the helper, not the return-path thread: the helper enters
        the urgent class."""
        assert self._bits is not None and post_channel
        if self._server is None:  # a resume: the helper of the last connection is gone
            self._server = UrgentServer(self.helpers)
        self._server.start(blocks, self._bits, post_channel, tracer.patterns, self.priority,
                           on_error)

    def pause(self) -> None:
        """The helper goes with the connection; the shared bits and counters stay."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def postcopy_gil(self, switch: SwitchInterval) -> AbstractContextManager[object]:
        return contextlib.nullcontext()  # requests never reach a thread of this process

    def switchover(self, background_queue: int) -> None:
        """The migration thread only streams background pages from here: the helper
        that answers requests goes first when both want a CPU (livemig.runtime)."""
        super().switchover(background_queue)
        # Nothing in this process answers requests: pieces go in one system call.
        self.sender.background_steps = False
        self.priority.background_thread()

    def on_request(self, req: PageRequest, queue: RequestQueue) -> None:
        raise RemoteProtocolError("a page request on the return path, but the destination "
                                  "was told to use the postcopy channel")

    def finish(self) -> dict[str, int]:
        assert self._server is not None
        return self._server.finish()

    def _counters(self) -> tuple[int, int]:
        if self._bits is not None:
            self._last_counters = (self._bits.counter("requests"),
                                   self._bits.counter("urgent_bytes"))
        return self._last_counters

    def bytes_sent(self) -> int:
        # The preamble came from this process, the pages from the helper.
        return super().bytes_sent() + self._counters()[1]

    def update_stats(self, ram: RamStats) -> None:
        ram.postcopy_requests, ram.x_postcopy_urgent_bytes = self._counters()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._bits is not None:
            self._counters()
            self._bits.close()
            self._bits = None


_DESIGNS: Mapping[UrgentMode, type[UrgentSender]] = {
    cls.mode: cls for cls in (MigrationThreadSender, ReturnPathSender, ProcessSender)}


def choose_urgent_sender(caps: Capabilities, params: Parameters,
                         helpers: HelperServer) -> UrgentSender:
    """The design for one migration, from the capabilities and parameters at ``migrate``.
    Without preemption requested pages share the main channel: the migration thread
    serves them."""
    if not caps.postcopy_preempt:
        return MigrationThreadSender(caps, params, helpers)
    return _DESIGNS[params.x_postcopy_urgent_sender](caps, params, helpers)
