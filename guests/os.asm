; os.asm -- the "os" test guest: a tiny SMP kernel with the state of a real OS.
;
; Theory of operation
; -------------------
; A multiboot kernel (flat image, "a.out kludge" header, loaded at 1 MiB), so livemig's
; loader and QEMU's -kernel run the same bytes.  The boot processor (BSP), entered in
; 32-bit protected mode, builds its own page tables (identity map of 4 GiB in 2 MiB pages,
; the APIC pages uncached), switches to long mode, fills an IDT, and then:
;
;   * sets up its local APIC (periodic timer at `hz`, vector 0x20) and kvmclock (MSR
;     0x4b564d01, one pvclock record per vCPU);
;   * routes the UART's IRQ 4 through the IOAPIC to itself (vector 0x24); the handler
;     echoes every received byte;
;   * copies the AP trampoline to 0x8000 and starts the other vCPUs with INIT/SIPI/SIPI
;     (each goes from real mode straight to long mode and sets up its own APIC and
;     kvmclock), waits for all `ncpus`, prints "cpus N", waits until every vCPU took
;     three timer ticks and prints "ticks";
;   * runs the workload like every AP: forever, one pass over the vCPU's private region
;     and one over the shared region, then (BSP only) a 'B'.
;
; Workload.  Page p of a region holds, in its first qword, the tag `gpa | owner` (owner
; = vCPU + 1 for a private page, 0xfff for a shared one) and, at the vCPU's slot (+8 for
; a private page, +8 + 8 * vCPU for a shared one), the number of passes that visited
; it.  A visit checks the tag and that the slot holds the current pass number g, and
; writes g+1.  The order of visits is the pattern: sequential, scattered (stride
; 0x9e3779b1 | 1 modulo a power-of-two region) or hot (only the first `hot` pages).
; With `rate` > 0 a vCPU visits at most `rate` pages per timer tick and halts until the
; next one.  The pass number is mirrored in xmm1 (checked after every pass: FPU/XSAVE
; state), DR0 and MSR_KERNEL_GS_BASE hold constants (checked after every pass: debug
; registers and MSRs); vCPU 0 also checks the PIC masks and the PIT's channel 0 mode.
;
; Time.  After every page a vCPU reads kvmclock and checks that time did not go back
; and did not step by more than `max_jump_ms`; that its tick count moved within
; `tick_timeout_ms`; and (BSP, once per tick) that every other vCPU's clock reading is
; younger than `tick_timeout_ms` (a vCPU that stopped running).  During a pause the
; VMM stops kvmclock (as QEMU does), so a migration is invisible to these checks.
;
; Errors print "E", a reason letter and the vCPU's number in hex, then that vCPU halts:
;   A  APs did not all come up      B  bad parameters / RAM too small
;   K  no kvmclock                  C  time went backwards   J  time jumped
;   T  no timer tick in time        V  another vCPU stopped  P/S private/shared page
;   F  xmm1 lost (FPU state)        D  DR0 lost (debug registers)
;   M  MSR_KERNEL_GS_BASE lost       W  XCR0 lost (XSAVE area size changed)
;   I  (vCPU 0) the PIC masks changed  R  (vCPU 0) the PIT's channel 0 mode changed
;   X  an exception (followed by its vector in hex)
;
; An NMI is not an error: its handler prints 'N' and returns.
;
; Parameters live at image offset 0x20 (see livemig.guests.os, which patches them).

        bits 32
        org 0x100000

MAX_CPUS        equ 16
STACK_SIZE      equ 16384
PERCPU_SIZE     equ 64
WORK_BASE       equ 0x400000            ; first byte of the workload regions
TRAMPOLINE      equ 0x8000              ; AP entry (SIPI vector 0x08)
LAPIC           equ 0xFEE00000
IOAPIC          equ 0xFEC00000
COM1            equ 0x3F8
VEC_TIMER       equ 0x20
VEC_SERIAL      equ 0x24
VEC_SPURIOUS    equ 0xFF
SCATTER         equ 0x9E3779B1
DR0_MAGIC       equ 0x5A5A0000
PIT_MODE        equ 0x34                ; channel 0, lo/hi byte, mode 2, binary
GSB_MAGIC       equ 0x4C4D0000          ; MSR_KERNEL_GS_BASE := this + vCPU
MSR_KERNEL_GS_BASE equ 0xC0000102

