//! Linux guests: loading a kernel, its initramfs and command line into guest memory, and
//! describing the machine so that a stock distribution kernel finds its devices.
//!
//! [`load_linux`] is the whole job. Given guest memory (mapped at the addresses
//! [`e820::ram_regions`] gives), the kernel image and the initramfs as already-open files
//! (vmm-proc opens nothing), it:
//!
//! - loads a bzImage (64-bit boot protocol, entry at load address + 0x200) or an ELF
//!   `vmlinux` (PVH entry if the image has the Xen PVH note, else its ELF entry with the
//!   64-bit boot protocol), with [`linux-loader`](linux_loader) after its own header checks;
//! - puts the initramfs at the top of RAM below 3 GiB (and below the kernel's limit), and
//!   the command line at [`layout::CMDLINE_ADDR`];
//! - writes the ACPI tables ([`acpi`]: RSDP, XSDT, FADT, MADT, DSDT with the virtio-mmio
//!   devices as `LNRO0005`), and `boot_params` with the e820 map, or PVH's `hvm_start_info`;
//! - returns the boot vCPU's registers ([`regs::BootCpu`]) as plain data.
//!
//! Everything read from the images is external input: parse errors are returned, never
//! panicked on. The layout is in [`layout`].

pub mod acpi;
pub mod aml;
pub mod bzimage;
pub mod e820;
pub mod elf;
pub mod layout;
pub mod regs;

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use bzimage::{BzImageError, ENTRY_64_OFFSET, SETUP_HEADER_END, SetupHeader};
use e820::E820Entry;
use layout::{
    ACPI_END, ACPI_START, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, IOAPIC_ADDR, MMIO_HOLE_START,
    PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, RESET_STUB, RESET_VECTOR, ZERO_PAGE_ADDR,
};
pub use regs::{BootCpu, BootProtocol};

/// The kernel's `COMMAND_LINE_SIZE` on x86 (2048 with the NUL), for images without a
/// setup header that says otherwise.
const DEFAULT_CMDLINE_SIZE: u32 = 2047;
/// The guest sizes [`load_linux`] accepts.
const MIN_MEMORY: u64 = 16 << 20;
const MAX_VCPUS: u8 = 254;
/// IOAPIC pins: interrupts 0-23. 0 (timer), 2 (cascade) and COM1's are taken.
const IOAPIC_PINS: u32 = 24;
const MAX_DEVICES: usize = 20;
/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;

/// A virtio-mmio transport to describe to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of its register window (in the device window below 4 GiB).
    pub base: u64,
    /// Size of the register window (0x1000 for virtio-mmio).
    pub size: u64,
    /// The GSI (IOAPIC pin) it raises: edge-triggered, active high.
    pub irq: u32,
}

/// What the guest is told about the machine.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBootSpec<'a> {
    /// The kernel command line, without a terminating NUL.
    pub cmdline: &'a str,
    /// Guest RAM in bytes; guest memory must map [`e820::ram_regions`] of it.
    pub mem_size: u64,
    /// vCPUs, APIC ids 0..vcpus.
    pub vcpus: u8,
    pub devices: &'a [VirtioMmioDevice],
}

