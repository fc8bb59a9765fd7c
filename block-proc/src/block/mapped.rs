//! Reads of an image file straight from the page cache, through read-only mappings of the
//! file ([`Windows`]). [`super::file::ImageFile`] tries them first for every read that must
//! not wait for the disk, and falls back to `preadv2(RWF_NOWAIT)` for whatever they do not
//! take.
//!
//! Why: `preadv` has the kernel copy page by page, a 4 KiB string move for each, and one
//! string move over the whole range, from a mapping, is faster: on these hosts (AMD EPYC),
//! 1 MiB reads of a page-cached file into memory the CPU caches do not hold ran at about
//! 22 GB/s with `preadv`, 23 with glibc's `memcpy` from a mapping and 28 with `rep movsb`
//! from it (and 15 against 30 on a file whose page cache had been rebuilt in small pieces).
//! In the guest, sequential 1 MiB reads at queue depth 32 went from about 0.95 of QEMU's to
//! 1.1 (docs/performance.md).
//!
//! What keeps it as safe as `preadv`:
//! - **Does not wait for the disk.** A range is copied only if the page cache holds all of
//!   it (`mincore`); anything else goes to `preadv2(RWF_NOWAIT)`. (A page evicted in the
//!   microseconds between the check and the copy is read back by the fault, as a
//!   `preadv` that raced with the same eviction would read it.)
//! - **Never reads past the end of the file.** Files are mapped in windows of [`WINDOW`]
//!   bytes, each only as long as the file was when it was mapped; a read beyond a window's
//!   end maps the window again if the file has grown, or goes to `preadv2`. Resizing through
//!   the block layer drops every window ([`Windows::clear`]).
//! - **A file shrunk or failing under a copy costs a retry, not the process.** Touching a
//!   mapped page that no longer exists (another process truncated the file) or cannot be
//!   read (an I/O error after the page left the cache) raises SIGBUS. The guard
//!   ([`install_guard`]) catches it for the range this thread is copying from only: it
//!   maps a zero page over the faulting page so the copy can finish, and counts the fault.
//!   A copy during which any fault was counted is thrown away and redone with `preadv2`,
//!   which returns the real error or data, and every window is mapped anew. A SIGBUS
//!   anywhere else keeps its default action.
//! - **Bounded.** At most [`MAX_WINDOWS`] windows in the whole process, over all its files
//!   (the least recently used is unmapped, whichever file it maps), so the mappings keep at
//!   most 2 GiB of page cache mapped and their page tables stay small (4 MiB at most),
//!   however many drives block-proc serves. A file's windows go when the file is closed.
//!
//! Nothing is read through a mapping until [`install_guard`] has run (block-proc's `main`,
//! before the jail).

use std::cell::Cell;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use imago::io_buffers::IoVectorMut;

use crate::mapping::Mapping;

/// The span of one mapping of a file.
pub const WINDOW: u64 = 64 << 20;
/// The most windows the process keeps mapped, over all its files: 2 GiB of images, whose
/// page tables take at most 4 MiB. A longer sequential pass maps each window again, at
/// about `preadv`'s speed.
pub const MAX_WINDOWS: usize = 32;
const PAGE: usize = 4096;

/// Whether the SIGBUS guard is installed.
static GUARDED: AtomicBool = AtomicBool::new(false);
/// SIGBUS faults the guard has caught so far, in any thread.
static FAULTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The mapped source range (start, end) this thread is copying from, while it copies.
    static COPYING: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Installs the SIGBUS guard (see the module documentation), once per process.
