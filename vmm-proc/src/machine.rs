//! The KVM virtual machine, made from the `/dev/kvm` descriptor the monitor opened: VM,
//! in-kernel irqchip and PIT, guest RAM in slot 0, and the vCPUs with their CPUID and
//! entry state. All of it happens before the jail; afterwards only the ioctls the vCPU
//! threads need remain (see `sandbox.rs`).
//!
//! A VM must be created by the process that runs it (a forked child cannot use inherited
//! VM fds), so vmm-proc creates it itself from the bare `/dev/kvm` descriptor.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY, kvm_lapic_state,
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::boot;
use crate::layout::KVM_TSS_ADDR;
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

/// The state a vCPU is put in at power-on and at every reset.
#[derive(Debug, Clone)]
pub struct VcpuInit {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub fpu: kvm_bindings::kvm_fpu,
    pub lapic: kvm_lapic_state,
}

impl VcpuInit {
    /// Puts `fd` in this state, runnable (KVM leaves application processors waiting for a
    /// SIPI; the ABI starts every vCPU at the entry point).
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })?;
        fd.set_lapic(&self.lapic)?;
        fd.set_sregs(&self.sregs)?;
        fd.set_regs(&self.regs)?;
        fd.set_fpu(&self.fpu)
    }
}

/// The VM and its vCPUs, ready to run.
#[derive(Debug)]
pub struct Machine {
    pub vm: VmFd,
    pub vcpus: Vec<(VcpuFd, VcpuInit)>,
    /// The guest's TSC frequency, if KVM knows it (`tsc_khz=` on the command line).
    pub tsc_khz: Option<u32>,
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
    /// Creates the VM on `kvm_fd` with `ram` in slot 0 and `cpus` vCPUs entering at `entry`.
    pub fn new(
        kvm_fd: OwnedFd,
        ram: &GuestRam,
        cpus: u8,
        entry: u64,
    ) -> Result<Self, MachineError> {
        // SAFETY: `kvm_fd` is an open /dev/kvm descriptor the monitor handed over, and its
        // ownership moves into `Kvm` here.
        let kvm = unsafe { Kvm::from_raw_fd(kvm_fd.into_raw_fd()) };
        if let Some(cap) = REQUIRED.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(MachineError::MissingCap(*cap));
        }
        let vm = kvm.create_vm().map_err(failed("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size,
            userspace_addr: ram.host_base()?,
        };
        // SAFETY: the region is the live mapping of guest RAM, which `ram` keeps mapped for
        // as long as the VM exists (the VM is dropped before the memory in `Vm`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(failed("KVM_SET_USER_MEMORY_REGION"))?;
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(failed("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(failed("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(failed("KVM_CREATE_PIT2"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(failed("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid_for(&supported, index, cpus)?)
                .map_err(failed("KVM_SET_CPUID2"))?;
            let init = VcpuInit {
                regs: boot::regs(entry, index, cpus),
                sregs: boot::sregs(fd.get_sregs().map_err(failed("KVM_GET_SREGS"))?),
                fpu: boot::fpu(),
                lapic: fd.get_lapic().map_err(failed("KVM_GET_LAPIC"))?,
            };
            init.apply(&fd).map_err(failed("setting the entry state"))?;
            vcpus.push((fd, init));
        }
        let tsc_khz = vcpus.first().and_then(|(fd, _)| fd.get_tsc_khz().ok());
        Ok(Self { vm, vcpus, tsc_khz })
    }
}

/// The host's supported CPUID with this vCPU's APIC ids and topology.
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
            }
            // Extended topology: the x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|_| MachineError::Kvm("building CPUID", kvm_ioctls::Error::new(libc::E2BIG)))
}
