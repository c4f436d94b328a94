"""One QMP session's protocol, without I/O: bytes in, reply lines out.

Theory of operation
-------------------
:class:`QmpProtocol` is the server side of a QMP session as QEMU runs it, kept free
of sockets and threads so that it can be reasoned about (and tested) on its own:

1. the server speaks first with :meth:`QmpProtocol.greeting`;
2. until ``qmp_capabilities`` succeeds only that command exists -- anything else is
   answered with CommandNotFound "Expecting capabilities negotiation with
   'qmp_capabilities'" (QEMU swaps in that text for every CommandNotFound while
   negotiating, other errors keep theirs);
3. afterwards the built-ins ``query-commands`` / ``query-version`` and the caller's
   :class:`~livemig.control.commands.CommandTable` are available, and a second
   ``qmp_capabilities`` is CommandNotFound "Capabilities negotiation is already
   complete, command ignored".

Input goes through :class:`~livemig.control.jsonstream.JsonSplitter`; each complete
piece is checked like QEMU's ``qmp_dispatch_check_obj`` (a JSON object whose members
are only ``execute``, ``arguments`` and ``id``), dispatched, and answered with exactly
one line: ``{"return": ...}`` or ``{"error": {"class", "desc"}}``, plus ``"id"``
echoed verbatim whenever the request was an object carrying one.

:meth:`QmpProtocol.handle` is a lazy generator on purpose: the next request is only
dispatched once the caller has taken (sent) the previous reply.  The I/O layer relies
on this to switch events on exactly after the ``qmp_capabilities`` reply went out and
to let a command's events (e.g. STOP from ``stop``) precede its own reply, as in QEMU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from livemig.control.commands import CommandTable, Param, command_not_found
from livemig.control.jsonstream import (
    DEFAULT_LIMIT,
    JsonSplitter,
    Rejected,
    decode_json,
    parse_error,
)
from livemig.errors import QmpError

_log = logging.getLogger("livemig.qmp")

NEGOTIATION_REQUIRED = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"

Version = tuple[int, int, int]


def encode_message(message: dict[str, Any]) -> bytes:
    """One wire line: compact-enough JSON, ASCII only, newline-terminated (as QEMU)."""
    return json.dumps(message, allow_nan=False).encode("ascii") + b"\n"


def version_info(version: Version, package: str) -> dict[str, Any]:
    """The ``query-version`` result, also embedded in the greeting."""
    major, minor, micro = version
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}


def event_message(event: str, data: dict[str, Any] | None, now_ns: int | None = None) -> bytes:
    """An event line stamped with wall-clock time; ``data`` is omitted when None, like QEMU."""
    micros = (time.time_ns() if now_ns is None else now_ns) // 1000
    message: dict[str, Any] = {
        "event": event,
        "timestamp": {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000},
    }
    if data is not None:
        message["data"] = data
    return encode_message(message)


def error_body(error: QmpError) -> dict[str, Any]:
    return {"class": error.error_class, "desc": error.desc}


def parse_request(request: Any) -> tuple[str, dict[str, Any]]:
    """Validate a decoded request as QEMU does; return (command name, arguments)."""
    if not isinstance(request, dict):
        raise QmpError("QMP input must be a JSON object")
    for member, value in request.items():
        if member == "execute":
            if not isinstance(value, str):
                raise QmpError("QMP input member 'execute' must be a string")
        elif member == "arguments":
            if not isinstance(value, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif member != "id":
            raise QmpError(f"QMP input member '{member}' is unexpected")
    if "execute" not in request:
        raise QmpError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


class QmpProtocol:
    """Server-side state machine of one QMP session (see module doc)."""

    def __init__(
        self,
        commands: CommandTable,
        *,
        version: Version = (7, 2, 0),
        package: str = "livemig",
        max_input: int = DEFAULT_LIMIT,
    ) -> None:
        self._commands = commands
        self._version = version_info(version, package)
        self._splitter = JsonSplitter(max_input)
        self._negotiated = False
        self._builtins = CommandTable()
        self._builtins.register(
            "qmp_capabilities", self._qmp_capabilities, [Param("enable", "array", True)]
        )
        self._builtins.register("query-commands", self._query_commands, [])
        self._builtins.register("query-version", lambda _args: self._version, [])

    @property
    def negotiated(self) -> bool:
        """True once ``qmp_capabilities`` has succeeded (events may then be sent)."""
        return self._negotiated

    def greeting(self) -> bytes:
        return encode_message({"QMP": {"version": self._version, "capabilities": []}})

    def handle(self, data: bytes) -> Iterator[bytes]:
        """Feed received bytes; lazily yield one reply line per complete request."""
        for piece in self._splitter.feed(data):
            yield self._answer(piece)

    def _answer(self, piece: bytes | Rejected) -> bytes:
        request: Any = None
        try:
            if isinstance(piece, Rejected):
                raise parse_error(piece.reason)
            request = decode_json(piece)
            name, args = parse_request(request)
            reply: dict[str, Any] = {"return": self._dispatch(name, args)}
        except QmpError as exc:
            reply = {"error": error_body(exc)}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        return self._encode_reply(reply)

    def _dispatch(self, name: str, args: dict[str, Any]) -> Any:
        _log.debug("QMP command %s %s", name, args)
        if not self._negotiated:
            try:
                if name != "qmp_capabilities":
                    raise command_not_found(name)
                return self._builtins.dispatch(name, args)
            except QmpError as exc:
                if exc.error_class == "CommandNotFound":
                    raise QmpError(NEGOTIATION_REQUIRED, "CommandNotFound") from exc
                raise
        if name in self._builtins:
            return self._builtins.dispatch(name, args)
        return self._commands.dispatch(name, args)

    def _encode_reply(self, reply: dict[str, Any]) -> bytes:
        try:
            return encode_message(reply)
        except (TypeError, ValueError, RecursionError) as exc:
            # A handler returned something JSON cannot carry: a bug, but not the client's.
            _log.error("QMP reply cannot be encoded as JSON: %s", exc)
            error = QmpError(f"Command result cannot be encoded as JSON: {exc}")
            fallback: dict[str, Any] = {"error": error_body(error)}
            if "id" in reply:
                fallback["id"] = reply["id"]
            return encode_message(fallback)

    def _qmp_capabilities(self, args: dict[str, Any]) -> None:
        if self._negotiated:
            raise QmpError(ALREADY_NEGOTIATED, "CommandNotFound")
        for capability in args.get("enable", []):
            # We offer no capability (no out-of-band execution), so none can be enabled.
            raise QmpError(f"Capability '{capability}' not available")
        self._negotiated = True

    def _query_commands(self, _args: dict[str, Any]) -> list[dict[str, str]]:
        names = set(self._builtins.names()) | set(self._commands.names())
        return [{"name": name} for name in sorted(names)]
