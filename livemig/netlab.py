"""Network lab: two network namespaces joined by a veth link, with real network faults.

Test and benchmark tooling, not part of the migration path.  It needs root (it creates
network namespaces and changes links inside them) and ``ip`` (iproute2); it only ever
creates, changes and removes namespaces it made itself, whose names carry a random tag.

Theory of operation
-------------------
:class:`NetnsPair` builds two namespaces, *source* and *dest*, joined by a veth pair.
Each end has an address in ``10.213.57.0/24`` (:data:`SUBNET`; ``.1`` source, ``.2``
dest) that exists only inside those namespaces: nothing is routed anywhere else, so a
fixed port (:data:`NETNS_PORT`) is always free there.  Optional :class:`Shaping` puts a
``tbf`` qdisc on both ends (each direction gets the rate), for a link slower than
loopback.  Processes run inside a namespace through ``ip netns exec``
(:func:`netns_prefix`, :meth:`NetnsPair.run`, :meth:`NetnsPair.popen`,
:meth:`NetnsPair.vmm` for ``livemig run``), and :meth:`NetnsPair.socket` creates a socket
inside one from this process.

Faults are real, made by the kernel, not simulated by livemig:

* **link down** (:meth:`NetnsPair.link_down` / :meth:`NetnsPair.link_up`,
  :meth:`NetnsPair.link_cut`): ``ip link set DEV down`` on one end.  The other end loses
  its carrier; packets in either direction go nowhere; TCP retransmits until the link
  is back (or a timeout kills the connection).
* **drop everything** (:meth:`NetnsPair.drop_all` / :meth:`NetnsPair.restore_traffic`,
  :meth:`NetnsPair.dropping`): an nftables table in each namespace whose input chain
  drops every packet, so both directions are silently lost while the link stays up -
  what ``tc qdisc ... netem loss 100%`` does, but netem is often not built into the
  kernel (``CONFIG_NET_SCH_NETEM``) while nftables is.  Needs ``nft`` (Debian package
  ``nftables``).
* **drop one message** (:meth:`NetnsPair.drop_segments` /
  :meth:`NetnsPair.stop_dropping_segments`): an nftables rule drops the TCP segments
  from a port whose data starts with given bytes (nftables' ``@ih`` payload match),
  retransmissions included: one protocol message is lost while everything else flows.
* **kill connections** (:meth:`NetnsPair.kill_connections`): ``ss -K`` in both
  namespaces destroys the established TCP connections on a port; the local end sees
  ``ECONNABORTED`` and the kernel sends a reset, so the peer sees ``ECONNRESET`` (needs
  ``CONFIG_INET_DIAG_DESTROY``).

Everything is a context manager: on exit - also after a failure half-way through the
setup, or an exception in the body - both namespaces are deleted, which removes the veth
pair, its qdiscs and the nftables tables with them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livemig.errors import NetlabError
from livemig.kernel.sock import socket_in_netns
from livemig.vmmprocess import VmmFiles, VmmProcess, livemig_command, livemig_environment

SUBNET = "10.213.57"  # /24; exists only inside a pair's namespaces
NETNS_PORT = 4444  # a port that is always free inside a pair's namespaces
COMMAND_TIMEOUT_S = 30.0
MAX_TAG = 11  # so that the veth names fit in 15 bytes
DROP_TABLE = "livemig_netlab_drop"
SEGMENTS_TABLE = "livemig_netlab_segments"  # drop_segments
_DROP_RULESET = (f"table inet {DROP_TABLE} {{\n"
                 "  chain input { type filter hook input priority -300; policy drop; }\n"
                 "}\n")


def netns_prefix(netns: str | None) -> list[str]:
    """The prefix that runs a command in namespace ``netns`` (none for this one).
    ``ip netns exec`` execs the command, so the child's pid is the command's own."""
    return [] if netns is None else ["ip", "netns", "exec", netns]


def unavailable_reason() -> str | None:
    """Why a :class:`NetnsPair` cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the network lab needs ip (iproute2)"
    return None


