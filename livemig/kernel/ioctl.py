"""ioctl request numbers, encoded once as ``<asm-generic/ioctl.h>`` does.

Theory of operation
-------------------
A Linux ioctl request number packs four things into 32 bits: the direction of the
data transfer (2 bits), the size of the argument (14 bits), the driver's "type" byte
(``0xAE`` for KVM, ``0xAA`` for userfaultfd) and the command number (8 bits).  The C
macros ``_IO``/``_IOR``/``_IOW``/``_IOWR`` take the argument's *type*, not its size;
:func:`ior`, :func:`iow` and :func:`iowr` do the same with a ctypes type, so the size
encoded in a request is always ``ctypes.sizeof`` of the structure the binding passes
and can never drift from it.  The kernel bindings (:mod:`livemig.kernel.kvm`,
:mod:`livemig.kernel.uffd`) build their request tables with these helpers.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

NRBITS: Final = 8
TYPEBITS: Final = 8
SIZEBITS: Final = 14
DIRBITS: Final = 2

NRSHIFT: Final = 0
TYPESHIFT: Final = NRSHIFT + NRBITS
SIZESHIFT: Final = TYPESHIFT + TYPEBITS
DIRSHIFT: Final = SIZESHIFT + SIZEBITS

IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2

# What ctypes.sizeof accepts: a ctypes type (Structure, Union, Array or scalar).
CType = type[Any]


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``; raises ValueError if a part does not fit its bits."""
    for what, value, bits in (("direction", direction, DIRBITS), ("type", kind, TYPEBITS),
                              ("nr", nr, NRBITS), ("size", size, SIZEBITS)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"ioctl {what} {value:#x} does not fit in {bits} bits")
    return (direction << DIRSHIFT) | (size << SIZESHIFT) | (kind << TYPESHIFT) | (nr << NRSHIFT)


def io(kind: int, nr: int) -> int:
    """``_IO(type, nr)``: no argument, or a plain integer argument."""
    return ioc(IOC_NONE, kind, nr, 0)


def ior(kind: int, nr: int, argtype: CType) -> int:
    """``_IOR(type, nr, argtype)``: the kernel writes an ``argtype`` back."""
    return ioc(IOC_READ, kind, nr, ctypes.sizeof(argtype))


def iow(kind: int, nr: int, argtype: CType) -> int:
    """``_IOW(type, nr, argtype)``: the kernel reads an ``argtype``."""
    return ioc(IOC_WRITE, kind, nr, ctypes.sizeof(argtype))


def iowr(kind: int, nr: int, argtype: CType) -> int:
    """``_IOWR(type, nr, argtype)``: the kernel reads and writes an ``argtype``."""
    return ioc(IOC_READ | IOC_WRITE, kind, nr, ctypes.sizeof(argtype))

