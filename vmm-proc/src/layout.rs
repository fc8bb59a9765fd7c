//! The guest-physical address map and the interrupt lines, as docs/guest-abi.md states them.
//!
//! ```text
//! 0x0000_0500  GDT (6 entries)
//! 0x0000_1000  TSS with an I/O permission bitmap allowing every port (to 0x3068)
//! 0x0000_6000  hvm_start_info, 0x6100 its memory map
//! 0x0000_7000  command line (NUL-terminated, at most 4 KiB)
//! 0x0000_9000  page tables: PML4, PDPT at 0xa000, four PDs at 0xb000-0xefff
//! 0x0001_0000  guest-owned RAM (the image is linked at 0x10_0000 and up)
//! 0xc000_0000  device window, no RAM above; virtio-mmio disk i at 0xd000_0000 + i * 0x1000
//! ```
//!
//! A Linux guest uses `linux::layout` for its low memory instead, and its RAM beyond 3 GiB
//! continues at 4 GiB (`linux::e820`); the device window and the disks are the same.

/// The GDT.
pub const GDT_ADDR: u64 = 0x500;
/// `hvm_start_info`, the PVH boot structure.
pub const START_INFO_ADDR: u64 = 0x6000;
/// The memory map `hvm_start_info` points to.
pub const MEMMAP_ADDR: u64 = 0x6100;
/// The command line.
pub const CMDLINE_ADDR: u64 = 0x7000;
/// The most bytes of command line, its NUL included.
pub const CMDLINE_MAX: usize = 0x1000;
/// The TSS `tr` refers to (the guest never loads it).
///
/// It carries an I/O permission bitmap that allows every port. IOPL 3 alone is not
/// enough under PVM: the guest runs in hardware ring 3 with IOPL 0, every `in`/`out` traps
/// into KVM's instruction emulator, and PVM's saved RFLAGS lose the IOPL bits at the first
/// exit, so the emulator falls back to the TSS bitmap.
pub const TSS_ADDR: u64 = 0x1000;
/// The TSS proper, before the bitmap.
pub const TSS_HEADER: u64 = 104;
/// The TSS with its 8 KiB bitmap and the terminating all-ones byte.
pub const TSS_SIZE: u64 = TSS_HEADER + 8192 + 1;
/// The page-map level-4 table (`cr3`).
pub const PML4_ADDR: u64 = 0x9000;
/// The one page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// The first of the four page directories (2 MiB pages, 0 to 4 GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Where guest-owned memory starts: the image may not load below this.
pub const GUEST_LOW_END: u64 = 0x1_0000;
/// The start of the device window; RAM ends at or below it.
pub const MMIO_WINDOW: u64 = 0xc000_0000;
/// The most RAM the workload guest can have: its ABI describes one region, below the
/// device window.
pub const WORKLOAD_MAX_RAM: u64 = MMIO_WINDOW;
/// The most RAM any guest can have (a Linux guest's RAM continues at 4 GiB): 1 TiB keeps
/// every guest-physical address within what any x86_64 host's KVM accepts.
pub const MAX_RAM: u64 = 1 << 40;
/// Where disk 0's virtio-mmio registers are.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The size of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC pin of disk 0; disk i uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The most disks a guest can have (IOAPIC pins 5 to 20).
pub const MAX_DISKS: usize = 16;
/// The serial port's I/O base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// KVM's three-page TSS for real mode (Intel needs it set; it lies in the device window).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The virtio-mmio window of disk `index`, and its IRQ, if it may exist.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    if index >= MAX_DISKS {
        return None;
    }
    let i = index as u64;
    Some((
        VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    ))
}
