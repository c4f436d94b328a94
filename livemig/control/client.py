"""A small synchronous QMP client for the CLI, on top of qemu.qmp's legacy API.

``livemig migrate`` and ``livemig demo`` drive livemig (and QEMU) processes over QMP.
qemu.qmp does the protocol; this wrapper only turns error replies into
:class:`~livemig.errors.QmpError` and waits for sockets to appear.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.errors import QmpError


class QmpClient:
    """One negotiated QMP session."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise QmpError(f"no QMP socket at {path} after {timeout:.0f} s")
            time.sleep(0.05)
        # The socket file can exist a moment before the server listens on it.
        while True:
            self._qmp = QEMUMonitorProtocol(path)
            try:
                self._qmp.connect(negotiate=True)
                break
            except (ConnectionRefusedError, OSError):
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QMP at {path}") from None
                time.sleep(0.05)

    def execute(self, command: str, **args: Any) -> Any:
        reply = self._qmp.cmd_obj({"execute": command, "arguments": args} if args
                                  else {"execute": command})
        if "error" in reply:
            err = reply["error"]
            raise QmpError(f"{command}: {err.get('desc', '')}", err.get("class", "GenericError"))
        return reply.get("return")

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """Events received so far (waiting up to ``wait`` s for the first one)."""
        if wait:
            try:
                first = self._qmp.pull_event(wait=wait)
            except TimeoutError:
                return []
            if first is None:
                return []
            return [first, *self._qmp.get_events()]
        return list(self._qmp.get_events())

    def close(self) -> None:
        """End the session.  A server that is gone (it quit, or its process was
        killed) has ended it already: qemu.qmp then reports the end of the stream,
        which is not an error of closing.  Any other error propagates."""
        with contextlib.suppress(EOFError, ConnectionResetError):
            self._qmp.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
