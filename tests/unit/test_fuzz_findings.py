"""Regression tests for what fuzzing (fuzz/run.py) found: each input that once broke a
parser's promise (only livemig's typed errors) must now be refused with one."""

from __future__ import annotations

import pytest

from livemig.errors import MigrationError
from livemig.migration.helper import decode_message


@pytest.mark.parametrize("data", [b"{", b"\xff\xfe", b"[1]", b"null", b"[" * 100000])
def test_a_malformed_helper_message_is_a_migration_error(data: bytes) -> None:
    # Was json.JSONDecodeError / RecursionError, escaping the helpers' control loop.
    with pytest.raises(MigrationError, match="bad helper message"):
        decode_message(data)
