"""Migration status, capabilities, parameters and statistics (QEMU's names).

Theory of operation
-------------------
:class:`MigrationStatus` uses QEMU's status strings; :class:`StatusMachine` enforces the
transitions of :data:`STATUS_TRANSITIONS`, logs each one, keeps the sequence (tests
assert it) and calls a listener (which emits the QMP ``MIGRATION`` event).

:class:`Capabilities` and :class:`Parameters` are what ``migrate-set-capabilities`` and
``migrate-set-parameters`` change; they are frozen and replaced whole, so a running
migration works on a consistent snapshot.  :class:`RamStats` and :class:`MigrationInfo`
are the counters behind ``query-migrate``; ``to_qmp()`` produces QEMU's field names.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from livemig.errors import ConfigError, LivemigError, MigrationError
from livemig.runtime import DEFAULT_URGENT_PRIORITY, MAX_URGENT_PRIORITY
from livemig.units import PAGE_SIZE

log = logging.getLogger("livemig.migration")
_T = TypeVar("_T")


def log_failure(logger: logging.Logger, what: str, e: BaseException) -> None:
    """Log a failure as text only.

    A log record that kept the exception would keep its traceback, whose frames hold
    memoryviews of guest RAM: a handler that stores records (pytest's, a MemoryHandler)
    would then stop the VM from ever unmapping its memory.  Unexpected errors get their
    traceback formatted into the message instead.
    """
    if isinstance(e, LivemigError):
        logger.error("%s: %s", what, str(e))
    else:
        tb = "".join(traceback.format_exception(e))
        logger.critical("%s: internal error: %s\n%s", what, str(e), tb)


def detached(e: Exception) -> Exception:
    """``e`` without its traceback and chained exceptions, to be kept after the
    ``except`` block: their frames would pin memoryviews of guest RAM (or of a
    temporary huge page) and, through a frame that keeps the error, form a cycle that
    only the garbage collector breaks, so the VM could not unmap its memory."""
    e.__context__ = e.__cause__ = None
    return e.with_traceback(None)


class MigrationStatus(Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"  # a channel failed in postcopy: wait for recovery
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"  # source: connecting anew
    POSTCOPY_RECOVER = "postcopy-recover"  # connected: resynchronising
    DEVICE = "device"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                        MigrationStatus.CANCELLED)

    def require_pausable(self) -> None:
        """migrate-pause is refused outside postcopy-active and postcopy-recover."""
        if self not in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER):
            raise MigrationError("migrate-pause is only possible in postcopy-active or "
                                 "postcopy-recover")

    @property
    def postcopy(self) -> bool:
        """The guest runs on the destination: cancelling would lose it."""
        return self in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED,
                        MigrationStatus.POSTCOPY_RECOVER_SETUP,
                        MigrationStatus.POSTCOPY_RECOVER)


_S = MigrationStatus
STATUS_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.NONE: frozenset({_S.SETUP, _S.FAILED}),
    _S.SETUP: frozenset({_S.ACTIVE, _S.FAILED, _S.CANCELLING}),
    _S.ACTIVE: frozenset({_S.DEVICE, _S.POSTCOPY_ACTIVE, _S.COMPLETED, _S.FAILED,
                          _S.CANCELLING}),
    _S.DEVICE: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLING, _S.POSTCOPY_ACTIVE}),
    _S.POSTCOPY_ACTIVE: frozenset({_S.COMPLETED, _S.FAILED, _S.POSTCOPY_PAUSED}),
    # Recovery (QEMU's names): paused until migrate-recover (destination) or migrate
    # resume=true (source); a failure while recovering pauses again.  FAILED only when
    # the process gives up (quit): the guest's memory is split between two hosts.
    _S.POSTCOPY_PAUSED: frozenset({_S.POSTCOPY_RECOVER_SETUP, _S.POSTCOPY_RECOVER,
                                   _S.FAILED}),
    _S.POSTCOPY_RECOVER_SETUP: frozenset({_S.POSTCOPY_RECOVER, _S.POSTCOPY_PAUSED,
                                          _S.FAILED}),
    # COMPLETED from postcopy-recover: the destination had completed and answers the
    # resume with its SHUT, which the old connection lost (docs/STREAM.md).
    _S.POSTCOPY_RECOVER: frozenset({_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED, _S.COMPLETED,
                                    _S.FAILED}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.FAILED}),
    _S.CANCELLED: frozenset(),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
}


class StatusMachine:
    """The status of one migration, with enforced transitions and a history."""

    def __init__(self, on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._status = MigrationStatus.NONE
        self._cond = threading.Condition()
        self.history: list[MigrationStatus] = [self._status]
        self._on_change = on_change

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def set(self, new: MigrationStatus) -> None:
        with self._cond:
            old = self._status
            if new is old:
                return
            if new not in STATUS_TRANSITIONS[old]:
                raise MigrationError(f"migration cannot go from {old.value} to {new.value}")
            log.info("migration status %s -> %s", old.value, new.value)
            self._status = new
            self.history.append(new)
            self._cond.notify_all()
        if self._on_change is not None:
            self._on_change(new)

    def try_set(self, new: MigrationStatus) -> bool:
        """Set if allowed (used on error paths that may race with cancel)."""
        try:
            self.set(new)
        except MigrationError:
            return False
        return True

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._status.finished, timeout)


class UrgentMode(Enum):
    """Who sends requested pages in postcopy with preemption (``x-postcopy-urgent-sender``).

    Each value names one design, implemented by one class in
    :mod:`livemig.migration.urgent_sender`; a migration picks it once, at ``migrate``.
    """

    MIGRATION = "migration"      # the migration thread, between background pieces (QEMU 7.1)
    RETURN_PATH = "return-path"  # the return-path thread, as it reads the request (QEMU 8.0)
    PROCESS = "process"          # a helper process on each side owns the postcopy channel


@dataclass(frozen=True)
class Range:
    """The valid values of an integer field (``Annotated[int, Range(...)]``), checked
    with the field's type; the refusal names the range and its unit, as QEMU's does."""

    low: int
    high: int
    unit: str


U64_MAX = (1 << 64) - 1  # QEMU's 'size' type: bandwidths are at most SIZE_MAX
MAX_DOWNTIME_MS = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME (2000 s)
MAX_ITERATIONS = 100_000
MAX_MULTIFD_CHANNELS = 255  # QEMU's bound (the channel id is one byte)


def _check_value(owner: str, name: str, kind: Any, value: Any) -> Any:
    """``value`` for field ``name`` of declared type ``kind``, or a ConfigError that says
    what the field takes (QEMU's wording).  Enums are given and shown by value."""
    if get_origin(kind) is Annotated:
        base, *meta = get_args(kind)
        value = _check_value(owner, name, base, value)
        for r in meta:
            if isinstance(r, Range) and not r.low <= value <= r.high:
                raise ConfigError(f"{owner} '{name}' expects an integer in the range of "
                                  f"{r.low} to {r.high} {r.unit}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{owner} '{name}' expects a boolean")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{owner} '{name}' expects a string")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{owner} '{name}' expects a non-negative integer")
        return value
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{owner} '{name}' expects one of "
                              f"{', '.join(str(m.value) for m in kind)}") from None
    raise TypeError(f"{owner} '{name}' has an unsupported type {kind!r}")