/// What was loaded where, and how to start the boot vCPU.
#[derive(Debug, Clone)]
pub struct LoadedLinux {
    pub cpu: BootCpu,
    /// Guest-physical range the kernel occupies once it has unpacked itself (as far as
    /// the image says), which the initramfs was kept clear of.
    pub kernel: Range<u64>,
    pub initrd: Option<Range<u64>>,
    pub rsdp_addr: u64,
    pub e820: Vec<E820Entry>,
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("invalid machine description: {0}")]
    Config(String),
    #[error("reading the kernel image: {0}")]
    KernelIo(std::io::Error),
    #[error("kernel image: {0}")]
    BzImage(#[from] BzImageError),
    #[error("ELF kernel image: {0}")]
    Elf(#[from] elf::ElfError),
    #[error("loading the kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error(
        "the kernel ({size} bytes, {need} bytes unpacked) does not fit in {ram} bytes of RAM below 3 GiB"
    )]
    KernelTooLarge { size: u64, need: u64, ram: u64 },
    #[error("kernel command line of {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("reading the initramfs: {0}")]
    InitrdIo(std::io::Error),
    #[error("the initramfs is empty")]
    InitrdEmpty,
    #[error(
        "the initramfs ({size} bytes) does not fit between the kernel (up to {kernel_end:#x}) \
         and {top:#x}, the highest address it may use"
    )]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("ACPI tables of {0} bytes do not fit at 0xe0000..0xffff0")]
    AcpiTooLarge(usize),
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{0}")]
    BootStructures(#[from] regs::WriteError),
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> LinuxError {
    move |source| LinuxError::Memory { what, source }
}

/// Loads the kernel, the initramfs (if any), the command line and the boot tables into
/// `mem`, and returns the boot vCPU's state. `kernel` and `initrd` are read from their
/// start, whatever their current offset.
pub fn load_linux<M, K, I>(
    mem: &M,
    kernel: &mut K,
    initrd: Option<&mut I>,
    spec: &LinuxBootSpec<'_>,
) -> Result<LoadedLinux, LinuxError>
where
    M: GuestMemoryBackend,
    K: Read + ReadVolatile + Seek,
    I: Read + ReadVolatile + Seek,
{
    validate(mem, spec)?;
    let low_ram_end = spec.mem_size.min(MMIO_HOLE_START);

    // The kernel: its kind from its first bytes, then its own checks, then the copy.
    let file_size = kernel
        .seek(SeekFrom::End(0))
        .map_err(LinuxError::KernelIo)?;
    let head = read_head(kernel, SETUP_HEADER_END.max(4)).map_err(LinuxError::KernelIo)?;
    let kind = if head.starts_with(b"\x7fELF") {
        let info = elf::inspect(kernel, file_size, HIMEM_START, low_ram_end)?;
        let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))?;
        match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => KernelKind::Pvh {
                entry: entry.0,
                range: info.start..info.end,
            },
            _ => KernelKind::Elf64 {
                entry: info.entry,
                range: info.start..info.end,
            },
        }
    } else {
        let header = SetupHeader::parse(&head, file_size)?;
        // The compressed kernel is copied to 1 MiB; it decompresses itself at its
        // preferred address (or 1 MiB, if higher), into init_size bytes.
        let copy_end = HIMEM_START + header.kernel_size;
        let need_end = HIMEM_START.max(header.pref_address) + u64::from(header.init_size);
        let end = copy_end.max(need_end);
        if end > low_ram_end {
            return Err(LinuxError::KernelTooLarge {
                size: header.kernel_size,
                need: u64::from(header.init_size),
                ram: low_ram_end,
            });
        }
        let loaded = BzImage::load(
            mem,
            Some(GuestAddress(HIMEM_START)),
            kernel,
            Some(GuestAddress(HIMEM_START)),
        )?;
        KernelKind::BzImage {
            header,
            raw: loaded.setup_header.unwrap_or_default(),
            range: HIMEM_START..end,
        }
    };
    let kernel_range = kind.range();

    // The command line.
    let max = match &kind {
        KernelKind::BzImage { header, .. } if header.cmdline_size > 0 => header.cmdline_size,
        _ => DEFAULT_CMDLINE_SIZE,
    }
    .min(CMDLINE_MAX as u32 - 1);
    if spec.cmdline.bytes().any(|b| b == 0) {
        return Err(LinuxError::CmdlineNul);
    }
    if spec.cmdline.len() > max as usize {
        return Err(LinuxError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max,
        });
    }
    let mut cmdline = spec.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("the command line"))?;

    // The initramfs: at the top of low RAM, below the kernel's limit, above the kernel.
    let initrd_range = match initrd {
        None => None,
        Some(file) => {
            let limit = match &kind {
                KernelKind::BzImage { header, .. } => u64::from(header.initrd_addr_max) + 1,
                _ => low_ram_end,
            };
            Some(load_initrd(
                mem,
                file,
                kernel_range.end,
                low_ram_end.min(limit),
            )?)
        }
    };

    // ACPI.
    let tables = acpi::build(ACPI_START, spec.vcpus, spec.devices);
    if tables.bytes.len() as u64 > ACPI_END - ACPI_START {
        return Err(LinuxError::AcpiTooLarge(tables.bytes.len()));
    }
    mem.write_slice(&tables.bytes, GuestAddress(tables.base))
        .map_err(mem_err("the ACPI tables"))?;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(mem_err("the reset stub"))?;

    let e820 = e820::memory_map(spec.mem_size);
    let cpu = match &kind {
        KernelKind::Pvh { entry, .. } => {
            write_pvh_start_info(mem, initrd_range.as_ref(), tables.rsdp_addr, &e820)?;
            regs::setup(mem, BootProtocol::Pvh, *entry, PVH_INFO_ADDR)?
        }
        KernelKind::BzImage { raw, .. } => {
            write_boot_params(mem, *raw, initrd_range.as_ref(), tables.rsdp_addr, &e820)?;
            regs::setup(
                mem,
                BootProtocol::Linux64,
                HIMEM_START + ENTRY_64_OFFSET,
                ZERO_PAGE_ADDR,
            )?
        }
        KernelKind::Elf64 { entry, .. } => {
            // No setup header in an ELF: the fields a bzImage would bring that the kernel
            // looks at, as other VMMs fill them.
            let hdr = setup_header {
                boot_flag: 0xaa55,
                header: u32::from_le_bytes(*b"HdrS"),
                kernel_alignment: 0x100_0000,
                cmdline_size: cmdline.len() as u32,
                ..Default::default()
            };
            write_boot_params(mem, hdr, initrd_range.as_ref(), tables.rsdp_addr, &e820)?;
            regs::setup(mem, BootProtocol::Linux64, *entry, ZERO_PAGE_ADDR)?
        }
    };
    Ok(LoadedLinux {
        cpu,
        kernel: kernel_range,
        initrd: initrd_range,
        rsdp_addr: tables.rsdp_addr,
        e820,
    })
}

