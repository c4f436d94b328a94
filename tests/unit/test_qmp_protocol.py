"""The socket-free parts of the QMP server: stream splitting, argument checks, messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.control.commands import CommandTable, Param
from livemig.control.jsonstream import JsonSplitter, Rejected, decode_json
from livemig.control.protocol import QmpProtocol, event_message
from livemig.errors import ConfigError, QmpError


def feed_bytewise(splitter: JsonSplitter, data: bytes) -> list[bytes | Rejected]:
    pieces: list[bytes | Rejected] = []
    for i in range(len(data)):
        pieces += splitter.feed(data[i : i + 1])
    return pieces


# -- JsonSplitter -----------------------------------------------------------------------


def test_splitter_yields_a_value_only_once_it_is_complete() -> None:
    splitter = JsonSplitter()
    assert splitter.feed(b'{"execute": "a", "arguments": {"x": [1, {') == []
    assert splitter.feed(b"}]}") == []
    assert splitter.feed(b"}") == [b'{"execute": "a", "arguments": {"x": [1, {}]}}']


def test_splitter_ignores_brackets_and_escaped_quotes_inside_strings() -> None:
    text = rb'{"a": "}]\"{[\\", "b": "\\\\"}'
    assert json.loads(text)  # really one valid object
    assert feed_bytewise(JsonSplitter(), text + b"  " + text) == [text, text]


def test_splitter_cuts_back_to_back_values_and_top_level_scalars() -> None:
    pieces = JsonSplitter().feed(b'{"a":1}[2] "s" 12 true{"b":2}')
    assert pieces == [b'{"a":1}', b"[2]", b'"s"', b"12", b"true", b'{"b":2}']


def test_splitter_resyncs_on_junk_at_the_next_object() -> None:
    pieces = JsonSplitter().feed(b'}}]garbage: {"a": 1}')
    assert pieces == [b"}}]garbage: ", b'{"a": 1}']


def test_splitter_cuts_at_a_mismatched_bracket() -> None:
    assert JsonSplitter().feed(b'{"a": [1}{"b": 2}') == [b'{"a": [1}', b'{"b": 2}']


def test_splitter_drops_oversized_value_but_keeps_scanning() -> None:
    splitter = JsonSplitter(limit=64)
    assert splitter.feed(b'{"s": "' + b"}" * 100) == []
    assert splitter.feed(b'"} {"ok": 1}') == [
        Rejected("value larger than 64 bytes"),
        b'{"ok": 1}',
    ]


def test_splitter_rejects_excessive_nesting() -> None:
    pieces = JsonSplitter(max_depth=8).feed(b"[" * 9)
    assert pieces == [Rejected("nesting deeper than 8 levels")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(
    st.lists(st.dictionaries(st.text(), json_values, max_size=4), min_size=1, max_size=4),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
    st.booleans(),
)
def test_splitter_recovers_objects_from_any_chunking(
    objects: list[dict[str, Any]], sizes: list[int], ascii_only: bool
) -> None:
    stream = b"".join(json.dumps(o, ensure_ascii=ascii_only).encode() for o in objects)
    splitter = JsonSplitter()
    pieces: list[bytes | Rejected] = []
    pos = 0
    for size in sizes * (len(stream) // len(sizes) + 1):
        pieces += splitter.feed(stream[pos : pos + size])
        pos += size
    assert [decode_json(p) for p in pieces if isinstance(p, bytes)] == objects
    assert len(pieces) == len(objects)


# -- decode_json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "piece", [b'{"execute": }', b"NaN", b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"\xff{}"]
)
def test_decode_rejects_what_qemu_rejects(piece: bytes) -> None:
    with pytest.raises(QmpError) as info:
        decode_json(piece)
    assert info.value.error_class == "GenericError"
    assert info.value.desc.startswith("JSON parse error, ")


# -- CommandTable -----------------------------------------------------------------------


def test_declared_types_follow_json_not_python() -> None:
    table = CommandTable()
    table.register(
        "t",
        lambda a: a,
        [Param("n", "int", True), Param("f", "number", True), Param("b", "bool", True)],
    )
    assert table.dispatch("t", {"n": 3, "f": 2, "b": False}) == {"n": 3, "f": 2, "b": False}
    with pytest.raises(QmpError, match="expected: integer"):
        table.dispatch("t", {"n": True})
    with pytest.raises(QmpError, match="expected: number"):
        table.dispatch("t", {"f": True})
    with pytest.raises(QmpError, match="expected: boolean"):
        table.dispatch("t", {"b": 1})


def test_undeclared_arguments_are_passed_through_unchecked() -> None:
    table = CommandTable()
    table.register("free", lambda a: a)
    assert table.dispatch("free", {"anything": [1]}) == {"anything": [1]}


def test_none_result_is_empty_object() -> None:
    table = CommandTable()
    table.register("nothing", lambda _a: None, [])
    assert table.dispatch("nothing", {}) == {}


def test_registering_a_name_twice_is_refused() -> None:
    table = CommandTable()
    table.register("x", lambda _a: None)
    with pytest.raises(ConfigError):
        table.register("x", lambda _a: None)


# -- messages ---------------------------------------------------------------------------


def test_event_timestamp_splits_wall_clock_into_seconds_and_microseconds() -> None:
    line = event_message("STOP", None, now_ns=1_700_000_123_456_789_012)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "event": "STOP",
        "timestamp": {"seconds": 1_700_000_123, "microseconds": 456_789},
    }
    assert json.loads(event_message("X", {}, now_ns=0))["data"] == {}


def test_protocol_dispatches_lazily_one_request_per_reply() -> None:
    calls: list[int] = []
    table = CommandTable()
    table.register("count", lambda _a: calls.append(1), [])
    protocol = QmpProtocol(table)
    replies = protocol.handle(
        b'{"execute":"qmp_capabilities"}{"execute":"count"}{"execute":"count"}'
    )
    assert json.loads(next(replies)) == {"return": {}}
    assert protocol.negotiated and calls == []
    assert json.loads(next(replies)) == {"return": {}}
    assert calls == [1]
    assert len(list(replies)) == 1 and calls == [1, 1]