def _updated(obj: _T, owner: str, changes: Mapping[str, Any], missing: str) -> _T:
    """A copy of the frozen dataclass ``obj`` with ``changes`` (QMP names: '-' for '_')
    applied, each checked against its field's declared type."""
    hints = get_type_hints(type(obj), include_extras=True)
    known = {f.name.replace("_", "-"): f.name for f in fields(obj)}  # type: ignore[arg-type]
    new: dict[str, Any] = {}
    for qmp_name, value in changes.items():
        if qmp_name not in known:
            raise ConfigError(missing.format(name=qmp_name))
        attr = known[qmp_name]
        new[attr] = _check_value(owner, qmp_name, hints[attr], value)
    return replace(obj, **new)  # type: ignore[type-var]


def _to_qmp_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


@dataclass(frozen=True)
class Capabilities:
    """``migrate-set-capabilities`` (QEMU names with '-' turned into '_')."""

    events: bool = False
    postcopy_ram: bool = False
    postcopy_blocktime: bool = False
    postcopy_preempt: bool = False
    return_path: bool = False
    multifd: bool = False  # precopy pages on multifd-channels extra connections

    def to_qmp(self) -> list[dict[str, Any]]:
        return [{"capability": f.name.replace("_", "-"), "state": getattr(self, f.name)}
                for f in fields(self)]

    def updated(self, changes: list[dict[str, Any]]) -> Capabilities:
        """Apply ``migrate-set-capabilities``' list of {capability, state}."""
        flat: dict[str, Any] = {}
        for item in changes:
            flat[str(item.get("capability"))] = item.get("state")
        caps = _updated(self, "Capability", flat, "Capability '{name}' not found")
        if caps.postcopy_preempt and not caps.postcopy_ram:
            raise ConfigError("Postcopy preempt requires postcopy-ram")
        return caps