/// The kinds of kernel image, with what each needs for the rest of the boot.
enum KernelKind {
    BzImage {
        header: SetupHeader,
        raw: setup_header,
        range: Range<u64>,
    },
    Elf64 {
        entry: u64,
        range: Range<u64>,
    },
    Pvh {
        entry: u64,
        range: Range<u64>,
    },
}

impl KernelKind {
    fn range(&self) -> Range<u64> {
        match self {
            KernelKind::BzImage { range, .. }
            | KernelKind::Elf64 { range, .. }
            | KernelKind::Pvh { range, .. } => range.clone(),
        }
    }
}

fn validate<M: GuestMemoryBackend>(mem: &M, spec: &LinuxBootSpec<'_>) -> Result<(), LinuxError> {
    let bad = |s: String| Err(LinuxError::Config(s));
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return bad(format!("{} vCPUs (1 to {MAX_VCPUS})", spec.vcpus));
    }
    if spec.mem_size < MIN_MEMORY || !spec.mem_size.is_multiple_of(4096) {
        return bad(format!(
            "memory size {:#x} (at least 16 MiB, a multiple of 4 KiB)",
            spec.mem_size
        ));
    }
    for (start, size) in e820::ram_regions(spec.mem_size) {
        let covered =
            usize::try_from(size).is_ok_and(|len| mem.check_range(GuestAddress(start), len));
        if !covered {
            return bad(format!(
                "guest memory does not map RAM at {start:#x}..{:#x}",
                start + size
            ));
        }
    }
    if spec.devices.len() > MAX_DEVICES {
        return bad(format!(
            "{} virtio-mmio devices (at most {MAX_DEVICES})",
            spec.devices.len()
        ));
    }
    let window = MMIO_HOLE_START..u64::from(IOAPIC_ADDR);
    for (i, d) in spec.devices.iter().enumerate() {
        let end = d.base.saturating_add(d.size);
        if d.size == 0 || d.base < window.start || end > window.end {
            return bad(format!(
                "virtio-mmio device {i} at {:#x}+{:#x} is outside {:#x}..{:#x}",
                d.base, d.size, window.start, window.end
            ));
        }
        if d.irq == 0 || d.irq == 2 || d.irq == u32::from(layout::COM1_IRQ) || d.irq >= IOAPIC_PINS
        {
            return bad(format!(
                "virtio-mmio device {i} has IRQ {} (1-23, not 2 or 4)",
                d.irq
            ));
        }
        for (j, o) in spec.devices.iter().enumerate().take(i) {
            if d.base < o.base.saturating_add(o.size) && o.base < end {
                return bad(format!("virtio-mmio devices {j} and {i} overlap"));
            }
            if d.irq == o.irq {
                return bad(format!(
                    "virtio-mmio devices {j} and {i} share IRQ {}",
                    d.irq
                ));
            }
        }
    }
    Ok(())
}