; per-vCPU record (PERCPU_SIZE bytes)
PC_TICKS        equ 0                   ; timer interrupts taken (the ISR counts)
PC_SEEN_TICKS   equ 8                   ; tick count at the last check
PC_SEEN_TIME    equ 16                  ; kvmclock when it last changed
PC_LAST_NOW     equ 24                  ; last kvmclock reading
PC_GEN          equ 32                  ; current pass number
PC_BUDGET       equ 40                  ; pages left in this tick (rate limit)
PC_XMM          equ 48                  ; 16 bytes: where xmm1 is stored and loaded

mb_header:
        dd      0x1BADB002
        dd      0x00010000              ; flags: load addresses follow
        dd      -(0x1BADB002 + 0x00010000)
        dd      mb_header               ; header_addr
        dd      mb_header               ; load_addr
        dd      0                       ; load_end_addr: the whole file
        dd      bss_end                 ; bss_end_addr
        dd      entry32                 ; entry_addr

        times   0x20 - ($ - $$) db 0
params:
        db      "LMOS"                  ; 0x20 magic
        dd      1                       ; 0x24 version
p_ncpus:        dd 1                    ; 0x28 vCPUs to start
p_private:      dd 256                  ; 0x2c private pages per vCPU
p_shared:       dd 256                  ; 0x30 shared pages
p_pattern:      dd 0                    ; 0x34 0 sequential, 1 scattered, 2 hot
p_hot:          dd 16                   ; 0x38 hot-set pages
p_rate:         dd 0                    ; 0x3c pages per tick and vCPU, 0 = no limit
p_hz:           dd 100                  ; 0x40 timer ticks per second
p_max_jump:     dd 5000                 ; 0x44 ms
p_tick_tmo:     dd 5000                 ; 0x48 ms
        dd      percpus                 ; 0x4c (read-only) the per-vCPU records

; ---------------------------------------------------------------------------
; 32-bit entry from the multiboot loader: EAX = 0x2BADB002, EBX = info block.
entry32:
        cli
        mov     esp, stacks + STACK_SIZE
        xor     ecx, ecx                ; RAM end unknown unless the loader says so
        test    byte [ebx], 1           ; info flags bit 0: mem_lower / mem_upper valid
        jz      .no_mem
        mov     ecx, [ebx + 8]          ; mem_upper, KiB above 1 MiB
        add     ecx, 1024
        shl     ecx, 10                 ; bytes (RAM below 4 GiB is all we use)
.no_mem:
        mov     [ram_end], ecx

        mov     edi, pml4               ; page tables: 6 pages, zeroed
        xor     eax, eax
        mov     ecx, 6 * 1024
        rep     stosd
        mov     dword [pml4], pdpt + 3
        mov     dword [pdpt], pd + 3
        mov     dword [pdpt + 8], pd + 0x1000 + 3
        mov     dword [pdpt + 16], pd + 0x2000 + 3
        mov     dword [pdpt + 24], pd + 0x3000 + 3
        xor     ecx, ecx
.pde:   mov     eax, ecx                ; 2 MiB page ecx: present, writable, large
        shl     eax, 21
        or      eax, 0x83
        cmp     ecx, IOAPIC >> 21       ; IOAPIC and LAPIC pages: cache disabled
        jb      .wb
        or      eax, 0x18
.wb:    mov     [pd + ecx * 8], eax
        inc     ecx
        cmp     ecx, 2048
        jb      .pde

        lgdt    [gdtr]
        mov     eax, 0x620              ; CR4: PAE, OSFXSR, OSXMMEXCPT
        mov     cr4, eax
        mov     eax, pml4
        mov     cr3, eax
        mov     ecx, 0xC0000080         ; EFER.LME
        rdmsr
        or      eax, 0x100
        wrmsr
        mov     eax, 0x80000011         ; PG | ET | PE
        mov     cr0, eax
        jmp     0x08:bsp64

; ---------------------------------------------------------------------------
; The AP trampoline, copied to TRAMPOLINE: real mode -> long mode in one step.
%define TR(x) ((x) - trampoline + TRAMPOLINE)
        bits 16
