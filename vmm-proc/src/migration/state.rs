//! What a migration carries besides RAM: each vCPU's state and the devices' state, read
//! from KVM and the device models on the source and put back on the destination.
//!
//! Both are encoded with the IPC codec (bincode, bounded: `ipc::codec`), inside the
//! stream's checksummed vCPU and device sections.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// `IA32_ARCH_CAPABILITIES`: KVM here refuses a non-zero value (PVM_FACTS.md).
const MSR_ARCH_CAPABILITIES: u32 = 0x10a;
/// The one `kvm_xsave` size the state can carry: `KVM_CAP_XSAVE2` larger than this
/// would need `KVM_GET_XSAVE2`.
pub const XSAVE_SIZE: usize = size_of::<kvm_xsave>();

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that reads and writes back (the TSC among them).
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

fn step(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The MSRs of `known` that a vCPU can both read and write back, found on a fresh vCPU
/// (before the jail: each is read, then written with the value read).
pub fn migratable_msrs(fd: &VcpuFd, known: &[u32]) -> Vec<u32> {
    known
        .iter()
        .copied()
        .filter(|&index| index != MSR_ARCH_CAPABILITIES)
        .filter(|&index| {
            let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            fd.get_msrs(&mut msrs).is_ok_and(|n| n == 1) && fd.set_msrs(&msrs).is_ok_and(|n| n == 1)
        })
        .collect()
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, String> {
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(step("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(format!("KVM_GET_MSRS read {n} of {} MSRs", entries.len()));
        }
        Ok(Self {
            regs: fd.get_regs().map_err(step("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(step("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(step("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(step("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(step("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(step("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(step("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(step("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Puts the state into a vCPU that is not running, in QEMU's order: registers, XSAVE,
    /// XCRs, special registers (which carry the APIC base the LAPIC is read through),
    /// MSRs, MP state, LAPIC, pending events, debug registers. `xsave_ok` says KVM's
    /// XSAVE area is no larger than `kvm_xsave` ([`XSAVE_SIZE`]).
    pub fn restore(&self, fd: &VcpuFd, xsave_ok: bool) -> Result<(), String> {
        if !xsave_ok {
            return Err(format!(
                "this KVM's XSAVE area is larger than {XSAVE_SIZE} bytes"
            ));
        }
        fd.set_regs(&self.regs).map_err(step("KVM_SET_REGS"))?;
        // SAFETY: `xsave_ok` says KVM_CAP_XSAVE2 is at most size_of::<kvm_xsave>(), so the
        // kernel reads no further than the struct passed.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(step("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(step("KVM_SET_XCRS"))?;
        fd.set_sregs(&self.sregs).map_err(step("KVM_SET_SREGS"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.set_msrs(&msrs).map_err(step("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            let refused = self.msrs.get(n).map_or(0, |m| m.index);
            return Err(format!("KVM_SET_MSRS refused MSR {refused:#x}"));
        }
        fd.set_mp_state(self.mp_state)
            .map_err(step("KVM_SET_MP_STATE"))?;
        fd.set_lapic(&self.lapic).map_err(step("KVM_SET_LAPIC"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(step("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(step("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        ipc::codec::encode(self).map_err(|e| format!("vCPU state: {e}"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        ipc::codec::decode(bytes).map_err(|e| format!("vCPU state: {e}"))
    }
}

/// The 16550's registers (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegs {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegs) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// One virtqueue's transport state (virtio-queue's `QueueState`, which has no serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// One virtio-blk device's virtio-mmio transport state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkRegs {
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueRegs>,
}

/// Everything outside the vCPUs and RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// Whether the guest was running when the source stopped it (the destination runs
    /// it only then, as QEMU's global state says).
    pub running: bool,
    pub serial: SerialRegs,
    pub disks: Vec<BlkRegs>,
    /// PIC master, PIC slave, IOAPIC.
    pub chips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The in-kernel irqchip, PIT and clock of a stopped VM.
pub fn save_vm(vm: &VmFd) -> Result<(Vec<kvm_irqchip>, kvm_pit_state2, kvm_clock_data), String> {
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
        vm.get_irqchip(&mut chip).map_err(step("KVM_GET_IRQCHIP"))?;
        chips.push(chip);
    }
    let pit = vm.get_pit2().map_err(step("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(step("KVM_GET_CLOCK"))?;
    Ok((chips, pit, clock))
}

impl DeviceState {
    /// Puts the irqchip, PIT and clock back (the devices' models are restored by their
    /// owners).
    pub fn restore_vm(&self, vm: &VmFd) -> Result<(), String> {
        for chip in &self.chips {
            vm.set_irqchip(chip).map_err(step("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(step("KVM_SET_PIT2"))?;
        // Only the clock value: the flags say how KVM measured it on the source.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(step("KVM_SET_CLOCK"))?;
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        ipc::codec::encode(self).map_err(|e| format!("device state: {e}"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        ipc::codec::decode(bytes).map_err(|e| format!("device state: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_round_trips_and_refuses_garbage() {
        let s = DeviceState {
            running: true,
            serial: SerialRegs {
                line_control: 3,
                in_buffer: vec![b'a'],
                ..Default::default()
            },
            disks: vec![BlkRegs {
                acked_features: 1 << 32,
                status: 0xf,
                activated: true,
                queues: vec![QueueRegs {
                    next_avail: 7,
                    next_used: 7,
                    size: 256,
                    ready: true,
                    desc_table: 0x1000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            chips: vec![kvm_irqchip::default(); 3],
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 123,
                ..Default::default()
            },
        };
        let bytes = s.encode().expect("encode");
        let back = DeviceState::decode(&bytes).expect("decode");
        assert_eq!(back.serial, s.serial);
        assert_eq!(back.disks, s.disks);
        assert_eq!(back.clock.clock, 123);
        assert!(DeviceState::decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(VcpuState::decode(&[0xff; 40]).is_err());
    }
}
