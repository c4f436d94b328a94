"""The destination side of a migration: receive RAM and device state, start the guest.

Theory of operation
-------------------
A :class:`DestinationMigration` listens on a URI (``migrate-incoming``), accepts the
main channel and runs a *load thread* that feeds the channel's bytes to the sans-IO
:class:`~livemig.wire.decoder.Decoder` and acts on its events:

- ``PageBatch``: many whole pages already buffered: one vectorised NumPy copy into
  guest RAM;
- ``PageHeader``: a page whose payload has not fully arrived: what is buffered is
  copied, the rest is read with ``recv_into`` straight into guest RAM;
- ``ZeroPages``: pages that must read as zero (written only where RAM is not already
  zero, so untouched memory stays unallocated);
- ``DeviceState``: CPU and serial state, decoded and kept until EOF;
- ``StreamEnd``: restore the device state, start the vCPUs (RESUME), ``completed``.

Anything the decoder rejects (corrupt, truncated, unknown block, out-of-range page)
arrives as a typed :class:`~livemig.errors.StreamError`: the migration fails, the guest
is never started, and nothing was written outside guest RAM (every write goes through a
bounds-checked view of a block).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError, MigrationError, RemoteProtocolError
from livemig.kernel.mman import PAGE_SIZE
from livemig.migration.channel import Channel, Listener, MigrationUri
from livemig.migration.source import block_table
from livemig.migration.state import Capabilities, MigrationInfo, MigrationStatus, StatusMachine
from livemig.vmm.serial import SerialState
from livemig.vmm.state import VcpuState, VmState
from livemig.vmm.vm import RunState, Vm
from livemig.wire import events as ev
from livemig.wire.decoder import Decoder

log = logging.getLogger("livemig.destination")

RECV_CHUNK = 4 << 20
EventSink = Callable[[str, dict[str, Any]], None]


class RamLoader:
    """Places decoded pages into guest RAM (precopy: straight into the final place)."""

    def __init__(self, vm: Vm) -> None:
        self._pages: dict[str, npt.NDArray[np.uint8]] = {}
        self._words: dict[str, npt.NDArray[np.uint64]] = {}
        self._views: dict[str, memoryview] = {}
        for name, block in vm.blocks.items():
            arr = block.array()
            self._pages[name] = arr.reshape(-1, PAGE_SIZE)
            self._words[name] = arr.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
            self._views[name] = block.view()
        self.pages = 0
        self.zeros = 0

    def batch(self, e: ev.PageBatch) -> None:
        self._pages[e.block][e.offsets // PAGE_SIZE] = e.data
        self.pages += len(e.offsets)

    def zero(self, e: ev.ZeroPages) -> None:
        idx = e.offsets // PAGE_SIZE
        words = self._words[e.block]
        dirty = idx[words[idx].any(axis=1)]
        if len(dirty):
            words[dirty] = 0
        self.zeros += len(idx)

    def page_slot(self, e: ev.PageHeader) -> memoryview:
        """Where a single page's payload goes (the decoder checked the offset)."""
        self.pages += 1
        return self._views[e.block][e.offset : e.offset + PAGE_SIZE]

    def release(self) -> None:
        self._pages.clear()
        self._words.clear()
        for v in self._views.values():
            v.release()
        self._views.clear()


