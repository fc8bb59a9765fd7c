//! The controller: the run-state machine, driven by the monitor's requests and by what the
//! guest does, on vmm-proc's main thread.
//!
//! States follow QEMU's `RunState`:
//!
//! | from | input | to | reported |
//! |---|---|---|---|
//! | prelaunch, paused | `cont` | running | RESUME |
//! | running | `stop` | paused | STOP |
//! | shutdown, guest-panicked | `cont` | (error: "Resetting the Virtual Machine is required") | |
//! | any | `system_reset` | running if it was running, else prelaunch | RESET (guest: false) |
//! | running | i8042 reset or triple fault (a guest reboot) | running | RESET (guest: true) |
//! | any | debug-exit write, ACPI S5 | shutdown | GuestShutdown (the monitor then exits) |
//! | running | guest reset under `--no-reboot` | shutdown | GuestResetShutdown (likewise) |
//! | any | KVM internal error, failed entry | guest-panicked | GUEST_PANICKED, STOP |
//! | any | a reset that fails (e.g. the kernel file no longer loads) | guest-panicked | GUEST_PANICKED, STOP |
//!
//! Pausing is complete when every vCPU has acknowledged and every request in flight has
//! completed (as QEMU drains before STOP), so a paused guest's memory and disks are still.
//! Events go to the monitor before the reply to the request that caused them.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::common::RunState;
use ipc::vmm::{VmmCall, VmmEvent, VmmMessage, VmmReply, VmmRequest};
use ipc::{Channel, IpcError, QmpError};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::io_thread::IoCommand;
use crate::kernel::BootSource;
use crate::machine::PowerOnChips;
use crate::memory::GuestRam;
use crate::vcpu::{GuestEvent, VcpuAck, VcpuEvent, VcpuHandle};

/// How long a vCPU gets to acknowledge an event.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long pausing waits for requests in flight (a hung block-proc must not hang us).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the main thread waits for.
#[derive(Debug)]
pub enum Input {
    Monitor(VmmCall),
    /// `ReconnectBlock` (its call id) with the restarted block-proc's data-path socket.
    ReconnectBlock(ipc::CallId, std::os::fd::OwnedFd),
    /// The monitor's link closed or broke.
    MonitorGone(IpcError),
    Guest(usize, GuestEvent),
    /// A guest disk request failed (from the I/O thread).
    BlockIoError(ipc::vmm::BlockIoError),
}

/// The running VM as the controller sees it.
#[derive(Debug)]
pub struct Vm {
    vm: kvm_ioctls::VmFd,
    chips: PowerOnChips,
    state: RunState,
    monitor: Arc<Channel>,
    inputs: Receiver<Input>,
    vcpus: Vec<VcpuHandle>,
    acks: Receiver<(usize, VcpuAck)>,
    io: Sender<IoCommand>,
    io_wake: EventFd,
    io_thread: Option<JoinHandle<()>>,
    bus: Arc<Bus>,
    ram: GuestRam,
    boot: BootSource,
    /// `--no-reboot`: a guest reset shuts down instead.
    no_reboot: bool,
}

/// Everything the controller drives.
#[derive(Debug)]
pub struct Parts {
    /// The VM itself, kept open for as long as its vCPUs run.
    pub vm: kvm_ioctls::VmFd,
    /// The interrupt controllers' power-on state, for resets.
    pub chips: PowerOnChips,
    pub monitor: Arc<Channel>,
    pub inputs: Receiver<Input>,
    pub vcpus: Vec<VcpuHandle>,
    pub acks: Receiver<(usize, VcpuAck)>,
    pub io: Sender<IoCommand>,
    pub io_wake: EventFd,
    pub io_thread: JoinHandle<()>,
    pub bus: Arc<Bus>,
    pub ram: GuestRam,
    pub boot: BootSource,
}

