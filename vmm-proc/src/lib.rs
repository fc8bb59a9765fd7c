//! vmm-proc: the only process facing the guest, and the most confined (DESIGN.md §4).
//!
//! - [`control`]: the run-state machine, driven by the monitor and by the guest;
//! - [`machine`]: the KVM VM and vCPUs, made from the `/dev/kvm` descriptor;
//! - [`memory`]: guest RAM, a sealed memfd shared with block-proc;
//! - [`kernel`]: what the guest boots, loaded at power-on and at every reset: the workload
//!   guest ([`loader`], [`boot`], [`builtin`]: its image and direct 64-bit entry) or a Linux
//!   kernel and initramfs ([`linux`]: the loader, ACPI, boot protocols);
//! - [`vcpu`]: one thread per vCPU; [`bus`]: what their exits reach (UART, i8042 reset,
//!   debug exit, boot timer, virtio-mmio);
//! - [`virtio`]: virtio-blk devices; [`io_thread`]: their queues and the data path to
//!   block-proc;
//! - [`sandbox`]: its jail (empty root, no network, seccomp allowlist).
//!
//! It opens nothing: everything it uses arrives as a descriptor. Everything that needs
//! more than the jail allows (creating the VM and vCPUs, registering eventfds with KVM)
//! happens before it enters the jail; its threads start after.

pub mod boot;
pub mod builtin;
pub mod bus;
pub mod control;
pub mod io_thread;
pub mod kernel;
pub mod layout;
pub mod linux;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod sandbox;
pub mod vcpu;
pub mod virtio;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use ipc::vmm::{KernelImage, VmmCall, VmmConfig, VmmMessage, VmmReply, VmmRequest};
use ipc::vmm_block::{BlockToVmm, GuestDrive, VmmBlockAnswer, VmmBlockRequest, VmmToBlock};
use ipc::{Channel, Link, QmpError};
use kvm_ioctls::IoEventAddress;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, IrqTrigger, SerialOut};
use crate::control::{Input, Parts, Vm};
use crate::io_thread::{IoThread, QueueEvent};
use crate::kernel::{BootConfig, BootSource, KernelSource};
use crate::layout::{MAX_DISKS, SERIAL_IRQ, virtio_slot};
use crate::machine::{Machine, VcpuInit};
use crate::memory::GuestRam;
use crate::virtio::mmio::BlkDevice;

/// Why vmm-proc stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("descriptor {0} from the command line is not open")]
    BadFd(RawFd),
    #[error("link: {0}")]
    Link(#[from] ipc::IpcError),
    #[error("the first request must be Configure")]
    NotConfigured,
    #[error("{0}")]
    Setup(String),
    #[error("sandbox: {0}")]
    Sandbox(#[from] jail::JailError),
}

/// The offset of `QueueNotify` in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;
/// The most queues a disk offers (each needs an eventfd; the workload guest runs on at
/// most 16 vCPUs, and with fewer queues than vCPUs it shares queue 0).
const MAX_QUEUES: usize = 16;

/// Sets up from the monitor's first request, enters the jail, then runs the VM and serves
/// the monitor until `Shutdown` or until it goes away.
pub fn run(monitor_fd: RawFd, peer_fd: RawFd, runas: Option<(u32, u32)>) -> Result<(), Error> {
    let monitor = Channel::from_inherited(monitor_fd).ok_or(Error::BadFd(monitor_fd))?;
    let block = Channel::from_inherited(peer_fd).ok_or(Error::BadFd(peer_fd))?;
    monitor.handshake(Link::MonitorVmm)?;
    let first = monitor.recv::<VmmCall>()?;
    let VmmRequest::Configure(config) = first.msg.request else {
        return Err(Error::NotConfigured);
    };
    let id = first.msg.id;
    let reply = |result: Result<VmmReply, QmpError>| VmmMessage::Reply { id, result };
    let built = block
        .handshake(Link::VmmBlock)
        .map_err(|e| format!("block-proc: {e}"))
        .and_then(|()| build(&config, first.fds, &block));
    let built = built.and_then(|b| {
        if config.sandbox {
            sandbox::enter(runas).map_err(|e| format!("vmm-proc sandbox: {e}"))?;
        }
        Ok(b)
    });
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            monitor.send(&reply(Err(QmpError::generic(e.clone()))), &[])?;
            return Err(Error::Setup(e));
        }
    };
    let monitor = Arc::new(monitor);
    let vm = match start(built, monitor.clone(), block) {
        Ok(vm) => vm,
        Err(e) => {
            monitor.send(&reply(Err(QmpError::generic(e.clone()))), &[])?;
            return Err(Error::Setup(e));
        }
    };
    monitor.send(&reply(Ok(VmmReply::Done)), &[])?;
    vm.serve(config.start_paused, config.incoming, config.no_reboot)?;
    Ok(())
}

