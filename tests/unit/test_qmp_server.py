"""QmpServer on a real unix socket, driven by the real qemu.qmp client and by raw sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from livemig.control.qmp import CommandTable, Param, QmpServer
from livemig.errors import ConfigError, QmpError, VmStateError

TIMEOUT = 30.0  # generous: the machine is slow; every wait below is bounded by it
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@asynccontextmanager
async def qmp_client(path: str) -> AsyncIterator[QMPClient]:
    client = QMPClient("test")
    await client.connect(path)
    try:
        yield client
    finally:
        await client.disconnect()


class RawClient:
    """A byte-level QMP client: sends exactly what it is told, reads reply lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Any:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""

    def negotiate(self) -> Any:
        greeting = self.recv()
        self.send(b'{"execute": "qmp_capabilities"}')
        assert self.recv() == {"return": {}}
        return greeting

    def execute(self, command: str, **arguments: Any) -> Any:
        self.send(json.dumps({"execute": command, "arguments": arguments}).encode())
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def toy_commands(server_ref: Callable[[], QmpServer]) -> CommandTable:
    """Small commands standing in for livemig's real ones."""
    table = CommandTable()
    table.register("stop", lambda _a: server_ref().emit("STOP"), [])
    table.register("cont", lambda _a: server_ref().emit("RESUME"), [])
    table.register(
        "add", lambda a: a["a"] + a.get("b", 0), [Param("a", "int"), Param("b", "int", True)]
    )
    table.register("migrate", lambda a: None, [Param("uri", "str")])

    def fail_qmp(_args: dict[str, Any]) -> None:
        raise QmpError("Device 'nope' not found", "DeviceNotFound")

    def fail_state(_args: dict[str, Any]) -> None:
        raise VmStateError("The VM is not running.")

    def crash(_args: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    table.register("fail-qmp", fail_qmp, [])
    table.register("fail-state", fail_state, [])
    table.register("crash", crash, [])
    table.register("bad-return", lambda _a: {1, 2}, [])
    return table


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short directory: AF_UNIX paths are limited to 107 bytes.
    return tmp_path_factory.mktemp("qmp")


@pytest.fixture
def make_server(sock_dir: Path) -> Iterator[Callable[..., QmpServer]]:
    servers: list[QmpServer] = []

    def make(name: str = "qmp.sock", **kwargs: Any) -> QmpServer:
        holder: list[QmpServer] = []
        server = QmpServer(str(sock_dir / name), toy_commands(lambda: holder[0]), **kwargs)
        holder.append(server)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., QmpServer]) -> QmpServer:
    return make_server()


@pytest.fixture
def raw(server: QmpServer) -> Iterator[RawClient]:
    client = RawClient(server.path)
    yield client
    client.close()


# -- through qemu.qmp ------------------------------------------------------------------


def test_qemu_qmp_client_connects_and_sees_greeting(server: QmpServer) -> None:
    async def scenario() -> Any:
        async with qmp_client(server.path) as client:
            assert client.greeting is not None
            return client.greeting._asdict()

    greeting = run(scenario())
    assert greeting["QMP"]["version"] == {
        "qemu": {"micro": 0, "minor": 2, "major": 7},
        "package": "livemig",
    }
    assert greeting["QMP"]["capabilities"] == []


def test_query_version_reports_configured_version(make_server: Callable[..., QmpServer]) -> None:
    server = make_server(version=(8, 1, 3), package="livemig-test")

    async def scenario() -> object:
        async with qmp_client(server.path) as client:
            return await client.execute("query-version")

    assert run(scenario()) == {
        "qemu": {"micro": 3, "minor": 1, "major": 8},
        "package": "livemig-test",
    }


def test_query_commands_lists_registered_and_builtin_commands(server: QmpServer) -> None:
    async def scenario() -> object:
        async with qmp_client(server.path) as client:
            return await client.execute("query-commands")

    names = {entry["name"] for entry in run(scenario())}  # type: ignore[attr-defined]
    assert {"stop", "cont", "add", "migrate", "crash"} <= names
    assert {"qmp_capabilities", "query-commands", "query-version"} <= names


