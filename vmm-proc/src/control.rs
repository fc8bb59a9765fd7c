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

use std::os::fd::OwnedFd;
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
use crate::migration::{DevicePages, MigrationInput, Shared};
use crate::vcpu::{GuestEvent, VcpuAck, VcpuEvent, VcpuHandle};

/// How long a vCPU gets to acknowledge an event.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long pausing waits for requests in flight (a hung block-proc must not hang us).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the main thread waits for.
#[derive(Debug)]
pub enum Input {
    /// A request and the descriptors that came with it.
    Monitor(VmmCall, Vec<OwnedFd>),
    /// The monitor's link closed or broke.
    MonitorGone(IpcError),
    Guest(usize, GuestEvent),
    /// A guest disk request failed (from the I/O thread).
    BlockIoError(ipc::vmm::BlockIoError),
    /// From a migration thread.
    Migration(MigrationInput),
}

/// The running VM as the controller sees it.
#[derive(Debug)]
pub struct Vm {
    vm: Arc<kvm_ioctls::VmFd>,
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
    /// The controller's own queue, for the migration threads.
    inputs_tx: Sender<Input>,
    /// Pages the I/O thread wrote into guest memory, for a migration.
    device_pages: Arc<DevicePages>,
    /// The last (or current) migration, for `query-migrate`.
    migration: Option<Arc<Shared>>,
    /// Whether a migration thread runs.
    migrating: bool,
    /// The run state before the source stopped the guest for the switch-over.
    before_switch_over: Option<RunState>,
    /// `--paused` on a destination (`cont` and `stop` in `inmigrate` change it).
    autostart: bool,
    /// Whether the source's guest was running (the destination runs it only then).
    source_running: bool,
    disks: u32,
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
    pub inputs_tx: Sender<Input>,
    pub device_pages: Arc<DevicePages>,
}

impl Vm {
    /// A VM whose vCPUs and I/O thread are started and paused.
    pub fn new(p: Parts) -> Self {
        let disks = p.bus.disks().len() as u32;
        Self {
            vm: Arc::new(p.vm),
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
            inputs_tx: p.inputs_tx,
            device_pages: p.device_pages,
            migration: None,
            migrating: false,
            before_switch_over: None,
            autostart: true,
            source_running: false,
            disks,
        }
    }

