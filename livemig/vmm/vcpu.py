"""vCPU threads: an explicit Running / Paused / Stopped state machine around KVM_RUN.

Theory of operation
-------------------
Each vCPU has one thread that loops on ``KVM_RUN`` (GIL released while the guest runs)
and handles exits: port I/O goes to the device bus, MMIO outside the in-kernel devices
reads as all ones and ignores writes (there is no such device), a triple fault
(``KVM_EXIT_SHUTDOWN``) asks the VM to shut down.  With the in-kernel irqchip, HLT, the
local APIC and INIT/SIPI are handled inside ``KVM_RUN`` (an application processor blocks
there until its SIPI).  Without it, HLT exits to us and parks the vCPU: nothing could
wake it, so it stays halted until it is reset or restored.

Commands (``resume``, ``pause``, ``stop``) come from other threads.  To get a running
vCPU out of the guest we set ``kvm_run.immediate_exit`` (so a vCPU just about to enter
the guest returns at once) and send it a signal (so one already inside returns with
EINTR); we repeat the signal until the vCPU acknowledges, which closes the race where
the signal lands just before ``KVM_RUN``.  ``pause()`` returns only when the vCPU is out
of the guest, so its registers can be read and guest RAM is stable.

Every transition goes through :data:`TRANSITIONS` and is logged.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Protocol

from livemig.errors import KvmError, VmStateError
from livemig.kernel import kvm as K
from livemig.runtime import NamedThread
from livemig.vmm.state import VcpuState

log = logging.getLogger("livemig.vcpu")

KICK_SIGNAL = signal.SIGUSR2


class VcpuRunState(Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


TRANSITIONS: dict[VcpuRunState, frozenset[VcpuRunState]] = {
    VcpuRunState.CREATED: frozenset({VcpuRunState.RUNNING, VcpuRunState.PAUSED,
                                     VcpuRunState.STOPPED}),
    VcpuRunState.RUNNING: frozenset({VcpuRunState.PAUSED, VcpuRunState.STOPPED}),
    VcpuRunState.PAUSED: frozenset({VcpuRunState.RUNNING, VcpuRunState.STOPPED}),
    VcpuRunState.STOPPED: frozenset(),
}


class IoBus(Protocol):
    def io_out(self, port: int, size: int, value: int) -> None: ...
    def io_in(self, port: int, size: int) -> int: ...
    def guest_shutdown(self, reason: str) -> None: ...


def install_kick_handler() -> None:
    """Install a no-op handler for the kick signal (must run in the main thread once).

    Without a handler the signal would kill the process; with ``SIG_IGN`` it would not
    interrupt ``KVM_RUN``.  Python's own C handler interrupts the syscall, which is all
    we need.
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise VmStateError("the first VM must be created in the main thread "
                               "(it installs the vCPU kick signal handler)")
        signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class Vcpu:
    """One vCPU: its fd, its thread, and its run state."""

    def __init__(self, fd: K.VcpuFd, bus: IoBus,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.fd = fd
        self.bus = bus
        self.on_fatal = on_fatal
        self.state = VcpuRunState.CREATED
        self.halted = False
        self.exits = 0
        self._want = VcpuRunState.PAUSED
        self._cond = threading.Condition()
        self._thread = NamedThread(target=self._loop, name=f"vcpu{fd.index}", daemon=True)
        self._thread.start()

    # --- commands (any thread) -------------------------------------------------------
    @property
    def native_id(self) -> int | None:
        """The vCPU thread's kernel thread id (what userfaultfd reports for its faults)."""
        return self._thread.native_id

    def resume(self) -> None:
        self._command(VcpuRunState.RUNNING)

    def pause(self) -> None:
        self._command(VcpuRunState.PAUSED)

    def request_pause(self) -> None:
        """Ask a running vCPU to leave the guest, without waiting for it.

        A vCPU blocked on a userfaultfd page inside KVM cannot acknowledge until the
        fault is resolved; the postcopy failure path uses this, then releases the
        faults, then waits with :meth:`pause`.
        """
        with self._cond:
            if self.state is not VcpuRunState.RUNNING or self._want is not self.state:
                return  # not running, or already told to pause or stop
            self._want = VcpuRunState.PAUSED
            self.fd.set_immediate_exit(True)
            self._cond.notify_all()
        if self._thread.ident is not None:
            signal.pthread_kill(self._thread.ident, KICK_SIGNAL)

    def stop(self) -> None:
        self._command(VcpuRunState.STOPPED)
        self._thread.join(timeout=10)

    def _command(self, want: VcpuRunState) -> None:
        with self._cond:
            if self.state is want:
                return
            if want not in TRANSITIONS[self.state]:
                raise VmStateError(f"vcpu{self.fd.index}: cannot go from {self.state.value} "
                                   f"to {want.value}")
            self._want = want
            self.fd.set_immediate_exit(want is not VcpuRunState.RUNNING)
            self._cond.notify_all()
            # Until the vCPU is there, or another thread's command superseded this one
            # (request_pause while a resume waits): that one's caller waits for it.
            while self.state is not want and self._want is want and self._thread.is_alive():
                if self.state is VcpuRunState.RUNNING and self._thread.ident is not None:
                    signal.pthread_kill(self._thread.ident, KICK_SIGNAL)
                self._cond.wait(0.005)

    # --- the vCPU thread ------------------------------------------------------------
    def _set_state(self, new: VcpuRunState) -> None:
        log.debug("vcpu%d: %s -> %s", self.fd.index, self.state.value, new.value)
        self.state = new
        self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._want is not self.state:
                    self._set_state(self._want)
                if self.state is VcpuRunState.STOPPED:
                    return
                if self.state is not VcpuRunState.RUNNING or self.halted:
                    self._cond.wait()
                    continue
            if not self._run_once():
                with self._cond:
                    self._want = VcpuRunState.STOPPED
                    self._set_state(VcpuRunState.STOPPED)
                return

    def _run_once(self) -> bool:
        """One KVM_RUN and its exit; False when the vCPU cannot go on."""
        try:
            reason = self.fd.run_once()
        except Exception as e:  # a KVM failure ends this vCPU, not the process
            return self._fatal(f"KVM_RUN failed: {e}")
        self.exits += 1
        if reason == K.KVM_EXIT_IO:
            self._handle_io()
        elif reason == K.KVM_EXIT_HLT:
            self.halted = True
        elif reason == K.KVM_EXIT_MMIO:
            mmio = self.fd.mmio_exit()
            if not mmio.is_write:
                for i in range(8):
                    mmio.data[i] = 0xFF
        elif reason == K.KVM_EXIT_SHUTDOWN:
            self.bus.guest_shutdown("guest-reset")
            return False
        elif reason == K.KVM_EXIT_INTERNAL_ERROR:
            sub, data = self.fd.internal_error()
            words = " ".join(f"{w:#x}" for w in data)
            return self._fatal(f"KVM internal error {sub} (data {words}) at "
                               f"rip {self.fd.get_regs().rip:#x}")
        elif reason != K.KVM_EXIT_INTR:
            return self._fatal(f"unexpected exit reason {reason}")
        return True

    def _fatal(self, why: str) -> bool:
        log.error("vcpu%d: %s", self.fd.index, why)
        if self.on_fatal is not None:
            self.on_fatal(why)
        return False

    def _handle_io(self) -> None:
        io = self.fd.io_exit()
        buf = self.fd.run_map
        for i in range(io.count):
            off = io.data_offset + i * io.size
            if io.is_out:
                self.bus.io_out(io.port, io.size, int.from_bytes(buf[off : off + io.size],
                                                                  "little"))
            else:
                value = self.bus.io_in(io.port, io.size)
                buf[off : off + io.size] = (value & ((1 << (8 * io.size)) - 1)).to_bytes(
                    io.size, "little")

    # --- state (only while paused or not yet started) -------------------------------
    def _require_stopped_guest(self) -> None:
        if self.state is VcpuRunState.RUNNING:
            raise VmStateError(f"vcpu{self.fd.index} is running; pause it first")

    def save(self, msr_indices: Sequence[int], lapic: bool, xsave: bool) -> VcpuState:
        """Read the vCPU's state; ``lapic``/``xsave`` say whether the VM has them."""
        self._require_stopped_guest()
        fd = self.fd
        try:
            xcrs = bytes(fd.get_xcrs())
        except KvmError:
            xcrs = b""
        msrs = tuple(fd.get_msrs(msr_indices))
        if len(msrs) != len(msr_indices):
            raise VmStateError(f"vcpu{fd.index}: KVM read {len(msrs)} of "
                               f"{len(msr_indices)} MSRs")
        return VcpuState(
            regs=bytes(fd.get_regs()), sregs=bytes(fd.get_sregs()), fpu=bytes(fd.get_fpu()),
            xcrs=xcrs, events=bytes(fd.get_vcpu_events()), msrs=msrs,
            mp_state=fd.get_mp_state(), halted=self.halted,
            xsave=fd.get_xsave() if xsave else b"", debugregs=fd.get_debugregs(),
            lapic=fd.get_lapic() if lapic else b"")

    def restore(self, st: VcpuState) -> None:
        """Load a saved state, in the order of ``livemig.vmm.state`` (events last)."""
        self._require_stopped_guest()
        fd = self.fd
        fd.set_sregs(K.KvmSregs.from_buffer_copy(st.sregs))
        fd.set_regs(K.KvmRegs.from_buffer_copy(st.regs))
        if st.xsave:
            fd.set_xsave(st.xsave)
        else:
            fd.set_fpu(K.KvmFpu.from_buffer_copy(st.fpu))
        if st.xcrs:
            fd.set_xcrs(K.KvmXcrs.from_buffer_copy(st.xcrs))
        if st.debugregs:
            fd.set_debugregs(st.debugregs)
        if st.lapic:
            fd.set_lapic(st.lapic)
        done = fd.set_msrs(st.msrs)
        if done != len(st.msrs):
            raise VmStateError(f"vcpu{fd.index}: KVM refused MSR {st.msrs[done][0]:#x} "
                               f"({done} of {len(st.msrs)} restored)")
        fd.set_mp_state(st.mp_state)
        fd.set_vcpu_events(K.KvmVcpuEvents.from_buffer_copy(st.events))
        self.halted = st.halted
