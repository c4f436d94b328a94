"""Who takes the destination's faults in postcopy: one class per design, chosen once.

Theory of operation
-------------------
In postcopy a vCPU that touches a missing page blocks in the kernel; someone must read
the userfaultfd, ask the source for the page, and place the answer.  The destination
learns from the capabilities section (:class:`~livemig.migration.handshake.Handshake`)
which design the source uses, and :func:`choose_fault_handler` picks the matching one:

=============================  ==========================================================
:class:`ThreadFaultHandler`    threads of this process: ``postcopy/fault`` reads the
                               userfaultfd and sends REQ_PAGES on the return path; with
                               preemption ``postcopy/recv`` places the pages arriving on
                               the postcopy channel.  The GIL switch interval is lowered
                               while they run (a woken thread must get the GIL quickly).
:class:`HelperFaultHandler`    the fault server (faultserver.py), a helper process that
                               owns the userfaultfd and the postcopy channel: requests
                               go out on that channel, answers are placed there.  The
                               page arrays live in memory this process maps too.
=============================  ==========================================================

The interface, in the order the load uses it: :meth:`~FaultHandler.advise` (at
POSTCOPY_ADVISE: the :class:`~livemig.migration.postcopy.PostcopyState` both sides of
the handler share; the threads or the helper start here, long before the guest stops:
nothing faults until guest RAM is registered, and starting a thread or handing fds to a
helper inside the switchover pause would lengthen it), :meth:`~FaultHandler.when_ready`
(the load answers ADVISE's PING once the handler can take faults, without holding up
the precopy stream while a helper process imports), :meth:`~FaultHandler.listen`
(at POSTCOPY_LISTEN, guest RAM registered: faults come from now on),
:meth:`~FaultHandler.wait_channel_end` (at the main stream's end: the
postcopy channel has ended and its pages are placed), :attr:`~FaultHandler.pages`,
:meth:`~FaultHandler.stop` (no more faults: statistics kept) and
:meth:`~FaultHandler.close`.  Errors of the threads or the helper reach the load
through the ``on_error`` callable given to :meth:`~FaultHandler.advise`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from livemig.errors import MigrationError, RemoteProtocolError
from livemig.kernel.shared import ProcessLock, SharedMemory
from livemig.kernel.uffd import Userfaultfd
from livemig.migration.channel import Channel
from livemig.migration.faultserver import FaultServer
from livemig.migration.handshake import Handshake, block_table
from livemig.migration.helper import HelperServer
from livemig.migration.postcopy import (
    ChannelPlacer,
    FaultThread,
    PostcopyChannelReceiver,
    PostcopyState,
    host_pages,
    postcopy_counters,
    postcopy_layout,
    uffd_block_states,
)
from livemig.migration.returnpath import ReturnPathWriter
from livemig.runtime import (
    POSTCOPY_SWITCH_INTERVAL,
    NamedThread,
    SwitchInterval,
    SwitchIntervalLease,
    UrgentPriority,
)
from livemig.vmm.memory import RamBlock
from livemig.wire.blocks import BlockInfo

OnError = Callable[[Exception], None]
_HelperStart = tuple[Mapping[str, RamBlock], Userfaultfd, Mapping[int, int]]


def receive_postcopy_channel(channel: Channel, placer: ChannelPlacer,
                             table: Mapping[str, BlockInfo], on_error: OnError,
                             priority: UrgentPriority) -> None:
    """The ``postcopy/recv`` thread: place requested pages until the channel's end, at
    ``priority``; any failure goes to ``on_error``."""
    priority.apply()
    try:
        PostcopyChannelReceiver(channel, placer, table).run()
    except Exception as e:
        on_error(e)


class FaultHandler(ABC):
    """One design for taking faults and placing requested pages (see module doc)."""

    def __init__(self, post_channel: Channel | None, priority: UrgentPriority) -> None:
        """``priority``: of the threads or the helper that take faults and place
        requested pages (livemig.runtime)."""
        self.post_channel = post_channel
        self.priority = priority

    @abstractmethod
    def advise(self, blocks: Mapping[str, RamBlock], uffd: Userfaultfd,
               vcpu_tids: Mapping[int, int], rp: ReturnPathWriter,
               on_error: OnError) -> PostcopyState:
        """The postcopy state the load and this handler share; start reading the
        userfaultfd (and the postcopy channel) now: nothing faults before guest RAM is
        registered."""

    def when_ready(self, then: Callable[[], None]) -> None:
        """Run ``then`` once what :meth:`advise` started can take faults (at once for
        threads; a helper process may still be importing, and the stream must go on
        meanwhile: the load thread answers ADVISE's PING through this)."""
        then()

    @abstractmethod
    def listen(self) -> None:
        """Guest RAM is registered: faults come from now on."""

    @abstractmethod
    def pause(self) -> None:
        """Postcopy paused (the connections are gone): stop taking faults, keep the
        state; vCPUs that fault meanwhile wait in the kernel."""

    @abstractmethod
    def resume(self, rp: ReturnPathWriter, post_channel: Channel | None,
               on_error: OnError) -> None:
        """Take faults again over the new connections, and ask again for the pages
        requested before the pause and still missing."""

    @abstractmethod
    def wait_channel_end(self, timeout: float) -> None:
        """Until the postcopy channel has ended and its pages are placed."""

    @property
    @abstractmethod
    def pages(self) -> int:
        """Pages placed from the postcopy channel."""

    @abstractmethod
    def stop(self) -> None:
        """Take no more faults (idempotent); the statistics stay readable."""

    def close(self) -> None:
        self.stop()


class ThreadFaultHandler(FaultHandler):
    def __init__(self, post_channel: Channel | None, switch: SwitchInterval,
                 priority: UrgentPriority) -> None:
        super().__init__(post_channel, priority)
        self._switch = switch
        self._state: PostcopyState | None = None
        self._table: dict[str, BlockInfo] = {}
        self._fault: FaultThread | None = None
        self._placer: ChannelPlacer | None = None
        self._recv: threading.Thread | None = None
        self._gil: SwitchIntervalLease | None = None

    def advise(self, blocks: Mapping[str, RamBlock], uffd: Userfaultfd,
               vcpu_tids: Mapping[int, int], rp: ReturnPathWriter,
               on_error: OnError) -> PostcopyState:
        views = postcopy_layout(host_pages(blocks)).private()
        state = PostcopyState(uffd_block_states(blocks, uffd, views), uffd, vcpu_tids,
                              counters=postcopy_counters(views))
        self._state, self._table = state, block_table(blocks)
        if self.post_channel is not None:
            self._placer = ChannelPlacer(state, "postcopy")
        self._start(rp, on_error)
        return state

    def listen(self) -> None:
        """With a postcopy channel the calling load thread places only background pages
        from here: the threads that take faults and place requested pages go first
        when they want a CPU (livemig.runtime).  Without one, requested pages come on
        the main channel too, and the load thread keeps its priority."""
        self._lower_switch_interval()
        if self.post_channel is not None:
            self.priority.background_thread()

    def _start(self, rp: ReturnPathWriter, on_error: OnError) -> None:
        assert self._state is not None
        self._fault = FaultThread(self._state, rp.request, on_error, self.priority)
        self._fault.start()
        if self.post_channel is not None:
            assert self._placer is not None
            self._recv = NamedThread(
                target=receive_postcopy_channel, name="postcopy/recv", daemon=True,
                args=(self.post_channel, self._placer, self._table, on_error, self.priority))
            self._recv.start()

    def _lower_switch_interval(self) -> None:
        # A fault wakes a thread of ours, which then needs the GIL quickly: the default
        # 5 ms switch interval would add up to 5 ms to every page request.
        self._gil = self._switch.switch_interval(POSTCOPY_SWITCH_INTERVAL)

    def pause(self) -> None:
        self.stop()
        if self.post_channel is not None:
            self.post_channel.shutdown()
        if self._recv is not None:
            self._recv.join(10)
            self._recv = None
        if self._placer is not None:
            self._placer.reset()

    def resume(self, rp: ReturnPathWriter, post_channel: Channel | None,
               on_error: OnError) -> None:
        assert self._state is not None
        self.post_channel = post_channel
        self._start(rp, on_error)
        self._lower_switch_interval()
        self._state.rerequest(rp.request)

    def wait_channel_end(self, timeout: float) -> None:
        if self._recv is not None:
            # The source ends the postcopy channel before the main one.
            self._recv.join(timeout)
            if self._recv.is_alive():
                raise MigrationError("the postcopy channel did not end")

    @property
    def pages(self) -> int:
        return self._placer.pages if self._placer is not None else 0

    def stop(self) -> None:
        if self._fault is not None:
            self._fault.stop()
            self._fault = None
        if self._gil is not None:
            self._gil.release()
            self._gil = None

    def close(self) -> None:
        self.stop()
        if self.post_channel is not None:
            self.post_channel.shutdown()
        if self._recv is not None:
            self._recv.join(10)
        if self._placer is not None:
            self._placer.close()


class HelperFaultHandler(FaultHandler):
    def __init__(self, post_channel: Channel | None, helpers: HelperServer,
                 priority: UrgentPriority) -> None:
        super().__init__(post_channel, priority)
        self._helpers = helpers
        self._server: FaultServer | None = FaultServer(helpers)  # forked: ready in ms
        self._shared: SharedMemory | None = None
        self._state: PostcopyState | None = None
        self._pages = 0  # placed by the helpers of earlier connections
        self._start_args: _HelperStart | None = None

    def advise(self, blocks: Mapping[str, RamBlock], uffd: Userfaultfd,
               vcpu_tids: Mapping[int, int], rp: ReturnPathWriter,
               on_error: OnError) -> PostcopyState:
        # Shared with the fault server, which places the requested pages.
        self._shared, views = postcopy_layout(host_pages(blocks)).create("livemig-postcopy")
        self._state = PostcopyState(uffd_block_states(blocks, uffd, views), uffd, vcpu_tids,
                                    lock=ProcessLock(self._shared.fd),
                                    counters=postcopy_counters(views))
        views.release()
        self._start_args = (blocks, uffd, vcpu_tids)
        self._start(on_error, rerequest=False)
        return self._state

    def when_ready(self, then: Callable[[], None]) -> None:
        assert self._server is not None, "advise() first"
        self._server.when_ready(then)

    def listen(self) -> None:
        """The fault server polls the userfaultfd since it took it (the source waited
        for that: it waits for the PONG answered through :meth:`when_ready` before it
        stops its guest); the calling load thread places only background pages from
        here: the fault server and the faulting vCPUs go first when they want a CPU
        (livemig.runtime)."""
        assert self._server is not None
        self._server.wait_ready()
        self.priority.background_thread()

    def _start(self, on_error: OnError, *, rerequest: bool) -> None:
        assert self._shared is not None and self.post_channel is not None
        if self._server is None:  # a resume: the helper of the last connection is gone
            self._server = FaultServer(self._helpers)
        assert self._start_args is not None
        blocks, uffd, vcpu_tids = self._start_args
        self._server.start(blocks, uffd, self.post_channel, self._shared, vcpu_tids,
                           on_error, rerequest=rerequest, priority=self.priority)

    def pause(self) -> None:
        """The helper goes with the connection; the shared state stays."""
        if self._server is not None:
            self._pages += self._server.pages
            self._server.close()
            self._server = None
        if self._state is not None:
            self._state.release_owner("postcopy")

    def resume(self, rp: ReturnPathWriter, post_channel: Channel | None,
               on_error: OnError) -> None:
        self.post_channel = post_channel
        self._start(on_error, rerequest=True)
        assert self._server is not None
        self._server.wait_ready()

    def wait_channel_end(self, timeout: float) -> None:
        assert self._server is not None
        self._server.wait_done(timeout)

    @property
    def pages(self) -> int:
        return self._pages + (self._server.pages if self._server is not None else 0)

    def stop(self) -> None:
        """Stop the helper, then keep the postcopy statistics in our own memory."""
        if self._server is not None:
            self._pages += self._server.pages
            self._server.close()  # its copy of the userfaultfd too
            self._server = None
        if self._state is not None and self._shared is not None:
            self._state.unshare()
        if self._shared is not None:
            self._shared.close()
            self._shared = None


def choose_fault_handler(handshake: Handshake, post_channel: Channel | None,
                         switch: SwitchInterval, helpers: HelperServer,
                         priority: UrgentPriority) -> FaultHandler:
    """The design matching the source's (announced in the capabilities section); its
    threads or helper answer faults at ``priority``."""
    if handshake.urgent_process:
        if post_channel is None:
            raise RemoteProtocolError("the source serves page requests on the postcopy "
                                      "channel, but there is no postcopy channel")
        return HelperFaultHandler(post_channel, helpers, priority)
    return ThreadFaultHandler(post_channel, switch, priority)
