"""Helpers for tests over a :class:`~livemig.netlab.NetnsPair`: TCP connections between
its namespaces, made from sockets this process creates inside them."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from livemig.netlab import NETNS_PORT, NetnsPair


@contextlib.contextmanager
def connection(pair: NetnsPair, port: int = NETNS_PORT
               ) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection from the source namespace (client) to the destination (server)."""
    with pair.socket(pair.dest) as listener, pair.socket(pair.source) as client:
        listener.bind((pair.dest.addr, port))
        listener.listen()
        client.settimeout(10)
        client.connect((pair.dest.addr, port))
        server, _ = listener.accept()
        with server:
            yield client, server
