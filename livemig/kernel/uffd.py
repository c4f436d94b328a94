"""userfaultfd(2) binding: the destination's postcopy page-fault channel.

Theory of operation
-------------------
During postcopy the destination VM runs before its RAM has arrived.  Guest RAM is
registered with a userfaultfd in MISSING mode, so the first touch of a page that is
not there yet (by a vCPU thread inside KVM, or by any host thread) blocks in the
kernel and queues a *page-fault message* on the fd.  The fault thread reads those
messages (:meth:`Userfaultfd.read_events`), asks the source for the pages, and
places each one atomically with UFFDIO_COPY (or UFFDIO_ZEROPAGE); placing a page
wakes every thread blocked on it.  This mirrors QEMU's migration/postcopy-ram.c.

Kernel calls are made with ctypes through ``CDLL`` prototypes (``CFUNCTYPE``), never
``PyDLL``: ctypes drops the GIL around such calls, so a UFFDIO_COPY of a 2 MiB or
1 GiB page, or a faulting access, never stalls the other Python threads (one of
which may be the very thread that must resolve the fault).

Kernel semantics this module relies on (fs/userfaultfd.c, mm/userfaultfd.c):

* UFFDIO_API may succeed only once per fd; on failure the kernel zeroes the reply,
  so the missing features are found with a second handshake on a throwaway fd.
* UFFDIO_COPY/ZEROPAGE fill the range page by page and stop at the first page that
  fails.  ``copy``/``zeropage`` in the struct then holds the bytes filled so far if
  any (the ioctl fails with EAGAIN), or ``-errno``.  EEXIST means "this page is
  already there" -- a benign race during postcopy, not an error.
* Only UFFD_EVENT_PAGEFAULT messages arrive unless non-cooperative EVENT_* features
  are requested; this module never requests them, so any other event is a bug.

Raw addresses: every address handed to the kernel is either a ctypes struct owned by
the calling frame (alive until the call returns) or a caller-supplied guest/staging
address, which the *caller* must keep mapped for the duration of the call (the
mapping objects live in livemig.kernel.mman and the RAM block that owns them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import numpy as np

from livemig.errors import UffdError
from livemig.kernel.ioctl import io, ior, iowr

__all__ = [
    "EVENT_PAGEFAULT",
    "FEATURE_EXACT_ADDRESS",
    "FEATURE_MISSING_HUGETLBFS",
    "FEATURE_MISSING_SHMEM",
    "FEATURE_THREAD_ID",
    "IOCTL_COPY",
    "IOCTL_WAKE",
    "IOCTL_ZEROPAGE",
    "PAGEFAULT_FLAG_WRITE",
    "REGISTER_MODE_MISSING",
    "PageFault",
    "Userfaultfd",
    "feature_names",
    "parse_messages",
]

# --- constants from include/uapi/linux/userfaultfd.h --------------------------------

UFFD_API: Final = 0xAA
NR_USERFAULTFD_X86_64: Final = 323
DEVICE_PATH: Final = "/dev/userfaultfd"
UFFD_USER_MODE_ONLY: Final = 1

EVENT_PAGEFAULT: Final = 0x12
_EVENT_NAMES: Final = ("PAGEFAULT", "FORK", "REMAP", "REMOVE", "UNMAP")  # from 0x12 on

PAGEFAULT_FLAG_WRITE: Final = 1 << 0
PAGEFAULT_FLAG_WP: Final = 1 << 1
PAGEFAULT_FLAG_MINOR: Final = 1 << 2

FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
FEATURE_EVENT_FORK: Final = 1 << 1
FEATURE_EVENT_REMAP: Final = 1 << 2
FEATURE_EVENT_REMOVE: Final = 1 << 3
FEATURE_MISSING_HUGETLBFS: Final = 1 << 4
FEATURE_MISSING_SHMEM: Final = 1 << 5
FEATURE_EVENT_UNMAP: Final = 1 << 6
FEATURE_SIGBUS: Final = 1 << 7
FEATURE_THREAD_ID: Final = 1 << 8
FEATURE_MINOR_HUGETLBFS: Final = 1 << 9
FEATURE_MINOR_SHMEM: Final = 1 << 10
FEATURE_EXACT_ADDRESS: Final = 1 << 11
FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
FEATURE_WP_UNPOPULATED: Final = 1 << 13
FEATURE_POISON: Final = 1 << 14
FEATURE_WP_ASYNC: Final = 1 << 15
FEATURE_MOVE: Final = 1 << 16

_FEATURE_NAMES: Final = (
    "PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "MISSING_HUGETLBFS",
    "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS", "THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM",
    "EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
)

REGISTER_MODE_MISSING: Final = 1 << 0
REGISTER_MODE_WP: Final = 1 << 1
REGISTER_MODE_MINOR: Final = 1 << 2

COPY_MODE_DONTWAKE: Final = 1 << 0
ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0

# Bits of uffdio_register.ioctls / uffdio_api.ioctls: 1 << _UFFDIO_<name>.
IOCTL_REGISTER: Final = 1 << 0x00
IOCTL_UNREGISTER: Final = 1 << 0x01
IOCTL_WAKE: Final = 1 << 0x02
IOCTL_COPY: Final = 1 << 0x03
IOCTL_ZEROPAGE: Final = 1 << 0x04
IOCTL_API: Final = 1 << 0x3F


# --- struct layouts ---------------------------------------------------------------

class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdPagefaultFeat(ctypes.Union):
    _fields_ = [("ptid", ctypes.c_uint32)]


class UffdPagefault(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("address", ctypes.c_uint64),
                ("feat", UffdPagefaultFeat)]


class UffdFork(ctypes.Structure):
    _fields_ = [("ufd", ctypes.c_uint32)]


class UffdRemap(ctypes.Structure):
    _fields_ = [("from_", ctypes.c_uint64), ("to", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdRemove(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class UffdReserved(ctypes.Structure):
    _fields_ = [("reserved1", ctypes.c_uint64), ("reserved2", ctypes.c_uint64),
                ("reserved3", ctypes.c_uint64)]


class UffdMsgArg(ctypes.Union):
    _fields_ = [("pagefault", UffdPagefault), ("fork", UffdFork), ("remap", UffdRemap),
                ("remove", UffdRemove), ("reserved", UffdReserved)]


class UffdMsg(ctypes.Structure):
    _pack_ = 1  # the kernel declares it __packed
    _fields_ = [("event", ctypes.c_uint8), ("reserved1", ctypes.c_uint8),
                ("reserved2", ctypes.c_uint16), ("reserved3", ctypes.c_uint32),
                ("arg", UffdMsgArg)]


MSG_SIZE: Final = ctypes.sizeof(UffdMsg)

# One NumPy record per uffd_msg, so a whole read() batch is decoded in one call.
# Offsets are taken from the ctypes layout above, the single source of truth.
_PF_BASE: Final = UffdMsg.arg.offset + UffdMsgArg.pagefault.offset
_MSG_DTYPE: Final = np.dtype({
    "names": ["event", "flags", "address", "ptid"],
    "formats": ["u1", "<u8", "<u8", "<u4"],
    "offsets": [UffdMsg.event.offset, _PF_BASE + UffdPagefault.flags.offset,
                _PF_BASE + UffdPagefault.address.offset,
                _PF_BASE + UffdPagefault.feat.offset + UffdPagefaultFeat.ptid.offset],
    "itemsize": MSG_SIZE,
})


# --- ioctl request numbers (sizes from the ctypes types, see livemig.kernel.ioctl) ---

USERFAULTFD_IOC_NEW: Final = io(UFFD_API, 0x00)
UFFDIO_API: Final = iowr(UFFD_API, 0x3F, UffdioApi)
UFFDIO_REGISTER: Final = iowr(UFFD_API, 0x00, UffdioRegister)
UFFDIO_UNREGISTER: Final = ior(UFFD_API, 0x01, UffdioRange)
UFFDIO_WAKE: Final = ior(UFFD_API, 0x02, UffdioRange)
UFFDIO_COPY: Final = iowr(UFFD_API, 0x03, UffdioCopy)
UFFDIO_ZEROPAGE: Final = iowr(UFFD_API, 0x04, UffdioZeropage)


# --- libc entry points ------------------------------------------------------------
# CFUNCTYPE (not PYFUNCTYPE / PyDLL) so the GIL is released during the call, and
# use_errno so errno is captured right after the call, before Python can clobber it.
# Prototypes of our own: setting argtypes on a shared CDLL attribute would leak into
# other modules' use of the same libc handle.  IOCTL is public so that tests can check
# its calling convention; use the Userfaultfd methods to make calls.

_LIBC: Final = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IOCTL: Final = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, use_errno=True
)(("ioctl", _LIBC))
_syscall1: Final = ctypes.CFUNCTYPE(
    ctypes.c_long, ctypes.c_long, ctypes.c_long, use_errno=True
)(("syscall", _LIBC))


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """Issue one ioctl on ``arg``; return 0 or the errno (callers may need out-fields
    the kernel wrote even on failure, e.g. uffdio_copy.copy)."""
    # `arg` is referenced by this frame until the call returns: that keeps the
    # struct's memory alive while the kernel reads and writes it.
    if IOCTL(fd, request, ctypes.byref(arg)) < 0:
        return ctypes.get_errno()
    return 0


def feature_names(bits: int) -> list[str]:
    """Names of the UFFD_FEATURE_* bits set in ``bits`` (unknown bits as ``bit N``)."""
    names = []
    for n in range(64):
        if bits >> n & 1:
            names.append(_FEATURE_NAMES[n] if n < len(_FEATURE_NAMES) else f"bit {n}")
    return names


@dataclass(frozen=True, slots=True)
class PageFault:
    """One UFFD_EVENT_PAGEFAULT: a thread is blocked until ``address`` is placed.

    ``address`` is page aligned (huge-page aligned on hugetlbfs) unless
    FEATURE_EXACT_ADDRESS was requested; ``thread_id`` is 0 unless
    FEATURE_THREAD_ID was requested.
    """

    address: int
    flags: int
    thread_id: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WRITE)


def parse_messages(data: bytes) -> list[PageFault]:
    """Decode a read() batch of uffd_msg records; raise on anything but page faults."""
    if len(data) % MSG_SIZE:
        raise UffdError("read(userfaultfd)", errno.EIO,
                        f"{len(data)} bytes is not a whole number of {MSG_SIZE}-byte messages")
    msgs = np.frombuffer(data, dtype=_MSG_DTYPE)
    unexpected = np.flatnonzero(msgs["event"] != EVENT_PAGEFAULT)
    if unexpected.size:
        event = int(msgs["event"][unexpected[0]])
        index = event - EVENT_PAGEFAULT
        name = _EVENT_NAMES[index] if 0 <= index < len(_EVENT_NAMES) else "unknown"
        raise UffdError("read(userfaultfd)", errno.EPROTO,
                        f"unexpected event 0x{event:x} ({name}); only page faults were requested")
    return [PageFault(address=a, flags=f, thread_id=t) for a, f, t in zip(
        msgs["address"].tolist(), msgs["flags"].tolist(), msgs["ptid"].tolist(), strict=True)]


def _fill_outcome(op: str, err: int, filled: int, done: int, dst: int, length: int) -> int | None:
    """Interpret one UFFDIO_COPY/ZEROPAGE round.

    Returns the new ``done`` if the caller should go on (progress was made), or None
    when the kernel reported EEXIST for the page at ``dst + done``.
    """
    if err == 0:
        return length
    if filled > 0:
        # Partial fill (kernel returns EAGAIN): retry the remainder, as the kernel
        # stopped at a page that may now be fine or will give its own errno.
        return done + filled
    if err == errno.EEXIST:
        return None
    detail = f"dst=0x{dst + done:x} len=0x{length - done:x}"
    if err == errno.EAGAIN:
        detail += " (address space changing under a non-cooperative event)"
    raise UffdError(op, err, detail)


class Userfaultfd:
    """One userfaultfd file descriptor; each method is one kernel call."""

    def __init__(self, fd: int) -> None:
        """Adopt ``fd`` (closed by :meth:`close`); use :meth:`open` to create one."""
        self._fd = fd
        self._features: int | None = None

    # --- lifetime ---------------------------------------------------------------

    @classmethod
    def open(cls, flags: int = os.O_CLOEXEC | os.O_NONBLOCK, *,
             device: str = DEVICE_PATH) -> Self:
        """Create a userfaultfd: /dev/userfaultfd first, the syscall as fallback.

        The device is preferred because access to it (a file mode) grants handling
        of kernel-mode faults -- needed for KVM, whose vCPUs touch guest RAM from
        inside the kernel -- without CAP_SYS_PTRACE or vm.unprivileged_userfaultfd.
        """
        try:
            dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            dev_error = f"{device}: {exc.strerror}"
        else:
            try:
                fd = IOCTL(dev, USERFAULTFD_IOC_NEW, flags)
                dev_errno = ctypes.get_errno()
            finally:
                os.close(dev)
            if fd >= 0:
                return cls(fd)
            dev_error = f"{device}: USERFAULTFD_IOC_NEW: {os.strerror(dev_errno)}"
        fd = _syscall1(NR_USERFAULTFD_X86_64, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise UffdError("userfaultfd", err,
                            f"{dev_error}; the syscall fallback failed too (unprivileged "
                            "callers need vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE)")
        return cls(fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise UffdError("fileno", errno.EBADF, "the userfaultfd is closed")
        return self._fd

    def close(self) -> None:
        """Close the fd.  The kernel then wakes every thread still blocked on a fault
        in a range registered here; those faults are then served normally."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self._fd})"

    # --- handshake --------------------------------------------------------------

    @property
    def features(self) -> int | None:
        """The feature set granted by :meth:`api`, or None before the handshake."""
        return self._features

    def api(self, features: int = 0) -> int:
        """UFFDIO_API handshake; returns every feature the kernel offers (a superset of
        ``features``).  Raises UffdError naming any requested feature it lacks."""
        arg = UffdioApi(api=UFFD_API, features=features)
        err = _ioctl(self.fileno(), UFFDIO_API, arg)
        if err:
            raise UffdError("UFFDIO_API", err, self._api_failure_detail(err, features))
        self._features = int(arg.features)
        return self._features

    @staticmethod
    def _api_failure_detail(err: int, features: int) -> str:
        if err == errno.EPERM:
            return "EVENT_FORK needs CAP_SYS_PTRACE"
        if err != errno.EINVAL:
            return ""
        # The kernel zeroed its reply; ask a fresh fd what it would have offered.
        try:
            missing = features & ~Userfaultfd.supported_features()
        except UffdError:
            return "the handshake was refused (API mismatch or already done on this fd)"
        if missing:
            return "kernel lacks requested feature(s): " + ", ".join(feature_names(missing))
        return "the handshake was refused (UFFDIO_API is allowed once per fd)"

    @classmethod
    def supported_features(cls) -> int:
        """Features this kernel offers, via a handshake on a throwaway fd (the kernel
        allows one UFFDIO_API per fd), so callers can refuse early."""
        with cls.open() as probe:
            return probe.api(0)

    # --- ranges ------------------------------------------------------------------

    def register(self, addr: int, length: int, mode: int = REGISTER_MODE_MISSING) -> int:
        """UFFDIO_REGISTER; returns the IOCTL_* bits usable on the range (hugetlbfs
        ranges, for instance, lack IOCTL_ZEROPAGE).  The range must stay mapped while
        registered; unmapping it unregisters it implicitly."""
        arg = UffdioRegister(range=UffdioRange(start=addr, len=length), mode=mode)
        err = _ioctl(self.fileno(), UFFDIO_REGISTER, arg)
        if err:
            raise UffdError("UFFDIO_REGISTER", err,
                            f"addr=0x{addr:x} len=0x{length:x} mode=0x{mode:x}")
        return int(arg.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER; threads blocked on faults in the range are woken."""
        self._range_ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, addr, length)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads blocked on faults in the range (after DONTWAKE)."""
        self._range_ioctl("UFFDIO_WAKE", UFFDIO_WAKE, addr, length)

    def _range_ioctl(self, op: str, request: int, addr: int, length: int) -> None:
        err = _ioctl(self.fileno(), request, UffdioRange(start=addr, len=length))
        if err:
            raise UffdError(op, err, f"addr=0x{addr:x} len=0x{length:x}")

    # --- placing pages ------------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` to the registered ``dst``.

        Returns the bytes placed.  A result below ``length`` means the page at
        ``dst + result`` already existed (EEXIST, not an error: someone placed it
        first) and later pages were not examined -- place one page per call, as the
        postcopy code does, and it reads simply as "placed" vs "already there".

        ``src`` and ``dst`` are raw addresses: the caller's staging buffer and guest
        mapping must stay alive until this returns.  The ioctl runs without the GIL,
        so a long copy (a 1 GiB page) does not stall other Python threads.
        """
        mode = 0 if wake else COPY_MODE_DONTWAKE
        done = 0
        while done < length:
            arg = UffdioCopy(dst=dst + done, src=src + done, len=length - done, mode=mode)
            err = _ioctl(self.fileno(), UFFDIO_COPY, arg)
            nxt = _fill_outcome("UFFDIO_COPY", err, int(arg.copy), done, dst, length)
            if nxt is None:
                break
            done = nxt
        return done

    def copy_runs(self, dsts: Sequence[int], srcs: Sequence[int],
                  lengths: Sequence[int]) -> list[int]:
        """:meth:`copy` of several runs, ``lengths[i]`` bytes from ``srcs[i]`` to
        ``dsts[i]``: one call per run, as many calls as :meth:`copy` would make but
        in one loop over one struct, so that scattered 4 KiB pages cost a system call
        each and little Python.  Returns the bytes placed per run, with the same
        EEXIST convention."""
        arg = UffdioCopy(mode=0)
        ref, fd = ctypes.byref(arg), self.fileno()
        placed = []
        for dst, src, n in zip(dsts, srcs, lengths, strict=True):
            arg.dst, arg.src, arg.len = dst, src, n
            if IOCTL(fd, UFFDIO_COPY, ref) == 0:
                placed.append(n)
                continue
            nxt = _fill_outcome("UFFDIO_COPY", ctypes.get_errno(), int(arg.copy), 0, dst, n)
            placed.append(0 if nxt is None else nxt + self.copy(dst + nxt, src + nxt, n - nxt))
        return placed

    def zeropage_runs(self, addrs: Sequence[int], lengths: Sequence[int]) -> list[int]:
        """:meth:`zeropage` of several runs, as :meth:`copy_runs` does for copies."""
        arg = UffdioZeropage(mode=0)
        rng, ref, fd = arg.range, ctypes.byref(arg), self.fileno()  # rng: a view of arg
        placed = []
        for addr, n in zip(addrs, lengths, strict=True):
            rng.start, rng.len = addr, n
            if IOCTL(fd, UFFDIO_ZEROPAGE, ref) == 0:
                placed.append(n)
                continue
            nxt = _fill_outcome("UFFDIO_ZEROPAGE", ctypes.get_errno(), int(arg.zeropage), 0,
                                addr, n)
            placed.append(0 if nxt is None else nxt + self.zeropage(addr + nxt, n - nxt))
        return placed

    def zeropage(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zero pages; returns bytes placed, with the same EEXIST
        convention as :meth:`copy`.  ``addr`` is guest memory the caller keeps mapped."""
        mode = 0 if wake else ZEROPAGE_MODE_DONTWAKE
        done = 0
        while done < length:
            arg = UffdioZeropage(range=UffdioRange(start=addr + done, len=length - done),
                                 mode=mode)
            err = _ioctl(self.fileno(), UFFDIO_ZEROPAGE, arg)
            nxt = _fill_outcome("UFFDIO_ZEROPAGE", err, int(arg.zeropage), done, addr, length)
            if nxt is None:
                break
            done = nxt
        return done

    # --- events ------------------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[PageFault]:
        """Read up to ``max_events`` pending faults in one read(); [] if none is
        pending on a non-blocking fd (a blocking fd waits for at least one)."""
        try:
            data = os.read(self.fileno(), max_events * MSG_SIZE)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise UffdError("read(userfaultfd)", exc.errno or errno.EIO) from exc
        return parse_messages(data)