def run_command(cmd: Sequence[str], *, netns: str | None = None, stdin: str | None = None,
                timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run ``cmd`` (inside ``netns`` if given); its stdout, or a NetlabError with its
    stderr if it fails."""
    full = netns_prefix(netns) + list(cmd)
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetlabError(f"{' '.join(full)} failed: {e}") from None
    if proc.returncode != 0:
        raise NetlabError(f"{' '.join(full)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Shaping:
    """``tbf`` on both ends of the link: each direction gets ``rate``."""

    rate: str = "1gbit"
    burst: str = "1mb"
    latency: str = "10ms"


@dataclass(frozen=True)
class Endpoint:
    """One end of the link: its namespace, its veth device and its address."""

    ns: str
    dev: str
    addr: str


class NetnsPair:
    """Two network namespaces joined by a veth link; everything removed on exit.

    ``prefix`` starts the namespace names (``PREFIX-TAG-src`` / ``PREFIX-TAG-dst``);
    the tag is random unless given.
    """

    def __init__(self, shaping: Shaping | None = None, *, prefix: str = "lmlab",
                 tag: str | None = None) -> None:
        self.shaping = shaping
        tag = tag or secrets.token_hex(3)
        if len(tag) > MAX_TAG:
            raise NetlabError(f"tag {tag!r} is longer than {MAX_TAG} characters")
        # Interface names are at most 15 bytes: "lml" + tag + "s"/"d".
        self.source = Endpoint(f"{prefix}-{tag}-src", f"lml{tag}s", f"{SUBNET}.1")
        self.dest = Endpoint(f"{prefix}-{tag}-dst", f"lml{tag}d", f"{SUBNET}.2")
        self._undo: list[list[str]] = []  # commands that remove what was made, in order

    @property
    def ends(self) -> tuple[Endpoint, Endpoint]:
        return (self.source, self.dest)

    # --- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> NetnsPair:
        why = unavailable_reason()
        if why is not None:
            raise NetlabError(why)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        for end in self.ends:
            run_command(["ip", "netns", "add", end.ns])
            self._undo.append(["ip", "netns", "del", end.ns])
        src, dst = self.ends
        # Made inside the namespaces, so the pair never appears in ours; removed
        # explicitly too, since a namespace is destroyed in the background.
        run_command(["ip", "link", "add", src.dev, "netns", src.ns, "type", "veth",
                     "peer", "name", dst.dev, "netns", dst.ns])
        self._undo.append(["ip", "-n", src.ns, "link", "del", src.dev])
        for end in self.ends:
            run_command(["ip", "-n", end.ns, "addr", "add", f"{end.addr}/24", "dev", end.dev])
            run_command(["ip", "-n", end.ns, "link", "set", end.dev, "up"])
            run_command(["ip", "-n", end.ns, "link", "set", "lo", "up"])
            if self.shaping is not None:
                run_command(["tc", "qdisc", "add", "dev", end.dev, "root", "tbf",
                             "rate", self.shaping.rate, "burst", self.shaping.burst,
                             "latency", self.shaping.latency], netns=end.ns)

    def close(self) -> None:
        """Remove everything made, newest first: the veth pair (with its qdiscs), then
        the namespaces (with any nftables tables).  Every step is tried; the first
        failure is raised afterwards."""
        failures: list[NetlabError] = []
        while self._undo:
            try:
                run_command(self._undo.pop())
            except NetlabError as e:
                failures.append(e)
        if failures:
            raise failures[0]

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- running things inside -----------------------------------------------------------
    def run(self, end: Endpoint, cmd: Sequence[str], *, stdin: str | None = None,
            timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run ``cmd`` inside ``end``'s namespace; its stdout (NetlabError if it fails)."""
        return run_command(cmd, netns=end.ns, stdin=stdin, timeout=timeout)

    def popen(self, end: Endpoint, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``end``'s namespace (``subprocess.Popen`` arguments)."""
        return subprocess.Popen(netns_prefix(end.ns) + list(cmd), **kwargs)

    def vmm(self, end: Endpoint, workdir: Path, name: str, args: Sequence[str] = (),
            **kwargs: Any) -> VmmProcess:
        """``livemig run`` with ``args`` inside ``end``'s namespace; its QMP socket and
        files are in ``workdir`` as usual (``VmmProcess`` keyword arguments pass on)."""
        command = netns_prefix(end.ns) + livemig_command(VmmFiles(workdir, name), args)
        kwargs.setdefault("env", livemig_environment())
        return VmmProcess(workdir, name, command=command, **kwargs)

    def socket(self, end: Endpoint, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new IPv4 socket inside ``end``'s namespace, usable from this process."""
        return socket_in_netns(f"/run/netns/{end.ns}", socket.AF_INET, kind)

    # --- faults --------------------------------------------------------------------------
    def link_down(self, end: Endpoint | None = None) -> None:
        """Take the link down at ``end`` (default: the destination's end)."""
        end = end or self.dest
        run_command(["ip", "-n", end.ns, "link", "set", end.dev, "down"])

    def link_up(self, end: Endpoint | None = None) -> None:
        end = end or self.dest
        run_command(["ip", "-n", end.ns, "link", "set", end.dev, "up"])

    @contextlib.contextmanager
    def link_cut(self, end: Endpoint | None = None) -> Iterator[None]:
        """The link is down inside the ``with`` block, up again after it."""
        self.link_down(end)
        try:
            yield
        finally:
            self.link_up(end)

    def drop_all(self) -> None:
        """Silently drop every packet in both directions (the link stays up)."""
        if shutil.which("nft") is None:
            raise NetlabError("dropping traffic needs nft (Debian package nftables)")
        for end in self.ends:
            self.run(end, ["nft", "-f", "-"], stdin=_DROP_RULESET)

    def restore_traffic(self) -> None:
        for end in self.ends:
            self.run(end, ["nft", "delete", "table", "inet", DROP_TABLE])

    @contextlib.contextmanager
    def dropping(self) -> Iterator[None]:
        """Every packet is dropped inside the ``with`` block, none after it."""
        self.drop_all()
        try:
            yield
        finally:
            self.restore_traffic()

    def drop_segments(self, end: Endpoint, payload: bytes, *, sport: int | None = None,
                      dport: int | None = None, alone: bool = False) -> None:
        """Silently drop, as they arrive at ``end``, the TCP segments from port
        ``sport`` (or to port ``dport``) whose data starts with ``payload`` (1 to 16
        bytes) - with ``alone``, only those that hold nothing else: one message of a
        protocol is lost, and every retransmission of it, while the rest flows."""
        if not 1 <= len(payload) <= 16:
            raise NetlabError(f"a payload of {len(payload)} bytes: 1 to 16 are matched")
        if shutil.which("nft") is None:
            raise NetlabError("dropping segments needs nft (Debian package nftables)")
        ports = [f"tcp {kind} {port}" for kind, port in (("sport", sport), ("dport", dport))
                 if port is not None]
        # IPv4 header, TCP header with or without timestamps, and the payload alone.
        size = f"ip length {{ {40 + len(payload)}, {52 + len(payload)} }} " if alone else ""
        rule = (f"{' '.join(ports)} {size}@ih,0,{len(payload) * 8} 0x{payload.hex()} drop")
        self.run(end, ["nft", "-f", "-"], stdin=(
            f"table inet {SEGMENTS_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority -300; {rule}; }}\n}}\n"))

    def stop_dropping_segments(self, end: Endpoint) -> None:
        self.run(end, ["nft", "delete", "table", "inet", SEGMENTS_TABLE])

    def kill_connections(self, port: int) -> int:
        """Destroy the established TCP connections from or to ``port`` (``ss -K``, both
        namespaces); how many sockets were destroyed."""
        selector = ["(", "sport", "=", f":{port}", "or", "dport", "=", f":{port}", ")"]
        killed = 0
        for end in self.ends:
            out = self.run(end, ["ss", "-K", "-t", "-n", "-H", "state", "established",
                                 *selector])
            killed += len(out.splitlines())
        return killed
