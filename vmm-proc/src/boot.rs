//! Direct 64-bit entry at CPL3, exactly as docs/guest-abi.md specifies: the low-memory
//! structures (GDT, TSS, identity page tables, `hvm_start_info` with its memory map and the
//! command line) and each vCPU's registers. No guest boot code runs: every vCPU starts at
//! the image's entry point in long mode, user mode, IOPL 3.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, GDT_ADDR, MEMMAP_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR,
    START_INFO_ADDR, TSS_ADDR, TSS_HEADER, TSS_SIZE,
};

/// The GDT (PVM_FACTS.md): null, kernel code64 (0x08), kernel data (0x10), TSS (0x18, its
/// low half: `tr` is loaded through `KVM_SET_SREGS`), user code64 (0x23 with RPL 3), user
/// data (0x2b).
pub const GDT: [u64; 6] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    tss_descriptor_low(TSS_ADDR, TSS_SIZE - 1),
    0x00af_fb00_0000_ffff,
    0x00cf_f300_0000_ffff,
];
const USER_CS: u16 = 0x23;
const USER_DS: u16 = 0x2b;
const TSS_SELECTOR: u16 = 0x18;

/// Page-table entry bits: present, writable, user-accessible, 2 MiB page.
const PTE_P_RW_US: u64 = 0x7;
const PTE_PS: u64 = 0x80;

const CR0: u64 = 0x8005_0033; // PE MP ET NE WP AM PG
const CR4: u64 = 0x620; // PAE OSFXSR OSXMMEXCPT
const EFER: u64 = 0x500; // LME LMA
/// IOPL 3 (port I/O at CPL3), interrupts off, bit 1 always set.
const RFLAGS: u64 = 0x3002;

/// `hvm_start_info.magic` (the PVH boot ABI).
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// `hvm_memmap_table_entry.type` for RAM.
const MEMMAP_RAM: u32 = 1;

/// The low 8 bytes of an available 64-bit TSS descriptor (type 0x9), present.
const fn tss_descriptor_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// Why the boot structures could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing the boot structures: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// Writes the GDT, TSS, page tables, `hvm_start_info`, memory map and command line.
pub fn write_boot_structures<M: GuestMemory>(
    mem: &M,
    ram_size: u64,
    cmdline: &str,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // The TSS: an I/O bitmap right after it (offset at 0x66), all zeros (every port
    // allowed), ended by an all-ones byte.
    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[0x66..0x68].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    tss[TSS_SIZE as usize - 1] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))?;
    // Identity map of 0-4 GiB with 2 MiB pages, user-accessible at every level.
    mem.write_obj(PDPT_ADDR | PTE_P_RW_US, GuestAddress(PML4_ADDR))?;
    mem.write_slice(&[0u8; 4096 - 8], GuestAddress(PML4_ADDR + 8))?;
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(4).enumerate() {
        *e = (PD_ADDR + 0x1000 * i as u64) | PTE_P_RW_US;
    }
    mem.write_slice(as_bytes(&pdpt), GuestAddress(PDPT_ADDR))?;
    for pd in 0..4u64 {
        let mut table = [0u64; 512];
        for (i, e) in table.iter_mut().enumerate() {
            *e = ((pd * 512 + i as u64) << 21) | PTE_PS | PTE_P_RW_US;
        }
        mem.write_slice(as_bytes(&table), GuestAddress(PD_ADDR + 0x1000 * pd))?;
    }
    // hvm_start_info (56 bytes): magic, version, flags, nr_modules, modlist_paddr,
    // cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(START_INFO_ADDR))?;
    // One hvm_memmap_table_entry (24 bytes): all of RAM.
    let mut map = Vec::with_capacity(24);
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&ram_size.to_le_bytes());
    map.extend_from_slice(&MEMMAP_RAM.to_le_bytes());
    map.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&map, GuestAddress(MEMMAP_ADDR))?;
    let mut line = vec![0u8; CMDLINE_MAX];
    line[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    mem.write_slice(&line, GuestAddress(CMDLINE_ADDR))?;
    Ok(())
}

