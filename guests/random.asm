; random.asm -- the "random" test guest: random page visits.
;
; Theory of operation
; -------------------
; An init pass stores each page's own page number (address >> 12, u32 LE) in the
; page's first dword.  Then, forever, the guest picks a page with a xorshift32 PRNG,
; checks that its first dword still holds the page number ('E' and halt if not) and
; writes a running visit counter into some other dword of that page, chosen from the
; same random number (offset 4..0xffc, never 0..3, so the tag is never overwritten).
; After every N visits, N being the number of pages in the range, it prints 'B'.
;
; The writes dirty random pages at random offsets, which is what makes a live
; migration work for its money; the tags let the host verify, after a pause, that
; every page landed where it belongs (livemig.vmm.checks.random_check).
;
; Mapping a random number x to a page index in [0, N) without division and for any N
; (not only powers of two): index = (x * N) >> 32, the high half of a 32x32 multiply.
; Its bias is below N / 2^32, negligible for any RAM size the guest can address.
;
; Registers in the main loop: ESI = range_start, EDI = N, EBP = PRNG state,
; ECX = visit counter, EBX = visits left before the next 'B'.

%include "boot.inc"

main:
        ; Init pass: tag every page with its page number.
        mov     ebx, esi
.init:
        mov     eax, ebx
        shr     eax, PAGE_SHIFT
        mov     [ebx], eax
        add     ebx, PAGE_SIZE
        cmp     ebx, edi
        jb      .init

        sub     edi, esi                ; EDI = N = number of pages in the range
        shr     edi, PAGE_SHIFT
        mov     ebp, 0x2545f491         ; any nonzero xorshift32 seed
        xor     ecx, ecx                ; visit counter
        mov     ebx, edi                ; visits until the next 'B'

.visit:
        ; xorshift32: x ^= x << 13; x ^= x >> 17; x ^= x << 5
        mov     eax, ebp
        shl     eax, 13
        xor     ebp, eax
        mov     eax, ebp
        shr     eax, 17
        xor     ebp, eax
        mov     eax, ebp
        shl     eax, 5
        xor     ebp, eax

        mov     eax, ebp                ; page index = (x * N) >> 32, lands in EDX
        mul     edi
        shl     edx, PAGE_SHIFT         ; EDX = address of the chosen page
        add     edx, esi

        mov     eax, edx                ; its first dword must be its page number
        shr     eax, PAGE_SHIFT
        cmp     [edx], eax
        jne     fail

        mov     eax, ebp                ; dword offset from the low bits of x ...
        and     eax, 0xffc
        jnz     .offset_ok
        mov     eax, 4                  ; ... but never the tag at offset 0
.offset_ok:
        inc     ecx
        mov     [edx + eax], ecx        ; dirty the page with the visit counter

        dec     ebx                     ; N visits make one 'B'
        jnz     .visit
        mov     ebx, edi
        mov     al, 'B'
        call    putc
        jmp     .visit

LMIG_TRAILER