trampoline:
        cli
        xor     ax, ax
        mov     ds, ax
        o32 lgdt [TR(tramp_gdtr)]
        mov     eax, 0x620
        mov     cr4, eax
        mov     eax, pml4
        mov     cr3, eax
        mov     ecx, 0xC0000080
        rdmsr
        or      eax, 0x100
        wrmsr
        mov     eax, 0x80000011
        mov     cr0, eax
        jmp     dword 0x08:ap64
tramp_gdtr:
        dw      gdt_end - gdt - 1
        dd      gdt
trampoline_end:

        bits 64
; ---------------------------------------------------------------------------
bsp64:
        mov     rsp, stacks + STACK_SIZE
        call    segments
        call    build_idt
        call    check_params
        xor     edi, edi
        call    cpu_setup               ; needs kvmclock: checked first inside
        ; legacy PICs: mask everything (interrupts come from the APICs only)
        mov     al, 0xFF
        out     0x21, al
        out     0xA1, al
        ; PIT channel 0: rate generator (its IRQ 0 stays masked everywhere); checked
        ; after every pass with a read-back, as the PIC masks are
        mov     al, PIT_MODE
        out     0x43, al
        mov     al, 0xFF
        out     0x40, al
        out     0x40, al
        call    serial_setup
        lea     rsi, [msg_boot]
        call    puts
        lock inc dword [cpus_up]
        sti
        call    start_aps
        pushfq                          ; "cpus N" as one piece of output
        cli
        call    lock_print
        lea     rsi, [msg_cpus]
        call    puts_raw
        mov     eax, [cpus_up]
        call    put_dec
        mov     al, 10
        call    putc
        call    unlock_print
        popfq
        call    wait_ticks
        lea     rsi, [msg_ticks]
        call    puts
        xor     edi, edi
        jmp     workload

ap64:                                   ; no stack yet: segments after RSP
        mov     ebx, LAPIC
        mov     edi, [rbx + 0x20]       ; APIC id = vCPU number
        shr     edi, 24
        cmp     edi, MAX_CPUS
        jae     halt_forever
        mov     eax, edi
        inc     eax
        imul    eax, eax, STACK_SIZE
        lea     rsp, [stacks + rax]
        call    segments
        call    cpu_setup
        lock inc dword [cpus_up]
        sti
        jmp     workload

segments:
        mov     ax, 0x10
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     fs, ax
        mov     gs, ax
        ret

; build_idt: exceptions to their stubs, timer, serial, spurious; the rest just EOIs.
build_idt:
        xor     ecx, ecx
.gate:  lea     rax, [isr_other]
        cmp     ecx, 32
        jae     .not_exc
        mov     rax, [exc_table + rcx * 8]
.not_exc:
        cmp     ecx, VEC_TIMER
        jne     .1
        lea     rax, [isr_timer]
.1:     cmp     ecx, VEC_SERIAL
        jne     .2
        lea     rax, [isr_serial]
.2:     cmp     ecx, VEC_SPURIOUS
        jne     .3
        lea     rax, [isr_spurious]
.3:     cmp     ecx, 2                  ; NMI: say "N" and go on
        jne     .4
        lea     rax, [isr_nmi]
.4:     mov     rdx, rcx
        shl     rdx, 4
        lea     rdx, [idt + rdx]
        mov     word [rdx], ax
        mov     word [rdx + 2], 0x08
        mov     word [rdx + 4], 0x8E00  ; present, ring 0, 64-bit interrupt gate
        shr     rax, 16
        mov     word [rdx + 6], ax
        shr     rax, 16
        mov     dword [rdx + 8], eax
        mov     dword [rdx + 12], 0
        inc     ecx
        cmp     ecx, 256
        jb      .gate
        ret

