"""The virtual machine: RAM blocks, vCPUs, the serial port, run state, save/restore.

Theory of operation
-------------------
A :class:`Vm` owns its KVM fds, its RAM blocks (one ``pc.ram`` block at guest-physical
0), its vCPUs and its devices; nothing is global, so two VMs (a migration source and
destination) can live in one process.  Guests start the way a PC BIOS hands over to a
boot sector: the 512-byte image at 0x7c00, real mode, ``CS:IP = 0:7c00``, ``DL = 0x80``.

The VM-level run state uses QEMU's ``RunState`` names (``prelaunch``, ``running``,
``paused``, ``inmigrate``, ``postmigrate``, ``shutdown``, ``internal-error``) because QMP
clients read them; the allowed transitions are :data:`RUN_TRANSITIONS`.  Listeners get
QMP-style events (``STOP``, ``RESUME``, ``SHUTDOWN``).

Save/restore (:meth:`Vm.save_state`, :meth:`Vm.restore_state`) covers CPU and device
state; RAM moves separately (the migration stream, or :meth:`Vm.copy_ram_from`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, BinaryIO

from livemig.errors import ConfigError, VmStateError
from livemig.kernel import kvm as K
from livemig.kernel.mman import Backing
from livemig.units import GIB, MIB
from livemig.vmm.memory import RamBlock, make_block
from livemig.vmm.serial import Serial
from livemig.vmm.state import VmState
from livemig.vmm.vcpu import Vcpu, VcpuRunState, install_kick_handler

log = logging.getLogger("livemig.vm")

BOOT_SECTOR_ADDR = 0x7C00
# Real-mode emulation on Intel needs a TSS and an identity-map page outside guest RAM.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_RAM = 3 * GIB  # RAM is one block below the 32-bit PCI hole
MAIN_BLOCK = "pc.ram"


class RunState(Enum):
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


_R = RunState
RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _R.PRELAUNCH: frozenset({_R.RUNNING, _R.PAUSED, _R.INMIGRATE, _R.FINISH_MIGRATE,
                             _R.SHUTDOWN}),
    _R.INMIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.PRELAUNCH, _R.SHUTDOWN,
                             _R.INTERNAL_ERROR}),
    _R.RUNNING: frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.SHUTDOWN, _R.INTERNAL_ERROR}),
    _R.PAUSED: frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.POSTMIGRATE, _R.SHUTDOWN,
                          _R.INMIGRATE}),
    _R.FINISH_MIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.PRELAUNCH, _R.POSTMIGRATE,
                                  _R.SHUTDOWN}),
    _R.POSTMIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.FINISH_MIGRATE, _R.SHUTDOWN}),
    _R.INTERNAL_ERROR: frozenset({_R.PAUSED, _R.RUNNING, _R.SHUTDOWN}),
    _R.SHUTDOWN: frozenset(),
}

EventListener = Callable[[str, dict[str, Any]], None]


def parse_size(text: str) -> int:
    """'256M' / '1G' / '4096' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": MIB, "G": GIB}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = int(num) * mult
    except ValueError:
        raise ConfigError(f"invalid size {text!r} (use e.g. 256M, 1G)") from None
    if value <= 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return value


@dataclass(frozen=True)
class VmConfig:
    mem_size: int
    backing: Backing = Backing.ANON_4K
    vcpus: int = 1
    reserve_hugepages: bool = True

    def validate(self) -> None:
        page = self.backing.host_page_size
        if self.mem_size % page or self.mem_size <= 0:
            raise ConfigError(f"memory size {self.mem_size} is not a multiple of the "
                              f"{self.backing.value} page size ({page} bytes)")
        if self.mem_size < 2 * MIB or self.mem_size > MAX_RAM:
            raise ConfigError(f"memory size must be between 2 MiB and {MAX_RAM // GIB} GiB")
        if self.vcpus != 1:
            raise ConfigError("livemig guests are single-vCPU for now")


