#!/usr/bin/env python3
"""Probe which instructions this host's KVM can run, with one tiny guest per probe.

Theory of operation
-------------------
On a nested KVM whose guest kernel code goes through KVM's instruction emulator, some
instructions stop the VM with ``KVM_EXIT_INTERNAL_ERROR`` (emulation failure).  Each
probe here is a multiboot image assembled by NASM: a prelude (32-bit protected mode
as the loader leaves it, or a switch to long mode with identity-mapped 2 MiB pages and
an IDT whose every vector counts an interrupt and sends the local APIC an EOI), the
instruction under test, then ``K`` on the serial port.  livemig runs it with the
in-kernel irqchip; the result is ``ok`` (``K`` printed), the VMM's failure message
(the internal error with the failing bytes), a triple fault, or ``timeout``.

Usage::

    python guests/probe.py            # all probes, a Markdown table on stdout
    python guests/probe.py popcnt     # only the probes whose name contains a word
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livemig.kernel.mman import MIB
from livemig.vmm.multiboot import MultibootImage
from livemig.vmm.vm import RunState, Vm, VmConfig

PRELUDE32 = """
        bits 32
        org 0x100000
mb:     dd 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
        dd mb, mb, 0, bss_end, start
start:  mov esp, 0x90000
"""

# Long mode: PML4 at 0x10000, PDPT at 0x11000, 4 PDs at 0x12000 mapping 4 GiB in 2 MiB
# pages (the APIC pages uncached), a 64-bit GDT and an IDT of 256 gates to `isr`.
PRELUDE64 = PRELUDE32 + """
        mov edi, 0x10000
        xor eax, eax
        mov ecx, 6 * 1024
        rep stosd
        mov dword [0x10000], 0x11003
        mov dword [0x11000], 0x12003
        mov dword [0x11008], 0x13003
        mov dword [0x11010], 0x14003
        mov dword [0x11018], 0x15003
        xor ecx, ecx
.pd:    mov eax, ecx
        shl eax, 21
        or eax, 0x83
        cmp ecx, 2038
        jb .wb
        or eax, 0x18
.wb:    mov [0x12000 + ecx * 8], eax
        mov eax, ecx
        shr eax, 11
        mov [0x12004 + ecx * 8], eax
        inc ecx
        cmp ecx, 2048
        jb .pd
        lgdt [gdtr]
        mov eax, cr4
        or eax, 0x620
        mov cr4, eax
        mov eax, 0x10000
        mov cr3, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, 0x80000011
        mov cr0, eax
        jmp 0x08:lm
        bits 64
lm:     mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, 0x90000
        lea rdi, [idt]
        mov rax, isr
        xor ecx, ecx
.gate:  mov word [rdi], ax
        mov word [rdi + 2], 0x08
        mov word [rdi + 4], 0x8E00
        mov rdx, rax
        shr rdx, 16
        mov word [rdi + 6], dx
        shr rdx, 16
        mov dword [rdi + 8], edx
        mov dword [rdi + 12], 0
        add rdi, 16
        inc ecx
        cmp ecx, 256
        jb .gate
        lidt [idtr]
        jmp probe
isr:    lock inc qword [ticks]
        push rax
        mov eax, 0xFEE000B0     ; 64-bit absolute addresses would sign-extend
        mov dword [rax], 0
        pop rax
        iretq
        align 8
gdt:    dq 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF
        dq 0x00CFF2000000FFFF, 0x00AFFA000000FFFF   ; 0x18 user data, 0x20 user code
gdtr:   dw 39
        dq gdt
idtr:   dw 4095
        dq idt
ticks:  dq 0
probe:
"""

EPILOGUE = """
        mov dx, 0x3F8
        mov al, 'K'
        out dx, al
.done:  cli
        hlt
        jmp .done
        align 16
buf:    times 64 db 0
{idt}
bss_end:
"""

TIMER = """
        mov ebx, 0xFEE00000
        mov dword [rbx + 0xF0], 0x1FF
        mov dword [rbx + 0x3E0], 0x3
        mov dword [rbx + 0x320], 0x20020
        mov dword [rbx + 0x380], 100000
        sti
.wait:  hlt
        cmp qword [ticks], 3
        jb .wait
        cli
"""

# CR4.OSXSAVE on, then EDX:EAX = 3 (x87 and SSE state) and ECX = 0 (XCR0) for xsetbv.
OSXSAVE = """mov rax, cr4
        or eax, 1 << 18
        mov cr4, rax
        xor ecx, ecx
        xor edx, edx
        mov eax, 3
