"""A helper process's readiness is waited for off the caller's path
(helper.HelperWatch.when_ready): the destination's load thread answers ADVISE's PING
through it while the fault server still imports, and reads the precopy stream on."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from livemig.errors import LivemigError
from livemig.migration.helper import HelperProcess, HelperWatch


class FakeHelper(HelperProcess):
    """The parent side of a helper whose messages the test writes itself."""

    def __init__(self) -> None:  # no process: the test plays the helper
        self.module = "fake"
        self.ctl, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def say(self, msg: dict[str, object]) -> None:
        self.child.send(json.dumps(msg).encode())


@pytest.fixture
def helper() -> Iterator[FakeHelper]:
    h = FakeHelper()
    yield h
    h.ctl.close()
    h.child.close()


def test_what_waits_for_a_helper_runs_once_it_is_ready_in_order(helper: FakeHelper) -> None:
    errors: list[Exception] = []
    watch = HelperWatch(helper, "done", "watch", errors.append, ready="ready")
    ran: list[int] = []
    done = threading.Event()
    watch.when_ready(lambda: ran.append(1))
    watch.when_ready(lambda: (ran.append(2), done.set()))
    assert ran == []  # queued: the caller went on
    helper.say({"msg": "ready"})
    assert done.wait(5)
    watch.when_ready(lambda: ran.append(3))  # ready now: runs at once, here
    assert ran == [1, 2, 3]
    watch.wait_ready(5)
    helper.say({"msg": "done", "pages": 7})
    assert watch.wait(5, "done")["pages"] == 7
    assert errors == []


def test_a_helper_that_fails_before_it_is_ready_runs_nothing_and_reports(
        helper: FakeHelper) -> None:
    errors: list[Exception] = []
    watch = HelperWatch(helper, "done", "watch", errors.append, ready="ready")
    ran: list[int] = []
    watch.when_ready(lambda: ran.append(1))
    helper.say({"error": "boom", "type": "MigrationError"})
    with pytest.raises(LivemigError):
        watch.wait_ready(5)
    watch.when_ready(lambda: ran.append(2))
    assert ran == []
    assert len(errors) == 1
