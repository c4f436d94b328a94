"""What livemig shares with its helper processes: memory, a lock, and reads of the
parent's memory.

Theory of operation
-------------------
Postcopy's urgent path runs in helper processes (``migration/helper.py``): a Python
thread woken by a fault would otherwise wait for the GIL held by the thread streaming
background pages.  A helper and its parent share state through a :class:`SharedMemory`
(a memfd mapped shared by both, NumPy arrays laid over it) and guard it with a
:class:`ProcessLock`.  The source's urgent helper reads guest RAM from the VMM's memfd
when it has one (``4K-memfd`` and hugetlb backings: mapped, sent with no copy) or, for
private anonymous RAM, through :class:`ProcessMemory` (``/proc/PID/mem``: a kernel copy
into the helper's buffer).

What lies in shared memory is described once, by a :class:`SharedLayout`: a list of
named fields (name, dtype, shape) from which it computes each field's aligned offset
and the total size.  Both processes build the same layout from the same inputs and get
the same named NumPy views (:meth:`SharedLayout.views`), so no offset is computed by
hand and no array is found by position.  Counters are one field whose dtype is a record
of named int64s (:func:`counters_field`), read and bumped by name through
:class:`Counters`.  :meth:`SharedLayout.private` gives the same views over private
memory, for a migration that does not share its state with a helper: one code path
either way.
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from math import prod
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


@dataclass(frozen=True)
class Field:
    """One named array of a :class:`SharedLayout`: ``shape`` items of ``dtype``."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, dtype: npt.DTypeLike, shape: int | Sequence[int]) -> Field:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"field {name!r} has a negative dimension: {dims}")
        return cls(name, np.dtype(dtype), dims)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * prod(self.shape)


def counters_field(name: str, names: Sequence[str]) -> Field:
    """A field holding one int64 per name, read and bumped through :class:`Counters`."""
    if not names:
        raise ValueError(f"counters field {name!r} has no counters")
    return Field.of(name, np.dtype([(n, np.int64) for n in names]), ())


def grouped(prefix: str, fields: Iterable[Field]) -> list[Field]:
    """``fields`` renamed ``prefix/name``: one group (a RAM block's arrays, say) of a
    layout, read back with :meth:`SharedViews.group`."""
    out = []
    for f in fields:
        if "/" in f.name:
            raise ValueError(f"field name {f.name!r} of group {prefix!r} contains '/'")
        out.append(Field(f"{prefix}/{f.name}", f.dtype, f.shape))
    return out


class SharedLayout:
    """Named fields packed in order into one buffer, each at an ``align``-byte
    boundary (8 by default: every NumPy scalar type is then naturally aligned, as the
    mapping itself is page aligned)."""

    def __init__(self, fields: Iterable[Field], *, align: int = 8) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        self.fields = tuple(fields)
        self.align = align
        offsets: dict[str, int] = {}
        offset = 0
        for f in self.fields:
            if f.name in offsets:
                raise ValueError(f"field {f.name!r} is declared twice")
            offsets[f.name] = offset
            offset += -(-f.nbytes // align) * align
        self.offsets: Mapping[str, int] = offsets
        self.size = offset

    def views(self, memory: SharedMemory) -> SharedViews:
        """The named views over ``memory`` (writes are seen by every process mapping
        it).  ``memory`` must be at least :attr:`size` bytes."""
        if memory.size < self.size:
            raise ValueError(f"shared memory of {memory.size} bytes is smaller than the "
                             f"{self.size} bytes of its layout")
        return self._views(memory.array(0, np.uint8, self.size))

    def private(self) -> SharedViews:
        """The same views over zeroed private memory (nothing shared)."""
        return self._views(np.zeros(self.size, dtype=np.uint8))

    def create(self, name: str) -> tuple[SharedMemory, SharedViews]:
        """A new memfd of :attr:`size` bytes (zeroed) and the views over it."""
        memory = SharedMemory.create(name, self.size)
        return memory, self.views(memory)

    def _views(self, raw: npt.NDArray[np.uint8]) -> SharedViews:
        arrays = {}
        for f in self.fields:
            at = self.offsets[f.name]
            arrays[f.name] = raw[at : at + f.nbytes].view(f.dtype).reshape(f.shape)
        return SharedViews(arrays)


class SharedViews(Mapping[str, npt.NDArray[Any]]):
    """The arrays of a :class:`SharedLayout`, by field name."""

    def __init__(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        self._arrays = arrays

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def group(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        """The fields declared with :func:`grouped` under ``prefix``, by their own name."""
        lead = f"{prefix}/"
        return {name[len(lead):]: a for name, a in self._arrays.items()
                if name.startswith(lead) and "/" not in name[len(lead):]}

    def counters(self, name: str) -> Counters:
        return Counters(self._arrays[name])

    def release(self) -> None:
        """Drop the views, so the shared memory can be unmapped."""
        self._arrays.clear()


class Counters:
    """Named int64 counters over a :func:`counters_field` (shared or private).

    Each counter must have one writer (a thread or a process); any process may read.
    """

    def __init__(self, record: npt.NDArray[Any]) -> None:
        names = record.dtype.names
        if names is None or record.shape != ():
            raise ValueError("Counters need a field made by counters_field()")
        self.names: tuple[str, ...] = names
        # One 0-d int64 view per counter: add() is then one in-place NumPy add.
        self._cells: dict[str, npt.NDArray[np.int64]] = {n: record[n] for n in names}

    def add(self, name: str, n: int = 1) -> None:
        cell = self._cells[name]
        cell += n

    def __getitem__(self, name: str) -> int:
        return int(self._cells[name])

    def as_dict(self) -> dict[str, int]:
        return {n: int(c) for n, c in self._cells.items()}


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
    the GIL released; the same permission as ptrace, which the VMM's own helper has).

    The file is opened at the first read: a helper whose guest RAM is all memfds (which
    it maps) never opens it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1

    def _file(self) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise MemoryMapError(f"open /proc/{self.pid}/mem",
                                     e.errno or errno.EIO) from None
        return self._fd

    def read_into(self, address: int, into: memoryview) -> None:
        """Fill ``into`` with the bytes at ``address`` of the process."""
        try:
            n = os.preadv(self._file(), [into], address)
        except OSError as e:
            raise MemoryMapError(f"read {len(into)} bytes at {address:#x} of pid {self.pid}",
                                 e.errno or errno.EIO) from None
        if n != len(into):
            raise MemoryMapError(f"read {len(into)} bytes at {address:#x} of pid "
                                 f"{self.pid}", errno.EFAULT, f"got {n}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Get SIGKILL when the thread that started this process exits: a helper must
    never outlive the migration it serves."""
    if _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise KernelError("prctl(PR_SET_PDEATHSIG)", ctypes.get_errno())
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)
