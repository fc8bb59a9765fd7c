//! linux-boot-probe: boots a Linux kernel with vmm-proc's loader ([`vmm_proc::linux`]) on
//! the barest KVM machine that can show whether the loader did its job, for the nested
//! test (`tests/tests/nested_linux.rs`) to run inside its L1 host while vmm-proc's VM core
//! and the loader are not yet wired together. It is a test instrument, not a VMM.
//!
//! The machine: RAM as the loader's e820 map says, KVM's in-kernel irqchip and PIT, one
//! vCPU started from the loader's register state, COM1 (vm-superio) on stdout, and one
//! virtio-mmio transport described in ACPI that implements nothing: every read of its
//! window returns 0 (so the kernel's virtio_mmio driver finds a wrong magic value and gives
//! up) and is reported, which proves the kernel found the device through the DSDT.
//!
//! It prints `PROBE:` lines (to stdout, between the guest's console output) and ends when
//! the guest resets (i8042 or the ACPI reset register, both port 0x64 ← 0xfe), powers off
//! (ACPI sleep control register), triple-faults, or KVM fails.
//!
//! Usage: `linux-boot-probe KERNEL INITRD CMDLINE`

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::process::ExitCode;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{Serial, Trigger};
use vmm_proc::linux::{LinuxBootSpec, VirtioMmioDevice, e820, layout, load_linux};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 256 << 20;
const DEVICE: VirtioMmioDevice = VirtioMmioDevice {
    base: 0xd000_0000,
    size: 0x1000,
    irq: 5,
};
const COM1_END: u16 = layout::COM1_PORT + 8;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Raises COM1's interrupt through an irqfd.
struct IrqFd(EventFd);

impl Trigger for IrqFd {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

fn probe(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\r\nPROBE: {line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, kernel, initrd, cmdline] = args.as_slice() else {
        eprintln!("usage: linux-boot-probe KERNEL INITRD CMDLINE");
        return ExitCode::from(2);
    };
    match run(kernel, initrd, cmdline) {
        Ok(code) => code,
        Err(e) => {
            probe(&format!("error: {e}"));
            ExitCode::from(1)
        }
    }
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

fn run(kernel: &str, initrd: &str, cmdline: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config::default())?;

    let ranges: Vec<(GuestAddress, usize)> = e820::ram_regions(MEM_SIZE)
        .into_iter()
        .map(|(a, s)| Ok((GuestAddress(a), usize::try_from(s)?)))
        .collect::<Result<_, std::num::TryFromIntError>>()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges)?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot)?,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which lives until the process exits, and
        // no other slot overlaps it.
        unsafe { vm.set_user_memory_region(region)? };
    }

    let devices = [DEVICE];
    let spec = LinuxBootSpec {
        cmdline,
        mem_size: MEM_SIZE,
        vcpus: 1,
        devices: &devices,
    };
    let mut kernel = File::open(kernel)?;
    let mut initrd = File::open(initrd)?;
    let loaded = load_linux(&mem, &mut kernel, Some(&mut initrd), &spec)?;
    probe(&format!(
        "loaded: {:?} entry {:#x}, kernel {:#x?}, initrd {:#x?}, RSDP {:#x}",
        loaded.cpu.protocol, loaded.cpu.regs.rip, loaded.kernel, loaded.initrd, loaded.rsdp_addr
    ));

    let vcpu = vm.create_vcpu(0)?;
    // What KVM supports, plus the "running under a hypervisor" bit (leaf 1, ECX bit 31)
    // without which the kernel ignores KVM's paravirtual leaves (kvmclock above all).
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= 1 << 31;
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    let mut sregs = vcpu.get_sregs()?;
    loaded.cpu.apply_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&loaded.cpu.regs)?;
    vcpu.set_fpu(&vmm_proc::linux::regs::boot_fpu())?;
    let mut lapic = vcpu.get_lapic()?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)?;

    let com1_irq = EventFd::new(0)?;
    vm.register_irqfd(&com1_irq, u32::from(layout::COM1_IRQ))?;
    let mut serial = Serial::new(IrqFd(com1_irq), std::io::stdout());
    let mut mmio_seen = BTreeSet::new();
    let device_window = DEVICE.base..DEVICE.base + DEVICE.size;

    let mut vcpu = vcpu;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let v = data.first().copied().unwrap_or(0);
                if (layout::COM1_PORT..COM1_END).contains(&port) {
                    let _ = serial.write((port - layout::COM1_PORT) as u8, v);
                } else if port == layout::ACPI_RESET_PORT && v == layout::ACPI_RESET_VALUE {
                    probe("reset (port 0x64 <- 0xfe)");
                    return Ok(ExitCode::SUCCESS);
                } else if port == layout::ACPI_SLEEP_CONTROL_PORT && v == layout::ACPI_S5_VALUE {
                    probe("power off (ACPI sleep control register, S5)");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (layout::COM1_PORT..COM1_END).contains(&port) {
                    let v = serial.read((port - layout::COM1_PORT) as u8);
                    data.fill(v);
                } else if port == layout::ACPI_RESET_PORT {
                    // i8042 status: both buffers empty, so a keyboard-controller reboot
                    // need not wait out its timeout before it pulses the reset line.
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if device_window.contains(&addr) && mmio_seen.insert(addr) {
                    probe(&format!(
                        "virtio-mmio register read at {addr:#x} ({} bytes)",
                        data.len()
                    ));
                }
                data.fill(0);
            }
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Shutdown) => {
                probe("shutdown exit (triple fault, or a reset through it)");
                return Ok(ExitCode::from(3));
            }
            Ok(VcpuExit::Hlt) => {
                probe("hlt exit");
                return Ok(ExitCode::from(3));
            }
            Ok(other) => {
                probe(&format!("unexpected exit {other:?}"));
                return Ok(ExitCode::from(4));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                probe(&format!("KVM_RUN failed: {e}"));
                return Ok(ExitCode::from(5));
            }
        }
    }
}
