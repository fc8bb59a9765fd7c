//! Where things go in a Linux guest's physical address space.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)              0x0000_a000  PDPT
//! 0x0000_5000  PVH hvm_start_info,      0x0000_b000  4 page directories: 0-4 GiB, 2 MiB pages
//!              module list, memory map  0x0002_0000  kernel command line
//! 0x0000_7000  boot_params (zero page)  0x0009_fc00  EBDA and BIOS area (reserved)
//! 0x0000_8ff0  boot stack (grows down)  0x000e_0000  ACPI tables, RSDP first
//!                                       0x000f_fff0  the real-mode reset vector: a reset stub
//! 0x0010_0000  kernel (bzImage protected-mode code; an ELF goes to its own addresses)
//!   ...        initramfs at the top of low RAM
//! 0xc000_0000  device window (reserved): virtio-mmio at 0xd000_0000, IOAPIC, local APIC
//! 0x1_0000_0000  the rest of RAM, when the guest has more than 3 GiB
//! ```

/// The boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: interrupts stay off until the kernel installs its own.
pub const IDT_ADDR: u64 = 0x520;
/// PVH: `hvm_start_info`, then the module list and the memory map.
pub const PVH_INFO_ADDR: u64 = 0x5000;
pub const PVH_MODLIST_ADDR: u64 = 0x5040;
pub const PVH_MEMMAP_ADDR: u64 = 0x5080;
/// The 64-bit boot protocol's `boot_params`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (the kernel switches to its own at once).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity page tables: one PML4, one PDPT, four page directories.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// How much the identity map covers: the 64-bit boot protocol needs the kernel,
/// boot_params, the command line and the initramfs mapped, all of which sit below 4 GiB.
pub const IDENTITY_MAP_SIZE: u64 = 1 << 32;
/// The kernel command line and the room it has.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Start of the extended BIOS data area: RAM below it, reserved from it to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables, RSDP first (where a kernel's scan of 0xe0000-0xfffff finds it), up to
/// the reset vector.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = RESET_VECTOR;
/// Where a CPU in real mode jumps to reboot through the BIOS (`ljmp $0xf000, $0xfff0`).
/// Linux does that when its other reboot methods return, and on hardware-reduced ACPI
/// without EFI it is its default: `reboot_init` picks EFI, `efi_reboot` returns at once,
/// and `machine_real_restart` follows. With no firmware, the loader puts a stub here that
/// pulses the reset line (`mov al, 0xfe; out 0x64, al`, then `hlt` in a loop), so every
/// reboot method ends in the same reset.
pub const RESET_VECTOR: u64 = 0xf_fff0;
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// Start of "high" memory, where a bzImage's protected-mode code is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The device window below 4 GiB: reserved in the e820 map, never RAM.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The IOAPIC and the local APIC, as KVM's in-kernel irqchip places them.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// ACPI sleep control register (an I/O port). Writing `ACPI_S5_VALUE` to it means
/// "power off" (`SLP_TYP` = 5 from the DSDT's `_S5_`, with `SLP_EN`).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
pub const ACPI_S5_VALUE: u8 = (5 << 2) | (1 << 5);
/// ACPI reset register: the i8042 command port, and the value that pulses the reset
/// line, so an ACPI reboot is the same event as a keyboard-controller reboot.
pub const ACPI_RESET_PORT: u16 = 0x64;
pub const ACPI_RESET_VALUE: u8 = 0xfe;
/// COM1, described in the DSDT for the kernel's 8250 driver.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;