; cpu_setup (EDI = vCPU): IDT, local APIC timer, kvmclock, DR0, per-vCPU record.
cpu_setup:
        lidt    [idtr]
        mov     eax, 0x40000000         ; kvmclock needs the KVM leaves ...
        cpuid
        cmp     ebx, 0x4B4D564B         ; "KVMKVMKVM\0\0\0"
        jne     .no_kvmclock
        mov     eax, 0x40000001         ; ... and KVM_FEATURE_CLOCKSOURCE2
        cpuid
        test    eax, 1 << 3
        jz      .no_kvmclock
        mov     eax, edi
        shl     eax, 5
        add     eax, pvclock
        or      eax, 1                  ; enable
        xor     edx, edx
        mov     ecx, 0x4B564D01         ; MSR_KVM_SYSTEM_TIME_NEW
        wrmsr
        mov     ebx, LAPIC
        mov     dword [rbx + 0x80], 0   ; TPR: accept everything
        mov     dword [rbx + 0xF0], 0x100 | VEC_SPURIOUS  ; software enable
        mov     dword [rbx + 0x350], 0x10000              ; LINT0 masked
        mov     dword [rbx + 0x3E0], 0x3                  ; timer divide by 16
        mov     dword [rbx + 0x320], 0x20000 | VEC_TIMER  ; periodic
        mov     eax, 62500000           ; 1 GHz APIC bus / 16 / hz
        xor     edx, edx
        div     dword [p_hz]
        mov     dword [rbx + 0x380], eax
        mov     eax, DR0_MAGIC
        add     eax, edi
        mov     dr0, rax
        mov     ecx, MSR_KERNEL_GS_BASE
        mov     eax, GSB_MAGIC
        add     eax, edi
        xor     edx, edx
        wrmsr
        call    xcr0_setup
        call    percpu
        call    read_clock
        mov     [r15 + PC_LAST_NOW], rax
        mov     [r15 + PC_SEEN_TIME], rax
        ret
.no_kvmclock:
        mov     al, 'K'
        jmp     fail

; xcr0_setup (EDI = vCPU): with XSAVE (CPUID.1:ECX bit 26), CR4.OSXSAVE on and XCR0 :=
; x87 | SSE | AVX as far as supported; xsave_size[vCPU] := CPUID.(0xD, 0).EBX, the XSAVE
; area size KVM derives from XCR0 (0 without XSAVE).  The workload compares it after
; every pass: xgetbv is not in this host's emulator, cpuid is.  Clobbers RAX-RDX.
xcr0_setup:
        mov     dword [xsave_size + rdi * 4], 0
        mov     eax, 1
        cpuid
        test    ecx, 1 << 26
        jz      .done
        mov     rax, cr4
        or      eax, 1 << 18
        mov     cr4, rax
        mov     eax, 0xD
        xor     ecx, ecx
        cpuid                           ; EAX: the XCR0 bits KVM supports
        and     eax, 7
        xor     edx, edx
        xor     ecx, ecx
        xsetbv
        mov     eax, 0xD
        xor     ecx, ecx
        cpuid
        mov     [xsave_size + rdi * 4], ebx
.done:  ret

; check_params: sane sizes and the regions inside RAM.
check_params:
        mov     eax, [p_ncpus]
        test    eax, eax
        jz      .bad
        cmp     eax, MAX_CPUS
        ja      .bad
        cmp     dword [p_hz], 0
        je      .bad
        cmp     dword [p_pattern], 2
        ja      .bad
        jne     .sizes
        mov     eax, [p_hot]            ; hot: 1 <= hot <= private and shared
        test    eax, eax
        jz      .bad
        cmp     eax, [p_private]
        ja      .bad
        cmp     eax, [p_shared]
        ja      .bad
.sizes: cmp     dword [p_private], 0
        je      .bad
        cmp     dword [p_shared], 0
        je      .bad
        cmp     dword [p_pattern], 1
        jne     .range
        mov     eax, [p_private]        ; scattered needs powers of two
        call    .pow2
        mov     eax, [p_shared]
        call    .pow2
.range: call    shared_base
        mov     ecx, [p_shared]
        shl     rcx, 12
        add     rax, rcx
        mov     ecx, [ram_end]
        cmp     rax, rcx
        ja      .bad
        ret
.pow2:  test    eax, eax
        jz      .bad_pop
        lea     ecx, [eax - 1]
        test    ecx, eax
        jnz     .bad_pop
        ret
.bad_pop:
        pop     rax
.bad:   mov     al, 'B'
        jmp     fail

; shared_base: RAX = first byte of the shared region.
shared_base:
        mov     eax, [p_private]
        imul    eax, [p_ncpus]
        shl     rax, 12
        add     rax, WORK_BASE
        ret