"""

# name -> (long mode?, snippet)
PROBES: dict[str, tuple[bool, str]] = {
    "protected mode, out": (False, "nop"),
    "rdmsr APIC base (32-bit)": (False, "mov ecx, 0x1B\n rdmsr"),
    "long-mode switch, paging, lgdt, lidt": (True, "nop"),
    "cpuid": (True, "xor eax, eax\n cpuid"),
    "rdmsr/wrmsr kvmclock MSR": (True, "mov ecx, 0x4B564D01\n mov eax, 0x80001\n"
                                 " xor edx, edx\n wrmsr\n rdmsr"),
    "LAPIC MMIO read/write": (True, "mov ebx, 0xFEE00000\n mov eax, [rbx + 0x30]\n"
                              " mov dword [rbx + 0x80], 0"),
    "IOAPIC MMIO (index/data)": (True, "mov ebx, 0xFEC00000\n mov dword [rbx], 1\n"
                                 " mov eax, [rbx + 0x10]"),
    "rdtsc": (True, "rdtsc"),
    "rdtscp": (True, "rdtscp"),
    "pause": (True, "pause"),
    "lock xadd / lock cmpxchg": (True, "mov eax, 1\n lock xadd [buf], eax\n"
                                 " lock cmpxchg [buf], ecx"),
    "rep movsb / rep stosq": (True, "lea rsi, [buf]\n lea rdi, [buf + 32]\n mov ecx, 16\n"
                              " rep movsb\n lea rdi, [buf]\n mov ecx, 4\n rep stosq"),
    "mul / div 64-bit": (True, "mov rax, -1\n mov rcx, 3\n mul rcx\n xor edx, edx\n div rcx"),
    "sti; hlt; LAPIC timer interrupts; iretq in ring 0": (True, TIMER),
    "mov cr3 (TLB flush), invlpg": (True, "mov rax, cr3\n mov cr3, rax\n invlpg [buf]"),
    "popcnt": (True, "popcnt rax, rbx"),
    "int3": (True, "int3"),
    "int 0x20 (software interrupt)": (True, "int 0x20"),
    "fwait": (True, "fwait"),
    "clac": (True, "clac"),
    "cmpxchg16b": (True, "lea rdi, [buf]\n lock cmpxchg16b [rdi]"),
    "xrstor": (True, "xor eax, eax\n xor edx, edx\n lea rdi, [buf]\n xrstor [rdi]"),
    "mov cr4 (OSXSAVE on); xsetbv XCR0 = x87|SSE": (True, OSXSAVE + "xsetbv"),
    "xgetbv": (True, OSXSAVE + "xgetbv"),
    "sse movdqa": (True, "movdqa xmm0, [buf]"),
    "movq xmm1, r12": (True, "movq xmm1, r12"),
    "pushfq / popfq": (True, "pushfq\n cli\n popfq"),
    "mov to/from dr0": (True, "mov eax, 5\n mov dr0, rax\n mov rax, dr0"),
    "wrmsr/rdmsr MSR_KERNEL_GS_BASE": (True, "mov ecx, 0xC0000102\n mov eax, 7\n"
                                       " xor edx, edx\n wrmsr\n rdmsr"),
    # IOPL 3 lets ring 3 print the K (its hlt then faults with no TSS: after the K)
    "iretq to ring 3": (True, "push 0x1B\n push 0x80000\n push 0x3002\n push 0x23\n"
                        " push .user\n iretq\n.user:"),
}


def assemble(source: str, workdir: Path) -> bytes:
    src, out = workdir / "probe.asm", workdir / "probe.bin"
    src.write_text(source)
    res = subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"nasm failed:\n{res.stderr}\n{source}")
    return out.read_bytes()


def run_probe(long_mode: bool, snippet: str, workdir: Path, timeout: float = 10.0) -> str:
    idt = "idt: times 4096 db 0" if long_mode else ""
    prelude = PRELUDE64 if long_mode else PRELUDE32
    image = assemble(prelude + snippet + EPILOGUE.format(idt=idt), workdir)
    with Vm(VmConfig(16 * MIB)) as vm:
        vm.load_multiboot(MultibootImage.parse(image))
        vm.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"K" in vm.serial.output:
                return "ok"
            if vm.runstate is RunState.INTERNAL_ERROR:
                return f"fails: {vm.failure}"
            if vm.runstate is RunState.SHUTDOWN:
                return "fails: triple fault (the VM shut down)"
            time.sleep(0.01)
        return "timeout"


def main(argv: list[str]) -> int:
    words = argv[1:]
    print("| probe | result |\n| --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (long_mode, snippet) in PROBES.items():
            if words and not any(w in name for w in words):
                continue
            print(f"| {name} | {run_probe(long_mode, snippet, Path(tmp))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