/// What set-up made, before any thread starts.
struct Built {
    ram: GuestRam,
    machine: Machine,
    inits: Vec<VcpuInit>,
    bus: Arc<Bus>,
    disks: Vec<Arc<Mutex<BlkDevice>>>,
    queue_events: Vec<QueueEvent>,
    boot: BootSource,
}

/// Where the guest image comes from: the embedded image, or the kernel file's descriptor.
fn kernel_source(config: &VmmConfig, file: Option<OwnedFd>) -> Result<KernelSource, String> {
    match (&config.kernel, file) {
        (KernelImage::Builtin(name), _) => builtin::image(name)
            .map(|b| KernelSource::Bytes(b.to_vec()))
            .map_err(|e| e.to_string()),
        (KernelImage::File, Some(fd)) => Ok(KernelSource::File(File::from(fd))),
        (KernelImage::File, None) => Err("no kernel descriptor".into()),
    }
}

/// Makes the VM, its memory, devices and boot state, and hands guest memory to block-proc.
fn build(config: &VmmConfig, fds: Vec<OwnedFd>, block: &Channel) -> Result<Built, String> {
    let mut fds = fds.into_iter();
    let kvm = fds.next().ok_or("no /dev/kvm descriptor")?;
    let serial = if config.serial { fds.next() } else { None };
    let kernel = match config.kernel {
        KernelImage::File => fds.next(),
        KernelImage::Builtin(_) => None,
    };
    let initrd = if config.initrd {
        Some(File::from(fds.next().ok_or("no initrd descriptor")?))
    } else {
        None
    };

    let drives = list_drives(block)?;
    if drives.len() > MAX_DISKS {
        return Err(format!(
            "{} drives: a guest can have at most {MAX_DISKS}",
            drives.len()
        ));
    }
    let ram = GuestRam::new(config.memory_bytes).map_err(|e| e.to_string())?;
    let machine = Machine::new(kvm, &ram, config.cpus).map_err(|e| e.to_string())?;
    let mut boot = BootSource::new(
        kernel_source(config, kernel)?,
        initrd,
        &ram,
        &BootConfig {
            cmdline: &config.cmdline,
            vcpus: config.cpus,
            disks: drives.len(),
            tsc_khz: machine.tsc_khz,
        },
    )?;
    let entry = boot.load(&ram)?;
    let inits = machine.enter(&entry).map_err(|e| e.to_string())?;

    let efd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
    let irqfd = |gsi: u32| -> Result<EventFd, String> {
        let e = efd()?;
        machine
            .vm
            .register_irqfd(&e, gsi)
            .map_err(|err| format!("KVM_IRQFD for GSI {gsi}: {err}"))?;
        Ok(e)
    };
    let mut disks = Vec::new();
    let mut queue_events = Vec::new();
    for (i, drive) in drives.into_iter().enumerate() {
        let (base, irq) = virtio_slot(i).ok_or("too many drives")?;
        let mut notify = Vec::new();
        // One queue per vCPU (VIRTIO_BLK_F_MQ), as many as the workload guest uses at most.
        for q in 0..usize::from(config.cpus).min(MAX_QUEUES) {
            let e = efd()?;
            machine
                .vm
                .register_ioevent(&e, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|err| format!("KVM_IOEVENTFD for disk {i}: {err}"))?;
            let clone = e.try_clone().map_err(|e| format!("eventfd: {e}"))?;
            queue_events.push(QueueEvent {
                disk: i,
                queue: q,
                event: e,
            });
            notify.push(clone);
        }
        let policy = config
            .error_policies
            .iter()
            .find(|p| p.id == drive.id)
            .cloned();
        let mut dev = BlkDevice::new(i, drive, ram.mem.clone(), ram.map, irqfd(irq)?, notify)
            .map_err(|e| format!("disk {i}: {e}"))?;
        if let Some(p) = policy {
            (dev.werror, dev.rerror) = (p.werror, p.rerror);
        }
        disks.push(Arc::new(Mutex::new(dev)));
    }
    let uart = Serial::new(
        IrqTrigger(Arc::new(irqfd(SERIAL_IRQ)?)),
        SerialOut(serial.map(File::from)),
    );
    let bus = Arc::new(Bus::new(uart, disks.clone()));

    // block-proc maps the same memory to serve guest I/O.
    share_memory(block, &ram)?;
    Ok(Built {
        ram,
        machine,
        inits,
        bus,
        disks,
        queue_events,
        boot,
    })
}

