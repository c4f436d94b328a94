"""The VM description QEMU writes after the end of a stream (``QEMU_VM_VMDESCRIPTION``).

Theory of operation
-------------------
After ``QEMU_VM_EOF`` a precopy (or ``file:``) stream may carry one more record: the
byte ``0x06``, a ``be32`` length, then that many bytes of JSON describing every device
section of the stream field by field, in the shape of QEMU's vmstate descriptions::

    {"page_size": 4096,
     "devices": [{"name": "livemig/serial", "instance_id": 0, "vmsd_name": "serial",
                  "version": 1,
                  "fields": [{"name": "length", "type": "uint32", "size": 4}, ...]}]}

A field is ``{"name", "type", "size"}``; ``"array_len": n`` repeats it ``n`` times;
type ``"struct"`` carries ``"struct": {"vmsd_name", "version", "fields"}`` instead of
reading ``size`` bytes itself.  Nothing reads this to load a VM: it exists so tools
such as QEMU's ``scripts/analyze-migration.py`` can show what a stream holds.

:class:`VmDescription` is the parsed, validated form; :meth:`VmDescription.encode`
produces the JSON and :func:`parse_description` checks JSON from the wire strictly
(shape, types, sizes, nesting depth), raising :class:`RemoteProtocolError`.  Both sides
use :func:`described_size` to check that a device's fields cover its section exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from livemig.errors import RemoteProtocolError

MAX_DEPTH = 8  # struct nesting a description may use
MAX_FIELDS = 1 << 16  # fields (after unfolding arrays) in one device
_SCALAR_TYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "buffer", "unused_buffer", "bitmap",
})
_INT_SIZES = {"int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
              "uint32": 4, "uint64": 8, "bool": 1}

Field = Mapping[str, Any]


def field(name: str, kind: str, size: int, count: int = 1) -> dict[str, Any]:
    """One scalar field (``count`` > 1: an array of them)."""
    out: dict[str, Any] = {"name": name, "type": kind, "size": size}
    if count != 1:
        out["array_len"] = count
    return out


def struct_field(name: str, vmsd_name: str, fields: Sequence[Field],
                 count: int = 1) -> dict[str, Any]:
    """A nested struct field (``count`` > 1: an array of structs)."""
    size = described_size(fields)
    out: dict[str, Any] = {"name": name, "type": "struct", "size": size,
                           "struct": {"vmsd_name": vmsd_name, "version": 1,
                                      "fields": list(fields)}}
    if count != 1:
        out["array_len"] = count
    return out


@dataclass(frozen=True)
class DeviceDescription:
    """One device section, as the description lists it."""

    name: str
    instance_id: int
    version: int
    fields: tuple[Field, ...]
    vmsd_name: str = ""

    @property
    def size(self) -> int:
        """Bytes of the section body the fields describe."""
        return described_size(self.fields)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "instance_id": self.instance_id,
                "vmsd_name": self.vmsd_name or self.name, "version": self.version,
                "fields": list(self.fields)}


@dataclass(frozen=True)
class VmDescription:
    page_size: int
    devices: tuple[DeviceDescription, ...]

    def encode(self) -> bytes:
        doc = {"page_size": self.page_size, "devices": [d.to_json() for d in self.devices]}
        return json.dumps(doc, separators=(",", ":")).encode("ascii")


def described_size(fields: Sequence[Field]) -> int:
    """Bytes covered by ``fields`` (arrays and nested structs included)."""
    return sum(int(f["size"]) * int(f.get("array_len", 1)) for f in fields)


def parse_description(raw: bytes) -> VmDescription:
    """Check ``raw`` is a well-formed description and return it parsed."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"The VM description is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError("The VM description is not a JSON object.")
    page_size: Any = doc.get("page_size")
    devices: Any = doc.get("devices")
    if not _is_int(page_size) or not isinstance(devices, list):
        raise RemoteProtocolError("The VM description needs an integer 'page_size' and a "
                                  "'devices' list.")
    return VmDescription(int(page_size), tuple(_device(d) for d in devices))


def _device(d: Any) -> DeviceDescription:
    if not isinstance(d, dict):
        raise RemoteProtocolError("A device of the VM description is not an object.")
    name: Any = d.get("name")
    instance: Any = d.get("instance_id")
    version: Any = d.get("version")
    if not isinstance(name, str) or not _is_int(instance) or not _is_int(version):
        raise RemoteProtocolError("A device of the VM description lacks its name, "
                                  "instance_id or version.")
    vmsd_name = d.get("vmsd_name", name)
    if not isinstance(vmsd_name, str):
        raise RemoteProtocolError(f"Device {name!r}: 'vmsd_name' is not a string.")
    fields = d.get("fields")
    budget = [MAX_FIELDS]
    _check_fields(fields, name, 0, budget)
    assert isinstance(fields, list)
    return DeviceDescription(name, int(instance), int(version), tuple(fields), vmsd_name)


def _check_fields(fields: Any, device: str, depth: int, budget: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise RemoteProtocolError(f"Device {device!r}: structs nest deeper than {MAX_DEPTH}.")
    if not isinstance(fields, list):
        raise RemoteProtocolError(f"Device {device!r}: 'fields' is not a list.")
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise RemoteProtocolError(f"Device {device!r}: a field has no name.")
        kind, size, count = f.get("type"), f.get("size"), f.get("array_len", 1)
        if not _is_int(size) or not _is_int(count) or count < 1:
            raise RemoteProtocolError(f"Device {device!r}: field {f['name']!r} has no valid "
                                      "size or array length.")
        budget[0] -= count
        if budget[0] < 0:
            raise RemoteProtocolError(f"Device {device!r} has more than {MAX_FIELDS} fields.")
        if kind == "struct":
            inner = f.get("struct")
            if not isinstance(inner, dict):
                raise RemoteProtocolError(f"Device {device!r}: struct field {f['name']!r} "
                                          "has no 'struct'.")
            _check_fields(inner.get("fields"), device, depth + 1, budget)
            if described_size(inner["fields"]) != size:
                raise RemoteProtocolError(f"Device {device!r}: struct field {f['name']!r} "
                                          "is not the size of its fields.")
        elif kind not in _SCALAR_TYPES:
            raise RemoteProtocolError(f"Device {device!r}: field {f['name']!r} has unknown "
                                      f"type {kind!r}.")
        elif kind in _INT_SIZES and size != _INT_SIZES[kind]:
            raise RemoteProtocolError(f"Device {device!r}: field {f['name']!r} of type "
                                      f"{kind} has size {size}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32