impl Vm {
    /// A VM whose vCPUs and I/O thread are started and paused.
    pub fn new(p: Parts) -> Self {
        Self {
            vm: p.vm,
            chips: p.chips,
            state: RunState::Prelaunch,
            monitor: p.monitor,
            inputs: p.inputs,
            vcpus: p.vcpus,
            acks: p.acks,
            io: p.io,
            io_wake: p.io_wake,
            io_thread: Some(p.io_thread),
            bus: p.bus,
            ram: p.ram,
            boot: p.boot,
            no_reboot: false,
        }
    }

    /// Starts the guest (unless `--paused`), then serves the monitor until `Shutdown` or
    /// until its link goes away. With `no_reboot`, a guest reset shuts down instead.
    pub fn serve(mut self, start_paused: bool, no_reboot: bool) -> Result<(), IpcError> {
        self.no_reboot = no_reboot;
        if !start_paused {
            // No RESUME event: the monitor starts out in `running`, as QEMU without -S.
            self.resume_all();
            self.state = RunState::Running;
        }
        let result = loop {
            match self.inputs.recv() {
                Ok(Input::Monitor(call)) => match self.request(call) {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
                Ok(Input::ReconnectBlock(id, fd)) => {
                    let result = self
                        .reconnect_block(fd)
                        .map(|()| VmmReply::Done)
                        .map_err(QmpError::generic);
                    if let Err(e) = self.monitor.send(&VmmMessage::Reply { id, result }, &[]) {
                        break Err(e);
                    }
                }
                Ok(Input::Guest(vcpu, event)) => {
                    if let Err(e) = self.guest(vcpu, event) {
                        break Err(e);
                    }
                }
                Ok(Input::BlockIoError(e)) => {
                    if let Err(e) = self.block_io_error(e) {
                        break Err(e);
                    }
                }
                Ok(Input::MonitorGone(IpcError::Closed)) | Err(_) => break Ok(()),
                Ok(Input::MonitorGone(e)) => break Err(e),
            }
        };
        self.exit();
        result
    }

    fn event(&self, e: VmmEvent) -> Result<(), IpcError> {
        self.monitor.send(&VmmMessage::Event(e), &[])
    }

    fn set_state(&mut self, s: RunState) -> Result<(), IpcError> {
        if self.state != s {
            self.state = s;
            self.event(VmmEvent::RunState(s))?;
        }
        Ok(())
    }

    /// One monitor request; `Ok(false)` after `Shutdown`.
    fn request(&mut self, call: VmmCall) -> Result<bool, IpcError> {
        let result = match call.request {
            VmmRequest::QueryStatus => Ok(VmmReply::Status(self.state)),
            VmmRequest::Configure(_) => Err(QmpError::generic("vmm-proc is already configured")),
            VmmRequest::Stop => {
                if self.state == RunState::Running {
                    self.pause_all();
                    self.set_state(RunState::Paused)?;
                }
                Ok(VmmReply::Done)
            }
            VmmRequest::Cont => match self.state {
                RunState::Shutdown | RunState::GuestPanicked => Err(QmpError::generic(
                    "Resetting the Virtual Machine is required",
                )),
                RunState::Running => Ok(VmmReply::Done),
                // From io-error, resuming retries the requests that failed.
                RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                    self.resume_all();
                    self.set_state(RunState::Running)?;
                    Ok(VmmReply::Done)
                }
            },
            VmmRequest::SystemReset => self.reset(false).map(|()| VmmReply::Done),
            VmmRequest::ReconnectBlock => {
                Err(QmpError::generic("ReconnectBlock came without its socket"))
            }
            VmmRequest::QueryBlockStats => Ok(VmmReply::BlockStats(self.bus.disk_stats())),
            VmmRequest::Shutdown => {
                // Threads first: the I/O thread must be gone before block-proc is.
                self.exit();
                self.monitor.send(
                    &VmmMessage::Reply {
                        id: call.id,
                        result: Ok(VmmReply::Done),
                    },
                    &[],
                )?;
                return Ok(false);
            }
        };
        self.monitor.send(
            &VmmMessage::Reply {
                id: call.id,
                result,
            },
            &[],
        )?;
        Ok(true)
    }