/// Hands guest memory to block-proc, which maps it to serve guest I/O (at start-up, and
/// to a block-proc restarted after a crash).
pub(crate) fn share_memory(block: &Channel, ram: &GuestRam) -> Result<(), String> {
    block
        .send(
            &VmmToBlock::Call {
                id: 2,
                request: VmmBlockRequest::SetMemory { size: ram.size },
            },
            &[ram.file.as_fd()],
        )
        .map_err(|e| format!("block-proc: {e}"))?;
    match block
        .recv::<BlockToVmm>()
        .map_err(|e| format!("block-proc: {e}"))?
        .msg
    {
        BlockToVmm::Reply {
            id: 2,
            result: Ok(VmmBlockAnswer::Done),
        } => Ok(()),
        BlockToVmm::Reply { result: Err(e), .. } => Err(format!("block-proc: {e}")),
        other => Err(format!("block-proc: unexpected answer {other:?}")),
    }
}

/// The drives block-proc offers the guest.
pub(crate) fn list_drives(block: &Channel) -> Result<Vec<GuestDrive>, String> {
    block
        .send(
            &VmmToBlock::Call {
                id: 1,
                request: VmmBlockRequest::ListDevices,
            },
            &[],
        )
        .map_err(|e| format!("block-proc: {e}"))?;
    match block
        .recv::<BlockToVmm>()
        .map_err(|e| format!("block-proc: {e}"))?
        .msg
    {
        BlockToVmm::Reply {
            id: 1,
            result: Ok(VmmBlockAnswer::Devices(d)),
        } => Ok(d),
        BlockToVmm::Reply { result: Err(e), .. } => Err(format!("block-proc: {e}")),
        other => Err(format!("block-proc: unexpected answer {other:?}")),
    }
}

/// Starts the threads (inside the jail): the monitor reader, the I/O thread and the vCPUs,
/// all paused.
fn start(b: Built, monitor: Arc<Channel>, block: Channel) -> Result<Vm, String> {
    let (inputs_tx, inputs) = channel();
    let reader = monitor.clone();
    let tx = inputs_tx.clone();
    std::thread::Builder::new()
        .name("monitor-link".into())
        .spawn(move || {
            loop {
                match reader.recv::<VmmCall>() {
                    Ok(r) => {
                        if tx.send(Input::Monitor(r.msg, r.fds)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Input::MonitorGone(e));
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("thread: {e}"))?;

    let (io_tx, io_rx) = channel();
    let io_wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let device_pages = Arc::new(migration::DevicePages::new(b.ram.size));
    let io = IoThread::new(
        block,
        b.disks.clone(),
        b.queue_events,
        io_wake.try_clone().map_err(|e| format!("eventfd: {e}"))?,
        io_rx,
        inputs_tx.clone(),
        (device_pages.clone(), b.ram.map),
    )
    .map_err(|e| format!("I/O thread: {e}"))?;
    let io_thread = std::thread::Builder::new()
        .name("io".into())
        .spawn(move || io.run())
        .map_err(|e| format!("thread: {e}"))?;

    vcpu::install_kick_handler().map_err(|e| format!("vCPU kick handler: {e}"))?;
    let (acks_tx, acks) = channel();
    let mut vcpus = Vec::new();
    for (i, (fd, init)) in b.machine.vcpus.into_iter().zip(b.inits).enumerate() {
        // Guest events join the monitor's requests on the controller's one queue.
        vcpus.push(
            vcpu::spawn(
                i,
                fd,
                init,
                b.bus.clone(),
                acks_tx.clone(),
                inputs_tx.clone(),
            )
            .map_err(|e| format!("vCPU thread: {e}"))?,
        );
    }
    // The monitor may ask for the vCPU threads (query-cpus-fast) as soon as we answer:
    // each must be running, under its name, by then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut started = 0;
    while started < vcpus.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match acks.recv_timeout(left) {
            Ok((_, vcpu::VcpuAck::Started)) => started += 1,
            Ok(_) => {}
            Err(_) => return Err("the vCPU threads did not start".into()),
        }
    }
    Ok(Vm::new(Parts {
        vm: b.machine.vm,
        chips: b.machine.chips,
        monitor,
        inputs,
        vcpus,
        acks,
        io: io_tx,
        io_wake,
        io_thread,
        bus: b.bus,
        ram: b.ram,
        boot: b.boot,
        inputs_tx,
        device_pages,
    }))
}
