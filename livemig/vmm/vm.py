"""The virtual machine: RAM blocks, vCPUs, the serial port, run state, save/restore.

Theory of operation
-------------------
A :class:`Vm` owns its KVM fds, its RAM blocks (one ``pc.ram`` block at guest-physical
0), its vCPUs and its devices; nothing is global, so two VMs (a migration source and
destination) can live in one process.  Guests start either the way a PC BIOS hands over
to a boot sector (the 512-byte image at 0x7c00, real mode, ``CS:IP = 0:7c00``,
``DL = 0x80``) or the way a multiboot loader starts a kernel (``livemig.vmm.multiboot``:
32-bit protected mode, ``EAX``/``EBX`` = magic and info block).

Unless the config turns it off, the VM has KVM's in-kernel irqchip (two 8259 PICs, an
IOAPIC, a local APIC per vCPU) and PIT, created before the vCPUs as KVM requires.  The
serial port drives GSI 4 of that irqchip.  Application processors (``vcpus > 1`` needs
the irqchip) wait inside ``KVM_RUN`` for INIT/SIPI from the boot processor.  Each vCPU
gets the host's supported CPUID with its own APIC id (``livemig.vmm.cpuid``).

The MSRs saved per vCPU (:attr:`Vm.msr_indices`) are those of
``KVM_GET_MSR_INDEX_LIST`` that a new vCPU can read and write back (which depends on the
CPUID and on the irqchip), in the kernel's list order (which puts
``IA32_TSC`` before ``IA32_TSC_DEADLINE`` and ``IA32_TSC_ADJUST``).

While the VM is paused its kvmclock stands still, as under QEMU: ``pause`` reads it
(``KVM_GET_CLOCK``) and ``start`` sets it back (``KVM_SET_CLOCK``), so guest time does not
jump by the length of a pause or of a migration's downtime.

:meth:`Vm.reset` (QMP ``system_reset``) restores the state every part had when the VM
was created and loads the boot image again.  A migration destination gets the same boot
options as its source, as QEMU's gets the same ``-kernel``: it keeps the image for a
reset without loading it (the stream brings RAM and CPU state).  A guest that
triple-faults or resets through port 0xcf9 shuts the VM down (as QEMU's
``-no-reboot``), emitting ``SHUTDOWN`` with ``guest: true``.

The VM-level run state uses QEMU's ``RunState`` names (``prelaunch``, ``running``,
``paused``, ``inmigrate``, ``postmigrate``, ``shutdown``, ``internal-error``) because QMP
clients read them; the allowed transitions are :data:`RUN_TRANSITIONS`.  Listeners get
QMP-style events (``STOP``, ``RESUME``, ``SHUTDOWN``).

Save/restore (:meth:`Vm.save_state`, :meth:`Vm.restore_state`) covers CPU and device
state; RAM moves separately (the migration stream, or :meth:`Vm.copy_ram_from`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from livemig.errors import ConfigError, KvmError, VmStateError
from livemig.kernel import kvm as K
from livemig.kernel.mman import Backing
from livemig.runtime import NamedThread
from livemig.units import GIB, MIB
from livemig.vmm.cpucheck import CR0_WP, check_restorable
from livemig.vmm.cpuid import CpuidPolicy, HostCpu
from livemig.vmm.memory import RamBlock, make_block
from livemig.vmm.multiboot import MultibootImage
from livemig.vmm.serial import COM1_IRQ, Serial, Sink
from livemig.vmm.state import PlatformState, VmState
from livemig.vmm.vcpu import Vcpu, VcpuRunState, install_kick_handler

log = logging.getLogger("livemig.vm")

BOOT_SECTOR_ADDR = 0x7C00
# Real-mode emulation on Intel needs a TSS and an identity-map page outside guest RAM.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_RAM = 3 * GIB  # RAM is one block below the 32-bit PCI hole
MAIN_BLOCK = "pc.ram"
MAX_VCPUS = 16
RESET_PORT = 0xCF9  # PIIX/ICH reset control register: bit 2 starts a reset


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
    prealloc: bool = False  # fault all of guest RAM in at start (QEMU's -mem-prealloc)
    irqchip: bool = True
    cpuid: CpuidPolicy = CpuidPolicy()

    def validate(self) -> None:
        page = self.backing.host_page_size
        if self.mem_size % page or self.mem_size <= 0:
            raise ConfigError(f"memory size {self.mem_size} is not a multiple of the "
                              f"{self.backing.value} page size ({page} bytes)")
        if self.mem_size < 2 * MIB or self.mem_size > MAX_RAM:
            raise ConfigError(f"memory size must be between 2 MiB and {MAX_RAM // GIB} GiB")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {self.vcpus}")
        if self.vcpus > 1 and not self.irqchip:
            raise ConfigError("several vCPUs need the in-kernel irqchip (INIT/SIPI)")
        self.cpuid.validate()


class Vm:
    """A KVM virtual machine with one RAM block, vCPUs and a serial port."""

    def __init__(self, config: VmConfig, serial_sink: Sink | None = None) -> None:
        config.validate()
        install_kick_handler()
        self.config = config
        self.runstate = RunState.PRELAUNCH
        self.failure: str | None = None  # why a vCPU stopped for good, if one did
        self._stopped_clock: int | None = None  # kvmclock while paused (ns)
        self._boot: Callable[[], None] | None = None  # loads the image again at a reset
        self._listeners: list[EventListener] = []
        self._lock = threading.RLock()
        self.serial = Serial(serial_sink, self._serial_irq if config.irqchip else None)
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
        if cfg.irqchip:
            self.vm_fd.create_irqchip()
            self.vm_fd.create_pit2()
        # The block's mapping reserves its huge pages and gives them back on close.
        block = make_block(self.vm_fd, MAIN_BLOCK, 0, cfg.mem_size, cfg.backing, slot=0,
                           reserve=cfg.reserve_hugepages, prealloc=cfg.prealloc)
        self._stack.callback(block.mapping.close)
        self.blocks: dict[str, RamBlock] = {block.name: block}
        self.xsave = bool(self.kvm.check_extension(K.KVM_CAP_XSAVE))
        supported = self.kvm.supported_cpuid()
        self.vcpus: list[Vcpu] = []
        for i in range(cfg.vcpus):
            fd = self.vm_fd.create_vcpu(i)
            self._stack.callback(fd.close)
            fd.set_cpuid2(cfg.cpuid.table_for(supported, i, cfg.vcpus))
            vcpu = Vcpu(fd, self, on_fatal=self._vcpu_failed)
            self._stack.callback(vcpu.stop)
            self.vcpus.append(vcpu)
        self.msr_indices = self._migratable_msrs(self.vcpus[0].fd)
        # KVM checks CR4 and XCR0 against the vCPU's CPUID (features hidden included),
        # and may refuse a CR4 bit it lists.
        listed = HostCpu.from_cpuid(cfg.cpuid.table_for(supported, 0, cfg.vcpus))
        self.host_cpu = replace(listed, cr4=self._settable_cr4(self.vcpus[0].fd, listed.cr4))
        self._power_on = self.save_state()  # what a reset goes back to

    def _migratable_msrs(self, fd: K.VcpuFd) -> list[int]:
        """The listed MSRs this (never run) vCPU can read and take back unchanged."""
        out = []
        for index in self.kvm.msr_index_list():
            value = fd.get_msrs([index])
            if value and fd.set_msrs(value) == 1:
                out.append(index)
        return out

    @staticmethod
    def _settable_cr4(fd: K.VcpuFd, listed: int) -> int:
        """The CR4 bits of ``listed`` (what the vCPU's CPUID allows) this never-run vCPU
        takes: a host may refuse one its CPUID lists (nested kvm_pvm refuses LA57), and
        a state KVM refuses must be refused by the checks first.  Each bit is tried
        alone on the power-on state with CR0.WP set (which some CR4 bits need)."""
        power_on = fd.get_sregs()
        out = 0
        for bit in range(64):
            if not listed >> bit & 1:
                continue
            trial = type(power_on).from_buffer_copy(power_on)
            trial.cr0 |= CR0_WP
            trial.cr4 |= 1 << bit
            try:
                fd.set_sregs(trial)
            except KvmError:
                continue
            out |= 1 << bit
        fd.set_sregs(power_on)
        return out

    # --- devices ----------------------------------------------------------------------
    def io_out(self, port: int, size: int, value: int) -> None:
        if self.serial.handles(port):
            self.serial.write(port, value & 0xFF)
        elif port == RESET_PORT and value & 0x04:
            self.guest_shutdown("guest-reset")

    def io_in(self, port: int, size: int) -> int:
        if self.serial.handles(port):
            return self.serial.read(port)
        return (1 << (8 * size)) - 1

    def _serial_irq(self, level: bool) -> None:
        self.vm_fd.irq_line(COM1_IRQ, level)

    def inject_nmi(self) -> None:
        """An NMI on every vCPU, as QEMU's ``inject-nmi`` (needs the in-kernel irqchip)."""
        if not self.config.irqchip:
            raise VmStateError("NMIs need the in-kernel irqchip")
        for v in self.vcpus:
            v.fd.nmi()

    def guest_shutdown(self, reason: str) -> None:
        """The guest asked to stop (from a vCPU thread, which must not wait for itself)."""
        NamedThread(target=self.shutdown, args=(reason, True), name="vm-shutdown",
                         daemon=True).start()

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
    def load_boot_sector(self, image: bytes, *, incoming: bool = False) -> None:
        """Place a boot sector and set the vCPU up exactly as a PC BIOS hands over
        (``incoming``: only keep it for a reset, see :meth:`_install_boot`)."""
        if len(image) != 512:
            raise ConfigError(f"a boot sector is 512 bytes, got {len(image)}")
        self._install_boot(functools.partial(self._enter_boot_sector, image), incoming)

    def _install_boot(self, boot: Callable[[], None], incoming: bool) -> None:
        """Keep ``boot`` as what :meth:`reset` loads, and load it now -- unless the VM
        waits for a migration (``incoming``): the stream brings its RAM and CPU state, and
        a write into RAM before it would shadow pages a postcopy has yet to fetch.  So a
        destination started with the source's boot options can be reset, as QEMU's."""
        self._require(RunState.PRELAUNCH, RunState.INMIGRATE)
        self._boot = boot
        if not incoming:
            boot()

    def _enter_boot_sector(self, image: bytes) -> None:
        self.write_guest(BOOT_SECTOR_ADDR, image)
        fd = self.vcpus[0].fd
        sregs = fd.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base, seg.selector = 0, 0
        fd.set_sregs(sregs)
        regs = K.KvmRegs()
        regs.rip, regs.rflags, regs.rdx, regs.rsp = BOOT_SECTOR_ADDR, 0x2, 0x80, 0x7000
        fd.set_regs(regs)

    def load_multiboot(self, image: MultibootImage, cmdline: bytes = b"", *,
                       incoming: bool = False) -> None:
        """Load a multiboot kernel and enter it on the boot processor, as QEMU's loader
        (``incoming``: only keep it for a reset, see :meth:`_install_boot`)."""
        self._install_boot(functools.partial(self._enter_multiboot, image, cmdline), incoming)

    def _enter_multiboot(self, image: MultibootImage, cmdline: bytes) -> None:
        for gpa, data in image.placements(self.main_block.size, cmdline):
            self.write_guest(gpa, data)
        fd = self.vcpus[0].fd
        sregs = fd.get_sregs()
        image.enter_protected_mode(sregs)
        fd.set_sregs(sregs)
        fd.set_regs(image.entry_regs())

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

    def _require_transition(self, new: RunState) -> None:
        if new not in RUN_TRANSITIONS[self.runstate]:
            raise VmStateError(f"VM cannot go from {self.runstate.value} to {new.value}")

    def set_runstate(self, new: RunState) -> None:
        with self._lock:
            if new is self.runstate:
                return
            self._require_transition(new)
            log.info("runstate %s -> %s", self.runstate.value, new.value)
            self.runstate = new

    @property
    def running(self) -> bool:
        return self.runstate is RunState.RUNNING

    def start(self) -> None:
        """Run (or resume) the vCPUs; emits RESUME first, as QEMU does, so that a QMP
        client that sees the run state ``running`` has been sent the event."""
        with self._lock:
            if self.runstate is RunState.RUNNING:
                return
            self._require_transition(RunState.RUNNING)  # no RESUME for a refused start
            self._emit("RESUME")
            self.set_runstate(RunState.RUNNING)
            if self._stopped_clock is not None:
                self.vm_fd.set_clock(self._stopped_clock)
                self._stopped_clock = None
            for v in self.vcpus:
                v.resume()

    def pause(self, to: RunState = RunState.PAUSED) -> None:
        """Stop the vCPUs (returns once they are out of the guest); emits STOP."""
        with self._lock:
            was_running = self.runstate is RunState.RUNNING
            for v in self.vcpus:
                if v.state is VcpuRunState.RUNNING:
                    v.pause()
            if was_running and self.config.irqchip:
                self._stopped_clock = int(self.vm_fd.get_clock().clock)
            self.set_runstate(to)
        if was_running:
            self._emit("STOP")

    def shutdown(self, reason: str = "host-qmp-quit", guest: bool = False) -> None:
        with self._lock:
            if self.runstate is RunState.SHUTDOWN:
                return
            for v in self.vcpus:
                v.stop()
            self.runstate = RunState.SHUTDOWN
        self._emit("SHUTDOWN", {"guest": guest, "reason": reason})

    def reset(self) -> None:
        """A hard reset, as QEMU's ``system_reset``: every vCPU and device goes back to
        its power-on state (the state saved when the VM was created), the image is
        loaded again, RAM is otherwise kept; a running VM runs on.  Emits ``RESET``."""
        with self._lock:
            if self.runstate in (RunState.SHUTDOWN, RunState.INMIGRATE):
                raise VmStateError(f"cannot reset a VM that is {self.runstate.value}")
            if self._boot is None:
                raise VmStateError("this VM has no boot image to reset to: start a "
                                   "migration destination with the source's --guest or "
                                   "--image, as QEMU's with its -kernel")
            was_running = self.runstate is RunState.RUNNING
            if was_running:
                self.pause()
            self.restore_state(self._power_on)
            self._boot()
            if was_running:
                self.start()
        self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def _vcpu_failed(self, why: str) -> None:
        """A vCPU stopped for good (called on its thread).  The runstate change needs the
        VM lock, which a thread pausing or stopping the vCPUs holds while it waits for
        this very vCPU to leave the guest: so a thread of its own makes the change, and
        the vCPU's thread goes on to end."""
        self.failure = why
        NamedThread(target=self._enter_internal_error, name="vcpu-failed",
                         daemon=True).start()

    def _enter_internal_error(self) -> None:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                self.runstate = RunState.INTERNAL_ERROR
        self._emit("STOP")

    # --- state save / restore -----------------------------------------------------------
    def save_state(self) -> VmState:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                raise VmStateError("pause the VM before saving its state")
            vcpus = tuple(v.save(self.msr_indices, self.config.irqchip, self.xsave)
                          for v in self.vcpus)
            return VmState(vcpus, self.serial.save(), self._save_platform())

    def _save_platform(self) -> PlatformState | None:
        if not self.config.irqchip:
            return None
        fd = self.vm_fd
        return PlatformState(
            pic_master=fd.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER),
            pic_slave=fd.get_irqchip(K.KVM_IRQCHIP_PIC_SLAVE),
            ioapic=fd.get_irqchip(K.KVM_IRQCHIP_IOAPIC), pit=fd.get_pit2(),
            clock_ns=self._stopped_clock if self._stopped_clock is not None
            else int(fd.get_clock().clock))

    def restore_state(self, state: VmState) -> None:
        with self._lock:
            if self.runstate is RunState.RUNNING:
                raise VmStateError("cannot restore state into a running VM")
            if len(state.vcpus) != len(self.vcpus):
                raise ConfigError(f"state has {len(state.vcpus)} vCPUs, VM has "
                                  f"{len(self.vcpus)}")
            if state.platform is not None and not self.config.irqchip:
                raise ConfigError("the saved VM had the in-kernel irqchip, this one has not")
            for i, st in enumerate(state.vcpus):  # all of them before any is touched
                check_restorable(st, i, self.msr_indices, self.host_cpu, self.config.irqchip)
            platform = state.platform
            fd = self.vm_fd
            if platform is not None:
                fd.set_irqchip(K.KVM_IRQCHIP_PIC_MASTER, platform.pic_master)
                fd.set_irqchip(K.KVM_IRQCHIP_PIC_SLAVE, platform.pic_slave)
                fd.set_irqchip(K.KVM_IRQCHIP_IOAPIC, platform.ioapic)
                fd.set_pit2(platform.pit)
            for v, st in zip(self.vcpus, state.vcpus, strict=True):
                v.restore(st)
            self.serial.restore(state.serial)
            if platform is not None:
                self._stopped_clock = platform.clock_ns  # set by start(), right before running

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