; serial_setup: 8N1, OUT2, receive interrupt; IOAPIC pin 4 -> BSP, vector VEC_SERIAL.
serial_setup:
        mov     dx, COM1 + 3
        mov     al, 0x03
        out     dx, al
        mov     dx, COM1 + 4
        mov     al, 0x0B                ; DTR | RTS | OUT2
        out     dx, al
        mov     dx, COM1 + 1
        mov     al, 0x01                ; IER: received data available
        out     dx, al
        mov     ebx, IOAPIC
        mov     dword [rbx], 0x19       ; redirection entry 4, high: destination 0
        mov     dword [rbx + 0x10], 0
        mov     dword [rbx], 0x18       ; low: fixed, physical, edge, unmasked
        mov     dword [rbx + 0x10], VEC_SERIAL
        ret

; start_aps: trampoline to 0x8000, INIT, SIPI, SIPI; wait for all (5 s of kvmclock).
start_aps:
        cmp     dword [p_ncpus], 1
        je      .done
        lea     rsi, [trampoline]
        mov     edi, TRAMPOLINE
        mov     ecx, trampoline_end - trampoline
        rep     movsb
        mov     ebx, LAPIC
        mov     dword [rbx + 0x310], 0
        mov     dword [rbx + 0x300], 0x000C4500   ; INIT, all excluding self
        mov     rdi, 10000000
        call    delay
        mov     dword [rbx + 0x300], 0x000C4600 | (TRAMPOLINE >> 12)   ; SIPI
        mov     rdi, 1000000
        call    delay
        mov     dword [rbx + 0x300], 0x000C4600 | (TRAMPOLINE >> 12)
        call    percpu0
        call    read_clock
        mov     r12, rax
.wait:  mov     eax, [cpus_up]
        cmp     eax, [p_ncpus]
        jae     .done
        pause
        call    read_clock
        sub     rax, r12
        mov     rcx, 5000000000
        cmp     rax, rcx
        jb      .wait
        mov     al, 'A'
        jmp     fail
.done:  ret

; delay: spin for RDI ns of kvmclock (BSP).
delay:
        push    rbx
        mov     rbx, rdi
        call    percpu0
        call    read_clock
        add     rbx, rax
.spin:  pause
        call    read_clock
        cmp     rax, rbx
        jb      .spin
        pop     rbx
        ret

; wait_ticks: until every vCPU took 3 timer interrupts (bounded by tick_timeout).
wait_ticks:
        call    percpu0
        call    read_clock
        mov     r12, rax
.again: xor     ecx, ecx
.cpu:   mov     eax, ecx
        shl     eax, 6
        cmp     qword [percpus + rax + PC_TICKS], 3
        jb      .not_yet
        inc     ecx
        cmp     ecx, [p_ncpus]
        jb      .cpu
        ret
.not_yet:
        hlt
        call    read_clock
        sub     rax, r12
        call    tick_timeout_ns
        cmp     rax, rdx
        jb      .again
        mov     al, 'T'
        jmp     fail

; tick_timeout_ns: RDX = tick timeout in ns (keeps RAX).
tick_timeout_ns:
        push    rax
        mov     eax, [p_tick_tmo]
        imul    rdx, rax, 1000000
        pop     rax
        ret

; percpu: R15 = this vCPU's record, R14 = its pvclock (EDI = vCPU); percpu0 for vCPU 0.
percpu0:
        xor     edi, edi
percpu:
        mov     eax, edi
        shl     eax, 6
        lea     r15, [percpus + rax]
        mov     eax, edi
        shl     eax, 5
        lea     r14, [pvclock + rax]
        ret

; read_clock: RAX = kvmclock ns from the pvclock record at R14.  Clobbers RCX, RDX, R8.
read_clock:
.retry: mov     r8d, [r14]              ; version: odd while the host updates it
        test    r8d, 1
        jnz     .retry
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        sub     rax, [r14 + 8]          ; tsc - tsc_timestamp
        movsx   ecx, byte [r14 + 28]    ; tsc_shift
        test    ecx, ecx
        js      .right
        shl     rax, cl
        jmp     .scale
.right: neg     ecx
        shr     rax, cl
.scale: mov     ecx, [r14 + 24]         ; tsc_to_system_mul (32.32 fixed point)
        mul     rcx
        shr     rax, 32
        shl     rdx, 32
        or      rax, rdx
        add     rax, [r14 + 16]         ; system_time
        cmp     r8d, [r14]
        jne     .retry
        ret

