"""One livemig VMM instance: a VM, its QMP monitor, and its migrations.

Theory of operation
-------------------
``livemig run`` builds an :class:`Instance`: it owns the :class:`~livemig.vmm.vm.Vm`, the
:class:`~livemig.control.qmp.QmpServer`, the QMP command table that maps QEMU's
command names onto VM and migration operations, and the outgoing and incoming
migration (at most one of each).  VM events (STOP, RESUME, SHUTDOWN) are forwarded to
QMP clients.  :meth:`Instance.wait` blocks the main thread until ``quit`` (or a
signal); then :meth:`Instance.close` closes everything in order: the migrations first
(whatever phase they are in, postcopy included: their threads hold views of guest
RAM), then the vCPUs, then QMP (no new commands), then the VM (fds, RAM, reserved huge
pages).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from livemig.control.commands import CommandTable, Param
from livemig.control.qmp import QmpServer
from livemig.errors import ConfigError, QmpError
from livemig.guests.os import LOAD_ADDRESS, OS_GUEST, PARAMS_OFFSET, PARAMS_SIZE, OsParams
from livemig.migration.channel import MigrationUri
from livemig.migration.destination import DestinationMigration
from livemig.migration.helper import HelperServer
from livemig.migration.source import SourceMigration
from livemig.migration.state import Capabilities, MigrationStatus, Parameters
from livemig.migration.tls import TlsEndpoint, TlsObjects
from livemig.migration.trace import Tracer
from livemig.runtime import SwitchInterval, UrgentPriority
from livemig.vmm.boot import guest_range
from livemig.vmm.checks import AbCheckResult, PageCheckResult, ab_check, os_check, random_check
from livemig.vmm.vm import RunState, Vm

log = logging.getLogger("livemig.instance")


class Instance:
    """A VM plus its QMP control socket."""

    def __init__(self, vm: Vm, qmp_path: str | None = None, *,
                 exit_after_incoming: bool = False, trace: Sequence[str] = (),
                 trace_sink: TextIO | None = None, switch: SwitchInterval | None = None,
                 helpers: HelperServer | None = None) -> None:
        """``switch``: the owner of the process's GIL switch interval; instances that
        share a process must share it (livemig runs one instance per process).
        ``helpers``: the server that forks the migrations' helper processes, started
        already (``livemig run`` starts it with the VMM); by default the instance's own,
        started at its first helper.  The instance closes it."""
        self.vm = vm
        self.switch = switch or SwitchInterval()
        self.helpers = helpers or HelperServer()
        self.trace_patterns = tuple(trace)
        self.trace_sink = trace_sink
        self.commands = CommandTable()
        self._quit = threading.Event()
        self.caps = Capabilities()
        self.params = Parameters()
        self.objects = TlsObjects()  # --object / object-add (tls-creds-x509, authz-*)
        self.outgoing: SourceMigration | None = None
        self.incoming: DestinationMigration | None = None
        self._exit_after_incoming = exit_after_incoming
        self._register_vm_commands()
        self._register_migration_commands()
        self.qmp: QmpServer | None = None
        if qmp_path is not None:
            self.qmp = QmpServer(qmp_path, self.commands)
            self.qmp.start()
            vm.add_listener(self.qmp.emit)

    # --- QMP commands -------------------------------------------------------------------
    def _register_vm_commands(self) -> None:
        reg = self.commands.register
        reg("query-status", lambda _a: self.query_status(), params=())
        reg("query-cpus-fast", lambda _a: self.query_cpus_fast(), params=())
        reg("stop", lambda _a: self._stop(), params=())
        reg("cont", lambda _a: self._cont(), params=())
        reg("inject-nmi", lambda _a: self.vm.inject_nmi(), params=())
        reg("system_reset", lambda _a: self.vm.reset(), params=())
        reg("quit", lambda _a: self._quit.set(), params=())
        reg("x-guest-check", lambda a: self.guest_check(a["guest"]),
            params=(Param("guest", "str"),))
        reg("pmemsave", lambda a: self.pmemsave(a["val"], a["size"], a["filename"]),
            params=(Param("val", "int"), Param("size", "int"), Param("filename", "str")))

    def query_status(self) -> dict[str, Any]:
        return {"status": self.vm.runstate.value, "running": self.vm.running,
                "singlestep": False}

    def query_cpus_fast(self) -> list[dict[str, Any]]:
        """QEMU's CpuInfoFast per vCPU: the thread that runs it (what libvirt pins), and
        the QOM path QEMU gives a vCPU of ``-smp`` on x86."""
        return [{"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                 "thread-id": v.native_id, "target": "x86_64"}
                for i, v in enumerate(self.vm.vcpus)]

    def guest_check(self, guest: str) -> dict[str, Any]:
        """Our extension: run the host-side check of a paused livemig guest's RAM."""
        if self.vm.running:
            raise QmpError("stop the VM before checking its memory")
        start, end = guest_range(self.vm)
        ram = self.vm.main_block.array()
        result: AbCheckResult | PageCheckResult
        if guest == "ab":
            result = ab_check(ram, start, end)
        elif guest == "random":
            result = random_check(ram, start, end)
        elif guest == OS_GUEST:
            try:
                params = OsParams.unpack(self.vm.read_guest(LOAD_ADDRESS + PARAMS_OFFSET,
                                                            PARAMS_SIZE))
            except ConfigError as e:
                raise QmpError(f"this VM does not run the os guest: {e}") from None
            result = os_check(ram, params)
        else:
            raise QmpError(f"unknown guest {guest!r}; choose ab, random or os")
        return {"pages": result.pages, "bad_pages": len(result.bad_pages),
                "first_bad_pages": list(result.bad_pages[:16])}

    def pmemsave(self, gpa: int, size: int, filename: str) -> None:
        """QEMU's ``pmemsave``: write ``size`` bytes of guest RAM at ``gpa`` to a file."""
        data = self.vm.read_guest(gpa, size)
        try:
            with open(filename, "wb") as f:
                f.write(data)
        except OSError as e:
            raise QmpError(f"could not open '{filename}': {e.strerror}") from None

    def _stop(self) -> None:
        if self.vm.runstate is RunState.RUNNING:
            self.vm.pause()

    def _cont(self) -> None:
        if self.vm.runstate is RunState.INMIGRATE:
            raise QmpError("Migration is not finalized yet")
        if self.vm.runstate is RunState.SHUTDOWN:
            raise QmpError("Resetting the Virtual Machine is required")
        self.vm.start()

    # --- migration commands (QEMU's names and shapes) ----------------------------------
    def _register_migration_commands(self) -> None:
        reg = self.commands.register
        reg("migrate", lambda a: self.migrate(a["uri"], resume=a.get("resume", False)),
            params=(Param("uri", "str"), Param("blk", "bool", True), Param("inc", "bool", True),
                    Param("detach", "bool", True), Param("resume", "bool", True)))
        reg("migrate-incoming", lambda a: self.migrate_incoming(a["uri"]),
            params=(Param("uri", "str"),))
        reg("migrate_cancel", lambda _a: self.migrate_cancel(), params=())
        reg("migrate-pause", lambda _a: self.migrate_pause(), params=())
        reg("migrate-recover", lambda a: self.migrate_recover(a["uri"]),
            params=(Param("uri", "str"),))
        reg("migrate-start-postcopy", lambda _a: self.migrate_start_postcopy(), params=())
        reg("query-migrate", lambda _a: self.query_migrate(), params=())
        # Ours: every page-request latency of the incoming postcopy, for exact CDFs.
        reg("x-query-postcopy-latency-samples", lambda a: self.latency_samples(a.get("slow-us")),
            params=(Param("slow-us", "int", True),))
        reg("migrate-set-capabilities", lambda a: self._set_caps(a["capabilities"]),
            params=(Param("capabilities", "array"),))
        reg("query-migrate-capabilities", lambda _a: self.caps.to_qmp(), params=())
        reg("migrate-set-parameters", lambda a: self._set_params(a), params=None)
        reg("query-migrate-parameters", lambda _a: self.params.to_qmp(), params=())
        reg("object-add", lambda a: self.object_add(a), params=None)
        reg("object-del", lambda a: self.objects.delete(a["id"]), params=(Param("id", "str"),))

    def object_add(self, args: dict[str, Any]) -> None:
        """QMP object-add (QEMU's flat form: qom-type, id and the properties)."""
        props = dict(args)
        qom_type = props.pop("qom-type", None)
        if not isinstance(qom_type, str):
            raise QmpError("Parameter 'qom-type' is missing")
        self.objects.add(qom_type, props)

    def _tls(self, uri: MigrationUri, endpoint: str) -> TlsEndpoint | None:
        """The TLS endpoint the parameters name, for a migration over ``uri``."""
        tls = self.objects.endpoint(self.params.tls_creds, self.params.tls_hostname,
                                    self.params.tls_authz, endpoint=endpoint)
        if tls is not None and uri.scheme == "file":
            raise ConfigError("tls-creds is set, but a file: migration has no peer to "
                              "secure: unset tls-creds")
        return tls

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.qmp is not None:
            self.qmp.emit(event, data)

    def _migration_active(self) -> bool:
        return any(m is not None and not m.status.status.finished
                   for m in (self.outgoing, self.incoming))

    def _set_caps(self, changes: list[dict[str, Any]]) -> None:
        if self._migration_active():
            raise QmpError("There's a migration process in progress")
        self.caps = self.caps.updated(changes)

    def _set_params(self, args: dict[str, Any]) -> None:
        self.params = self.params.updated(args)
        if self.outgoing is not None and not self.outgoing.status.status.finished:
            self.outgoing.update_params(self.params)

    def migrate(self, uri: str, *, resume: bool = False) -> None:
        if resume:
            # Postcopy recovery: the paused outgoing migration goes on over ``uri``.
            if self.outgoing is None:
                raise QmpError("Cannot resume if there is no paused migration")
            self.outgoing.resume(MigrationUri.parse(uri))
            return
        if self._migration_active():
            raise QmpError("There's a migration process in progress")
        if self.vm.runstate not in (RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH,
                                    RunState.POSTMIGRATE):
            raise QmpError(f"Cannot migrate a VM that is {self.vm.runstate.value}")
        target = MigrationUri.parse(uri)
        self.outgoing = SourceMigration(self.vm, target, self.caps,
                                        self.params, self._emit,
                                        Tracer(self.trace_patterns, self.trace_sink),
                                        helpers=self.helpers, switch=self.switch,
                                        tls=self._tls(target, "client"))
        self.outgoing.start()

    def migrate_incoming(self, uri: str) -> None:
        if self.incoming is not None:
            raise QmpError("The incoming migration has already been started")
        if self.vm.runstate not in (RunState.PRELAUNCH, RunState.INMIGRATE):
            raise QmpError("migrate-incoming is only allowed on a VM started with --incoming")
        listen = MigrationUri.parse(uri)
        self.incoming = DestinationMigration(self.vm, listen, self.caps,
                                             self._emit, self._incoming_finished,
                                             helpers=self.helpers, switch=self.switch,
                                             dead_link_timeout_ms=self.params.x_dead_link_timeout,
                                             urgent_priority=UrgentPriority(
                                                 self.params.x_postcopy_urgent_priority),
                                             tls=self._tls(listen, "server"))
        self.incoming.start()

    def _incoming_finished(self, mig: DestinationMigration) -> None:
        # QEMU exits when an incoming migration fails; a process started only to
        # receive does the same here (cleanly, through quit).
        if mig.status.status is MigrationStatus.FAILED and self._exit_after_incoming:
            self._quit.set()

    def migrate_cancel(self) -> None:
        if self.outgoing is not None:
            self.outgoing.cancel()

    def migrate_pause(self) -> None:
        """Force a postcopy migration (either side) into postcopy-paused."""
        for mig in (self.outgoing, self.incoming):
            if mig is not None and mig.status.status.postcopy:
                mig.pause()
                return
        raise QmpError("migrate-pause is only possible in postcopy-active or "
                       "postcopy-recover")

    def migrate_recover(self, uri: str) -> None:
        if self.incoming is None:
            raise QmpError("Migrate recover can only be run when postcopy is paused.")
        self.incoming.recover(MigrationUri.parse(uri))

    def migrate_start_postcopy(self) -> None:
        if self.outgoing is None:
            raise QmpError("Postcopy must be started after migration has been started")
        self.outgoing.start_postcopy()

    def query_migrate(self) -> dict[str, Any]:
        if self.outgoing is not None:
            return self.outgoing.query()
        return {} if self.incoming is None else self.incoming.query()

    def latency_samples(self, slow_us: int | None = None) -> dict[str, Any]:
        """Every latency and when its fault came; with ``slow_us``, also the requests
        that waited that long, by page, with CLOCK_MONOTONIC times."""
        samples, at = self.incoming.latency_samples() if self.incoming is not None else ([], [])
        out: dict[str, Any] = {"samples-ns": samples, "fault-at-ns": at}
        if slow_us is not None:
            out["slow"] = ([] if self.incoming is None
                           else self.incoming.slow_pages(slow_us * 1000))
        return out

    # --- lifecycle ------------------------------------------------------------------------
    def request_quit(self) -> None:
        self._quit.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until quit is requested (True) or ``timeout`` passes (False)."""
        return self._quit.wait(timeout)

    def close(self) -> None:
        """Stop the migrations and wait for their threads, then close the VM and QMP
        (see the module docstring); an error on the way propagates."""
        if self.outgoing is not None:
            self.outgoing.abort()
            self.outgoing.join(10)
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming.join(30)
        self.helpers.close()
        self.vm.shutdown()
        if self.qmp is not None:
            self.qmp.close()
        self.vm.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
