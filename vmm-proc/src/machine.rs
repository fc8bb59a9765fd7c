//! The KVM virtual machine, made from the `/dev/kvm` descriptor the monitor opened: VM,
//! in-kernel irqchip and PIT, guest RAM in one slot per region, and the vCPUs with their
//! CPUID and entry state. All of it happens before the jail; afterwards only the ioctls a
//! running VM and its resets need remain (see `sandbox.rs`).
//!
//! A VM must be created by the process that runs it (a forked child cannot use inherited
//! VM fds), so vmm-proc creates it itself from the bare `/dev/kvm` descriptor.
//!
//! Two ways in ([`Entry`]):
//! - the workload guest: every vCPU starts at once at the image's entry, in 64-bit user
//!   mode (docs/guest-abi.md);
//! - Linux: the boot vCPU starts as the loader says (`linux::regs`); the others wait, as
//!   KVM creates them, for the INIT/SIPI the kernel sends through the in-kernel LAPIC.
//!
//! What every vCPU gets either way: KVM's supported CPUID with the hypervisor bit and its
//! own APIC id, and a LAPIC wired as a PC's (LINT0 ExtINT for the PIC, LINT1 NMI).

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::boot;
use crate::layout::KVM_TSS_ADDR;
use crate::linux::BootCpu;
use crate::memory::GuestRam;

/// Why the VM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("KVM lacks {0:?}, which splitvmm needs")]
    MissingCap(Cap),
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("guest RAM: {0}")]
    Memory(#[from] crate::memory::MemoryError),
}

fn failed(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |e| MachineError::Kvm(step, e)
}

/// How the guest is entered.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Every vCPU at this address in 64-bit user mode (docs/guest-abi.md).
    Workload { entry: u64 },
    /// The boot vCPU as the Linux loader set it up; the others wait for INIT/SIPI.
    Linux(Box<BootCpu>),
}

/// Paravirtual MSRs through which a guest asks KVM to write into its memory (kvmclock,
/// steal time, async page faults, PV EOI). All are 0 at power-on. A reset must set them
/// back to 0: otherwise KVM keeps writing the old kernel's clock page into whatever the
/// reloaded kernel put there. (`MSR_KVM_WALL_CLOCK` is not one of them: writing it makes
/// KVM write once, at the address written.)
const PV_MSRS: &[u32] = &[
    0x12,        // MSR_KVM_SYSTEM_TIME
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
];

/// Local APIC registers and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// The state a vCPU is put in at power-on and at every reset.
#[derive(Debug, Clone)]
pub struct VcpuInit {
    /// `KVM_MP_STATE_RUNNABLE`, or `KVM_MP_STATE_UNINITIALIZED` for a Linux AP, which
    /// waits for INIT/SIPI.
    pub mp_state: u32,
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub fpu: kvm_bindings::kvm_fpu,
    pub lapic: kvm_lapic_state,
    /// The `PV_MSRS` this KVM accepts, set to 0 at every (re)start.
    pub pv_msrs: Vec<u32>,
    /// The MSRs a migration carries (`migration::state::migratable_msrs`).
    pub migratable_msrs: Vec<u32>,
    /// Whether KVM's XSAVE area fits `kvm_xsave`, so `KVM_SET_XSAVE` is safe to call.
    pub xsave_ok: bool,
}

impl VcpuInit {
    /// Puts `fd` in this state. The special registers go before the LAPIC: they carry the
    /// APIC base, whose mode (xAPIC or x2APIC, which a guest may have switched to) decides
    /// how KVM reads the LAPIC registers.
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })?;
        fd.set_sregs(&self.sregs)?;
        fd.set_lapic(&self.lapic)?;
        fd.set_regs(&self.regs)?;
        fd.set_fpu(&self.fpu)?;
        if !self.pv_msrs.is_empty() {
            let msrs = pv_msrs_zero(&self.pv_msrs)?;
            let written = fd.set_msrs(&msrs)?;
            if written != self.pv_msrs.len() {
                return Err(kvm_ioctls::Error::new(libc::EINVAL));
            }
        }
        Ok(())
    }

    /// Takes the Linux loader's registers for the boot vCPU (a reset reloads the kernel,
    /// whose entry may have changed with the file).
    pub fn set_boot_cpu(&mut self, cpu: &BootCpu) {
        self.regs = cpu.regs;
        cpu.apply_sregs(&mut self.sregs);
    }
}