class Vm:
    """A KVM virtual machine with one RAM block, vCPUs and a serial port."""

    def __init__(self, config: VmConfig, serial_sink: BinaryIO | None = None) -> None:
        config.validate()
        install_kick_handler()
        self.config = config
        self.runstate = RunState.PRELAUNCH
        self._listeners: list[EventListener] = []
        self._lock = threading.RLock()
        self.serial = Serial(serial_sink)
        self._stack = contextlib.ExitStack()
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise

    def _setup(self) -> None:
        cfg = self.config
        self.kvm = K.Kvm()
        self._stack.callback(self.kvm.close)
        self.vm_fd = self.kvm.create_vm()
        self._stack.callback(self.vm_fd.close)
        self.vm_fd.set_tss_addr(TSS_ADDR)
        self.vm_fd.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if self.kvm.check_extension(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            self.vm_fd.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                  K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        # The block's mapping reserves its huge pages and gives them back on close.
        block = make_block(self.vm_fd, MAIN_BLOCK, 0, cfg.mem_size, cfg.backing, slot=0,
                           reserve=cfg.reserve_hugepages)
        self._stack.callback(block.mapping.close)
        self.blocks: dict[str, RamBlock] = {block.name: block}
        supported = set(self.kvm.msr_index_list())
        self.msr_indices = [m for m in K.MIGRATED_MSRS if m in supported]
        cpuid = self.kvm.supported_cpuid()
        self.vcpus: list[Vcpu] = []
        for i in range(cfg.vcpus):
            fd = self.vm_fd.create_vcpu(i)
            self._stack.callback(fd.close)
            fd.set_cpuid2(cpuid)
            vcpu = Vcpu(fd, self, on_fatal=self._vcpu_failed)
            self._stack.callback(vcpu.stop)
            self.vcpus.append(vcpu)

    # --- devices ----------------------------------------------------------------------
    def io_out(self, port: int, size: int, value: int) -> None:
        if self.serial.handles(port):
            self.serial.write(port, value & 0xFF)

    def io_in(self, port: int, size: int) -> int:
        if self.serial.handles(port):
            return self.serial.read(port)
        return (1 << (8 * size)) - 1

    # --- memory -----------------------------------------------------------------------
    @property
    def main_block(self) -> RamBlock:
        return self.blocks[MAIN_BLOCK]

    def write_guest(self, gpa: int, data: bytes) -> None:
        """A VMM write into guest RAM; recorded for dirty tracking (KVM cannot see it)."""
        block = self._block_at(gpa, len(data))
        off = block.offset_of(gpa)
        block.view()[off : off + len(data)] = data
        block.mark_dirty(off, len(data))

    def read_guest(self, gpa: int, length: int) -> bytes:
        block = self._block_at(gpa, length)
        off = block.offset_of(gpa)
        return bytes(block.view()[off : off + length])

    def _block_at(self, gpa: int, length: int) -> RamBlock:
        for b in self.blocks.values():
            if b.contains(gpa, length):
                return b
        raise ConfigError(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")

    def set_dirty_logging(self, on: bool) -> None:
        for b in self.blocks.values():
            b.set_dirty_logging(on)

    # --- boot -------------------------------------------------------------------------
    def load_boot_sector(self, image: bytes) -> None:
        """Place a boot sector and set the vCPU up exactly as a PC BIOS hands over."""
        if len(image) != 512:
            raise ConfigError(f"a boot sector is 512 bytes, got {len(image)}")
        self._require(RunState.PRELAUNCH, RunState.INMIGRATE)
        self.write_guest(BOOT_SECTOR_ADDR, image)
        fd = self.vcpus[0].fd
        sregs = fd.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base, seg.selector = 0, 0
        fd.set_sregs(sregs)
        regs = K.KvmRegs()
        regs.rip, regs.rflags, regs.rdx, regs.rsp = BOOT_SECTOR_ADDR, 0x2, 0x80, 0x7000
        fd.set_regs(regs)

    # --- run state --------------------------------------------------------------------
    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data or {})
            except Exception:  # a broken listener must not stop the VM
                log.exception("event listener failed for %s", event)

    def _require(self, *states: RunState) -> None:
        if self.runstate not in states:
            raise VmStateError(f"VM is {self.runstate.value}; this needs "
                               + " or ".join(s.value for s in states))

    def set_runstate(self, new: RunState) -> None:
        with self._lock:
            if new is self.runstate:
                return
            if new not in RUN_TRANSITIONS[self.runstate]:
                raise VmStateError(f"VM cannot go from {self.runstate.value} to {new.value}")
            log.info("runstate %s -> %s", self.runstate.value, new.value)
            self.runstate = new

    @property
    def running(self) -> bool:
        return self.runstate is RunState.RUNNING

    def start(self) -> None:
        """Run (or resume) the vCPUs; emits RESUME."""
        with self._lock:
            if self.runstate is RunState.RUNNING:
                return
            self.set_runstate(RunState.RUNNING)
            for v in self.vcpus:
                v.resume()
        self._emit("RESUME")

    def pause(self, to: RunState = RunState.PAUSED) -> None:
        """Stop the vCPUs (returns once they are out of the guest); emits STOP."""
        with self._lock:
            was_running = self.runstate is RunState.RUNNING
            for v in self.vcpus:
                if v.state is VcpuRunState.RUNNING:
                    v.pause()
            self.set_runstate(to)
        if was_running:
            self._emit("STOP")

    def shutdown(self, reason: str = "host-qmp-quit") -> None:
        with self._lock:
            if self.runstate is RunState.SHUTDOWN:
                return
            for v in self.vcpus:
                v.stop()
            self.runstate = RunState.SHUTDOWN
        self._emit("SHUTDOWN", {"guest": False, "reason": reason})

    def _vcpu_failed(self, why: str) -> None:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                self.runstate = RunState.INTERNAL_ERROR
        self._emit("STOP")

    # --- state save / restore -----------------------------------------------------------
    def save_state(self) -> VmState:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                raise VmStateError("pause the VM before saving its state")
            return VmState(tuple(v.save(self.msr_indices) for v in self.vcpus),
                           self.serial.save())

    def restore_state(self, state: VmState) -> None:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                raise VmStateError("cannot restore state into a running VM")
            if len(state.vcpus) != len(self.vcpus):
                raise ConfigError(f"state has {len(state.vcpus)} vCPUs, VM has "
                                  f"{len(self.vcpus)}")
            for v, st in zip(self.vcpus, state.vcpus, strict=True):
                v.restore(st)
            self.serial.restore(state.serial)

    def copy_ram_from(self, other: Vm) -> None:
        """Copy all RAM of a paused VM (for in-process save/restore tests and file loads)."""
        for name, block in self.blocks.items():
            src = other.blocks.get(name)
            if src is None or src.size != block.size:
                raise ConfigError(f"block {name} does not match")
            block.array()[:] = src.array()

    def close(self) -> None:
        """Stop the vCPUs, close the fds, unmap RAM, give back huge pages."""
        with self._lock:
            self.runstate = RunState.SHUTDOWN
        self._stack.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
