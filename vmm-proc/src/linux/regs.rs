//! The boot CPU's initial state, as plain data for `KVM_SET_REGS` / `KVM_SET_SREGS` /
//! `KVM_SET_FPU`, and the guest-memory structures it points at (GDT, IDT, page tables).
//!
//! - 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"): long mode, paging on with
//!   an identity map of the low 4 GiB (2 MiB pages), `__BOOT_CS` = 0x10 and `__BOOT_DS` =
//!   0x18 flat segments, interrupts off, `rsi` = the `boot_params` address.
//! - PVH (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected mode, paging off,
//!   flat 32-bit segments, `ebx` = the `hvm_start_info` address.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    BOOT_STACK_TOP, GDT_ADDR, IDENTITY_MAP_SIZE, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR,
};

/// Selectors of the boot GDT. Entries 0 and 1 are null, as the Linux boot protocol expects
/// `__BOOT_CS` at 0x10 and `__BOOT_DS` at 0x18.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page table entry bits: present, writable, and for directory entries "2 MiB page".
const PTE_P_RW: u64 = 0x3;
const PDE_PS: u64 = 0x80;

/// Which entry convention the kernel was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit boot protocol: long mode, `rsi` = `boot_params`.
    Linux64,
    /// PVH: 32-bit protected mode, `ebx` = `hvm_start_info`.
    Pvh,
}

/// The boot vCPU's starting state. Other vCPUs start in the KVM reset state and are woken
/// by the kernel with INIT/SIPI.
#[derive(Debug, Clone, Copy)]
pub struct BootCpu {
    pub protocol: BootProtocol,
    /// General-purpose registers, `rip` and `rflags`: set as they are.
    pub regs: kvm_regs,
    /// Segments, descriptor tables and control registers. Fields the loader does not own
    /// (`apic_base`, `interrupt_bitmap`, `cr8`) are zero here: use
    /// [`BootCpu::apply_sregs`] on the vCPU's current sregs rather than setting this as is.
    pub sregs: kvm_sregs,
}

impl BootCpu {
    /// Copies the loader's part of the special registers into `current` (from
    /// `KVM_GET_SREGS`), keeping the APIC base and the pending-interrupt bitmap.
    pub fn apply_sregs(&self, current: &mut kvm_sregs) {
        let s = &self.sregs;
        current.cs = s.cs;
        current.ds = s.ds;
        current.es = s.es;
        current.fs = s.fs;
        current.gs = s.gs;
        current.ss = s.ss;
        current.tr = s.tr;
        current.ldt = s.ldt;
        current.gdt = s.gdt;
        current.idt = s.idt;
        current.cr0 = s.cr0;
        current.cr3 = s.cr3;
        current.cr4 = s.cr4;
        current.efer = s.efer;
    }
}