@dataclass(frozen=True)
class Parameters:
    """``migrate-set-parameters``: bandwidth in bytes/s (0 = unlimited), times in ms.

    A migration works on the snapshot taken at ``migrate``; only the fields in
    :data:`LIVE_PARAMETERS` reach a running migration (as in QEMU, bandwidth and the
    downtime limit apply at once; the design choices below stay as they were).
    """

    max_bandwidth: Annotated[int, Range(0, U64_MAX, "bytes/second")] = 0
    downtime_limit: Annotated[int, Range(0, MAX_DOWNTIME_MS, "milliseconds")] = 300
    max_postcopy_bandwidth: Annotated[int, Range(0, U64_MAX, "bytes/second")] = 0
    # ours: give up converging after this many rounds
    x_max_iterations: Annotated[int, Range(0, MAX_ITERATIONS, "rounds")] = 30
    # Postcopy preemption knobs (ours, "x-" as QEMU marks experimental properties):
    # break huge pages for urgent requests (QEMU's x-postcopy-preempt-break-huge) ...
    x_postcopy_preempt_break_huge: bool = True
    # ... who sends requested pages (UrgentMode; docs/BENCHMARKS.md says why "process")
    x_postcopy_urgent_sender: UrgentMode = UrgentMode.PROCESS
    # ... and whether the background scan continues after the last requested page.
    x_postcopy_locality: bool = True
    # The SCHED_FIFO priority of the threads and helpers that answer page requests, on
    # each side (livemig.runtime.UrgentPriority; 0: time-sharing like the rest).
    x_postcopy_urgent_priority: Annotated[int, Range(0, MAX_URGENT_PRIORITY,
                                                     "(SCHED_FIFO priority, 0: none)")] = \
        DEFAULT_URGENT_PRIORITY
    # No VM description after a precopy stream's EOF (QEMU's machine option
    # suppress-vmdesc); docs/STREAM.md.
    x_suppress_vmdesc: bool = False
    # Ours: a TCP peer silent for this long (ms) is gone (TCP_USER_TIMEOUT and
    # keepalive on every connection): in postcopy the migration pauses instead of
    # hanging on a cut link.
    x_dead_link_timeout: int = 5000
    # With the multifd capability: how many extra connections carry precopy pages
    # (QEMU's name, default and range).
    multifd_channels: Annotated[int, Range(1, MAX_MULTIFD_CHANNELS, "channels")] = 2
    # TLS (QEMU's names): the id of a tls-creds-x509 object ("" = no TLS), the name
    # the destination's certificate must carry (source; "" = the URI's host), and the
    # id of an authz object the client certificate's DN must satisfy (destination).
    tls_creds: str = ""
    tls_hostname: str = ""
    tls_authz: str = ""

    def to_qmp(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): _to_qmp_value(getattr(self, f.name))
                for f in fields(self)}

    def updated(self, args: Mapping[str, Any]) -> Parameters:
        return _updated(self, "Parameter", args, "Parameter '{name}' is unexpected")

    def live_update(self, newer: Parameters) -> Parameters:
        """These parameters with the live fields of ``newer`` (a running migration)."""
        return replace(self, **{name: getattr(newer, name) for name in LIVE_PARAMETERS})


# What migrate-set-parameters changes in a migration that is already running.
LIVE_PARAMETERS = ("max_bandwidth", "downtime_limit", "max_postcopy_bandwidth")


@dataclass
class RamStats:
    """RAM counters of one migration (updated by the migration thread)."""

    total: int = 0
    transferred: int = 0
    duplicate: int = 0  # zero pages
    normal: int = 0  # full pages sent
    dirty_sync_count: int = 0
    remaining: int = 0
    dirty_pages_rate: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    postcopy_requests: int = 0
    x_postcopy_urgent_bytes: int = 0  # ours: bytes of requested pages
    page_size: int = PAGE_SIZE
    mbps: float = 0.0
    pages_per_second: int = 0

    def to_qmp(self) -> dict[str, Any]:
        d = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        d["normal-bytes"] = self.normal * self.page_size
        return d


@dataclass
class MigrationInfo:
    """Everything ``query-migrate`` reports for one migration."""

    status: MigrationStatus = MigrationStatus.NONE
    ram: RamStats = field(default_factory=RamStats)
    start_ns: int = 0
    setup_ns: int = 0
    end_ns: int = 0
    postcopy_ns: int = 0  # when postcopy started (CLOCK_MONOTONIC; 0: not in postcopy)
    downtime_ms: int = 0
    expected_downtime_ms: int = 0
    rounds: int = 0
    error_desc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def total_time_ms(self) -> int:
        end = self.end_ns or time.monotonic_ns()
        return (end - self.start_ns) // 1_000_000 if self.start_ns else 0

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is MigrationStatus.NONE:
            return out
        out["total-time"] = self.total_time_ms()
        out["setup-time"] = self.setup_ns // 1_000_000
        if self.status is MigrationStatus.COMPLETED:
            out["downtime"] = self.downtime_ms
        else:
            out["expected-downtime"] = self.expected_downtime_ms
        out["ram"] = self.ram.to_qmp()
        if self.error_desc:
            out["error-desc"] = self.error_desc
        out.update(self.extra)
        return out
