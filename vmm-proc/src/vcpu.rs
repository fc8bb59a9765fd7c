//! vCPU threads: one per vCPU, each a small state machine driven by typed events.
//!
//! ```text
//!            Resume                       guest exit needing the VM (debug exit, reset,
//!   Paused ─────────► Running ──────────► crash): report it, stop running ──► Paused
//!     ▲  ◄──────────────┘
//!     │    Pause (kick)
//!   Reset, Save, Restore (only while paused)      Exit (any state): leave the thread
//! ```
//!
//! The controller sends an event and then *kicks* the thread with [`kick_signal`]: the
//! handler sets `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` whether the signal
//! arrived inside the guest or just before the ioctl. The thread clears the flag *before*
//! it looks for events, so a kick can never be lost between the two. Every event is
//! acknowledged on the controller's ack channel.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::{Bus, PioAction};
use crate::control::Input;
use crate::linux::BootCpu;
use crate::machine::VcpuInit;
use crate::migration::state::VcpuState;

/// What the controller asks of a vCPU.
#[derive(Debug, Clone)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Back to the power-on state (the vCPU must be paused); for a Linux guest's boot
    /// vCPU, with the entry state of the kernel just reloaded.
    Reset(Option<Box<BootCpu>>),
    /// Read the vCPU's state for migration (the vCPU must be paused).
    Save,
    /// Take a migrated state (the vCPU must be paused).
    Restore(Arc<VcpuState>),
    Exit,
}

/// A vCPU's answer to an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuAck {
    /// The thread runs (and has its name, which `query-cpus-fast` looks for).
    Started,
    Paused,
    Resumed,
    Reset(Result<(), String>),
    /// The state, encoded for the stream.
    Saved(Result<Vec<u8>, String>),
    Restored(Result<(), String>),
    Exited,
}

