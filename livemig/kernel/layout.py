"""The byte layout of the kernel structs livemig saves, as plain data.

Theory of operation
-------------------
Saved vCPU state carries some register groups as the kernel's own struct bytes
(:data:`~livemig.kernel.kvm.VCPU_STATE_STRUCTS`).  Tools that show a stream (the VM
description after EOF, QEMU's ``analyze-migration.py``) need those bytes named field by
field.  The ctypes mirrors in :mod:`livemig.kernel.kvm` already know every field's name,
offset and size; :func:`struct_layout` reads them once into :class:`FieldLayout` values,
so no code outside ``kernel/`` touches ctypes.  Padding the compiler inserts between
fields becomes an explicit ``padding@OFFSET`` field, so the fields always cover the
struct's bytes exactly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Final

from livemig.kernel.kvm import VCPU_STATE_STRUCTS


@dataclass(frozen=True)
class FieldLayout:
    """One field: ``count`` elements of ``size`` bytes each (little-endian integers,
    byte arrays, or a nested struct with its own ``fields``)."""

    name: str
    size: int
    count: int = 1
    struct_name: str = ""  # set for a nested struct
    fields: tuple[FieldLayout, ...] = ()


def struct_layout(cls: type[ctypes.Structure]) -> tuple[FieldLayout, ...]:
    """The fields of ``cls`` in memory order, padding included."""
    out: list[FieldLayout] = []
    pos = 0
    for name, ctype in cls._fields_:  # type: ignore[misc]
        desc = getattr(cls, name)
        if desc.offset > pos:
            out.append(FieldLayout(f"padding@{pos}", 1, desc.offset - pos))
        out.append(_field(name, ctype))
        pos = desc.offset + desc.size
    if ctypes.sizeof(cls) > pos:
        out.append(FieldLayout(f"padding@{pos}", 1, ctypes.sizeof(cls) - pos))
    return tuple(out)


def _field(name: str, ctype: Any) -> FieldLayout:
    count = 1
    if issubclass(ctype, ctypes.Array):
        count, ctype = ctype._length_, ctype._type_
    if issubclass(ctype, ctypes.Structure):
        return FieldLayout(name, ctypes.sizeof(ctype), count, ctype.__name__,
                           struct_layout(ctype))
    return FieldLayout(name, ctypes.sizeof(ctype), count)


VCPU_STATE_LAYOUTS: Final[dict[str, tuple[FieldLayout, ...]]] = {
    name: struct_layout(cls) for name, cls in VCPU_STATE_STRUCTS.items()}