fn pv_msrs_zero(indices: &[u32]) -> Result<Msrs, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            data: 0,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
}

/// The interrupt controllers' and the PIT's power-on state, restored at every reset so a
/// rebooted guest inherits no routing, mask or timer from the one before.
#[derive(Debug, Clone)]
pub struct PowerOnChips {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl PowerOnChips {
    fn read(vm: &VmFd) -> Result<Self, MachineError> {
        let mut chips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(failed("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        let pit = vm.get_pit2().map_err(failed("KVM_GET_PIT2"))?;
        Ok(Self { chips, pit })
    }

    /// Puts the PICs, the IOAPIC and the PIT back to power-on.
    pub fn apply(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        for chip in &self.chips {
            vm.set_irqchip(chip)?;
        }
        vm.set_pit2(&self.pit)
    }
}

/// The VM and its vCPUs, before they are given their entry state.
#[derive(Debug)]
pub struct Machine {
    pub vm: VmFd,
    pub vcpus: Vec<VcpuFd>,
    pub chips: PowerOnChips,
    /// The guest's TSC frequency, if KVM knows it (`tsc_khz=` on the command line).
    pub tsc_khz: Option<u32>,
    /// The MSRs `KVM_GET_MSR_INDEX_LIST` names.
    known_msrs: Vec<u32>,
    /// Whether KVM's XSAVE area (`KVM_CAP_XSAVE2`) fits `kvm_xsave`.
    xsave_ok: bool,
}

/// Capabilities the machine depends on.
const REQUIRED: &[Cap] = &[
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::Pit2,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::ImmediateExit,
    Cap::MpState,
    Cap::ExtCpuid,
];

impl Machine {
    /// Creates the VM on `kvm_fd` with `ram` mapped region by region and `cpus` vCPUs with
    /// their CPUID.
    pub fn new(kvm_fd: OwnedFd, ram: &GuestRam, cpus: u8) -> Result<Self, MachineError> {
        // SAFETY: `kvm_fd` is an open /dev/kvm descriptor the monitor handed over, and its
        // ownership moves into `Kvm` here.
        let kvm = unsafe { Kvm::from_raw_fd(kvm_fd.into_raw_fd()) };
        if let Some(cap) = REQUIRED.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(MachineError::MissingCap(*cap));
        }
        let vm = kvm.create_vm().map_err(failed("KVM_CREATE_VM"))?;
        // Guest RAM first: registering it after the TSS, irqchip and PIT took 5-25 ms here.
        for (slot, (gpa, len, host)) in ram.host_regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping of guest RAM, which `ram` keeps mapped
            // for as long as the VM exists (the VM is dropped before the memory in `Vm`);
            // regions do not overlap.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(failed("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(failed("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(failed("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(failed("KVM_CREATE_PIT2"))?;
        let chips = PowerOnChips::read(&vm)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("KVM_GET_SUPPORTED_CPUID"))?;
        let known_msrs = kvm
            .get_msr_index_list()
            .map_err(failed("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let mut vcpus = Vec::new();
        for index in 0..cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(failed("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid_for(&supported, index, cpus)?)
                .map_err(failed("KVM_SET_CPUID2"))?;
            vcpus.push(fd);
        }
        let tsc_khz = vcpus.first().and_then(|fd| fd.get_tsc_khz().ok());
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        let xsave_ok =
            usize::try_from(xsave2).is_ok_and(|n| n <= crate::migration::state::XSAVE_SIZE);
        Ok(Self {
            vm,
            vcpus,
            chips,
            tsc_khz,
            known_msrs,
            xsave_ok,
        })
    }

    /// Gives every vCPU its power-on state for `entry` (kept for resets) and applies it.
    pub fn enter(&self, entry: &Entry) -> Result<Vec<VcpuInit>, MachineError> {
        let cpus = self.vcpus.len() as u8;
        let mut inits = Vec::new();
        for (index, fd) in self.vcpus.iter().enumerate() {
            let mut init = vcpu_init(fd, index as u8, cpus, entry, &self.known_msrs)?;
            init.xsave_ok = self.xsave_ok;
            init.apply(fd).map_err(failed("setting the entry state"))?;
            inits.push(init);
        }
        Ok(inits)
    }
}

/// vCPU `index`'s power-on state for `entry`, from what KVM gave the fresh vCPU.
fn vcpu_init(
    fd: &VcpuFd,
    index: u8,
    cpus: u8,
    entry: &Entry,
    known_msrs: &[u32],
) -> Result<VcpuInit, MachineError> {
    let power_on_sregs = fd.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
    let mut lapic = fd.get_lapic().map_err(failed("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    // Only the paravirtual MSRs this KVM both lists and lets us write (as 0, which they
    // already are).
    let pv_msrs = PV_MSRS
        .iter()
        .copied()
        .filter(|m| known_msrs.contains(m))
        .filter(|&m| {
            pv_msrs_zero(&[m])
                .and_then(|msrs| fd.set_msrs(&msrs))
                .is_ok_and(|n| n == 1)
        })
        .collect();
    let mut init = VcpuInit {
        mp_state: KVM_MP_STATE_RUNNABLE,
        regs: fd.get_regs().map_err(failed("KVM_GET_REGS"))?,
        sregs: power_on_sregs,
        fpu: boot::fpu(),
        lapic,
        pv_msrs,
        migratable_msrs: crate::migration::state::migratable_msrs(fd, known_msrs),
        xsave_ok: false,
    };
    match entry {
        Entry::Workload { entry } => {
            init.regs = boot::regs(*entry, index, cpus);
            init.sregs = boot::sregs(power_on_sregs);
        }
        Entry::Linux(cpu) if index == 0 => {
            init.set_boot_cpu(cpu);
            init.fpu = crate::linux::regs::boot_fpu();
        }
        // An application processor keeps KVM's reset state and waits for INIT/SIPI.
        Entry::Linux(_) => init.mp_state = KVM_MP_STATE_UNINITIALIZED,
    }
    Ok(init)
}

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        lapic.regs[off + i] = b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT (the PIC's output, as on a PC) and LINT1 as NMI, what firmware sets
/// up and what Linux expects to find.
fn set_lint(lapic: &mut kvm_lapic_state) {
    let mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lint0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, mode(lint1, APIC_MODE_NMI));
}

/// CPUID leaf 1, ECX: "running under a hypervisor". Without it Linux looks at none of
/// KVM's leaves (0x4000_0000 and up), so it uses no kvmclock and cannot calibrate its TSC.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The host's supported CPUID with the hypervisor bit, this vCPU's APIC ids and topology.
fn cpuid_for(supported: &CpuId, index: u8, count: u8) -> Result<CpuId, MachineError> {
    let mut entries = supported.as_slice().to_vec();
    for e in &mut entries {
        match e.function {
            1 => {
                // Initial APIC id; logical processor count; HTT when there are several.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28;
                }
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
            }
            // Extended topology: the x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|_| MachineError::Kvm("building CPUID", kvm_ioctls::Error::new(libc::E2BIG)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_says_hypervisor_and_gives_each_vcpu_its_apic_id() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .expect("cpuid");
        let c = cpuid_for(&supported, 3, 4).expect("cpuid");
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ecx & CPUID_1_ECX_HYPERVISOR, CPUID_1_ECX_HYPERVISOR);
        assert_eq!(leaf1.ebx >> 24, 3, "initial APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "the rest is KVM's");
        assert_ne!(leaf1.edx & (1 << 28), 0, "HTT with several vCPUs");
        assert_eq!(c.as_slice()[1].edx, 3, "x2APIC id");
    }

    #[test]
    fn lint0_is_extint_and_lint1_nmi_keeping_the_mask_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        set_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }
}