/// Up to `n` bytes from the start of `f` (fewer if the file is shorter).
fn read_head<F: Read + Seek>(f: &mut F, n: usize) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Copies the initramfs to the highest page-aligned address where it ends at or below
/// `top`, refusing to let it reach down into the kernel's range.
fn load_initrd<M, I>(
    mem: &M,
    file: &mut I,
    kernel_end: u64,
    top: u64,
) -> Result<Range<u64>, LinuxError>
where
    M: GuestMemoryBackend,
    I: Read + ReadVolatile + Seek,
{
    let size = file.seek(SeekFrom::End(0)).map_err(LinuxError::InitrdIo)?;
    if size == 0 {
        return Err(LinuxError::InitrdEmpty);
    }
    let too_large = LinuxError::InitrdTooLarge {
        size,
        kernel_end,
        top,
    };
    let Some(start) = top.checked_sub(size).map(|s| s & !0xfff) else {
        return Err(too_large);
    };
    if start < kernel_end {
        return Err(too_large);
    }
    let len = usize::try_from(size)
        .map_err(|_| LinuxError::InitrdIo(std::io::ErrorKind::FileTooLarge.into()))?;
    file.seek(SeekFrom::Start(0))
        .map_err(LinuxError::InitrdIo)?;
    mem.read_exact_volatile_from(GuestAddress(start), file, len)
        .map_err(mem_err("the initramfs"))?;
    Ok(start..start + size)
}

/// The 64-bit boot protocol's zero page: the kernel's setup header with the loader's
/// fields filled in, the e820 map and the RSDP's address.
fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    mut hdr: setup_header,
    initrd: Option<&Range<u64>>,
    rsdp_addr: u64,
    e820: &[E820Entry],
) -> Result<(), LinuxError> {
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some(r) = initrd {
        // Below 3 GiB, so the 32-bit fields hold it.
        hdr.ramdisk_image = r.start as u32;
        hdr.ramdisk_size = (r.end - r.start) as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp_addr,
        ..Default::default()
    };
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(mem_err("boot_params"))
}

