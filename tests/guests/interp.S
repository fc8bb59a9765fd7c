# The test guests' interpreter: a CPL3 loop that executes a list of operations built by
# the test (tests/src/guest.rs). Linked at 0x100000; vCPU i runs the list at
# 0x200000 + i * 0x10000. Each operation is four little-endian u64s: op, a, b, c.
# On a failed check it writes ((operation number << 8) | 1) to the debug-exit port.
#
# Assemble: as --64 -o interp.o interp.S && objcopy -O binary -j .text interp.o interp.bin
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        mov r15, rdi
        mov rbx, rdi
        shl rbx, 16
        add rbx, 0x200000
        xor r12d, r12d
next:
        mov rax, [rbx]
        mov rsi, [rbx + 8]
        mov rdx, [rbx + 16]
        mov rcx, [rbx + 24]
        add rbx, 32
        inc r12
        cmp rax, 1
        je op_w32
        cmp rax, 2
        je op_w16
        cmp rax, 3
        je op_w64
        cmp rax, 4
        je op_r32eq
        cmp rax, 5
        je op_r8eq
        cmp rax, 6
        je op_wait16
        cmp rax, 7
        je op_out8
        cmp rax, 8
        je op_out32
        cmp rax, 9
        je op_memeq
        cmp rax, 10
        je op_jmp
        cmp rax, 11
        je op_idle
        cmp rax, 12
        je op_r32mask
        cmp rax, 13
        je op_add16
        cmp rax, 14
        je op_print
        cmp rax, 15
        je op_fill
        cmp rax, 16
        je op_waiteq16
        jmp fail
op_w32:                         # *(u32 *)a = b
        mov [rsi], edx
        jmp next
op_w16:                         # *(u16 *)a = b
        mov [rsi], dx
        jmp next
op_w64:                         # *(u64 *)a = b
        mov [rsi], rdx
        jmp next
op_r32eq:                       # *(u32 *)a == b, else fail
        mov eax, [rsi]
        cmp eax, edx
        jne fail
        jmp next
op_r8eq:                        # *(u8 *)a == b, else fail
        mov al, [rsi]
        cmp al, dl
        jne fail
        jmp next
op_wait16:                      # spin until *(u16 *)a == b, at most c rounds
        mov ax, [rsi]
        cmp ax, dx
        je next
        pause
        dec rcx
        jnz op_wait16
        jmp fail
op_out8:                        # out a, (u8)b
        mov eax, edx
        mov edx, esi
        out dx, al
        jmp next
op_out32:                       # out a, (u32)b
        mov eax, edx
        mov edx, esi
        out dx, eax
        jmp next
op_memeq:                       # memcmp(a, b, c) == 0, else fail
        mov rdi, rdx
        xor eax, eax            # ZF=1 when c == 0
        repe cmpsb
        jne fail
        jmp next
op_jmp:                         # continue at operation address a
        mov rbx, rsi
        jmp next
op_idle:                        # spin forever
        pause
        jmp op_idle
op_r32mask:                     # (*(u32 *)a & c) == b, else fail
        mov eax, [rsi]
        and eax, ecx
        cmp eax, edx
        jne fail
        jmp next
op_add16:                       # *(u16 *)a += b
        add [rsi], dx
        jmp next
op_print:                       # write b bytes at a to the serial port
        mov rcx, rdx
        mov edx, 0x3f8
        rep outsb
        jmp next
op_fill:                        # memset(a, b, c)
        mov rdi, rsi
        mov eax, edx
        rep stosb
        jmp next
op_waiteq16:                    # spin until *(u16 *)a == *(u16 *)b, at most c rounds
        mov ax, [rsi]
        cmp ax, [rdx]
        je next
        pause
        dec rcx
        jnz op_waiteq16
        jmp fail
fail:
        mov eax, r12d
        shl eax, 8
        or eax, 1
        mov edx, 0xf4
        out dx, eax
        jmp op_idle