/// Something the guest did that the whole VM must handle. The vCPU that saw it has
/// stopped running when this is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// Power off: a write to the debug-exit port (with its value), or ACPI S5 (value 0).
    PowerOff(u32),
    /// The i8042 reset line (`0xfe` to port 0x64, also the ACPI reset register), or a
    /// triple fault.
    Reset,
    /// KVM internal error or failed entry.
    Panicked(String),
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Const-initialised and without a
    /// destructor, so reading it from a signal handler touches nothing but the TLS slot.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run (set by the vCPU thread
        // before it first runs, valid until the thread ends); a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once, before any vCPU thread starts).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set a
    // handler of the right SA_SIGINFO signature.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_kick as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: installs a handler that only does an async-signal-safe store; no old action
    // is read back.
    if unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The controller's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub index: usize,
    events: Sender<VcpuEvent>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the thread out of the guest.
    pub fn send(&self, event: VcpuEvent) {
        if self.events.send(event).is_err() {
            return; // the thread is gone; its ack will never come and the caller times out
        }
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread is alive (or a zombie until joined, which pthread_kill
            // tolerates): we hold its JoinHandle and have not joined it.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Waits for the thread to end (after `Exit`).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts vCPU `index`'s thread, paused. Acks go to `acks` as `(index, ack)`, guest events
/// to the controller's `inputs`.
pub fn spawn(
    index: usize,
    fd: VcpuFd,
    init: VcpuInit,
    bus: Arc<Bus>,
    acks: Sender<(usize, VcpuAck)>,
    guest: Sender<Input>,
) -> std::io::Result<VcpuHandle> {
    let (tx, rx) = channel();
    let vcpu = Vcpu {
        index,
        fd,
        init,
        bus,
        events: rx,
        acks,
        guest,
    };
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || vcpu.run())?;
    Ok(VcpuHandle {
        index,
        events: tx,
        thread: Some(thread),
    })
}

struct Vcpu {
    index: usize,
    fd: VcpuFd,
    init: VcpuInit,
    bus: Arc<Bus>,
    events: Receiver<VcpuEvent>,
    acks: Sender<(usize, VcpuAck)>,
    guest: Sender<Input>,
}

/// What handling an exit leads to.
enum Next {
    Continue,
    /// Stop running and tell the VM.
    Stop(GuestEvent),
}

impl Vcpu {
    fn run(mut self) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let _ = self.acks.send((self.index, VcpuAck::Started));
        let mut running = false;
        loop {
            if !running {
                match self.events.recv() {
                    Ok(event) => {
                        if !self.handle(event, &mut running) {
                            break;
                        }
                    }
                    Err(_) => break, // the controller is gone
                }
                continue;
            }
            // Clear first, then look: a kick after this point makes KVM_RUN return at once.
            self.fd.set_kvm_immediate_exit(0);
            let mut alive = true;
            while let Ok(event) = self.events.try_recv() {
                alive &= self.handle(event, &mut running);
            }
            if !alive {
                break;
            }
            if !running {
                continue;
            }
            match self.run_once() {
                Next::Continue => {}
                Next::Stop(event) => {
                    running = false;
                    let _ = self.guest.send(Input::Guest(self.index, event));
                }
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Applies one event; `false` means leave the thread.
    fn handle(&mut self, event: VcpuEvent, running: &mut bool) -> bool {
        let ack = match event {
            VcpuEvent::Pause => {
                *running = false;
                VcpuAck::Paused
            }
            VcpuEvent::Resume => {
                *running = true;
                VcpuAck::Resumed
            }
            VcpuEvent::Reset(boot) => {
                if let Some(cpu) = boot {
                    self.init.set_boot_cpu(&cpu);
                }
                VcpuAck::Reset(
                    self.init
                        .apply(&self.fd)
                        .map_err(|e| format!("vCPU {}: reset: {e}", self.index)),
                )
            }
            VcpuEvent::Save => VcpuAck::Saved(
                VcpuState::save(&self.fd, &self.init.migratable_msrs)
                    .and_then(|s| s.encode())
                    .map_err(|e| format!("vCPU {}: {e}", self.index)),
            ),
            VcpuEvent::Restore(state) => VcpuAck::Restored(
                state
                    .restore(&self.fd, self.init.xsave_ok)
                    .map_err(|e| format!("vCPU {}: {e}", self.index)),
            ),
            VcpuEvent::Exit => {
                let _ = self.acks.send((self.index, VcpuAck::Exited));
                return false;
            }
        };
        let _ = self.acks.send((self.index, ack));
        true
    }

    fn run_once(&mut self) -> Next {
        let index = self.index;
        let bus = &self.bus;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match bus.pio_write(port, data) {
                PioAction::None => Next::Continue,
                PioAction::PowerOff(code) => Next::Stop(GuestEvent::PowerOff(code)),
                PioAction::Reset => Next::Stop(GuestEvent::Reset),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                Next::Continue
            }
            // A triple fault resets the machine, as on a PC (and in QEMU: RESET with
            // reason guest-reset).
            Ok(VcpuExit::Shutdown) => {
                tracing::info!("vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN): resetting");
                Next::Stop(GuestEvent::Reset)
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, so `internal` is
                // the union member it filled in.
                let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Next::Stop(GuestEvent::Panicked(format!(
                    "vCPU {index}: KVM internal error, suberror {sub}"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(GuestEvent::Panicked(format!(
                "vCPU {index}: entry failed, hardware reason {reason:#x} on host CPU {cpu}"
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(GuestEvent::PowerOff(0)),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(GuestEvent::Reset),
                other => Next::Stop(GuestEvent::Panicked(format!(
                    "vCPU {index}: system event {other}"
                ))),
            },
            // With the in-kernel irqchip KVM handles HLT itself; an interrupt window or an
            // interrupted run needs nothing from us.
            Ok(VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Next::Continue,
            Ok(other) => Next::Stop(GuestEvent::Panicked(format!(
                "vCPU {index}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(GuestEvent::Panicked(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        }
    }
}
