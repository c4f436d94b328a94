"""Shaped links: two network namespaces joined by a tbf-shaped veth pair.

Theory of operation
-------------------
:class:`ShapedLink` builds two network namespaces joined by a veth pair, each end shaped
with a ``tbf`` qdisc (each direction gets the rate), for benchmarks over a slower link
than loopback.  The source VMM runs in one namespace, the destination in the other
(:func:`netns_prefix` is the command prefix that runs a process inside one).
Addresses are private 10.x addresses that exist only inside those namespaces; nothing
is routed elsewhere, so a fixed port (:data:`NETNS_PORT`) is always free there.  The
link is a context manager: everything it created is removed on exit, also after a
failure half-way through its setup.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from _harness import HarnessError, run

NETNS_PORT = 4444  # migration port inside a ShapedLink's private namespace


def netns_prefix(netns: str | None) -> list[str]:
    """The prefix that runs a command in namespace ``netns`` (none for this one).
    ``ip netns exec`` execs the command, so the child's pid is the command's own."""
    return [] if netns is None else ["ip", "netns", "exec", netns]


@dataclass(frozen=True)
class LinkSpec:
    """A veth link shaped with tbf on both ends (each direction gets ``rate``)."""

    rate: str = "1gbit"
    burst: str = "1mb"
    latency: str = "10ms"
    subnet: str = "10.213.57"  # /24, exists only inside the two namespaces


class ShapedLink:
    """Two network namespaces joined by a tbf-shaped veth pair; removed on exit.

    The source side is ``source_ns`` / ``source_addr``, the destination side
    ``dest_ns`` / ``dest_addr``.  Run a peer inside with ``netns=link.source_ns``.
    """

    def __init__(self, spec: LinkSpec | None = None, tag: str | None = None) -> None:
        self.spec = spec or LinkSpec()
        tag = tag or str(os.getpid() % 100_000)
        self.source_ns, self.dest_ns = f"lmbench-{tag}-src", f"lmbench-{tag}-dst"
        # Interface names are at most 15 bytes.
        self._veth = (f"lmb{tag}s", f"lmb{tag}d")
        self.source_addr, self.dest_addr = f"{self.spec.subnet}.1", f"{self.spec.subnet}.2"
        self._undo: list[list[str]] = []  # commands that remove what was made, in order

    def __enter__(self) -> ShapedLink:
        if not self.spec.subnet.startswith("10."):
            raise HarnessError("ShapedLink only uses 10.x addresses")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        for ns in (self.source_ns, self.dest_ns):
            run(["ip", "netns", "add", ns])
            self._undo.append(["ip", "netns", "del", ns])
        vs, vd = self._veth
        run(["ip", "link", "add", vs, "type", "veth", "peer", "name", vd])
        # Until both ends are inside the namespaces the pair lives in ours: remove it
        # explicitly if setup stops half-way (harmless if it has already gone).
        self._undo.append(["ip", "link", "del", vs])
        for ns, dev, addr in ((self.source_ns, vs, self.source_addr),
                              (self.dest_ns, vd, self.dest_addr)):
            run(["ip", "link", "set", dev, "netns", ns])
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", self.spec.rate, "burst", self.spec.burst,
                 "latency", self.spec.latency])

    def close(self) -> None:
        # Deleting a namespace destroys the veth end inside it, and so the pair.
        while self._undo:
            cmd = self._undo.pop()
            with contextlib.suppress(HarnessError):
                run(cmd)

    def __exit__(self, *exc: object) -> None:
        self.close()