; ---------------------------------------------------------------------------
; The workload (EDI = vCPU, interrupts on).  R12 = pass number, R13 = vCPU.
workload:
        mov     r13d, edi
        call    percpu
        xor     r12d, r12d
        mov     [r15 + PC_GEN], r12
        mov     eax, [p_rate]
        mov     [r15 + PC_BUDGET], rax
        ; first touch: tags and zero counters in our private pages and shared slots
        call    region_private
        call    visit_all
        call    region_shared
        call    visit_all
.pass:  mov     [r15 + PC_XMM], r12     ; xmm1 := pass number (movq from a GPR is
        mov     qword [r15 + PC_XMM + 8], 0  ; not in this host's emulator)
        movdqa  xmm1, [r15 + PC_XMM]
        call    region_private
        call    visit_pattern
        call    region_shared
        call    visit_pattern
        movdqa  [r15 + PC_XMM], xmm1    ; FPU state kept across the pass?
        cmp     [r15 + PC_XMM], r12
        jne     .fpu_lost
        mov     rax, dr0                ; debug registers kept?
        mov     ecx, DR0_MAGIC
        add     ecx, r13d
        cmp     rax, rcx
        jne     .dr_lost
        mov     ecx, MSR_KERNEL_GS_BASE ; MSRs kept?
        rdmsr
        sub     eax, GSB_MAGIC
        or      eax, edx
        cmp     eax, r13d
        jne     .msr_lost
        mov     r9d, [xsave_size + r13 * 4]  ; XCR0 kept? (the size KVM derives from it)
        test    r9d, r9d
        jz      .xcr_ok
        mov     eax, 0xD
        xor     ecx, ecx
        cpuid
        cmp     ebx, r9d
        jne     .xcr_lost
.xcr_ok:
        inc     r12
        mov     [r15 + PC_GEN], r12
        test    r13d, r13d
        jnz     .pass
        in      al, 0x21                ; vCPU 0: the legacy devices as it left them?
        mov     ah, al
        in      al, 0xA1
        and     al, ah
        cmp     al, 0xFF
        jne     .pic_lost
        mov     al, 0xE2                ; PIT read-back: status of channel 0
        out     0x43, al
        in      al, 0x40
        and     al, 0x3F
        cmp     al, PIT_MODE & 0x3F
        jne     .pit_lost
        mov     al, 'B'
        call    putc_locked
        jmp     .pass
.pic_lost:
        mov     al, 'I'
        jmp     fail
.pit_lost:
        mov     al, 'R'
        jmp     fail
.fpu_lost:
        mov     al, 'F'
        jmp     fail
.dr_lost:
        mov     al, 'D'
        jmp     fail
.msr_lost:
        mov     al, 'M'
        jmp     fail
.xcr_lost:
        mov     al, 'W'
        jmp     fail

; region_private / region_shared: RBX = base, RBP = pages, R10 = slot offset,
; R11 = tag owner.
region_private:
        mov     eax, [p_private]
        mov     ebp, eax
        imul    eax, r13d
        shl     rax, 12
        lea     rbx, [rax + WORK_BASE]
        mov     r10d, 8
        lea     r11d, [r13d + 1]
        ret
region_shared:
        call    shared_base
        mov     rbx, rax
        mov     ebp, [p_shared]
        lea     r10d, [r13d * 8 + 8]
        mov     r11d, 0xFFF
        ret

; visit_all: first touch, every page in order (write tag, slot := 0).
visit_all:
        xor     ecx, ecx
.page:  mov     rax, rcx
        shl     rax, 12
        add     rax, rbx
        mov     rdx, rax
        or      rdx, r11
        mov     [rax], rdx
        mov     qword [rax + r10], 0
        inc     ecx
        cmp     ecx, ebp
        jb      .page
        ret

; visit_pattern: one pass over the region in the configured order.
visit_pattern:
        push    rbx
        mov     esi, ebp                ; visits in this pass
        cmp     dword [p_pattern], 2
        jne     .count
        mov     esi, [p_hot]
.count: xor     ecx, ecx                ; page index
        xor     edi, edi                ; visits done
.visit: mov     rax, rcx
        shl     rax, 12
        add     rax, rbx
        mov     rdx, rax
        or      rdx, r11
        cmp     [rax], rdx              ; the tag
        jne     .bad
        cmp     [rax + r10], r12        ; the pass number
        jne     .bad
        lea     rdx, [r12 + 1]
        mov     [rax + r10], rdx
        push    rcx
        push    rsi
        push    rdi
        call    housekeeping
        pop     rdi
        pop     rsi
        pop     rcx
        inc     edi
        cmp     edi, esi
        jae     .done
        cmp     dword [p_pattern], 1
        je      .scatter
        inc     ecx
        jmp     .visit
.scatter:
        mov     eax, SCATTER
        lea     edx, [ebp - 1]
        and     eax, edx
        or      eax, 1
        add     ecx, eax
        and     ecx, edx
        jmp     .visit
.done:  pop     rbx
        ret
.bad:   mov     al, 'P'
        cmp     r11d, 0xFFF
        jne     fail
        mov     al, 'S'
        jmp     fail

; housekeeping: after each page -- clock, own ticks, the others (BSP), rate limit.
housekeeping:
        call    read_clock
        mov     rcx, [r15 + PC_LAST_NOW]
        cmp     rax, rcx
        jb      .backwards
        mov     rdx, rax
        sub     rdx, rcx
        mov     ecx, [p_max_jump]
        imul    rcx, rcx, 1000000
        cmp     rdx, rcx
        ja      .jump
        mov     [r15 + PC_LAST_NOW], rax
        mov     rdx, [r15 + PC_TICKS]
        cmp     rdx, [r15 + PC_SEEN_TICKS]
        je      .same_tick
        mov     [r15 + PC_SEEN_TICKS], rdx
        mov     [r15 + PC_SEEN_TIME], rax
        test    r13d, r13d
        jnz     .rate
        call    watch_others
        jmp     .rate
.same_tick:
        mov     rcx, rax
        sub     rcx, [r15 + PC_SEEN_TIME]
        call    tick_timeout_ns
        cmp     rcx, rdx
        ja      .no_tick
.rate:  cmp     dword [p_rate], 0
        je      .ok
        dec     qword [r15 + PC_BUDGET]
        jnz     .ok
        mov     rdx, [r15 + PC_TICKS]
.sleep: hlt                             ; until the next tick on this vCPU
        cmp     rdx, [r15 + PC_TICKS]
        je      .sleep
        mov     eax, [p_rate]
        mov     [r15 + PC_BUDGET], rax
.ok:    ret
.backwards:
        mov     al, 'C'
        jmp     fail
.jump:  mov     al, 'J'
        jmp     fail
.no_tick:
        mov     al, 'T'
        jmp     fail

; watch_others (BSP, RAX = now): every other vCPU read its clock recently.
watch_others:
        call    tick_timeout_ns
        mov     ecx, 1
.cpu:   cmp     ecx, [p_ncpus]
        jae     .ok
        mov     esi, ecx
        shl     esi, 6
        mov     r8, rax
        sub     r8, [percpus + rsi + PC_LAST_NOW]
        jb      .next                   ; it read the clock after us: alive
        cmp     r8, rdx
        ja      .stuck
.next:  inc     ecx
        jmp     .cpu
.ok:    ret
.stuck: mov     al, 'V'
        jmp     fail

; ---------------------------------------------------------------------------
; Interrupt handlers.
isr_timer:
        push    rax
        push    rbx
        mov     ebx, LAPIC
        mov     eax, [rbx + 0x20]       ; APIC id = vCPU number
        shr     eax, 24
        shl     eax, 6
        lock inc qword [percpus + rax + PC_TICKS]
        mov     dword [rbx + 0xB0], 0   ; EOI
        pop     rbx
        pop     rax
        iretq

isr_serial:                             ; echo everything received
        push    rax
        push    rdx
        call    lock_print
.more:  mov     dx, COM1 + 5
        in      al, dx
        test    al, 1                   ; data ready
        jz      .done
        mov     dx, COM1
        in      al, dx
        call    putc
        jmp     .more
.done:  call    unlock_print
        push    rbx
        mov     ebx, LAPIC
        mov     dword [rbx + 0xB0], 0
        pop     rbx
        pop     rdx
        pop     rax
        iretq

isr_other:
        push    rbx
        mov     ebx, LAPIC
        mov     dword [rbx + 0xB0], 0
        pop     rbx
        iretq

isr_nmi:                                ; an NMI (QMP inject-nmi): print 'N'
        push    rax
        mov     al, 'N'
        call    putc
        pop     rax
        iretq

isr_spurious:
        iretq

%assign v 0
%rep 32
exc_ %+ v:
        mov     edx, v
        jmp     exception
%assign v v + 1
%endrep

exception:                              ; EDX = vector: "EX" vector cpu
        cli
        mov     ebx, LAPIC
        mov     edi, [rbx + 0x20]
        shr     edi, 24
        call    lock_print
        mov     al, 'E'
        call    putc
        mov     al, 'X'
        call    putc
        mov     eax, edx
        shr     eax, 4
        call    put_hex
        mov     eax, edx
        call    put_hex
        jmp     fail.tail

; ---------------------------------------------------------------------------
; Output.  putc: AL to COM1 (waits for THR empty; keeps all registers).
putc:
        push    rdx
        push    rax
        mov     dx, COM1 + 5
.wait:  in      al, dx
        test    al, 0x20
        jz      .wait
        pop     rax
        mov     dx, COM1
        out     dx, al
        pop     rdx
        ret

; puts: the zero-terminated string at RSI, as one piece of console output.
puts:
        pushfq
        cli
        call    lock_print
        call    puts_raw
        call    unlock_print
        popfq
        ret

; puts_raw: the same without the console lock (the caller holds it).
puts_raw:
        push    rax
.next:  mov     al, [rsi]
        test    al, al
        jz      .end
        call    putc
        inc     rsi
        jmp     .next
.end:   pop     rax
        ret

; putc_locked: AL as one piece of console output (any interrupt state).
putc_locked:
        pushfq
        cli
        call    lock_print
        call    putc
        call    unlock_print
        popfq
        ret

; put_hex: the low nibble of AL as a hex digit.
put_hex:
        and     al, 0xF
        add     al, '0'
        cmp     al, '9'
        jbe     .out
        add     al, 'a' - '9' - 1
.out:   jmp     putc

; put_dec: EAX (< 100) in decimal.
put_dec:
        xor     edx, edx
        mov     ecx, 10
        div     ecx
        test    eax, eax
        jz      .ones
        call    put_hex
.ones:  mov     eax, edx
        jmp     put_hex

; lock_print / unlock_print: the console lock, so that lines from different vCPUs and
; the echo do not interleave.  Only with interrupts off: the serial handler takes it
; too.  (The NMI handler prints without it: an NMI may interrupt a holder.)
lock_print:
        push    rax
        mov     eax, 1
.spin:  xchg    eax, [print_lock]
        test    eax, eax
        jz      .got
        pause
        mov     eax, 1
        jmp     .spin
.got:   pop     rax
        ret

unlock_print:
        mov     dword [print_lock], 0
        ret

; fail: AL = reason.  "E" reason vCPU, newline, halt this vCPU for good.
fail:
        cli
        mov     dl, al
        mov     ebx, LAPIC
        mov     edi, [rbx + 0x20]
        shr     edi, 24
        call    lock_print
        mov     al, 'E'
        call    putc
        mov     al, dl
        call    putc
.tail:  mov     eax, edi
        call    put_hex
        mov     al, 10
        call    putc
        call    unlock_print
halt_forever:
        cli
        hlt
        jmp     halt_forever

; ---------------------------------------------------------------------------
; Data.
        align   8
gdt:    dq      0
        dq      0x00AF9A000000FFFF      ; 0x08: 64-bit code, ring 0
        dq      0x00CF92000000FFFF      ; 0x10: flat data
gdt_end:
gdtr:   dw      gdt_end - gdt - 1
        dq      gdt
idtr:   dw      256 * 16 - 1
        dq      idt
exc_table:
%assign v 0
%rep 32
        dq      exc_ %+ v
%assign v v + 1
%endrep
cpus_up:        dd 0
print_lock:     dd 0
ram_end:        dd 0
msg_boot:       db "LMOS boot", 10, 0
msg_cpus:       db "cpus ", 0
msg_ticks:      db "ticks", 10, 0

; ---------------------------------------------------------------------------
; BSS (zeroed by the loader; page tables are cleared again before use).
        align   4096
load_end:
        absolute load_end
pml4:           resb 4096
pdpt:           resb 4096
pd:             resb 4 * 4096
idt:            resb 4096
pvclock:        resb 32 * MAX_CPUS
percpus:        resb PERCPU_SIZE * MAX_CPUS
xsave_size:     resd MAX_CPUS
        alignb  16
stacks:         resb STACK_SIZE * MAX_CPUS
bss_end:
