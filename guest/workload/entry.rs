//! The guest's two entries (`docs/guest-abi.md`) and everything they need in the image:
//!
//! - `workload_entry64` (`e_entry`): every vCPU, 64-bit, CPL3, rdi = index, rsi =
//!   `hvm_start_info`, rdx = vCPU count. vCPU 0 first writes the boot-timer byte; each
//!   vCPU takes its own stack from `workload_stacks` and calls `workload_main`.
//! - `workload_entry_pvh` (the PVH note): QEMU's one vCPU, 32-bit, CPL0, paging off, ebx
//!   = `hvm_start_info`. About twenty instructions (CPL0 is emulated on PVM hosts): load
//!   the static GDT and page tables below, enable long mode with cr4 0x620, and `iretq`
//!   to `workload_entry64` at CPL3 with IOPL 3.
//!
//! Also the memory functions the compiler calls (`memcpy` and friends), as `rep` string
//! instructions (written in Rust they could be compiled back into calls to themselves),
//! and the `rust_eh_personality` symbol the precompiled `core` refers to.

use crate::abi::{BOOT_TIMER_BYTE, BOOT_TIMER_PORT, MAX_VCPUS, STACK_SIZE};

core::arch::global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .code64
    .globl workload_entry64
workload_entry64:
    test %rdi, %rdi
    jnz 1f
    mov ${timer_byte}, %al
    out %al, ${timer_port}
1:  cmp ${max_vcpus}, %rdi
    jae 3f
    lea 1(%rdi), %rax
    imul ${stack_size}, %rax, %rax
    lea workload_stacks(%rax), %rsp
    xor %ebp, %ebp
    call workload_main
2:  ud2
    jmp 2b
    /* An index past the last stack: no stack, so no Rust; vCPU 0 reports it. */
3:  pause
    jmp 3b

    .code32
    .globl workload_entry_pvh
workload_entry_pvh:
    cli
    lgdt pvh_gdt_ptr
    lidt pvh_idt_null
    mov $0x620, %eax
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80050033, %eax
    mov %eax, %cr0
    ljmp $0x08, $pvh_long
    .code64
pvh_long:
    mov $0x10, %eax
    mov %eax, %ss
    mov $0x2b, %eax
    mov %eax, %ds
    mov %eax, %es
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $(workload_stacks + {stack_size}), %esp
    pushq $0x2b
    pushq $0
    pushq $0x3002
    pushq $0x23
    pushq $workload_entry64
    mov %ebx, %esi
    xor %edi, %edi
    mov $1, %edx
    iretq

    /* memcpy/memmove/memset/memcmp/bcmp for the compiler. */
    .globl memcpy
memcpy:
    mov %rdi, %rax
    mov %rdx, %rcx
    rep movsb
    ret

    .globl memmove
memmove:
    mov %rdi, %rax
    mov %rdx, %rcx
    cmp %rsi, %rdi
    jbe 1f
    lea -1(%rsi, %rdx), %rsi
    lea -1(%rdi, %rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

    .globl memset
memset:
    mov %rdi, %r8
    mov %esi, %eax
    mov %rdx, %rcx
    rep stosb
    mov %r8, %rax
    ret

    .globl memcmp
    .globl bcmp
memcmp:
bcmp:
    xor %eax, %eax
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 1f
    repe cmpsb
    je 1f
    movzbl -1(%rdi), %eax
    movzbl -1(%rsi), %ecx
    sub %ecx, %eax
1:  ret

    /* The precompiled core (built to unwind) refers to this; with panic=abort nothing
       unwinds, so it is never called. */
    .globl rust_eh_personality
rust_eh_personality:
    ud2
    .popsection

    /* The PVH path's GDT (the same selectors splitvmm sets up) and a null IDT: any
       exception then shuts the VM down instead of jumping through firmware leftovers. */
    .pushsection .data.pvh, "aw"
    .balign 16
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0
    .quad 0x00affb000000ffff
    .quad 0x00cff3000000ffff
pvh_gdt_end:
    .balign 4
pvh_gdt_ptr:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt
pvh_idt_null:
    .word 0
    .long 0
    .popsection

    /* Identity map of 0-4 GiB in 2 MiB pages, user-accessible (P|RW|US). */
    .pushsection .data.pagetables, "aw"
    .balign 4096
pvh_pml4:
    .quad pvh_pdpt + 0x7
    .fill 511, 8, 0
pvh_pdpt:
    .quad pvh_pd + 0x0007
    .quad pvh_pd + 0x1007
    .quad pvh_pd + 0x2007
    .quad pvh_pd + 0x3007
    .fill 508, 8, 0
pvh_pd:
    .set pvh_page, 0
    .rept 2048
    .quad (pvh_page << 21) | 0x87
    .set pvh_page, pvh_page + 1
    .endr
    .popsection

    /* XEN_ELFNOTE_PHYS32_ENTRY: QEMU's PVH loader starts here. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad workload_entry_pvh
    .popsection

    .pushsection .bss.stacks, "aw", @nobits
    .balign 4096
    .globl workload_stacks
workload_stacks:
    .skip {stacks_size}
    .popsection
"#,
    timer_byte = const BOOT_TIMER_BYTE,
    timer_port = const BOOT_TIMER_PORT,
    max_vcpus = const MAX_VCPUS,
    stack_size = const STACK_SIZE,
    stacks_size = const STACK_SIZE * MAX_VCPUS,
    options(att_syntax)
);

unsafe extern "C" {
    /// The per-vCPU stacks (`MAX_VCPUS` × `STACK_SIZE`), in `.bss`; only its address is used.
    safe static workload_stacks: [u8; 0];
}

/// The index of the vCPU whose stack holds `sp`, if any (used where no index was passed,
/// i.e. the panic handler).
pub fn vcpu_of_stack(sp: u64) -> Option<usize> {
    let base = (&raw const workload_stacks) as u64;
    let i = usize::try_from(sp.checked_sub(base)?).ok()? / STACK_SIZE;
    (i < MAX_VCPUS).then_some(i)
}

/// The current stack pointer.
pub fn stack_pointer() -> u64 {
    let sp: u64;
    // SAFETY: reads rsp only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}
