"""HostCpu: what a saved vCPU may use, read from a CPUID table (livemig.vmm.cpucheck
checks CR4, XCR0 and physical addresses against it)."""

from __future__ import annotations

from livemig.vmm.cpuid import CpuidEntry, CpuidPolicy, HostCpu, encode

PCE = 1 << 8


def table(*entries: CpuidEntry) -> bytes:
    return encode(list(entries))


def test_the_xsave_leaf_the_address_sizes_and_cr4_features_are_read() -> None:
    raw = table(CpuidEntry(0xD, 0, 0, 0b111, 0, 0, 1),  # x87 SSE AVX, bit 32
                CpuidEntry(0x80000008, 0, 0, 0x3027, 0, 0, 0),  # 39 physical bits
                CpuidEntry(1, 0, 0, 0, 0, 1 << 26, 1 << 6),  # XSAVE, PAE
                CpuidEntry(7, 0, 0, 0, 1 << 7, 0, 0))  # SMEP
    host = HostCpu.from_cpuid(raw)
    assert host.xcr0 == 0b111 | 1 << 32
    assert host.phys_bits == 39
    assert host.cr4 == PCE | 1 << 18 | 1 << 5 | 1 << 20  # + OSXSAVE, PAE, SMEP


def test_without_the_leaves_only_the_architectural_minimum_is_allowed() -> None:
    host = HostCpu.from_cpuid(table())
    assert (host.xcr0, host.phys_bits, host.cr4) == (1, 36, PCE)


def test_a_hidden_feature_takes_its_cr4_bit_away() -> None:
    supported = table(CpuidEntry(7, 0, 0, 0, 1 << 7 | 1 << 20, 0, 0))  # SMEP, SMAP
    hidden = CpuidPolicy(frozenset({"smep"})).table_for(supported, 0, 1)
    assert HostCpu.from_cpuid(hidden).cr4 == PCE | 1 << 21


def test_xsave_state_in_leaf_0xd_allows_osxsave_without_leaf_1s_bit() -> None:
    # Nested kvm_pvm lists XSAVE's components but not leaf 1's XSAVE bit, and KVM takes
    # a vCPU with CR4.OSXSAVE set (the os guest's saved state has it).
    raw = table(CpuidEntry(0xD, 0, 0, 0b111, 0, 0, 0), CpuidEntry(1, 0, 0, 0, 0, 0, 0))
    assert HostCpu.from_cpuid(raw).cr4 == PCE | 1 << 18
    x87_only = table(CpuidEntry(0xD, 0, 0, 0b1, 0, 0, 0))
    assert HostCpu.from_cpuid(x87_only).cr4 == PCE