    /// Something the guest did. The vCPU that saw it has already stopped.
    fn guest(&mut self, vcpu: usize, event: GuestEvent) -> Result<(), IpcError> {
        match event {
            GuestEvent::PowerOff(code) => {
                if self.state == RunState::Shutdown {
                    return Ok(());
                }
                tracing::info!("vCPU {vcpu}: guest powered off, debug-exit value {code:#x}");
                self.pause_all();
                // The monitor exits on this; no STOP for the final stop, as in QEMU.
                self.state = RunState::Shutdown;
                self.event(VmmEvent::GuestShutdown { code })
            }
            GuestEvent::Reset if self.no_reboot => {
                if self.state == RunState::Shutdown {
                    return Ok(());
                }
                tracing::info!("vCPU {vcpu}: guest reset; --no-reboot: shutting down");
                self.pause_all();
                self.state = RunState::Shutdown;
                self.event(VmmEvent::GuestResetShutdown)
            }
            GuestEvent::Reset => {
                tracing::info!("vCPU {vcpu}: guest reset");
                // A failed reset has already stopped the VM and said why.
                let _ = self.reset(true);
                Ok(())
            }
            GuestEvent::Panicked(why) => {
                if matches!(self.state, RunState::GuestPanicked | RunState::Shutdown) {
                    return Ok(());
                }
                tracing::warn!("guest crashed: {why}");
                self.pause_all();
                self.event(VmmEvent::GuestPanicked)?;
                self.set_state(RunState::GuestPanicked)
            }
        }
    }

    /// A disk request failed: BLOCK_IO_ERROR, and with `stop` the VM stops in `io-error`
    /// (QEMU's order: the event, then STOP).
    fn block_io_error(&mut self, e: ipc::vmm::BlockIoError) -> Result<(), IpcError> {
        let stop = e.action == ipc::vmm::ErrorAction::Stop;
        self.event(VmmEvent::BlockIoError(e))?;
        if stop && self.state == RunState::Running {
            self.pause_all();
            self.set_state(RunState::IoError)?;
        }
        Ok(())
    }

    /// Resets the machine: devices, memory image, vCPUs. A running VM keeps running;
    /// any other state becomes prelaunch (QEMU's rule). If the machine cannot be put back
    /// (a kernel file that no longer loads, a vCPU that refuses its state), the guest
    /// cannot run: the VM stays stopped in `guest-panicked` (GUEST_PANICKED), and another
    /// `system_reset` tries again.
    fn reset(&mut self, guest: bool) -> Result<(), QmpError> {
        let was_running = self.state == RunState::Running;
        self.pause_all();
        let gone = |e: IpcError| QmpError::generic(format!("monitor link: {e}"));
        if let Err(why) = self.reset_machine() {
            tracing::error!("reset failed: {why}");
            if self.state != RunState::GuestPanicked {
                self.event(VmmEvent::GuestPanicked).map_err(gone)?;
                self.set_state(RunState::GuestPanicked).map_err(gone)?;
            }
            return Err(QmpError::generic(format!("reset failed: {why}")));
        }
        self.bus.reset_boot_timer();
        self.event(VmmEvent::Reset { guest }).map_err(gone)?;
        if was_running {
            self.resume_all();
        } else {
            self.set_state(RunState::Prelaunch).map_err(gone)?;
        }
        Ok(())
    }

