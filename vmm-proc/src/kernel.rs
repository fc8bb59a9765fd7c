//! What the guest boots, loaded at power-on and again at every reset:
//!
//! - the **workload guest**: a static ELF with the ABI of docs/guest-abi.md (the embedded
//!   `builtin:workload`, or a file), kept parsed in memory, entered by every vCPU at once;
//! - a **Linux kernel** (a bzImage, or an ELF `vmlinux`, which always has a `Linux` note)
//!   with its initramfs: loaded by [`crate::linux::load_linux`] straight from the
//!   descriptors the monitor opened, and read from them again at every reset, as a PC's
//!   firmware loads the kernel again at every boot. That takes `read` and `lseek` on held
//!   descriptors, which the jail allows (`sandbox.rs`); vmm-proc opens nothing.
//!
//! The guest chooses nothing here: the kind comes from the image's first bytes, and
//! everything read from an image is checked by the loader that reads it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::boot;
use crate::layout::{VIRTIO_MMIO_SIZE, WORKLOAD_MAX_RAM, virtio_slot};
use crate::linux::{BootCpu, LinuxBootSpec, VirtioMmioDevice, load_linux};
use crate::loader::{Image, LoadError, is_linux_kernel};
use crate::machine::Entry;
use crate::memory::GuestRam;

/// A Linux kernel, its initramfs and how it is told about the machine.
#[derive(Debug)]
pub struct LinuxBoot {
    kernel: File,
    initrd: Option<File>,
    cmdline: String,
    vcpus: u8,
    devices: Vec<VirtioMmioDevice>,
}

/// What a boot (and every reset) loads.
#[derive(Debug)]
pub enum BootSource {
    /// The workload guest's image and the command line it is given.
    Workload {
        image: Image,
        cmdline: String,
    },
    Linux(LinuxBoot),
}

/// How the guest is to be booted, before anything is loaded.
#[derive(Debug)]
pub struct BootConfig<'a> {
    /// The user's command line (`--append`).
    pub cmdline: &'a str,
    pub vcpus: u8,
    pub disks: usize,
    /// The guest's TSC frequency, for the workload guest's command line.
    pub tsc_khz: Option<u32>,
}

impl BootSource {
    /// Works out what `kernel` is: the embedded image's bytes, or a file the monitor
    /// opened (a Linux kernel if it has a bzImage header or a `Linux` ELF note, the
    /// workload ABI otherwise). `initrd` is only for Linux.
    pub fn new(
        kernel: KernelSource,
        initrd: Option<File>,
        ram: &GuestRam,
        config: &BootConfig<'_>,
    ) -> Result<Self, String> {
        let bytes = match kernel {
            KernelSource::Bytes(b) => b,
            KernelSource::File(mut f) => {
                let linux = is_linux_kernel(&mut f)
                    .map_err(|e| format!("--kernel: reading the image: {e}"))?;
                if linux {
                    return Ok(Self::Linux(LinuxBoot {
                        kernel: f,
                        initrd,
                        cmdline: config.cmdline.trim().to_string(),
                        vcpus: config.vcpus,
                        devices: (0..config.disks)
                            .filter_map(virtio_slot)
                            .map(|(base, irq)| VirtioMmioDevice {
                                base,
                                size: VIRTIO_MMIO_SIZE,
                                irq,
                            })
                            .collect(),
                    }));
                }
                let mut bytes = Vec::new();
                f.seek(SeekFrom::Start(0))
                    .and_then(|_| f.read_to_end(&mut bytes))
                    .map_err(|e| format!("--kernel: reading the image: {e}"))?;
                bytes
            }
        };
        if initrd.is_some() {
            return Err(
                "--initrd: the workload guest takes no initrd (only a Linux kernel does)".into(),
            );
        }
        if ram.size > WORKLOAD_MAX_RAM {
            return Err(format!(
                "--memory: the workload guest can have at most {} MiB (its ABI describes one \
                 region below the device window)",
                WORKLOAD_MAX_RAM >> 20
            ));
        }
        let image = Image::parse(&bytes, ram.size).map_err(|e| match e {
            // The embedded image is never Linux; a file that is was handled above.
            LoadError::Linux => "--kernel: a Linux kernel here is unexpected".to_string(),
            e => format!("--kernel: {e}"),
        })?;
        // The workload guest's command line: the user's, then the devices and the TSC
        // frequency (docs/guest-abi.md).
        let mut cmdline = config.cmdline.trim().to_string();
        for (base, irq) in (0..config.disks).filter_map(virtio_slot) {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        }
        if let Some(khz) = config.tsc_khz {
            cmdline.push_str(&format!(" tsc_khz={khz}"));
        }
        let cmdline = cmdline.trim_start().to_string();
        Ok(Self::Workload { image, cmdline })
    }

    /// Loads the guest into `ram` and returns how to enter it. For Linux this re-reads the
    /// kernel and the initramfs from their descriptors.
    pub fn load(&mut self, ram: &GuestRam) -> Result<Entry, String> {
        match self {
            Self::Workload { image, cmdline } => {
                image
                    .load(&*ram.mem)
                    .map_err(|e| format!("loading the guest image: {e}"))?;
                boot::write_boot_structures(&*ram.mem, ram.size, cmdline)
                    .map_err(|e| format!("writing the boot structures: {e}"))?;
                Ok(Entry::Workload { entry: image.entry })
            }
            Self::Linux(l) => {
                let spec = LinuxBootSpec {
                    cmdline: &l.cmdline,
                    mem_size: ram.size,
                    vcpus: l.vcpus,
                    devices: &l.devices,
                };
                let loaded = load_linux(&*ram.mem, &mut l.kernel, l.initrd.as_mut(), &spec)
                    .map_err(|e| format!("--kernel: {e}"))?;
                tracing::info!(
                    protocol = ?loaded.cpu.protocol,
                    entry = format_args!("{:#x}", loaded.cpu.regs.rip),
                    kernel = format_args!("{:#x?}", loaded.kernel),
                    initrd = format_args!("{:#x?}", loaded.initrd),
                    "Linux kernel loaded"
                );
                Ok(Entry::Linux(Box::new(loaded.cpu)))
            }
        }
    }

    /// The boot vCPU's entry state for a reset, from what [`BootSource::load`] returned:
    /// only a Linux kernel's can change (the workload guest's entry is fixed at start-up).
    pub fn boot_cpu(entry: &Entry) -> Option<Box<BootCpu>> {
        match entry {
            Entry::Linux(cpu) => Some(cpu.clone()),
            Entry::Workload { .. } => None,
        }
    }
}

/// Where the guest image comes from.
#[derive(Debug)]
pub enum KernelSource {
    /// An embedded image's bytes (`builtin:NAME`).
    Bytes(Vec<u8>),
    /// A file the monitor opened (`--kernel PATH`).
    File(File),
}