/// The FPU state Linux expects at entry: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// A GDT descriptor from flags (access byte in bits 0-7, flags nibble in bits 12-15),
/// base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` a descriptor describes, for selector `sel`.
fn segment(entry: u64, sel: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        // The limit in bytes, as KVM wants it.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: sel,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The boot GDT for a protocol: null, null, code, data, TSS.
pub fn gdt(protocol: BootProtocol) -> [u64; 5] {
    let code = match protocol {
        // Present, DPL 0, code, execute/read, accessed; G=1, L=1.
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        // The same with D=1, L=0: a flat 32-bit code segment.
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        // Present, DPL 0, data, read/write, accessed; G=1, D/B=1.
        gdt_entry(0xc093, 0, 0xfffff),
        // Present, busy 32/64-bit TSS.
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Errors writing the boot structures: the guest memory lacks the low pages they use.
#[derive(Debug, thiserror::Error)]
#[error("guest memory has no room for the boot {what} at {addr:#x}: {source}")]
pub struct WriteError {
    what: &'static str,
    addr: u64,
    source: vm_memory::GuestMemoryError,
}

fn write<M: GuestMemoryBackend, T: vm_memory::ByteValued>(
    mem: &M,
    what: &'static str,
    addr: u64,
    v: T,
) -> Result<(), WriteError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| WriteError { what, addr, source })
}

/// Writes the GDT and an empty IDT and returns the CPU state for `protocol` entering at
/// `entry` with `arg` in `rsi` (Linux64) or `rbx` (PVH). For Linux64, also writes the
/// identity page tables.
pub fn setup<M: GuestMemoryBackend>(
    mem: &M,
    protocol: BootProtocol,
    entry: u64,
    arg: u64,
) -> Result<BootCpu, WriteError> {
    let table = gdt(protocol);
    for (i, e) in table.iter().enumerate() {
        write(mem, "GDT", GDT_ADDR + 8 * i as u64, *e)?;
    }
    write(mem, "IDT", IDT_ADDR, 0u64)?;

    let mut sregs = kvm_sregs {
        gdt: kvm_dtable {
            base: GDT_ADDR,
            limit: (std::mem::size_of_val(&table) - 1) as u16,
            ..Default::default()
        },
        idt: kvm_dtable {
            base: IDT_ADDR,
            limit: 7,
            ..Default::default()
        },
        ..Default::default()
    };
    let code = segment(table[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment(table[usize::from(BOOT_DS / 8)], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[usize::from(BOOT_TSS / 8)], BOOT_TSS);
    // No LDT: a present-but-unusable null segment keeps KVM's checks happy.
    sregs.ldt = kvm_segment {
        type_: 2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsi = arg;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            regs.rbx = arg;
        }
    }
    Ok(BootCpu {
        protocol,
        regs,
        sregs,
    })
}

/// PML4[0] → PDPT; PDPT[0..4] → four page directories of 512 2 MiB pages: 0-4 GiB
/// identity-mapped, writable, kernel-only.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), WriteError> {
    const PAGE_2M: u64 = 2 << 20;
    let directories = IDENTITY_MAP_SIZE / (512 * PAGE_2M);
    write(mem, "PML4", PML4_ADDR, PDPT_ADDR | PTE_P_RW)?;
    for d in 0..directories {
        let pd = PD_ADDR + d * 0x1000;
        write(mem, "PDPT", PDPT_ADDR + 8 * d, pd | PTE_P_RW)?;
        for i in 0..512 {
            let addr = (d * 512 + i) * PAGE_2M;
            write(mem, "page directory", pd + 8 * i, addr | PTE_P_RW | PDE_PS)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory")
    }

    #[test]
    fn long_mode_state_matches_the_known_good_values() {
        let m = mem();
        let cpu = setup(&m, BootProtocol::Linux64, 0x10_0200, 0x7000).expect("setup");
        // DESIGN.md §4's long-mode set-up: code64 0x00af9b000000ffff, data
        // 0x00cf93000000ffff, cr0 0x80050033, cr4 0x20, efer 0x500.
        let g = gdt(BootProtocol::Linux64);
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
        assert_eq!(cpu.sregs.cr0, 0x8005_0033);
        assert_eq!(cpu.sregs.cr4, 0x20);
        assert_eq!(cpu.sregs.efer, 0x500);
        assert_eq!(cpu.sregs.cr3, PML4_ADDR);
        assert_eq!(
            (cpu.sregs.cs.selector, cpu.sregs.cs.l, cpu.sregs.cs.type_),
            (0x10, 1, 0xb)
        );
        assert_eq!(cpu.sregs.cs.limit, 0xffff_ffff);
        assert_eq!((cpu.sregs.ds.selector, cpu.sregs.ds.db), (0x18, 1));
        assert_eq!(
            (cpu.regs.rip, cpu.regs.rsi, cpu.regs.rflags),
            (0x10_0200, 0x7000, 2)
        );
        let gdt0: u64 = m.read_obj(GuestAddress(GDT_ADDR + 16)).expect("read GDT");
        assert_eq!(gdt0, g[2]);
    }

    #[test]
    fn identity_map_covers_4_gib_with_2_mib_pages() {
        let m = mem();
        setup(&m, BootProtocol::Linux64, 0x10_0200, 0x7000).expect("setup");
        let read = |a: u64| -> u64 { m.read_obj(GuestAddress(a)).expect("read") };
        assert_eq!(read(PML4_ADDR), PDPT_ADDR | 3);
        // Translate a few addresses by walking the tables.
        for va in [0u64, 0x7000, 0x10_0000, 0xbfff_f000, 0xffff_ffff] {
            let pdpte = read(PDPT_ADDR + 8 * ((va >> 30) & 511));
            assert_eq!(pdpte & 1, 1, "PDPT entry for {va:#x}");
            let pde = read((pdpte & !0xfff) + 8 * ((va >> 21) & 511));
            assert_eq!(pde & 0x83, 0x83, "PD entry for {va:#x}");
            assert_eq!(
                (pde & !0x1f_ffff) | (va & 0x1f_ffff),
                va,
                "identity at {va:#x}"
            );
        }
    }

    #[test]
    fn pvh_starts_in_flat_32_bit_protected_mode() {
        let m = mem();
        let cpu = setup(&m, BootProtocol::Pvh, 0x100_0000, 0x5000).expect("setup");
        assert_eq!(cpu.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(cpu.sregs.efer, 0);
        assert_eq!(
            (cpu.sregs.cs.db, cpu.sregs.cs.l, cpu.sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!((cpu.regs.rip, cpu.regs.rbx), (0x100_0000, 0x5000));
    }

    #[test]
    fn apply_sregs_keeps_the_apic_base() {
        let m = mem();
        let cpu = setup(&m, BootProtocol::Linux64, 0x10_0200, 0x7000).expect("setup");
        let mut current = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        cpu.apply_sregs(&mut current);
        assert_eq!(current.apic_base, 0xfee0_0900);
        assert_eq!(current.cr3, PML4_ADDR);
        assert_eq!(current.cs.selector, BOOT_CS);
    }

    #[test]
    fn missing_low_memory_is_an_error() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)])
            .expect("guest memory");
        let e = setup(&m, BootProtocol::Linux64, 0, 0).expect_err("no low memory");
        assert!(e.to_string().contains("GDT"), "{e}");
    }
}