fn as_bytes(table: &[u64; 512]) -> &[u8] {
    // SAFETY: a [u64; 512] is 4096 initialised bytes with no padding; u8 has alignment 1
    // and the slice borrows `table` for its lifetime.
    unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), 4096) }
}

/// The general registers of vCPU `index` of `count` at entry.
pub fn regs(entry: u64, index: u8, count: u8) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: RFLAGS,
        rdi: u64::from(index),
        rsi: START_INFO_ADDR,
        rdx: u64::from(count),
        rsp: 0,
        ..Default::default()
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// The special registers at entry, starting from the vCPU's own (which keep what KVM set,
/// e.g. the APIC base).
pub fn sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SELECTOR,
        type_: 11, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    // No IDT: an exception the guest does not expect becomes a triple fault, which
    // resets the machine (or with --no-reboot shuts it down).
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4;
    s.efer = EFER;
    s
}

/// The FPU at entry: the x87 and SSE defaults after FNINIT and reset.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn the_tss_descriptor_encodes_base_and_limit() {
        assert_eq!(GDT[3], 0x0000_8900_1000_2068);
    }

    #[test]
    fn structures_are_where_the_abi_says() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
        write_boot_structures(&mem, 4 << 20, "run=idle x=1").expect("write");
        let r64 = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).expect("read");
        let r32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).expect("read");
        assert_eq!(r64(GDT_ADDR + 0x20), 0x00af_fb00_0000_ffff);
        // The I/O bitmap: right after the TSS, every port allowed, all-ones end byte.
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(TSS_ADDR + 0x66))
                .expect("r"),
            104
        );
        assert_eq!(r64(TSS_ADDR + 104 + 0x3f8 / 8), 0);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(TSS_ADDR + TSS_SIZE - 1))
                .expect("r"),
            0xff
        );
        assert_eq!(r64(GDT_ADDR + 0x28), 0x00cf_f300_0000_ffff);
        assert_eq!(r64(PML4_ADDR), PDPT_ADDR | 7);
        assert_eq!(r64(PDPT_ADDR + 24), (PD_ADDR + 0x3000) | 7);
        // The last 2 MiB page below 4 GiB maps itself (the device window).
        assert_eq!(r64(PD_ADDR + 0x3000 + 511 * 8), 0xffe0_0000 | 0x87);
        assert_eq!(r32(START_INFO_ADDR), 0x336e_c578);
        assert_eq!(r64(START_INFO_ADDR + 24), CMDLINE_ADDR);
        assert_eq!(r64(START_INFO_ADDR + 40), MEMMAP_ADDR);
        assert_eq!(r32(START_INFO_ADDR + 48), 1);
        assert_eq!(r64(MEMMAP_ADDR + 8), 4 << 20);
        assert_eq!(r32(MEMMAP_ADDR + 16), 1);
        let mut line = [0u8; 13];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&line, b"run=idle x=1\0");
        assert!(matches!(
            write_boot_structures(&mem, 4 << 20, &"x".repeat(CMDLINE_MAX)),
            Err(BootError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn every_vcpu_enters_at_cpl3_with_its_index() {
        let r = regs(0x10_0000, 1, 2);
        assert_eq!(
            (r.rip, r.rdi, r.rsi, r.rdx, r.rflags),
            (0x10_0000, 1, 0x6000, 2, 0x3002)
        );
        let s = sregs(kvm_sregs::default());
        assert_eq!(
            (s.cs.selector, s.cs.dpl, s.cs.l, s.cs.type_),
            (0x23, 3, 1, 11)
        );
        assert_eq!((s.ss.selector, s.ss.dpl), (0x2b, 3));
        assert_eq!(
            (s.cr0, s.cr3, s.cr4, s.efer),
            (0x8005_0033, 0x9000, 0x620, 0x500)
        );
    }
}
