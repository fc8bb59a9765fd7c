//! An in-memory [`BlockDevice`] for the targets: bytes plus a 4 KiB allocation map, so
//! `block_status` (and the NBD server's sparse reads) see holes and data. Unallocated
//! blocks read as zeroes; writes allocate; discard and unmapping write-zeroes free the
//! blocks they cover whole. Out-of-range requests fail (callers must have refused them).

use std::io;
use std::sync::{Mutex, MutexGuard};

use block_proc::device::{BlockDevice, Extent};

/// Allocation granularity.
pub const BLOCK: u64 = 4096;

/// Most extents one `block_status` answer holds (small, so callers loop).
const MAX_EXTENTS: usize = 4;

#[derive(Debug)]
struct State {
    bytes: Vec<u8>,
    allocated: Vec<bool>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MemDevice {
    state: Mutex<State>,
    read_only: bool,
}

impl MemDevice {
    /// A device of `size` bytes (a multiple of [`BLOCK`]): blocks alternate in a fixed
    /// pattern between holes and data (each data byte a function of its offset).
    pub fn new(size: usize, read_only: bool) -> Self {
        // One data block, repeated (copying is much cheaper than computing every byte).
        static DATA: [u8; BLOCK as usize] = {
            let mut d = [0u8; BLOCK as usize];
            let mut i = 0;
            while i < d.len() {
                d[i] = (i as u8) ^ ((i >> 8) as u8) | 1;
                i += 1;
            }
            d
        };
        let blocks = size.div_ceil(BLOCK as usize);
        let allocated: Vec<bool> = (0..blocks).map(|b| b % 3 != 1).collect();
        let mut bytes = vec![0u8; size];
        for (chunk, &alloc) in bytes.chunks_mut(BLOCK as usize).zip(&allocated) {
            if alloc {
                chunk.copy_from_slice(&DATA[..chunk.len()]);
            }
        }
        Self {
            state: Mutex::new(State { bytes, allocated }),
            read_only,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// The allocation map, one entry per block.
    pub fn allocation(&self) -> Vec<bool> {
        self.lock().allocated.clone()
    }
}

fn range(st: &State, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= st.bytes.len() as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(offset as usize..end as usize)
}

/// Marks the blocks `r` touches allocated.
fn allocate(st: &mut State, r: &std::ops::Range<usize>) {
    if r.is_empty() {
        return;
    }
    let b = BLOCK as usize;
    for a in &mut st.allocated[r.start / b..r.end.div_ceil(b)] {
        *a = true;
    }
}

/// Frees the blocks `r` covers whole.
fn free(st: &mut State, r: &std::ops::Range<usize>) {
    let b = BLOCK as usize;
    let (first, end) = (r.start.div_ceil(b), r.end / b);
    for a in st.allocated.iter_mut().take(end).skip(first) {
        *a = false;
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        let r = range(&st, offset, buf.len() as u64)?;
        buf.copy_from_slice(&st.bytes[r]);
        Ok(())
    }

    async fn write(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut st = self.lock();
        let r = range(&st, offset, buf.len() as u64)?;
        st.bytes[r.clone()].copy_from_slice(buf);
        allocate(&mut st, &r);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut st = self.lock();
        let r = range(&st, offset, length)?;
        st.bytes[r.clone()].fill(0);
        if may_unmap {
            free(&mut st, &r);
        } else {
            allocate(&mut st, &r);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut st = self.lock();
        let r = range(&st, offset, length)?;
        st.bytes[r.clone()].fill(0);
        free(&mut st, &r);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let st = self.lock();
        let r = range(&st, offset, length)?;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = r.start;
        while pos < r.end && extents.len() < MAX_EXTENTS {
            let alloc = st.allocated[pos / BLOCK as usize];
            let next = ((pos / BLOCK as usize) + 1) * BLOCK as usize;
            let n = (next.min(r.end) - pos) as u64;
            match extents.last_mut() {
                Some(e) if e.data == alloc => e.length += n,
                _ => extents.push(Extent {
                    length: n,
                    zero: !alloc,
                    data: alloc,
                    allocated_here: alloc,
                }),
            }
            pos = next.min(r.end);
        }
        Ok(extents)
    }
}
