//! Live migration of the VM (docs/migration.md): the stream format ([`stream`]), the
//! state besides RAM ([`state`]), the source's pre-copy ([`source`]) and the
//! destination's load ([`dest`]), and what they share with the controller and the I/O
//! thread: the statistics `query-migrate` reads, the cancel flag, and the bitmap of
//! guest pages that devices wrote ([`DevicePages`]), which KVM's dirty log cannot see.

pub mod dest;
pub mod source;
pub mod state;
pub mod stream;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ipc::vmm::{MigrationInfo, MigrationParams, MigrationStatus, VmmEvent};

use self::state::{DeviceState, VcpuState};
use self::stream::PAGE;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Guest pages written by devices (disk reads that block-proc put into guest memory, the
/// status bytes vmm-proc writes), by page index in the memfd. The I/O thread marks them
/// when their request completes, while a migration is under way; the source takes them
/// at every pass, together with KVM's dirty log.
#[derive(Debug)]
pub struct DevicePages {
    active: AtomicBool,
    words: Vec<AtomicU64>,
}

impl DevicePages {
    /// A bitmap for `ram_size` bytes of guest RAM.
    pub fn new(ram_size: u64) -> Self {
        let pages = ram_size.div_ceil(PAGE as u64);
        Self {
            active: AtomicBool::new(false),
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
        if !on {
            for w in &self.words {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Marks the memfd range `[offset, offset + len)` (a no-op with no migration).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.active.load(Ordering::Acquire) {
            return;
        }
        let first = offset / PAGE as u64;
        let last = offset.saturating_add(len - 1) / PAGE as u64;
        for page in first..=last {
            if let Some(w) = self.words.get((page / 64) as usize) {
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
        }
    }

    /// Moves the marked pages into `into` (one bit per memfd page).
    pub fn take_into(&self, into: &mut [u64]) {
        for (w, out) in self.words.iter().zip(into.iter_mut()) {
            *out |= w.swap(0, Ordering::AcqRel);
        }
    }
}

/// One bit per page of the guest-RAM memfd: set where the memfd has data, clear where it
/// is a hole (never written: it reads as zeroes). Found with `lseek` `SEEK_DATA` /
/// `SEEK_HOLE`, so neither side touches (and so allocates) RAM the guest never used.
pub fn data_pages(file: &std::fs::File, size: u64) -> Result<Vec<u64>, String> {
    use nix::unistd::{Whence, lseek};
    let pages = size.div_ceil(PAGE as u64);
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let end = i64::try_from(size).map_err(|_| "guest RAM too large".to_string())?;
    let mut at = 0i64;
    while at < end {
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // nothing but a hole from here
            Err(e) => return Err(format!("SEEK_DATA in guest RAM: {e}")),
        };
        let hole = match lseek(file, data, Whence::SeekHole) {
            Ok(h) => h.min(end),
            Err(e) => return Err(format!("SEEK_HOLE in guest RAM: {e}")),
        };
        let first = data as u64 / PAGE as u64;
        let last = (hole as u64).div_ceil(PAGE as u64);
        for page in first..last {
            if let Some(w) = bits.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
        at = hole.max(data + 1);
    }
    Ok(bits)
}

/// Whether `page` is set in a bitmap of [`data_pages`]' shape.
pub fn page_set(bits: &[u64], page: u64) -> bool {
    bits.get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// What a migration shares with the controller and `query-migrate`.
#[derive(Debug, Default)]
pub struct Shared {
    info: Mutex<MigrationInfo>,
    started: Mutex<Option<Instant>>,
    cancel: AtomicBool,
    params: Mutex<MigrationParams>,
}

impl Shared {
    pub fn new(params: MigrationParams) -> Self {
        Self {
            params: Mutex::new(params),
            ..Self::default()
        }
    }

    /// `query-migrate`'s figures now: `total-time` runs while the migration does.
    pub fn info(&self) -> MigrationInfo {
        let mut info = lock(&self.info).clone();
        if info.status.is_some_and(MigrationStatus::in_progress)
            && let Some(t) = *lock(&self.started)
        {
            info.total_time = t.elapsed().as_millis() as u64;
        }
        info
    }

    pub fn status(&self) -> Option<MigrationStatus> {
        lock(&self.info).status
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut lock(&self.info));
    }

    pub fn start_clock(&self) {
        *lock(&self.started) = Some(Instant::now());
    }

    pub fn elapsed_ms(&self) -> u64 {
        lock(&self.started).map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn params(&self) -> MigrationParams {
        *lock(&self.params)
    }

    pub fn set_params(&self, p: MigrationParams) {
        *lock(&self.params) = p;
    }
}

/// What the vCPUs and devices were when the source stopped the guest.
#[derive(Debug)]
pub struct Saved {
    /// Each vCPU's encoded [`VcpuState`].
    pub vcpus: Vec<Vec<u8>>,
    /// The encoded [`DeviceState`].
    pub devices: Vec<u8>,
    /// Guest-physical ranges of the virtqueue rings (written by the I/O thread).
    pub rings: Vec<(u64, u64)>,
}

/// What the destination read, to be put into the machine.
#[derive(Debug)]
pub struct Loaded {
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

/// What a migration thread asks of the controller.
#[derive(Debug)]
pub enum MigrationInput {
    /// Report an event (`MIGRATION`, `MIGRATION_PASS`) in order with the controller's.
    Event(VmmEvent),
    /// The source's final stage: stop the guest, drain the disks, answer with its state.
    SwitchOver(Sender<Result<Saved, String>>),
    /// The source ended: `Ok` once the destination acknowledged the load. `stopped` says
    /// the guest was stopped for the switch-over (and must run again on failure).
    SourceDone {
        result: Result<(), String>,
        stopped: bool,
    },
    /// The destination read the whole stream: put the state in and answer.
    Load(Box<Loaded>, Sender<Result<(), String>>),
    /// The destination ended: `Ok` once it acknowledged the load (the guest may run).
    DestDone(Result<(), String>),
}

/// Sets the status and tells the controller, which emits `MIGRATION`.
pub(crate) fn set_status(
    shared: &Shared,
    controller: &Sender<crate::control::Input>,
    status: MigrationStatus,
) {
    shared.update(|i| i.status = Some(status));
    let _ = controller.send(crate::control::Input::Migration(MigrationInput::Event(
        VmmEvent::Migration(status),
    )));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_in_guest_ram_are_found_without_touching_them() {
        let ram = crate::memory::GuestRam::new(4 << 20).expect("ram");
        let bits = data_pages(&ram.file, ram.size).expect("map");
        assert!(bits.iter().all(|&w| w == 0), "a fresh memfd is all hole");
        use vm_memory::Bytes;
        ram.mem
            .write_obj(1u8, vm_memory::GuestAddress(0x5000))
            .expect("write");
        ram.mem
            .write_obj(1u8, vm_memory::GuestAddress((4 << 20) - 1))
            .expect("write");
        let bits = data_pages(&ram.file, ram.size).expect("map");
        assert!(page_set(&bits, 5));
        assert!(page_set(&bits, 1023));
        assert!(!page_set(&bits, 4) && !page_set(&bits, 6) && !page_set(&bits, 512));
    }

    #[test]
    fn device_pages_are_marked_only_while_active_and_taken_once() {
        let d = DevicePages::new(1 << 20);
        d.mark(0x1000, 10);
        let mut bits = vec![0u64; 4];
        d.take_into(&mut bits);
        assert_eq!(bits, vec![0; 4], "marked with no migration");
        d.set_active(true);
        d.mark(0x1ffe, 4); // spans pages 1 and 2
        d.mark(0xff000, 4096); // the last page
        d.mark(1 << 30, 1); // past the end: ignored
        d.take_into(&mut bits);
        assert_eq!(bits[0], 0b110);
        assert_eq!(bits[3], 1 << 63);
        let mut again = vec![0u64; 4];
        d.take_into(&mut again);
        assert_eq!(again, vec![0; 4], "taken twice");
    }
}