def test_command_with_arguments_returns_handler_value(server: QmpServer) -> None:
    async def scenario() -> tuple[object, object, object]:
        async with qmp_client(server.path) as client:
            return (
                await client.execute("add", {"a": 40, "b": 2}),
                await client.execute("add", {"a": 7}),
                await client.execute("migrate", {"uri": "tcp:0:4444"}),
            )

    assert run(scenario()) == (42, 7, {})


def _execute_error(server: QmpServer, command: str, args: dict[str, Any] | None = None) -> Any:
    """Run a failing command through qemu.qmp, then prove the session still works."""

    async def scenario() -> tuple[ExecuteError, object]:
        async with qmp_client(server.path) as client:
            with pytest.raises(ExecuteError) as info:
                await client.execute(command, args)
            return info.value, await client.execute("add", {"a": 1})

    error, after = run(scenario())
    assert after == 1
    return error


def test_unknown_command_is_command_not_found(server: QmpServer) -> None:
    error = _execute_error(server, "no-such-command")
    assert error.error_class == "CommandNotFound"
    assert error.error.error.desc == "The command no-such-command has not been found"


def test_missing_argument_is_generic_error(server: QmpServer) -> None:
    error = _execute_error(server, "migrate", {})
    assert error.error_class == "GenericError"
    assert error.error.error.desc == "Parameter 'uri' is missing"


def test_wrongly_typed_argument_is_generic_error(server: QmpServer) -> None:
    error = _execute_error(server, "migrate", {"uri": 5})
    assert error.error.error.desc == "Invalid parameter type for 'uri', expected: string"


def test_unknown_argument_is_generic_error(server: QmpServer) -> None:
    error = _execute_error(server, "migrate", {"uri": "x", "blk": True})
    assert error.error.error.desc == "Parameter 'blk' is unexpected"


def test_handler_qmp_error_keeps_its_class_and_desc(server: QmpServer) -> None:
    error = _execute_error(server, "fail-qmp")
    assert error.error_class == "DeviceNotFound"
    assert error.error.error.desc == "Device 'nope' not found"


def test_handler_livemig_error_becomes_generic_error_with_its_message(server: QmpServer) -> None:
    error = _execute_error(server, "fail-state")
    assert error.error_class == "GenericError"
    assert error.error.error.desc == "The VM is not running."


def test_handler_crash_is_generic_error_logged_and_session_survives(
    server: QmpServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="livemig.qmp"):
        error = _execute_error(server, "crash")
    assert error.error_class == "GenericError"
    assert "boom" in error.error.error.desc
    assert "Traceback" not in error.error.error.desc
    assert any(r.name == "livemig.qmp" and r.exc_info for r in caplog.records)


def test_unencodable_result_is_generic_error(server: QmpServer) -> None:
    error = _execute_error(server, "bad-return")
    assert error.error_class == "GenericError"


def test_command_events_reach_qemu_qmp_listener_with_timestamps(server: QmpServer) -> None:
    async def scenario() -> list[Any]:
        async with qmp_client(server.path) as client:
            assert await client.execute("stop") == {}
            assert await client.execute("cont") == {}
            return [await client.events.get(), await client.events.get()]

    stop, resume = run(scenario())
    assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
    for event in (stop, resume):
        stamp = event["timestamp"]
        assert isinstance(stamp["seconds"], int) and stamp["seconds"] > 1_600_000_000
        assert isinstance(stamp["microseconds"], int) and 0 <= stamp["microseconds"] < 1_000_000
        assert "data" not in event  # as QEMU: no data member for data-less events


def test_emit_from_another_thread_carries_data(server: QmpServer) -> None:
    async def scenario() -> Any:
        async with qmp_client(server.path) as client:
            await asyncio.to_thread(server.emit, "MIGRATION", {"status": "active"})
            return await client.events.get()

    event = run(scenario())
    assert event["event"] == "MIGRATION"
    assert event["data"] == {"status": "active"}


