//! Dirty bitmaps: which granules of a node were written since a job last copied them.
//!
//! A [`Tracker`] sits in every block node; a job that needs to know what changes under
//! it (mirror) attaches a [`DirtyBitmap`], and every write, write-zeroes and discard that
//! reaches the node marks its range once it has completed (whoever sent it: the guest,
//! an NBD client). A job clears a range *before* it reads it, so a write that completes
//! after the read marks it again and the range is copied again.
//!
//! With no bitmap attached, a write costs one atomic load.
//!
//! A mirror in `copy-mode: write-blocking` also registers a [`WriteThrough`]: a write that
//! reached the node is then written to the mirror's target before it completes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A future a [`WriteThrough`] returns.
pub type ThroughFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where a node's writes are copied synchronously (a write-blocking mirror's target).
/// Failures are the copier's to handle: the write to the node itself has succeeded.
pub trait WriteThrough: Send + Sync {
    fn write<'a>(&'a self, buf: &'a [u8], offset: u64) -> ThroughFuture<'a>;
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> ThroughFuture<'_>;
}

/// One bit per granule of a device of fixed size.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    bits: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    /// Set bits.
    count: u64,
}

impl DirtyBitmap {
    /// A clean bitmap of `size` bytes with `granularity` (a power of two) bytes per bit.
    pub fn new(size: u64, granularity: u64) -> Self {
        let granularity = granularity.max(1).next_power_of_two();
        let granules = size.div_ceil(granularity);
        let words = usize::try_from(granules.div_ceil(64)).unwrap_or(0);
        Self {
            granularity,
            size,
            bits: Mutex::new(Bits {
                words: vec![0; words],
                count: 0,
            }),
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The size in bytes the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, Bits> {
        self.bits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The granules `[first, end)` that `[offset, offset+len)` touches, inside the device.
    fn granules(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return (0, 0);
        }
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// Marks every granule `[offset, offset+len)` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        let (first, end) = self.granules(offset, len);
        let mut b = self.lock();
        for g in first..end {
            let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if let Some(word) = b.words.get_mut(w)
                && *word & bit == 0
            {
                *word |= bit;
                b.count += 1;
            }
        }
    }

    /// Clears the granules of `[offset, offset+len)`.
    pub fn clear(&self, offset: u64, len: u64) {
        let (first, end) = self.granules(offset, len);
        let mut b = self.lock();
        for g in first..end {
            let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if let Some(word) = b.words.get_mut(w)
                && *word & bit != 0
            {
                *word &= !bit;
                b.count -= 1;
            }
        }
    }

    /// Bytes dirty (whole granules, the last one cut at the device's end).
    pub fn dirty_bytes(&self) -> u64 {
        let count = self.lock().count;
        if count == 0 {
            return 0;
        }
        let last = self.size.div_ceil(self.granularity) - 1;
        let mut bytes = count * self.granularity;
        if self.is_set(last) {
            bytes -= last * self.granularity + self.granularity - self.size;
        }
        bytes
    }

    fn is_set(&self, g: u64) -> bool {
        self.lock()
            .words
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// The first dirty run at or after byte `from` (wrapping to 0), at most `max` bytes
    /// (at least one granule): `(offset, length)`, cut at the device's end.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let b = self.lock();
        if b.count == 0 {
            return None;
        }
        let granules = self.size.div_ceil(self.granularity);
        let set = |g: u64| {
            b.words
                .get((g / 64) as usize)
                .is_some_and(|w| w & (1 << (g % 64)) != 0)
        };
        let start = (from / self.granularity).min(granules);
        let first = (start..granules)
            .chain(0..start)
            .find(|g| b.words.get((g / 64) as usize) != Some(&0) && set(*g))?;
        let most = (max / self.granularity).max(1);
        let mut end = first + 1;
        while end < granules && end - first < most && set(end) {
            end += 1;
        }
        let offset = first * self.granularity;
        let stop = (end * self.granularity).min(self.size);
        Some((offset, stop - offset))
    }
}

/// The bitmaps attached to one node.
#[derive(Debug, Default)]
pub struct Tracker {
    attached: AtomicUsize,
    maps: Mutex<Vec<Arc<DirtyBitmap>>>,
    through: Mutex<Option<Arc<dyn WriteThrough>>>,
}

impl std::fmt::Debug for dyn WriteThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteThrough")
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on, every completed write to the node marks `map`.
    pub fn attach(&self, map: Arc<DirtyBitmap>) {
        let mut maps = self.lock();
        maps.push(map);
        self.attached.store(maps.len(), Ordering::Release);
    }

    pub fn detach(&self, map: &Arc<DirtyBitmap>) {
        let mut maps = self.lock();
        maps.retain(|m| !Arc::ptr_eq(m, map));
        self.attached.store(maps.len(), Ordering::Release);
    }

    /// From now on (`Some`), or no longer (`None`), writes to the node are copied to `w`
    /// before they complete. Only with a bitmap attached.
    pub fn set_write_through(&self, w: Option<Arc<dyn WriteThrough>>) {
        *self.through.lock().unwrap_or_else(PoisonError::into_inner) = w;
    }

    fn through(&self) -> Option<Arc<dyn WriteThrough>> {
        if self.attached.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.through
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A write of `buf` at `offset` succeeded: copies it where writes go through.
    pub async fn write_through(&self, buf: &[u8], offset: u64) {
        if let Some(w) = self.through() {
            w.write(buf, offset).await;
        }
    }

    /// The same for a write of zeroes. (A discard is not copied: what the node reads
    /// after it depends on the node. Its range is dirty, for the background copy.)
    pub async fn zeroes_through(&self, offset: u64, len: u64, unmap: bool) {
        if let Some(w) = self.through() {
            w.write_zeroes(offset, len, unmap).await;
        }
    }

    /// A write to `[offset, offset+len)` completed (or failed: its range may have changed).
    pub fn mark(&self, offset: u64, len: u64) {
        if self.attached.load(Ordering::Acquire) == 0 {
            return;
        }
        for m in self.lock().iter() {
            m.mark(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_clears_and_counts_whole_granules() {
        let m = DirtyBitmap::new(10 * 4096 + 100, 4096);
        assert_eq!(m.dirty_bytes(), 0);
        m.mark(4095, 2);
        assert_eq!(m.dirty_bytes(), 2 * 4096);
        m.mark(10 * 4096, 1);
        assert_eq!(m.dirty_bytes(), 2 * 4096 + 100);
        assert_eq!(m.next_run(0, 1 << 20), Some((0, 8192)));
        assert_eq!(m.next_run(8192, 1 << 20), Some((10 * 4096, 100)));
        m.clear(0, 4096);
        assert_eq!(m.next_run(0, 1 << 20), Some((4096, 4096)));
        m.clear(0, 1 << 30);
        assert_eq!(m.next_run(0, 1 << 20), None);
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn runs_are_capped_and_wrap() {
        let m = DirtyBitmap::new(1 << 20, 512);
        m.mark(0, 1 << 20);
        assert_eq!(m.next_run(0, 4096), Some((0, 4096)));
        m.clear(4096, (1 << 20) - 4096);
        assert_eq!(m.next_run(8192, 1 << 20), Some((0, 4096)));
        // Out-of-range marks are ignored.
        m.mark(u64::MAX - 1, 10);
        assert_eq!(m.dirty_bytes(), 4096);
    }
}
