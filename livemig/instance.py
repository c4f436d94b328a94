"""One livemig VMM instance: a VM, its QMP monitor, and (later) its migrations.

Theory of operation
-------------------
``livemig run`` builds an :class:`Instance`: it owns the :class:`~livemig.vmm.vm.Vm`, the
:class:`~livemig.control.qmp.QmpServer` and the QMP command table that maps QEMU's
command names onto VM operations.  VM events (STOP, RESUME, SHUTDOWN) are forwarded to
QMP clients.  :meth:`Instance.wait` blocks the main thread until ``quit`` (or a
signal); then everything is closed in order: QMP first (no new commands), then the VM
(vCPUs, fds, RAM, reserved huge pages).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from livemig.control.commands import CommandTable
from livemig.control.qmp import QmpServer
from livemig.errors import QmpError
from livemig.vmm.vm import RunState, Vm

log = logging.getLogger("livemig.instance")


class Instance:
    """A VM plus its QMP control socket."""

    def __init__(self, vm: Vm, qmp_path: str | None = None) -> None:
        self.vm = vm
        self.commands = CommandTable()
        self._quit = threading.Event()
        self._register_vm_commands()
        self.qmp: QmpServer | None = None
        if qmp_path is not None:
            self.qmp = QmpServer(qmp_path, self.commands)
            self.qmp.start()
            vm.add_listener(self.qmp.emit)

    # --- QMP commands -------------------------------------------------------------------
    def _register_vm_commands(self) -> None:
        reg = self.commands.register
        reg("query-status", lambda _a: self.query_status(), params=())
        reg("stop", lambda _a: self._stop(), params=())
        reg("cont", lambda _a: self._cont(), params=())
        reg("quit", lambda _a: self._quit.set(), params=())

    def query_status(self) -> dict[str, Any]:
        return {"status": self.vm.runstate.value, "running": self.vm.running,
                "singlestep": False}

    def _stop(self) -> None:
        if self.vm.runstate is RunState.RUNNING:
            self.vm.pause()

    def _cont(self) -> None:
        if self.vm.runstate is RunState.INMIGRATE:
            raise QmpError("Migration is not finalized yet")
        if self.vm.runstate is RunState.SHUTDOWN:
            raise QmpError("Resetting the Virtual Machine is required")
        self.vm.start()

    # --- lifecycle ------------------------------------------------------------------------
    def request_quit(self) -> None:
        self._quit.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until quit is requested (True) or ``timeout`` passes (False)."""
        return self._quit.wait(timeout)

    def close(self) -> None:
        self.vm.shutdown()
        if self.qmp is not None:
            self.qmp.close()
        self.vm.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
