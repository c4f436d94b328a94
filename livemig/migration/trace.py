"""Trace events, as QEMU's ``-trace PATTERN``: structured lines plus counters.

Every event is counted (``query-migrate`` reports the counters as ``x-trace-*``);
events whose name matches one of the enabled glob patterns are also written as one
JSON line each (``{"ts_ns", "event", ...fields}``) to the trace sink, and kept in
memory for tests (bounded).  A :class:`Tracer` belongs to one migration: no global
trace state, so two migrations in one process trace separately.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, TextIO

MAX_KEPT = 100_000


class Tracer:
    def __init__(self, patterns: Sequence[str] = (), sink: TextIO | None = None) -> None:
        self.patterns = tuple(patterns)
        self.sink = sink
        self.counts: Counter[str] = Counter()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_KEPT)
        self._lock = threading.Lock()

    def enabled(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def __call__(self, name: str, **fields: Any) -> None:
        with self._lock:
            self.counts[name] += 1
            if not self.patterns or not self.enabled(name):
                return
            record = {"ts_ns": time.monotonic_ns(), "event": name, **fields}
            self.events.append(record)
            if self.sink is not None:
                self.sink.write(json.dumps(record) + "\n")
                self.sink.flush()

    def names(self) -> list[str]:
        """The traced event names, in order (for tests)."""
        with self._lock:
            return [e["event"] for e in self.events]

    def to_qmp(self, prefix: str) -> dict[str, int]:
        with self._lock:
            return {f"x-trace-{name.replace('_', '-')}": n for name, n in self.counts.items()
                    if name.startswith(prefix)}
