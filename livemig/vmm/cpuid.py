"""The CPUID table each vCPU sees: the host's supported leaves, per-vCPU ids, features hidden.

Theory of operation
-------------------
``KVM_GET_SUPPORTED_CPUID`` returns every leaf KVM can present to a guest on this host
(a ``kvm_cpuid2`` header and 40-byte ``kvm_cpuid_entry2`` records).  A VMM must then make
the table *per vCPU*: the initial APIC id lives in leaf 1 ``EBX[31:24]`` and the x2APIC id
in leaf 0xB ``EDX`` (and on AMD leaf 0x8000001E ``EAX``); leaf 1 ``EBX[23:16]`` is the
number of logical processors in the package.  livemig presents one package with one core
per vCPU and APIC id == vCPU index.

Some hosts cannot run every instruction they advertise (a nested KVM whose instruction
emulator lacks ``popcnt`` or ``xsave``): :data:`FEATURES` names CPUID bits, and a
:class:`CpuidPolicy` clears the ones named in ``hide`` in every vCPU's table.  The table is
set with ``KVM_SET_CPUID2`` once, before the vCPU first runs (the first step of a restore,
as in Firecracker and QEMU).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from livemig.errors import ConfigError

_HEADER = struct.Struct("<II")  # nent, padding
_ENTRY = struct.Struct("<7I12x")  # function, index, flags, eax, ebx, ecx, edx, padding
_REGS = ("eax", "ebx", "ecx", "edx")

# name -> (leaf, subleaf, register, bit)
FEATURES: Final[dict[str, tuple[int, int, str, int]]] = {
    "popcnt": (1, 0, "ecx", 23),
    "x2apic": (1, 0, "ecx", 21),
    "tsc-deadline": (1, 0, "ecx", 24),
    "xsave": (1, 0, "ecx", 26),
    "avx": (1, 0, "ecx", 28),
    "rdrand": (1, 0, "ecx", 30),
    "cx16": (1, 0, "ecx", 13),
    "smap": (7, 0, "ebx", 20),
    "smep": (7, 0, "ebx", 7),
    "pku": (7, 0, "ecx", 3),
    "kvmclock": (0x40000001, 0, "eax", 3),  # KVM_FEATURE_CLOCKSOURCE2
    "kvm-pv-eoi": (0x40000001, 0, "eax", 6),
}


@dataclass
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class CpuidPolicy:
    """What a VM's vCPUs are told: ``hide`` names entries of :data:`FEATURES` to clear."""

    hide: frozenset[str] = field(default_factory=frozenset)

    def validate(self) -> None:
        unknown = sorted(self.hide - FEATURES.keys())
        if unknown:
            raise ConfigError(f"unknown CPUID feature(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(FEATURES))}")

    def table_for(self, supported: bytes, vcpu: int, nvcpus: int) -> bytes:
        """The raw ``kvm_cpuid2`` for vCPU ``vcpu`` of ``nvcpus``."""
        entries = parse(supported)
        for e in entries:
            if e.function == 1:
                e.ebx = (e.ebx & 0x0000FFFF) | (vcpu << 24) | (min(nvcpus, 255) << 16)
                e.edx |= 1 << 28 if nvcpus > 1 else 0  # HTT: the count field is valid
            elif e.function == 0xB:
                e.edx = vcpu
            elif e.function == 0x8000001E:
                e.eax = vcpu
        for name in sorted(self.hide):
            leaf, sub, reg, bit = FEATURES[name]
            for e in entries:
                if e.function == leaf and e.index == sub:
                    setattr(e, reg, getattr(e, reg) & ~(1 << bit))
        return encode(entries)


def parse(raw: bytes) -> list[CpuidEntry]:
    (nent, _) = _HEADER.unpack_from(raw)
    return [CpuidEntry(*_ENTRY.unpack_from(raw, _HEADER.size + i * _ENTRY.size))
            for i in range(nent)]


def encode(entries: list[CpuidEntry]) -> bytes:
    return _HEADER.pack(len(entries), 0) + b"".join(
        _ENTRY.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries)


def lookup(raw: bytes, function: int, index: int = 0) -> CpuidEntry | None:
    for e in parse(raw):
        if e.function == function and e.index == index:
            return e
    return None



# CR4 bits that exist only with a CPUID feature: bit -> (leaf, sub-leaf, register, bit).
CR4_FEATURES: dict[int, tuple[int, int, str, int]] = {
    0: (1, 0, "edx", 1), 1: (1, 0, "edx", 1),  # VME, PVI: VME
    2: (1, 0, "edx", 4), 3: (1, 0, "edx", 2),  # TSD: TSC; DE
    4: (1, 0, "edx", 3), 5: (1, 0, "edx", 6),  # PSE; PAE
    6: (1, 0, "edx", 7), 7: (1, 0, "edx", 13),  # MCE; PGE
    9: (1, 0, "edx", 24), 10: (1, 0, "edx", 25),  # OSFXSR: FXSR; OSXMMEXCPT: SSE
    11: (7, 0, "ecx", 2), 12: (7, 0, "ecx", 16),  # UMIP; LA57
    13: (1, 0, "ecx", 5), 14: (1, 0, "ecx", 6),  # VMXE; SMXE
    16: (7, 0, "ebx", 0), 17: (1, 0, "ecx", 17),  # FSGSBASE; PCIDE
    18: (1, 0, "ecx", 26), 19: (7, 0, "ecx", 23),  # OSXSAVE; KL
    20: (7, 0, "ebx", 7), 21: (7, 0, "ebx", 20),  # SMEP; SMAP
    22: (7, 0, "ecx", 3), 23: (7, 0, "ecx", 7),  # PKE; CET: shadow stacks
    24: (7, 0, "ecx", 31), 25: (7, 0, "edx", 5),  # PKS; UINTR
    28: (7, 1, "eax", 26),  # LAM_SUP
}
CR4_ALWAYS = 1 << 8  # PCE
CR4_OSXSAVE = 1 << 18


@dataclass(frozen=True)
class HostCpu:
    """What a saved vCPU may use on this VM (from the CPUID its vCPUs are given, KVM's
    supported CPUID less hidden features): the XCR0 state components, the physical
    address width, the CR4 bits (the VM keeps those of them its vCPU takes, see
    ``Vm._settable_cr4``)."""

    xcr0: int
    phys_bits: int
    cr4: int

    @classmethod
    def from_cpuid(cls, raw: bytes) -> HostCpu:
        xsave = lookup(raw, 0xD)
        sizes = lookup(raw, 0x80000008)
        cr4 = CR4_ALWAYS
        for bit, (leaf, sub, reg, feature) in CR4_FEATURES.items():
            e = lookup(raw, leaf, sub)
            if e is not None and getattr(e, reg) >> feature & 1:
                cr4 |= 1 << bit
        if xsave is not None and (xsave.eax | xsave.edx << 32) & ~1:
            # XSAVE state components listed in leaf 0xD: KVM takes OSXSAVE (some hosts,
            # nested kvm_pvm among them, list them without leaf 1's XSAVE bit).
            cr4 |= CR4_OSXSAVE
        return cls(xcr0=1 if xsave is None else xsave.eax | xsave.edx << 32,
                   phys_bits=36 if sizes is None else sizes.eax & 0xFF, cr4=cr4)