pub fn install_guard() -> io::Result<()> {
    if GUARDED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: a zeroed `sigaction` is a valid starting point; every field that matters is
    // set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: initialises the mask inside `sa`, which we own.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that only does async-signal-safe things (a thread-local
    // read, an atomic add, `mmap`, `signal`).
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    GUARDED.store(true, Ordering::Release);
    Ok(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (start, end) = COPYING.get();
    // SAFETY: with SA_SIGINFO the kernel passes a valid `siginfo_t`.
    let addr = unsafe { (*info).si_addr() } as usize;
    if (start..end).contains(&addr) {
        // Counted before the page is replaced: a copy in another thread that reads the zero
        // page then sees the count move when it checks after copying.
        FAULTS.fetch_add(1, Ordering::SeqCst);
        let page = addr & !(PAGE - 1);
        // SAFETY: replaces one page inside the window this thread is copying from (a
        // read-only file mapping that this module owns) with a private zero page; no Rust
        // reference points into windows, and the window is unmapped and never read again
        // once the fault has been seen.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            return;
        }
    }
    // Not a fault of ours: SIGBUS does what it would have done without the guard. Returning
    // makes the faulting access again, and the kernel's forced SIGBUS then takes its
    // default action (raising it here would not do: block-proc is PID 1 of its namespace,
    // which ignores default-action signals it sends itself).
    // SAFETY: `signal` is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// One read-only mapping of `[start, start + len)` of a file.
#[derive(Debug)]
struct Window {
    map: Mapping,
    start: u64,
}

impl Window {
    /// Maps window `index` of `fd`, as far as a file of `size` bytes reaches into it.
    fn map(fd: BorrowedFd<'_>, index: u64, size: u64) -> Option<Self> {
        let start = index.checked_mul(WINDOW)?;
        let len = size.checked_sub(start)?.min(WINDOW) as usize / PAGE * PAGE;
        if len == 0 {
            return None;
        }
        let map = Mapping::new(fd, start, len, false).ok()?;
        Some(Self { map, start })
    }

    /// The address of the file's byte at `offset`, which the window must hold.
    fn at(&self, offset: u64) -> usize {
        self.map.base().as_ptr() as usize + (offset - self.start) as usize
    }

    fn end(&self) -> u64 {
        self.start + self.map.size() as u64
    }
}

/// Every window the process has mapped, least recently used first.
static CACHE: Mutex<Cache> = Mutex::new(Cache {
    faults: 0,
    windows: Vec::new(),
});

struct Cache {
    /// [`FAULTS`] when these windows were mapped: once it moves, they are all dropped.
    faults: u64,
    /// Each with the id of the [`Windows`] (the file) it belongs to.
    windows: Vec<(u64, Arc<Window>)>,
}

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One file's share of the process's windows: an id no other file gets, so a window is
/// only ever used for the file it maps. Its windows are unmapped when it is dropped.
#[derive(Debug)]
pub struct Windows {
    id: u64,
}

impl Default for Windows {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Drop for Windows {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Windows {
    /// Copies `bufv.len()` bytes at `offset` of `fd` into `bufv` if the page cache holds all
    /// of them and they lie inside the file; `false` (with `bufv` in any state) if not, and
    /// the caller reads them another way.
    pub fn read(&self, fd: BorrowedFd<'_>, bufv: &mut IoVectorMut<'_>, offset: u64) -> bool {
        if !GUARDED.load(Ordering::Acquire) {
            return false;
        }
        let Ok(len) = usize::try_from(bufv.len()) else {
            return false;
        };
        let Some(end) = offset.checked_add(len as u64) else {
            return false;
        };
        if len == 0 || offset / WINDOW != (end - 1) / WINDOW {
            return false;
        }
        let Some(window) = self.window(fd, offset / WINDOW, end) else {
            return false;
        };
        let src = window.at(offset);
        if !resident(src, len) {
            return false;
        }
        let before = FAULTS.load(Ordering::SeqCst);
        COPYING.set((src & !(PAGE - 1), src + len));
        let mut from = src;
        // SAFETY: the iovecs describe `bufv`'s buffers, which we hold mutably for this call
        // and only write through below, while `bufv` lives.
        let iovecs = unsafe { bufv.as_iovec() };
        for iov in iovecs {
            // SAFETY: `iov` is one of those buffers, written once, from the part of the
            // mapped range [src, src + len) that `window` (held) keeps mapped; the two never
            // overlap (a file mapping and caller memory).
            unsafe { copy(from as *const u8, iov.iov_base.cast::<u8>(), iov.iov_len) };
            from += iov.iov_len;
        }
        COPYING.set((0, 0));
        fence(Ordering::SeqCst);
        if FAULTS.load(Ordering::SeqCst) != before {
            self.clear();
            return false;
        }
        true
    }

    /// Window `index`, mapped (again) if it is not, or if it ends before `end` and the file
    /// has grown since.
    fn window(&self, fd: BorrowedFd<'_>, index: u64, end: u64) -> Option<Arc<Window>> {
        let mut cache = cache();
        let faults = FAULTS.load(Ordering::SeqCst);
        if cache.faults != faults {
            cache.windows.clear();
            cache.faults = faults;
        }
        let start = index * WINDOW;
        let found = cache
            .windows
            .iter()
            .position(|(id, w)| *id == self.id && w.start == start);
        if let Some(i) = found {
            let (_, w) = cache.windows.remove(i);
            if w.end() >= end {
                cache.windows.push((self.id, w.clone()));
                return Some(w);
            }
        }
        let size = nix::sys::stat::fstat(fd).ok()?.st_size;
        let w = Arc::new(Window::map(fd, index, u64::try_from(size).ok()?)?);
        if cache.windows.len() >= MAX_WINDOWS {
            cache.windows.remove(0);
        }
        cache.windows.push((self.id, w.clone()));
        (w.end() >= end).then_some(w)
    }

    /// Unmaps this file's windows (once no copy uses them). For whoever changes the file's
    /// size.
    pub fn clear(&self) {
        cache().windows.retain(|(id, _)| *id != self.id);
    }
}

/// Copies `len` bytes from `src` to `dst` with one string move (`rep movsb`), which these
/// CPUs (ERMS, FSRM) run at memory speed (see the module documentation). A SIGBUS in the
/// middle resumes it where it stopped, once the guard has mapped a page there.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, and the two must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract; `rep movsb` moves rcx bytes from [rsi] to [rdi],
    // upwards (the direction flag is clear at every Rust function boundary).
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Whether the page cache holds every page of the mapped range `[addr, addr + len)`.
fn resident(addr: usize, len: usize) -> bool {
    let first = addr & !(PAGE - 1);
    let pages = (addr + len).div_ceil(PAGE) - first / PAGE;
    let mut vec = vec![0u8; pages];
    // SAFETY: `first` is page-aligned and `[first, first + pages * PAGE)` lies inside a
    // mapping the caller holds; `vec` has one byte per page.
    let r = unsafe { libc::mincore(first as *mut libc::c_void, pages * PAGE, vec.as_mut_ptr()) };
    r == 0 && vec.iter().all(|v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use super::*;

    /// A new file holding `bytes`, already unlinked.
    fn file_of(bytes: &[u8]) -> std::fs::File {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "splitvmm-mapped-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        std::fs::remove_file(&path).expect("unlink");
        f.write_all(bytes).expect("write");
        f
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn cached_ranges_are_copied_and_others_left_to_the_caller() {
        install_guard().expect("guard");
        let data = pattern(3 * PAGE + 100);
        let f = file_of(&data);
        let w = Windows::default();
        let mut buf = vec![0u8; 2 * PAGE];
        assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut buf[..]), 50));
        assert_eq!(buf, data[50..50 + 2 * PAGE]);
        // The last partial page is past the window (whole pages only): not taken.
        let mut tail = [0u8; 100];
        assert!(!w.read(
            f.as_fd(),
            &mut IoVectorMut::from(&mut tail[..]),
            3 * PAGE as u64
        ));
        // Past the end of the file: not taken.
        assert!(!w.read(f.as_fd(), &mut IoVectorMut::from(&mut tail[..]), 1 << 20));
    }

    /// Taken by the tests that count windows and by the one that makes a fault, which
    /// drops every window of the process.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many windows `w`'s file has mapped.
    fn mapped(w: &Windows) -> usize {
        cache().windows.iter().filter(|(id, _)| *id == w.id).count()
    }

    #[test]
    fn all_files_share_one_budget_of_windows_and_take_theirs_along_when_closed() {
        let _serial = serial();
        install_guard().expect("guard");
        let files: Vec<_> = (0..=MAX_WINDOWS).map(|_| file_of(&pattern(PAGE))).collect();
        let windows: Vec<_> = files.iter().map(|_| Windows::default()).collect();
        let mut buf = vec![0u8; PAGE];
        for (f, w) in files.iter().zip(&windows) {
            assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut buf[..]), 0));
            assert_eq!(buf, pattern(PAGE));
        }
        // One window more than the budget: the least recently used went, whatever file it
        // was of (other tests' windows, mapped meanwhile, only make that more certain).
        assert_eq!(mapped(&windows[0]), 0, "the oldest window is still mapped");
        let ours: usize = windows.iter().map(mapped).sum();
        assert!(ours <= MAX_WINDOWS, "{ours} windows mapped");
        let last = windows.last().expect("a file");
        assert_eq!(mapped(last), 1);
        // Closing a file unmaps its windows.
        let id = last.id;
        drop(windows);
        assert!(!cache().windows.iter().any(|(i, _)| *i == id));
    }

    #[test]
    fn a_file_that_grew_is_mapped_again() {
        install_guard().expect("guard");
        let mut f = file_of(&pattern(PAGE));
        let w = Windows::default();
        let mut buf = vec![0u8; PAGE];
        assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut buf[..]), 0));
        let more = vec![0xa5u8; PAGE];
        f.write_all(&more).expect("grow");
        assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut buf[..]), PAGE as u64));
        assert_eq!(buf, more);
    }

    #[test]
    fn a_file_truncated_under_a_copy_costs_a_retry_not_the_process() {
        let _serial = serial();
        install_guard().expect("guard");
        let f = file_of(&pattern(4 * PAGE));
        let w = Windows::default();
        let mut buf = vec![0u8; PAGE];
        assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut buf[..]), 0));
        // Shrink it behind the window's back, as another process could, then copy from the
        // window directly (the residency check would otherwise see the pages are gone):
        // the access past the end raises SIGBUS, which the guard turns into a retry.
        f.set_len(PAGE as u64).expect("truncate");
        let window = w.window(f.as_fd(), 0, PAGE as u64).expect("window");
        assert_eq!(
            window.map.size(),
            4 * PAGE,
            "the window still spans the old size"
        );
        let before = FAULTS.load(Ordering::SeqCst);
        let src = window.at(2 * PAGE as u64);
        COPYING.set((src, src + PAGE));
        // SAFETY: reads one byte of a page inside the window, which the guard covers.
        let byte = unsafe { std::ptr::read_volatile(src as *const u8) };
        COPYING.set((0, 0));
        assert_eq!(byte, 0, "the faulting page reads as zeroes");
        assert_eq!(
            FAULTS.load(Ordering::SeqCst),
            before + 1,
            "the fault was counted"
        );
        // Every window is dropped: the next read maps the file as it is now.
        let mut again = vec![0u8; PAGE];
        assert!(w.read(f.as_fd(), &mut IoVectorMut::from(&mut again[..]), 0));
        assert_eq!(again, pattern(PAGE));
        assert!(!w.read(
            f.as_fd(),
            &mut IoVectorMut::from(&mut again[..]),
            2 * PAGE as u64
        ));
    }
}
