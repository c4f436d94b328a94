"""What livemig shares with its helper processes: memory, a lock, and reads of the
parent's memory.

Theory of operation
-------------------
Postcopy's urgent path runs in helper processes (``migration/helper.py``): a Python
thread woken by a fault would otherwise wait for the GIL held by the thread streaming
background pages.  A helper and its parent share state through a :class:`SharedMemory`
(a memfd mapped shared by both, NumPy arrays laid over it) and guard it with a
:class:`ProcessLock`.  The source's helper reads guest RAM either from a shared memfd
(hugetlb backings) or, for private anonymous RAM, through :class:`ProcessMemory`
(``/proc/PID/mem``: one copy of at most one host page).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import KernelError, MemoryMapError

log = logging.getLogger("livemig.shared")

_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
# struct flock on Linux x86-64: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = "hhqqi4x"


class SharedMemory:
    """A memfd mapped shared; hand :attr:`fd` to a helper, which calls :meth:`attach`."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, max(size, 1))
        except OSError as e:
            raise MemoryMapError("memfd_create (shared state)", e.errno or errno.EIO) from None
        return cls(fd, max(size, 1))

    @classmethod
    def attach(cls, fd: int, size: int) -> SharedMemory:
        return cls(fd, size)

    def array(self, offset: int, dtype: Any, count: int) -> npt.NDArray[Any]:
        """``count`` items of ``dtype`` at byte ``offset`` (a view: writes are shared)."""
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        """Close the memfd and unmap.  A NumPy view still alive somewhere keeps the
        mapping (it goes with the last view): say so, but do not fail a cleanup."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self._mm.close()
        except BufferError:
            log.warning("shared memory still has views; it is unmapped when they go")


class ProcessLock:
    """Mutual exclusion between processes (an open-file-description lock on a memfd)
    and between the threads of this process (a threading lock, as OFD locks do not
    exclude threads that share the description)."""

    def __init__(self, fd: int) -> None:
        # Our own open file description: locks held through another one exclude us.
        self._fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        self._thread_lock = threading.Lock()
        self._lock = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        self._unlock = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)

    def __enter__(self) -> ProcessLock:
        self._thread_lock.acquire()
        try:
            fcntl.fcntl(self._fd, _F_OFD_SETLKW, self._lock)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.fcntl(self._fd, _F_OFD_SETLKW, self._unlock)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        os.close(self._fd)


class ProcessMemory:
    """Reads another process's memory through ``/proc/PID/mem`` (one ``preadv`` a read,
    the GIL released; the same permission as ptrace, which the VMM's own helper has)."""

    def __init__(self, pid: int) -> None:
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MemoryMapError(f"open /proc/{pid}/mem", e.errno or errno.EIO) from None
        self.pid = pid

    def read_into(self, address: int, into: memoryview) -> None:
        """Fill ``into`` with the bytes at ``address`` of the process."""
        try:
            n = os.preadv(self._fd, [into], address)
        except OSError as e:
            raise MemoryMapError(f"read {len(into)} bytes at {address:#x} of pid {self.pid}",
                                 e.errno or errno.EIO) from None
        if n != len(into):
            raise MemoryMapError(f"read {len(into)} bytes at {address:#x} of pid "
                                 f"{self.pid}", errno.EFAULT, f"got {n}")

    def close(self) -> None:
        os.close(self._fd)


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Get SIGKILL when the thread that started this process exits: a helper must
    never outlive the migration it serves."""
    if _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise KernelError("prctl(PR_SET_PDEATHSIG)", ctypes.get_errno())
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)
