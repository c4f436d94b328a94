; ab.asm -- the "ab" test guest: a sweeping incrementer.
;
; Theory of operation
; -------------------
; The guest owns the first byte of every 4 KiB page in [range_start, range_end).
; An init pass sets them all to 0.  Then, forever, pass c walks the pages in address
; order; each page must still hold c mod 256 (what pass c-1 wrote) and is bumped to
; c+1.  After a full pass the guest prints 'B' and starts pass c+1.
;
; So at any instant pages [0,k) hold c+1 and pages [k,n) hold c: a single step down
; where the walker stands.  A host that pauses the guest (e.g. after a migration) can
; verify exactly that pattern (livemig.vmm.checks.ab_check), and the guest itself
; notices any page that lost an update, printing 'E' and halting.
;
; Registers in the main loop: ESI = range_start, EDI = range_end, EBX = current page,
; CL = pass counter c (mod 256, wraps naturally).

%include "boot.inc"

main:
        ; Init pass: first byte of every page := 0; nothing to check yet.
        mov     ebx, esi
.init:
        mov     byte [ebx], 0
        add     ebx, PAGE_SIZE
        cmp     ebx, edi
        jb      .init

        xor     ecx, ecx                ; pass counter c = 0
.pass:
        mov     ebx, esi                ; every pass starts at the first page
.page:
        cmp     [ebx], cl               ; page must still hold the previous value c
        jne     fail
        lea     eax, [ecx + 1]          ; and now gets c+1 (only AL is stored)
        mov     [ebx], al
        add     ebx, PAGE_SIZE
        cmp     ebx, edi
        jb      .page

        inc     cl                      ; pass complete: c += 1 (mod 256)
        mov     al, 'B'
        call    putc
        jmp     .pass

LMIG_TRAILER