# -- raw socket: wire-level behaviour ---------------------------------------------------


def test_id_is_echoed_verbatim_for_any_json_value(raw: RawClient) -> None:
    raw.negotiate()
    for ident in ["abc", 17, None, {"a": [1, "x"]}, [True]]:
        raw.send(json.dumps({"execute": "add", "arguments": {"a": 2}, "id": ident}).encode())
        assert raw.recv() == {"return": 2, "id": ident}
    raw.send(b'{"execute": "nope", "id": 99}')
    reply = raw.recv()
    assert reply["id"] == 99 and reply["error"]["class"] == "CommandNotFound"


def test_greeting_is_one_line_and_command_without_newline_is_answered(raw: RawClient) -> None:
    greeting = raw.recv()
    assert set(greeting) == {"QMP"}
    raw.send(b'{"execute":"qmp_capabilities","id":"neg"}')  # no trailing newline
    assert raw.recv() == {"return": {}, "id": "neg"}


def test_request_split_across_writes_is_reassembled(raw: RawClient) -> None:
    raw.negotiate()
    request = b'{"execute": "add", "arguments": {"a": 3, "b": 4}, "id": "split"}'
    for start in range(0, len(request), 5):
        raw.send(request[start : start + 5])
    assert raw.recv() == {"return": 7, "id": "split"}


def test_two_requests_in_one_write_get_two_replies_in_order(raw: RawClient) -> None:
    raw.negotiate()
    raw.send(
        b'{"execute":"add","arguments":{"a":1},"id":1}{"execute":"add","arguments":{"a":2},"id":2}'
    )
    assert raw.recv() == {"return": 1, "id": 1}
    assert raw.recv() == {"return": 2, "id": 2}


def test_malformed_json_gets_error_and_next_command_still_works(raw: RawClient) -> None:
    raw.negotiate()
    raw.send(b'{"execute": }')
    error = raw.recv()["error"]
    assert error["class"] == "GenericError"
    assert error["desc"].startswith("JSON parse error, ")
    raw.send(b'}}garbage {"execute": "add", "arguments": {"a": 5}, "id": "ok"}')
    assert raw.recv()["error"]["desc"].startswith("JSON parse error, ")
    assert raw.recv() == {"return": 5, "id": "ok"}


@pytest.mark.parametrize(
    ("request_bytes", "desc"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'{"id": 1}', "QMP input lacks member 'execute'"),
        (b'{"execute": 3}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "add", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "add", "exec-oob": "add"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_invalid_request_shapes_are_generic_errors(
    raw: RawClient, request_bytes: bytes, desc: str
) -> None:
    raw.negotiate()
    raw.send(request_bytes)
    assert raw.recv()["error"] == {"class": "GenericError", "desc": desc}
    assert raw.execute("add", a=1) == {"return": 1}


def test_commands_before_negotiation_are_refused(raw: RawClient) -> None:
    raw.recv()
    for command in ("query-version", "add", "no-such-command"):
        raw.send(json.dumps({"execute": command, "id": command}).encode())
        assert raw.recv() == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": command,
        }
    raw.send(b'{"execute": "qmp_capabilities"}')
    assert raw.recv() == {"return": {}}
    assert raw.execute("add", a=9) == {"return": 9}


def test_second_qmp_capabilities_is_refused(raw: RawClient) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "qmp_capabilities"}')
    assert raw.recv()["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }


def test_events_are_not_sent_before_negotiation(server: QmpServer, raw: RawClient) -> None:
    raw.recv()  # greeting: the session exists now
    server.emit("EARLY")
    raw.send(b'{"execute": "qmp_capabilities"}')
    assert raw.recv() == {"return": {}}
    server.emit("LATE")
    assert raw.recv()["event"] == "LATE"


def test_event_precedes_the_reply_of_the_command_that_caused_it(raw: RawClient) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "stop", "id": "s"}')
    assert raw.recv()["event"] == "STOP"
    assert raw.recv() == {"return": {}, "id": "s"}


def test_oversized_value_is_rejected_and_session_recovers(
    make_server: Callable[..., QmpServer],
) -> None:
    server = make_server(max_input=4096)
    raw = RawClient(server.path)
    try:
        raw.negotiate()
        raw.send(b'{"execute": "migrate", "arguments": {"uri": "')
        for _ in range(16):
            raw.send(b"x" * 4096)
        raw.send(b'"}, "id": 1}{"execute": "add", "arguments": {"a": 6}}')
        error = raw.recv()["error"]
        assert error["class"] == "GenericError"
        assert error["desc"] == "JSON parse error, value larger than 4096 bytes"
        assert raw.recv() == {"return": 6}
    finally:
        raw.close()


def test_client_that_stops_reading_does_not_block_emit(
    make_server: Callable[..., QmpServer],
) -> None:
    server = make_server(send_timeout=0.2)
    raw = RawClient(server.path)
    raw.negotiate()  # ...and never read again
    blob = {"pad": "x" * 65536}

    def flood() -> None:
        for _ in range(200):  # ~13 MB: far beyond what the socket buffers can hold
            server.emit("BIG", blob)

    emitter = threading.Thread(target=flood)
    emitter.start()
    emitter.join(TIMEOUT)
    try:
        assert not emitter.is_alive(), "emit blocked on a client that does not read"
    finally:
        raw.close()


def test_vanished_client_does_not_disturb_others(server: QmpServer) -> None:
    gone = RawClient(server.path)
    gone.negotiate()
    gone.close()
    server.emit("AFTER_CLOSE")

    async def scenario() -> object:
        async with qmp_client(server.path) as client:
            return await client.execute("add", {"a": 3})

    assert run(scenario()) == 3


# -- socket file and lifecycle ----------------------------------------------------------


def test_socket_file_is_private_and_removed_on_close(sock_dir: Path) -> None:
    path = sock_dir / "private.sock"
    server = QmpServer(str(path), CommandTable())
    server.start()
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    finally:
        server.close()
    assert not path.exists()


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, like a crashed process
    with QmpServer(str(path), CommandTable()) as server:
        raw = RawClient(server.path)
        assert "QMP" in raw.recv()
        raw.close()


def test_non_socket_file_at_path_is_refused_and_kept(sock_dir: Path) -> None:
    path = sock_dir / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError):
        QmpServer(str(path), CommandTable()).start()
    assert path.read_text() == "keep me"


def test_close_disconnects_clients(server: QmpServer, raw: RawClient) -> None:
    raw.negotiate()
    server.close()
    assert raw.at_eof()
    assert not Path(server.path).exists()
    assert server.session_count() == 0


def test_handler_may_close_its_own_server(sock_dir: Path) -> None:
    table = CommandTable()
    path = str(sock_dir / "quit.sock")
    server = QmpServer(path, table)
    table.register("quit", lambda _a: server.close(), [])
    server.start()
    raw = RawClient(path)
    try:
        raw.negotiate()
        raw.send(b'{"execute": "quit"}')
        with pytest.raises(EOFError):
            while True:  # the reply may or may not make it out; EOF must follow
                raw.recv()
        assert not Path(path).exists()
    finally:
        raw.close()


def test_two_servers_side_by_side_are_independent(
    make_server: Callable[..., QmpServer],
) -> None:
    first = make_server("a.sock")
    second = make_server("b.sock")
    raw_a, raw_b = RawClient(first.path), RawClient(second.path)
    try:
        raw_a.negotiate()
        raw_b.negotiate()
        first.emit("ONLY_A")
        assert raw_a.recv()["event"] == "ONLY_A"
        second.close()
        assert raw_b.at_eof()
        assert raw_a.execute("add", a=1) == {"return": 1}
        assert Path(first.path).exists() and not Path(second.path).exists()
    finally:
        raw_a.close()
        raw_b.close()