    /// Starts the guest (unless `--paused`), then serves the monitor until `Shutdown` or
    /// until its link goes away. With `no_reboot`, a guest reset shuts down instead.
    pub fn serve(
        mut self,
        start_paused: bool,
        incoming: bool,
        no_reboot: bool,
    ) -> Result<(), IpcError> {
        self.no_reboot = no_reboot;
        if incoming {
            // Nothing runs until the stream is loaded; then the guest starts unless
            // `--paused` (or a `stop` meanwhile) said otherwise.
            self.state = RunState::InMigrate;
            self.autostart = !start_paused;
        } else if !start_paused {
            // No RESUME event: the monitor starts out in `running`, as QEMU without -S.
            self.resume_all();
            self.state = RunState::Running;
        }
        let result = loop {
            match self.inputs.recv() {
                Ok(Input::Monitor(call, fds)) => match self.request(call, fds) {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
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
                Ok(Input::Migration(m)) => {
                    if let Err(e) = self.migration_input(m) {
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
    fn request(&mut self, call: VmmCall, fds: Vec<OwnedFd>) -> Result<bool, IpcError> {
        let result = match call.request {
            VmmRequest::QueryStatus => Ok(VmmReply::Status(self.state)),
            VmmRequest::Configure(_) => Err(QmpError::generic("vmm-proc is already configured")),
            VmmRequest::Stop if self.state == RunState::InMigrate => {
                self.autostart = false;
                Ok(VmmReply::Done)
            }
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
                RunState::InMigrate => {
                    self.autostart = true;
                    Ok(VmmReply::Done)
                }
                RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
                // After a migration the destination may own the images: take them back
                // first (QEMU's `cont` activates the block devices too).
                RunState::PostMigrate => match self.image_locks(true) {
                    Ok(()) => {
                        self.resume_all();
                        self.set_state(RunState::Running)?;
                        Ok(VmmReply::Done)
                    }
                    Err(e) => Err(QmpError::generic(e)),
                },
                // From io-error, resuming retries the requests that failed.
                RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                    self.resume_all();
                    self.set_state(RunState::Running)?;
                    Ok(VmmReply::Done)
                }
            },
            // The switch-over has read the vCPUs' and devices' state: it stands.
            VmmRequest::SystemReset if self.state == RunState::FinishMigrate => {
                Err(QmpError::generic("Migration is not finalized yet"))
            }
            VmmRequest::SystemReset => self.reset(false).map(|()| VmmReply::Done),
            VmmRequest::ReconnectBlock => match fds.into_iter().next() {
                Some(fd) => self
                    .reconnect_block(fd)
                    .map(|()| VmmReply::Done)
                    .map_err(QmpError::generic),
                None => Err(QmpError::generic("ReconnectBlock came without its socket")),
            },
            VmmRequest::QueryBlockStats => Ok(VmmReply::BlockStats(self.bus.disk_stats())),
            VmmRequest::MigrateOut(params) => self.migrate_out(params, fds),
            VmmRequest::MigrateIn => self.migrate_in(fds),
            VmmRequest::MigrateSetParams(params) => {
                if let Some(m) = &self.migration {
                    m.set_params(params);
                }
                Ok(VmmReply::Done)
            }
            VmmRequest::MigrateCancel => {
                if let Some(m) = &self.migration
                    && self.migrating
                    && m.status()
                        .is_some_and(ipc::vmm::MigrationStatus::in_progress)
                    && !self.incoming_side()
                {
                    m.cancel();
                    crate::migration::set_status(
                        m,
                        &self.inputs_tx,
                        ipc::vmm::MigrationStatus::Cancelling,
                    );
                }
                Ok(VmmReply::Done)
            }
            VmmRequest::QueryMigrate => Ok(VmmReply::Migration(
                self.migration
                    .as_ref()
                    .map(|m| m.info())
                    .unwrap_or_default(),
            )),
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

    /// Whether this VM is (or was) a migration's destination.
    fn incoming_side(&self) -> bool {
        self.state == RunState::InMigrate
    }

    fn stream_config(&self) -> crate::migration::stream::StreamConfig {
        crate::migration::stream::StreamConfig {
            ram_size: self.ram.size,
            vcpus: self.vcpus.len() as u32,
            disks: self.disks,
        }
    }

    /// QMP `migrate`: checks QEMU's preconditions, then starts the source thread on the
    /// socket the monitor connected.
    fn migrate_out(
        &mut self,
        params: ipc::vmm::MigrationParams,
        fds: Vec<OwnedFd>,
    ) -> Result<VmmReply, QmpError> {
        if self.migrating {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        match self.state {
            RunState::InMigrate => {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
            RunState::PostMigrate => {
                return Err(QmpError::generic(
                    "Can't migrate the vm that was paused due to previous migration",
                ));
            }
            RunState::Shutdown | RunState::GuestPanicked => {
                return Err(QmpError::generic(format!(
                    "Cannot migrate a guest in state {}",
                    self.state.as_qapi_str()
                )));
            }
            _ => {}
        }
        let sock = fds
            .into_iter()
            .next()
            .ok_or_else(|| QmpError::generic("migrate: no connection descriptor"))?;
        let shared = Arc::new(Shared::new(params));
        crate::migration::set_status(&shared, &self.inputs_tx, ipc::vmm::MigrationStatus::Setup);
        let source = crate::migration::source::Source {
            sock: std::fs::File::from(sock),
            ram_file: self.ram.file.clone(),
            vm: self.vm.clone(),
            mem: self.ram.mem.clone(),
            map: self.ram.map,
            slots: self.ram.host_regions(),
            devices: self.device_pages.clone(),
            shared: shared.clone(),
            controller: self.inputs_tx.clone(),
            config: self.stream_config(),
        };
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || source.run())
            .map_err(|e| QmpError::generic(format!("migration thread: {e}")))?;
        self.migration = Some(shared);
        self.migrating = true;
        Ok(VmmReply::Done)
    }

    /// The destination: starts loading from the socket the monitor accepted.
    fn migrate_in(&mut self, fds: Vec<OwnedFd>) -> Result<VmmReply, QmpError> {
        if self.state != RunState::InMigrate {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if self.migrating || self.migration.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let sock = fds
            .into_iter()
            .next()
            .ok_or_else(|| QmpError::generic("migrate-incoming: no connection descriptor"))?;
        let shared = Arc::new(Shared::new(Default::default()));
        crate::migration::set_status(&shared, &self.inputs_tx, ipc::vmm::MigrationStatus::Setup);
        let dest = crate::migration::dest::Dest {
            sock: std::fs::File::from(sock),
            ram_file: self.ram.file.clone(),
            mem: self.ram.mem.clone(),
            map: self.ram.map,
            shared: shared.clone(),
            controller: self.inputs_tx.clone(),
            config: self.stream_config(),
        };
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || dest.run())
            .map_err(|e| QmpError::generic(format!("migration thread: {e}")))?;
        self.migration = Some(shared);
        self.migrating = true;
        Ok(VmmReply::Done)
    }

    fn migration_input(&mut self, m: MigrationInput) -> Result<(), IpcError> {
        match m {
            MigrationInput::Event(e) => self.event(e),
            MigrationInput::SwitchOver(reply) => {
                let before = self.state;
                if before == RunState::Running {
                    self.pause_all();
                } else {
                    // Paused already; still wait for nothing in flight.
                    self.drain_io();
                }
                self.before_switch_over = Some(before);
                self.set_state(RunState::FinishMigrate)?;
                // The destination takes the images over: nothing is in flight any more.
                let saved = self
                    .image_locks(false)
                    .and_then(|()| self.save(before == RunState::Running));
                let _ = reply.send(saved);
                Ok(())
            }
            MigrationInput::SourceDone { result, stopped } => {
                self.migrating = false;
                let before = self.before_switch_over.take();
                let status = match &result {
                    Ok(()) => ipc::vmm::MigrationStatus::Completed,
                    Err(_) if self.migration.as_ref().is_some_and(|m| m.cancelled()) => {
                        ipc::vmm::MigrationStatus::Cancelled
                    }
                    Err(_) => ipc::vmm::MigrationStatus::Failed,
                };
                if let Err(why) = &result {
                    tracing::warn!("migration: {why}");
                    // The guest goes on here as it was.
                    if stopped {
                        let relocked = self.image_locks(true);
                        match (before, relocked) {
                            (Some(_), Err(e)) => {
                                // Not without the images: the guest stays stopped.
                                tracing::error!(
                                    "migration failed, and {e}; the guest stays paused"
                                );
                                self.set_state(RunState::Paused)?;
                            }
                            (Some(RunState::Running), Ok(())) => {
                                self.resume_all();
                                self.set_state(RunState::Running)?;
                            }
                            (Some(s), Ok(())) => self.set_state(s)?,
                            (None, _) => {}
                        }
                    }
                }
                if let Some(shared) = &self.migration {
                    shared.update(|i| {
                        i.status = Some(status);
                        if status == ipc::vmm::MigrationStatus::Failed {
                            i.error_desc = result.as_ref().err().cloned();
                        }
                    });
                }
                self.event(VmmEvent::Migration(status))?;
                if result.is_ok() {
                    self.set_state(RunState::PostMigrate)?;
                }
                Ok(())
            }
            MigrationInput::Load(loaded, reply) => {
                let _ = reply.send(self.load(*loaded));
                Ok(())
            }
            MigrationInput::DestDone(result) => {
                self.migrating = false;
                let status = if result.is_ok() {
                    ipc::vmm::MigrationStatus::Completed
                } else {
                    ipc::vmm::MigrationStatus::Failed
                };
                if let Some(shared) = &self.migration {
                    let total = shared.elapsed_ms();
                    shared.update(|i| {
                        i.status = Some(status);
                        i.total_time = total;
                        i.error_desc = result.as_ref().err().cloned();
                    });
                }
                self.event(VmmEvent::Migration(status))?;
                match result {
                    Ok(()) if self.autostart && self.source_running => {
                        self.resume_all();
                        self.set_state(RunState::Running)
                    }
                    Ok(()) => self.set_state(RunState::Paused),
                    Err(why) => {
                        tracing::error!("incoming migration failed: {why}");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Has block-proc take (`true`) or give up the drives' image locks.
    fn image_locks(&self, active: bool) -> Result<(), String> {
        let (tx, rx) = channel();
        self.io_command(IoCommand::ImageLocks(active, tx));
        rx.recv_timeout(DRAIN_TIMEOUT)
            .map_err(|_| "block-proc did not answer about the image locks".to_string())?
            .map_err(|e| {
                let verb = if active { "taking" } else { "giving up" };
                format!("{verb} the image locks: {e}")
            })
    }

    /// Waits until no disk request is in flight (the vCPUs are already stopped).
    fn drain_io(&mut self) {
        let (tx, rx) = channel();
        self.io_command(IoCommand::Pause(tx));
        if rx.recv_timeout(DRAIN_TIMEOUT).is_err() {
            tracing::error!("guest I/O did not drain in {DRAIN_TIMEOUT:?}");
        }
    }

    /// The stopped guest's vCPU and device state, for the stream.
    fn save(&mut self, running: bool) -> Result<crate::migration::Saved, String> {
        for v in &self.vcpus {
            v.send(VcpuEvent::Save);
        }
        let mut vcpus = Vec::new();
        for (i, ack) in self.wait_acks(|a| matches!(a, VcpuAck::Saved(_))) {
            match ack {
                Some(VcpuAck::Saved(state)) => vcpus.push(state?),
                _ => return Err(format!("vCPU {i} did not save its state")),
            }
        }
        let (chips, pit, clock) = crate::migration::state::save_vm(&self.vm)?;
        let disks = self.bus.disks();
        let mut rings = Vec::new();
        let mut disk_states = Vec::new();
        for d in disks {
            let d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            rings.extend(d.ring_ranges());
            disk_states.push(d.save_state());
        }
        let devices = crate::migration::state::DeviceState {
            running,
            serial: self.bus.serial_state(),
            disks: disk_states,
            chips,
            pit,
            clock,
        }
        .encode()?;
        Ok(crate::migration::Saved {
            vcpus,
            devices,
            rings,
        })
    }

    /// Puts a migrated state into the (never run) machine.
    fn load(&mut self, loaded: crate::migration::Loaded) -> Result<(), String> {
        let d = &loaded.devices;
        // The source has given the images up; take them before anything can touch them.
        self.image_locks(true)?;
        d.restore_vm(&self.vm)?;
        self.bus.restore_serial(&d.serial)?;
        for (dev, state) in self.bus.disks().iter().zip(&d.disks) {
            dev.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .restore_state(state)?;
        }
        for (v, state) in self.vcpus.iter().zip(loaded.vcpus) {
            v.send(VcpuEvent::Restore(Arc::new(state)));
        }
        for (i, ack) in self.wait_acks(|a| matches!(a, VcpuAck::Restored(_))) {
            match ack {
                Some(VcpuAck::Restored(r)) => r?,
                _ => return Err(format!("vCPU {i} did not take its state")),
            }
        }
        self.source_running = d.running;
        Ok(())
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
        // The loader wrote guest RAM from here, which KVM's dirty log does not see: a
        // migration under way sends all of it again.
        self.device_pages.mark(0, self.ram.size);
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
