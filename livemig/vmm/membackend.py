"""Guest RAM given the QEMU way: a ``memory-backend-memfd`` object and the machine
property that names it.

Theory of operation
-------------------
QEMU users choose a shared guest RAM backing with two options::

    -object memory-backend-memfd,id=ram0,size=1G,share=on[,hugetlb=on,hugetlbsize=2M]
    -machine memory-backend=ram0

``livemig run`` takes the same two (``--object``, ``--machine``).  A livemig VM has one
RAM block, so the backend the machine names *is* guest RAM: its properties become the
VM's :class:`~livemig.kernel.mman.Backing` (``4K-memfd`` without ``hugetlb``, ``2M`` /
``1G`` with it), its size and its preallocation.  :class:`MemoryBackend` is that
object, parsed once (:meth:`MemoryBackend.from_object`) and written back
(:meth:`MemoryBackend.qemu_object`) for the command lines livemig builds itself (the
demo, the benchmarks' livemig and QEMU peers): one spelling for both VMMs.

A memfd is shared by definition here (QEMU's default for this backend, ``share=on``):
livemig's helper processes map it, which is why one uses it.  ``share=off`` is refused
rather than silently mapped private.  Properties livemig does not implement (``seal``,
``host-nodes``, ...) are refused with QEMU's "Parameter ... is unexpected".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from livemig.errors import ConfigError
from livemig.kernel.mman import Backing
from livemig.objects import object_flag
from livemig.units import MIB
from livemig.vmm.vm import parse_size

MEMFD_TYPE: Final = "memory-backend-memfd"
_PROPERTIES: Final = frozenset({"size", "share", "hugetlb", "hugetlbsize", "prealloc"})
_HUGETLB: Final = {b.host_page_size: b for b in (Backing.HUGETLB_2M, Backing.HUGETLB_1G)}


@dataclass(frozen=True)
class MemoryBackend:
    """One ``memory-backend-memfd`` object: guest RAM once the machine names it."""

    id: str
    size: int
    backing: Backing
    prealloc: bool = False

    @classmethod
    def is_memory_backend(cls, qom_type: str) -> bool:
        return qom_type.startswith("memory-backend-")

    @classmethod
    def from_object(cls, qom_type: str, props: Mapping[str, Any]) -> MemoryBackend:
        if qom_type != MEMFD_TYPE:
            raise ConfigError(f"livemig backs guest RAM with {MEMFD_TYPE} objects only "
                              f"(or --page-size), not {qom_type!r}")
        oid = str(props.get("id", ""))
        if not oid:
            raise ConfigError("Parameter 'id' is missing")
        unknown = sorted(set(props) - _PROPERTIES - {"id"})
        if unknown:
            raise ConfigError(f"Parameter '{unknown[0]}' is unexpected")
        if "size" not in props:
            raise ConfigError("Parameter 'size' is missing")
        if not object_flag("share", props.get("share", "on")):
            raise ConfigError(f"{MEMFD_TYPE} '{oid}': livemig maps a memfd shared only "
                              "(share=on); use --page-size 4K for private RAM")
        backing = Backing.MEMFD_4K
        if object_flag("hugetlb", props.get("hugetlb", "off")):
            size = parse_size(str(props.get("hugetlbsize", "2M")))
            if size not in _HUGETLB:
                raise ConfigError(f"{MEMFD_TYPE} '{oid}': hugetlbsize must be 2M or 1G")
            backing = _HUGETLB[size]
        elif "hugetlbsize" in props:
            raise ConfigError(f"{MEMFD_TYPE} '{oid}': hugetlbsize needs hugetlb=on")
        return cls(oid, parse_size(str(props["size"])), backing,
                   object_flag("prealloc", props.get("prealloc", "off")))

    def qemu_object(self) -> str:
        """The ``-object`` / ``--object`` text of this backend."""
        spec = f"{MEMFD_TYPE},id={self.id},size={self.size // MIB}M,share=on"
        if self.backing.is_hugetlb:
            spec += f",hugetlb=on,hugetlbsize={self.backing.value}"
        return spec + (",prealloc=on" if self.prealloc else "")

    def command_args(self, dash: str = "--") -> list[str]:
        """Both options, as ``livemig run`` (``--``) and QEMU (``-``) take them."""
        return [f"{dash}object", self.qemu_object(),
                f"{dash}machine", f"memory-backend={self.id}"]


def machine_memory_backend(spec: str | None) -> str | None:
    """The backend id of ``--machine memory-backend=ID`` (the only machine property
    livemig has)."""
    if spec is None:
        return None
    key, eq, value = spec.partition("=")
    if key != "memory-backend" or not eq or not value:
        raise ConfigError(f"--machine {spec!r}: livemig knows only memory-backend=ID")
    return value


def guest_ram_backend(objects: Mapping[str, MemoryBackend], machine: str | None
                      ) -> MemoryBackend | None:
    """The backend ``--machine memory-backend=ID`` names (None: --page-size decides)."""
    wanted = machine_memory_backend(machine)
    unused = sorted(set(objects) - {wanted})
    if unused:
        raise ConfigError(f"memory backend '{unused[0]}' is not used: name it with "
                          f"--machine memory-backend={unused[0]}")
    if wanted is None:
        return None
    if wanted not in objects:
        raise ConfigError(f"Memory backend '{wanted}' not found")
    return objects[wanted]


def run_memory_args(backing: Backing, mem_mib: int, prealloc: bool = False) -> list[str]:
    """``livemig run`` options for guest RAM of ``mem_mib`` MiB with ``backing``: a
    memory-backend-memfd object for ``4K-memfd`` (the one backing without a page size
    of its own), ``--page-size`` otherwise."""
    if backing is Backing.MEMFD_4K:
        return MemoryBackend("ram0", mem_mib * MIB, backing, prealloc).command_args()
    return ["--mem", f"{mem_mib}M", "--page-size", backing.value,
            *(["--mem-prealloc"] if prealloc else [])]
