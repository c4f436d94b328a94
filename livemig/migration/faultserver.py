"""The destination's fault server: a helper process that owns the userfaultfd and the
postcopy channel (``x-postcopy-urgent-sender=process``).

Theory of operation
-------------------
One thread, one ``poll`` over three descriptors, nothing else in the process to take
the GIL:

* the **userfaultfd**: a fault becomes a REQ_PAGES_ID sent straight back on the
  *postcopy channel* (not on the return path: the source's helper reads requests where
  it sends pages, so a request crosses no other thread on either side);
* the **postcopy channel**: requested pages are decoded and placed (temporary huge
  page, then UFFDIO_COPY into the VMM's guest RAM, which wakes the vCPU);
* the **control socket** to the VMM.

State shared with the VMM (which places the background pages of the main channel)
lives in a memfd both map: the per-host-page arrays of
:class:`~livemig.migration.postcopy.PostcopyState` under a
:class:`~livemig.kernel.shared.ProcessLock`.  Latency statistics come from those arrays,
so the VMM reports them for both processes.

After the postcopy channel ends, faults are still read (pages still on their way on
the main channel fault until the VMM places them) but no longer requested.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from livemig.errors import MigrationError
from livemig.kernel.placement import PagePlacer, RemoteRange
from livemig.kernel.shared import ProcessLock, SharedMemory
from livemig.kernel.uffd import Userfaultfd
from livemig.migration.channel import Channel
from livemig.migration.helper import (
    HelperBlock,
    HelperConn,
    HelperProcess,
    HelperServer,
    HelperWatch,
)
from livemig.migration.postcopy import (
    BlockState,
    ChannelPlacer,
    PageArrays,
    PostcopyChannelReceiver,
    PostcopyState,
    postcopy_counters,
    postcopy_layout,
)
from livemig.runtime import UrgentPriority
from livemig.wire.blocks import BlockInfo
from livemig.wire.returnpath import ReturnPathEncoder

log = logging.getLogger("livemig.faultserver")

MODULE = "livemig.migration.faultserver"
START_TIMEOUT = 30.0


class FaultServer:
    """VMM side: start the helper early (it imports for a few hundred ms), hand it the
    userfaultfd and the postcopy channel at POSTCOPY_ADVISE without waiting for it to
    take them (:meth:`when_ready`, :meth:`wait_ready`), hear when it is done."""

    def __init__(self, helpers: HelperServer) -> None:
        self.helper = HelperProcess(MODULE, helpers)
        self._watch: HelperWatch | None = None

    def start(self, blocks: Mapping[str, HelperBlock], uffd: Userfaultfd, channel: Channel,
              shared: SharedMemory, vcpu_tids: Mapping[int, int],
              on_error: Callable[[Exception], None], *, rerequest: bool = False,
              priority: UrgentPriority) -> None:
        """``rerequest``: after a postcopy recovery, first ask again for the pages
        requested before and still missing.  The helper serves at ``priority``."""
        if channel.sock is None:
            raise MigrationError("the postcopy channel must be a socket")
        config = {
            "msg": "start",
            "blocks": [[n, b.size, b.host_page_size, b.mapping.host_addr]
                       for n, b in blocks.items()],
            "vcpu_tids": {str(i): t for i, t in vcpu_tids.items()},
            "shared_size": shared.size,
            "rerequest": rerequest,
            "priority": priority.priority,
            "channel": channel.handover(),
        }
        self.helper.send(config, [uffd.fileno(), channel.sock.fileno(), shared.fd])
        # The helper may still be importing: nothing waits for it here (see when_ready).
        self._watch = HelperWatch(self.helper, "done", "postcopy/fault-server", on_error,
                                  ready="ready")

    def when_ready(self, then: Callable[[], None]) -> None:
        """Run ``then`` once the helper has taken the userfaultfd and the channel (at
        once if it has; on the watching thread otherwise)."""
        assert self._watch is not None, "start() first"
        self._watch.when_ready(then)

    def wait_ready(self) -> None:
        assert self._watch is not None, "start() first"
        self._watch.wait_ready(START_TIMEOUT)

    @property
    def pages(self) -> int:
        """Pages placed from the postcopy channel (reported at its end)."""
        return int(self._watch.message.get("pages", 0)) if self._watch is not None else 0

    def wait_done(self, timeout: float) -> None:
        """Until the postcopy channel has ended and every page on it is placed."""
        assert self._watch is not None, "start() first"
        self._watch.wait(timeout, "the postcopy channel did not end")

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        else:
            self.helper.close()


# --- the helper process ---------------------------------------------------------------


class _Server:
    def __init__(self, conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
        uffd_fd, sock_fd, shm_fd = fds
        self.conn = conn
        self.uffd = Userfaultfd(uffd_fd)
        blocks = [(str(n), int(size), int(hp), int(addr)) for n, size, hp, addr in msg["blocks"]]
        layout = postcopy_layout({n: size // hp for n, size, hp, _ in blocks})
        self.shared = SharedMemory.attach(shm_fd, int(msg["shared_size"]))
        views = layout.views(self.shared)  # checks the VMM's memory fits the layout
        states = {n: BlockState(n, size, hp, PagePlacer(self.uffd, RemoteRange(addr, size)),
                                PageArrays(views.group(n)))
                  for n, size, hp, addr in blocks}
        tids = {int(i): int(t) for i, t in msg["vcpu_tids"].items()}
        self.state = PostcopyState(states, self.uffd, tids, lock=ProcessLock(shm_fd),
                                   counters=postcopy_counters(views))
        self.channel = Channel.adopt(socket.socket(fileno=sock_fd), msg["channel"], "postcopy")
        self.receiver = PostcopyChannelReceiver(
            self.channel, ChannelPlacer(self.state, "postcopy"),
            {n: BlockInfo(size, hp) for n, size, hp, _ in blocks})
        self.requests = ReturnPathEncoder()
        self.rerequest = bool(msg.get("rerequest", False))

    def request(self, block: str, offset: int, length: int) -> None:
        if self.receiver.ended:
            return  # every page has been sent; this one is on the main channel
        self.channel.send([self.requests.req_pages(block, offset, length)])

    def serve(self) -> None:
        poll = select.poll()
        uffd, ctl = self.uffd.fileno(), self.conn.fileno()
        for fd in (uffd, ctl):
            poll.register(fd, select.POLLIN)
        self.conn.send({"msg": "ready"})
        # With TLS, this process opens the channel's session (the fault server is its
        # server end: the handshake waits for the source's helper).
        self.channel.secure()
        sock = self.channel.fileno()
        poll.register(sock, select.POLLIN)
        if self.rerequest:
            self.state.rerequest(self.request)
        while True:
            # Records already decrypted do not make the socket readable again.
            ready = {fd for fd, _ in poll.poll(0 if self.channel.buffered() else None)}
            if self.channel.buffered():
                ready.add(sock)
            if uffd in ready:
                now = time.monotonic_ns()
                for fault in self.uffd.read_events():
                    self.state.on_fault(fault.address, fault.thread_id, now, self.request)
            if sock in ready:
                self.receiver.receive()
                if self.receiver.pump():
                    poll.unregister(sock)
                    self.conn.send({"msg": "done", "pages": self.receiver.placer.pages})
            if ctl in ready:
                msg, _ = self.conn.recv()  # "stop" (EOF raises)
                if msg.get("msg") == "stop":
                    return


def serve(conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
    """The helper's life (livemig.migration.helper.run_helper)."""
    UrgentPriority(int(msg["priority"])).apply()
    _Server(conn, msg, fds).serve()