class DestinationMigration:
    """One incoming migration (see the module docstring)."""

    def __init__(self, vm: Vm, uri: MigrationUri, caps: Capabilities,
                 emit: EventSink | None = None,
                 on_finished: Callable[[DestinationMigration], None] | None = None) -> None:
        self.vm = vm
        self.uri = uri
        self.caps = caps
        self._emit = emit or (lambda _e, _d: None)
        self._on_finished = on_finished
        self.info = MigrationInfo()
        self.status = StatusMachine(self._on_status)
        self._listener = Listener(uri)  # bind now: errors reach the migrate-incoming caller
        self._channel: Channel | None = None
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)

    @property
    def port(self) -> int:
        return self._listener.port

    def start(self) -> None:
        self.vm.set_runstate(RunState.INMIGRATE)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self.status.wait_finished(timeout)

    def abort(self) -> None:
        """Stop waiting or receiving (the process is shutting down)."""
        self._listener.close()
        if self._channel is not None:
            self._channel.shutdown()

    def _on_status(self, status: MigrationStatus) -> None:
        self.info.status = status
        if self.caps.events:
            self._emit("MIGRATION", {"status": status.value})

    # --- the load thread ----------------------------------------------------------------
    def _run(self) -> None:
        loader: RamLoader | None = None
        try:
            self.status.set(MigrationStatus.SETUP)
            self._channel = self._listener.accept()
            self.info.start_ns = time.monotonic_ns()
            self.status.set(MigrationStatus.ACTIVE)
            loader = RamLoader(self.vm)
            state = self._load(self._channel, loader)
            self._finish(state, loader)
        except Exception as e:
            self._fail(e)
        finally:
            if loader is not None:
                loader.release()
            self._listener.close()
            if self._channel is not None:
                self._channel.close()
            self.info.end_ns = time.monotonic_ns()
            if self._on_finished is not None:
                self._on_finished(self)

    def _load(self, channel: Channel, loader: RamLoader) -> VmState:
        dec = Decoder(block_table(self.vm), postcopy=self.caps.postcopy_ram)
        cpus: dict[int, VcpuState] = {}
        serial: SerialState | None = None
        while True:
            e = dec.next_event()
            if e is ev.NEED_DATA:
                data = channel.recv(RECV_CHUNK)
                dec.receive_data(data)  # b"" means EOF: the decoder judges truncation
                continue
            if isinstance(e, ev.PageBatch):
                loader.batch(e)
            elif isinstance(e, ev.ZeroPages):
                loader.zero(e)
            elif isinstance(e, ev.PageHeader):
                self._read_payload(dec, channel, loader.page_slot(e))
            elif isinstance(e, ev.DeviceState):
                if e.idstr == "livemig/cpu":
                    cpus[e.instance_id] = VcpuState.from_bytes(e.data)
                elif e.idstr == "livemig/serial":
                    serial = SerialState.from_bytes(e.data)
                else:
                    raise RemoteProtocolError(f"unknown device section {e.idstr!r}")
            elif isinstance(e, ev.StreamEnd):
                return self._vm_state(cpus, serial)
            elif isinstance(e, (ev.StreamStart, ev.SectionBegin, ev.SectionComplete,
                                ev.MemSize)):
                continue
            else:
                raise RemoteProtocolError(f"unexpected {type(e).__name__} in a precopy stream")

    @staticmethod
    def _read_payload(dec: Decoder, channel: Channel, slot: memoryview) -> None:
        n = dec.take_payload(slot)
        if dec.payload_remaining:
            channel.recv_exact_into(slot[n:])
            dec.payload_received(len(slot) - n)

    def _vm_state(self, cpus: dict[int, VcpuState], serial: SerialState | None) -> VmState:
        if serial is None or sorted(cpus) != list(range(len(self.vm.vcpus))):
            raise RemoteProtocolError("the stream ended without the CPU and serial state")
        return VmState(tuple(cpus[i] for i in range(len(cpus))), serial)

    def _finish(self, state: VmState, loader: RamLoader) -> None:
        self.vm.restore_state(state)
        st = self.info.ram
        st.normal, st.duplicate = loader.pages, loader.zeros
        st.total = sum(b.size for b in self.vm.blocks.values())
        st.transferred = self._channel.bytes_received if self._channel else 0
        self.vm.start()
        self.status.set(MigrationStatus.COMPLETED)

    def _fail(self, e: Exception) -> None:
        if isinstance(e, LivemigError):
            log.error("incoming migration failed: %s", e)
        else:
            log.exception("incoming migration failed")
            e = MigrationError(f"internal error: {e}")
        self.info.error_desc = str(e)
        if self.vm.runstate is RunState.INMIGRATE:
            self.vm.set_runstate(RunState.PAUSED)
        self.status.try_set(MigrationStatus.FAILED)