/// PVH's `hvm_start_info`, its module list (the initramfs) and its memory map.
fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<&Range<u64>>,
    rsdp_addr: u64,
    e820: &[E820Entry],
) -> Result<(), LinuxError> {
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some(r) = initrd {
        let module = hvm_modlist_entry {
            paddr: r.start,
            size: r.end - r.start,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(mem_err("the PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(mem_err("the PVH memory map"))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(mem_err("hvm_start_info"))
}

/// Kernel images made for tests that boot hand-assembled code through the Linux path.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use super::bzimage::{BOOT_FLAG, LOADED_HIGH, XLF_KERNEL_64};

    /// A bzImage with a valid boot protocol 2.15 header (one setup sector after the boot
    /// sector, 64-bit entry, relocatable) whose protected-mode code is `payload`: the
    /// loader copies it to 1 MiB and enters it at 1 MiB + 0x200 in 64-bit mode. It claims
    /// to unpack into 4 MiB at 16 MiB (`pref_address`, `init_size`), so the initramfs is
    /// kept clear of 1 MiB to 20 MiB.
    pub fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x234] = 1; // relocatable
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 64 << 20;

    fn mem(size: u64) -> GuestMemoryMmap<()> {
        let ranges: Vec<_> = e820::ram_regions(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
    }

    fn devices() -> Vec<VirtioMmioDevice> {
        (0..2)
            .map(|i| VirtioMmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                irq: 5 + i as u32,
            })
            .collect()
    }

    fn spec<'a>(cmdline: &'a str, devices: &'a [VirtioMmioDevice]) -> LinuxBootSpec<'a> {
        LinuxBootSpec {
            cmdline,
            mem_size: MEM,
            vcpus: 2,
            devices,
        }
    }

    fn load(
        m: &GuestMemoryMmap<()>,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        s: &LinuxBootSpec<'_>,
    ) -> Result<LoadedLinux, LinuxError> {
        let mut k = Cursor::new(kernel.to_vec());
        let mut i = initrd.map(|b| Cursor::new(b.to_vec()));
        load_linux(m, &mut k, i.as_mut(), s)
    }

    fn read_bytes(m: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(addr))
            .expect("read guest memory");
        v
    }

    #[test]
    fn bzimage_boots_with_the_64_bit_protocol() {
        let m = mem(MEM);
        let kernel = bzimage::tests::fake_bzimage(8192);
        let initrd: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let devs = devices();
        let l = load(
            &m,
            &kernel,
            Some(&initrd),
            &spec("console=ttyS0 quiet", &devs),
        )
        .expect("load");

        assert_eq!(l.cpu.protocol, BootProtocol::Linux64);
        assert_eq!(l.cpu.regs.rip, HIMEM_START + 0x200);
        assert_eq!(l.cpu.regs.rsi, ZERO_PAGE_ADDR);
        // The protected-mode code is at 1 MiB, byte for byte.
        assert_eq!(read_bytes(&m, HIMEM_START, 8192), kernel[1024..]);
        // The initramfs is at the top of RAM, page-aligned, clear of the kernel.
        let r = l.initrd.clone().expect("initrd loaded");
        assert_eq!(r.start % 4096, 0);
        assert!(r.end <= MEM && MEM - r.end < 4096, "{r:?}");
        assert!(r.start >= l.kernel.end);
        assert_eq!(read_bytes(&m, r.start, initrd.len()), initrd);
        assert_eq!(read_bytes(&m, CMDLINE_ADDR, 20), b"console=ttyS0 quiet\0");

        let p: boot_params = m
            .read_obj(GuestAddress(ZERO_PAGE_ADDR))
            .expect("boot_params");
        let hdr = p.hdr;
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.type_of_loader),
            (0xaa55, u32::from_le_bytes(*b"HdrS"), 0xff)
        );
        assert_eq!(hdr.cmd_line_ptr as u64, CMDLINE_ADDR);
        assert_eq!(
            (hdr.ramdisk_image as u64, hdr.ramdisk_size as usize),
            (r.start, initrd.len())
        );
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        let n = usize::from(p.e820_entries);
        assert_eq!(n, l.e820.len());
        let table = p.e820_table;
        for (got, want) in table[..n].iter().zip(&l.e820) {
            let (addr, size, kind) = (got.addr, got.size, got.r#type);
            assert_eq!((addr, size, kind), (want.addr, want.size, want.kind as u32));
        }
        assert_eq!(read_bytes(&m, ACPI_START, 8), b"RSD PTR ");
        // The real-mode reset vector pulses the reset line: mov al, 0xfe; out 0x64, al.
        assert_eq!(
            read_bytes(&m, RESET_VECTOR, 4),
            [
                0xb0,
                layout::ACPI_RESET_VALUE,
                0xe6,
                layout::ACPI_RESET_PORT as u8
            ]
        );
    }

    #[test]
    fn elf_with_a_pvh_note_boots_through_pvh() {
        let m = mem(MEM);
        let code = [0xf4u8; 256];
        let kernel = elf::tests::fake_vmlinux(0x100_0000, &code, Some(0x100_0040));
        let devs = devices();
        let l = load(
            &m,
            &kernel,
            Some(b"initramfs"),
            &spec("root=/dev/vda", &devs),
        )
        .expect("load");
        assert_eq!(l.cpu.protocol, BootProtocol::Pvh);
        assert_eq!(l.cpu.regs.rip, 0x100_0040);
        assert_eq!(l.cpu.regs.rbx, PVH_INFO_ADDR);
        assert_eq!(read_bytes(&m, 0x100_0000, 256), code);
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).expect("start info");
        assert_eq!((info.magic, info.version), (PVH_MAGIC, 1));
        assert_eq!(
            (info.cmdline_paddr, info.rsdp_paddr),
            (CMDLINE_ADDR, ACPI_START)
        );
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m
            .read_obj(GuestAddress(info.modlist_paddr))
            .expect("module");
        assert_eq!(read_bytes(&m, module.paddr, 9), b"initramfs");
        assert_eq!(info.memmap_entries as usize, l.e820.len());
        let first: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(info.memmap_paddr)).expect("memmap");
        assert_eq!((first.addr, first.type_), (0, 1));
    }

    #[test]
    fn elf_without_the_note_boots_at_its_entry_with_boot_params() {
        let m = mem(MEM);
        let kernel = elf::tests::fake_vmlinux(0x100_0000, &[0x90; 64], None);
        let l = load(&m, &kernel, None::<&[u8]>, &spec("", &[])).expect("load");
        assert_eq!(l.cpu.protocol, BootProtocol::Linux64);
        assert_eq!(
            (l.cpu.regs.rip, l.cpu.regs.rsi),
            (0x100_0000, ZERO_PAGE_ADDR)
        );
        assert_eq!(l.initrd, None);
        let p: boot_params = m
            .read_obj(GuestAddress(ZERO_PAGE_ADDR))
            .expect("boot_params");
        let hdr = p.hdr;
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0, 0));
        assert_eq!({ hdr.header }, u32::from_le_bytes(*b"HdrS"));
    }

    #[test]
    fn memory_above_4_gib_is_described_but_not_touched() {
        let size = (3 << 30) + (64 << 20);
        // Map only what the guest would have; check the loader accepts the split layout.
        let m = mem(size);
        let kernel = bzimage::tests::fake_bzimage(4096);
        let s = LinuxBootSpec {
            mem_size: size,
            ..spec("", &[])
        };
        let l = load(&m, &kernel, Some(b"x"), &s).expect("load");
        assert_eq!(
            l.e820.last().map(|e| (e.addr, e.size)),
            Some((1 << 32, 64 << 20))
        );
        // The initramfs stays below the device window.
        assert!(l.initrd.expect("initrd").end <= MMIO_HOLE_START);
    }

    #[test]
    fn garbage_kernels_are_refused_with_clear_errors() {
        let m = mem(MEM);
        let s = spec("", &[]);
        let e = load(&m, b"", None, &s).expect_err("empty");
        assert!(e.to_string().contains("too small for a bzImage"), "{e}");
        let e = load(&m, &[0u8; 4096], None, &s).expect_err("zeros");
        assert!(e.to_string().contains("boot sector signature"), "{e}");
        let e = load(&m, b"\x7fELF\x01\x01", None, &s).expect_err("truncated ELF");
        assert!(e.to_string().starts_with("ELF kernel image"), "{e}");
        let mut big = bzimage::tests::fake_bzimage(4096);
        big[0x260..0x264].copy_from_slice(&(60u32 << 20).to_le_bytes()); // init_size
        let e = load(&m, &big, None, &s).expect_err("too large");
        assert!(matches!(e, LinuxError::KernelTooLarge { .. }), "{e}");
    }

    #[test]
    fn random_kernel_bytes_never_panic() {
        let m = mem(MEM);
        let s = spec("", &[]);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let valid = bzimage::tests::fake_bzimage(2048);
        let elf = elf::tests::fake_vmlinux(0x100_0000, &[0x90; 64], Some(0x100_0000));
        for round in 0..300 {
            let mut img = if round % 3 == 0 {
                valid.clone()
            } else if round % 3 == 1 {
                elf.clone()
            } else {
                vec![0u8; 64 + round * 7]
            };
            // Corrupt a few bytes in the headers (or everywhere, for the random ones).
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = if round % 3 == 2 {
                    img.len()
                } else {
                    img.len().min(0x300)
                };
                let at = (x as usize) % len;
                img[at] = (x >> 32) as u8;
            }
            let _ = load(&m, &img, Some(b"i"), &s);
        }
    }

    #[test]
    fn command_line_limits_are_enforced() {
        let m = mem(MEM);
        let kernel = bzimage::tests::fake_bzimage(4096); // cmdline_size 2047
        let long = "x".repeat(2048);
        let e = load(&m, &kernel, None, &spec(&long, &[])).expect_err("too long");
        assert!(
            matches!(
                e,
                LinuxError::CmdlineTooLong {
                    len: 2048,
                    max: 2047
                }
            ),
            "{e}"
        );
        load(&m, &kernel, None, &spec(&long[..2047], &[])).expect("2047 bytes fit");
        let e = load(&m, &kernel, None, &spec("a\0b", &[])).expect_err("NUL");
        assert!(matches!(e, LinuxError::CmdlineNul), "{e}");
    }

    #[test]
    fn an_initramfs_that_would_reach_the_kernel_is_refused() {
        let m = mem(MEM);
        let kernel = bzimage::tests::fake_bzimage(4096); // needs up to 20 MiB
        let initrd = vec![1u8; 50 << 20];
        let e = load(&m, &kernel, Some(&initrd), &spec("", &[])).expect_err("too large");
        assert!(matches!(e, LinuxError::InitrdTooLarge { .. }), "{e}");
        let e = load(&m, &kernel, Some(&[]), &spec("", &[])).expect_err("empty");
        assert!(matches!(e, LinuxError::InitrdEmpty), "{e}");
    }

    #[test]
    fn bad_machine_descriptions_are_refused() {
        let m = mem(MEM);
        let kernel = bzimage::tests::fake_bzimage(4096);
        let check = |s: LinuxBootSpec<'_>, want: &str| {
            let e = load(&m, &kernel, None, &s).expect_err(want);
            assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
        };
        check(
            LinuxBootSpec {
                vcpus: 0,
                ..spec("", &[])
            },
            "0 vCPUs",
        );
        check(
            LinuxBootSpec {
                mem_size: MEM * 2,
                ..spec("", &[])
            },
            "does not map RAM",
        );
        let dev = |base, irq| VirtioMmioDevice {
            base,
            size: 0x1000,
            irq,
        };
        check(spec("", &[dev(0x1000, 5)]), "outside");
        check(spec("", &[dev(0xd000_0000, 2)]), "IRQ 2");
        check(
            spec("", &[dev(0xd000_0000, 5), dev(0xd000_0800, 6)]),
            "overlap",
        );
        check(
            spec("", &[dev(0xd000_0000, 5), dev(0xd000_1000, 5)]),
            "share IRQ 5",
        );
    }
}