    /// The devices, interrupt controllers, UART, guest image and vCPUs back to power-on
    /// (the vCPUs are paused). A Linux kernel is read again from its file, and may enter
    /// elsewhere than before.
    fn reset_machine(&mut self) -> Result<(), String> {
        let (tx, rx) = channel();
        self.io_command(IoCommand::Reset(tx));
        if rx.recv_timeout(VCPU_ACK_TIMEOUT).is_err() {
            return Err("the I/O thread did not reset the devices".into());
        }
        self.chips
            .apply(&self.vm)
            .map_err(|e| format!("resetting the interrupt controllers: {e}"))?;
        self.bus.reset_serial();
        let entry = self
            .boot
            .load(&self.ram)
            .map_err(|e| format!("reloading the guest: {e}"))?;
        let boot_cpu = BootSource::boot_cpu(&entry);
        for (i, v) in self.vcpus.iter().enumerate() {
            v.send(VcpuEvent::Reset(if i == 0 {
                boot_cpu.clone()
            } else {
                None
            }));
        }
        for (i, ack) in self.wait_acks(|a| matches!(a, VcpuAck::Reset(_))) {
            match ack {
                Some(VcpuAck::Reset(Err(e))) => return Err(e),
                None => return Err(format!("vCPU {i} did not reset")),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A restarted block-proc (crash recovery): checks it offers the guest's drives, hands
    /// it guest memory, then the I/O thread sends it the requests still in flight.
    fn reconnect_block(&mut self, fd: std::os::fd::OwnedFd) -> Result<(), String> {
        let block = Channel::from_fd(fd);
        block
            .handshake(ipc::Link::VmmBlock)
            .map_err(|e| format!("block-proc: {e}"))?;
        let offered: Vec<String> = crate::list_drives(&block)?
            .into_iter()
            .map(|d| d.id)
            .collect();
        let guest: Vec<String> = self.bus.disk_stats().into_iter().map(|d| d.id).collect();
        if offered != guest {
            return Err(format!(
                "the restarted block-proc offers drives {offered:?}, the guest has {guest:?}"
            ));
        }
        crate::share_memory(&block, &self.ram)?;
        self.io_command(IoCommand::Reconnect(block));
        Ok(())
    }

    fn io_command(&self, c: IoCommand) {
        if self.io.send(c).is_ok() {
            let _ = self.io_wake.write(1);
        }
    }

    /// Stops every vCPU, then waits until no request is in flight.
    fn pause_all(&mut self) {
        for v in &self.vcpus {
            v.send(VcpuEvent::Pause);
        }
        for (i, ack) in self.wait_acks(|a| *a == VcpuAck::Paused) {
            if ack.is_none() {
                tracing::error!("vCPU {i} did not pause");
            }
        }
        let (tx, rx) = channel();
        self.io_command(IoCommand::Pause(tx));
        if rx.recv_timeout(DRAIN_TIMEOUT).is_err() {
            tracing::error!("guest I/O did not drain in {DRAIN_TIMEOUT:?}; pausing anyway");
        }
    }

    fn resume_all(&mut self) {
        self.io_command(IoCommand::Resume);
        self.bus.start_boot_timer();
        for v in &self.vcpus {
            v.send(VcpuEvent::Resume);
        }
        for (i, ack) in self.wait_acks(|a| *a == VcpuAck::Resumed) {
            if ack.is_none() {
                tracing::error!("vCPU {i} did not resume");
            }
        }
    }

    /// Collects one ack matching `want` from every vCPU (`None` for those that timed out).
    fn wait_acks(&self, want: impl Fn(&VcpuAck) -> bool) -> Vec<(usize, Option<VcpuAck>)> {
        let mut got: Vec<Option<VcpuAck>> = vec![None; self.vcpus.len()];
        let deadline = Instant::now() + VCPU_ACK_TIMEOUT;
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok((i, ack)) if want(&ack) => {
                    if let Some(slot) = got.get_mut(i) {
                        *slot = Some(ack);
                    }
                }
                Ok(_) => {} // a late answer to an earlier event
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        got.into_iter().enumerate().collect()
    }

    /// Ends the vCPU and I/O threads (once).
    fn exit(&mut self) {
        if self.io_thread.is_none() {
            return;
        }
        for v in &self.vcpus {
            v.send(VcpuEvent::Exit);
        }
        let exited = self.wait_acks(|a| *a == VcpuAck::Exited);
        for (v, (_, ack)) in self.vcpus.iter_mut().zip(exited) {
            if ack.is_some() {
                v.join();
            }
        }
        self.io_command(IoCommand::Exit);
        if let Some(t) = self.io_thread.take() {
            let _ = t.join();
        }
    }
}
