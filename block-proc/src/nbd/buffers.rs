//! Reusable transmission buffers: [`Buf`], a byte buffer that keeps the memory it has
//! initialised, and [`BufPool`], one connection's free buffers.
//!
//! A READ reply and a WRITE payload are each a buffer of the request's length (256 KiB for
//! `nbdcopy`). Allocating and zero-filling a fresh one per request cost more than the copy
//! of the data itself: the allocator returned the memory to the kernel between requests,
//! so every buffer was page-faulted in again (docs/performance.md). A connection now takes
//! its buffers from its pool and the reply writer gives them back once they are on the
//! socket. The pool belongs to one connection only, so a buffer never carries one client's
//! bytes to another, and it keeps at most [`POOL_BYTES`].

use std::sync::Mutex;

use super::proto::Sink;

/// Most bytes of free buffers a connection keeps: room for all the buffers of a full window
/// of 256 KiB requests (`MAX_INFLIGHT`, 32, each with its reply header, a little over
/// 8 MiB), or of 8 requests of 2 MiB.
pub const POOL_BYTES: usize = 16 << 20;

/// A byte buffer whose content is `data[..len]`. All of `data` is initialised (by earlier
/// use, or zeroed when it grew), so content can be appended for a read to overwrite without
/// filling it first.
#[derive(Debug, Default)]
pub struct Buf {
    data: Vec<u8>,
    len: usize,
}

impl Buf {
    /// Makes room for `n` more bytes of content, so that appending them moves nothing
    /// (a reply of many chunks is appended to piece by piece).
    pub fn reserve(&mut self, n: usize) {
        let end = self.len + n;
        if self.data.len() < end {
            self.data.reserve_exact(end - self.data.len());
            self.data.resize(end, 0);
        }
    }

    /// Appends `n` bytes and returns them, to be overwritten: they hold whatever this
    /// buffer held there before (zeroes where it never held anything).
    pub fn append(&mut self, n: usize) -> &mut [u8] {
        let start = self.len;
        let end = start + n;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.len = end;
        &mut self.data[start..end]
    }

    /// The content.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// Drops the content, keeping the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Content length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no content.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Sink for Buf {
    fn put(&mut self, bytes: &[u8]) {
        self.append(bytes.len()).copy_from_slice(bytes);
    }
}

/// One connection's free buffers. See the module documentation.
#[derive(Debug, Default)]
pub struct BufPool(Mutex<PoolState>);

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<Vec<u8>>,
    /// Sum of the capacities of `free`.
    bytes: usize,
}

impl BufPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Pushes and pops of whole values: a panic cannot leave the state half-changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer, with the memory of the one given back last if there is one.
    pub fn take(&self) -> Buf {
        let mut st = self.lock();
        match st.free.pop() {
            Some(data) => {
                st.bytes -= data.capacity();
                Buf { data, len: 0 }
            }
            None => Buf::default(),
        }
    }

    /// Gives a buffer back; it is kept if the pool stays within [`POOL_BYTES`].
    pub fn give(&self, buf: Buf) {
        let data = buf.data;
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        if st.bytes + data.capacity() <= POOL_BYTES {
            st.bytes += data.capacity();
            st.free.push(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_bytes_reuse_memory_and_only_new_memory_is_zeroed() {
        let pool = BufPool::default();
        let mut b = pool.take();
        assert!(b.is_empty());
        b.reserve(5);
        let at = b.data.as_ptr();
        b.append(4).copy_from_slice(&[1, 2, 3, 4]);
        b.put(&[5]);
        assert_eq!(b.as_slice(), &[1, 2, 3, 4, 5]);
        assert_eq!(b.data.as_ptr(), at, "reserved room was used in place");
        pool.give(b);
        let mut b = pool.take();
        assert!(b.is_empty(), "a buffer comes back without content");
        // The old bytes are still there to be overwritten; beyond them, zeroes.
        assert_eq!(b.append(7), &[1, 2, 3, 4, 5, 0, 0]);
        b.clear();
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_its_limit() {
        let pool = BufPool::default();
        for _ in 0..3 {
            let mut b = Buf::default();
            b.reserve(POOL_BYTES / 2);
            pool.give(b);
        }
        assert_eq!(pool.lock().free.len(), 2);
        assert_eq!(pool.lock().bytes, POOL_BYTES);
        let mut big = Buf::default();
        big.append(POOL_BYTES + 1);
        pool.give(big);
        assert_eq!(
            pool.lock().free.len(),
            2,
            "a buffer over the limit is dropped"
        );
    }
}
