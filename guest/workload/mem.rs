//! The guest's RAM past its image: a bump allocator that vCPU 0 runs during set-up to lay
//! out rings, request headers, buffers and records; whatever is left is free for `dirty`.

use crate::console::{Fail, fail};

unsafe extern "C" {
    /// End of the image (`.bss` included), from the linker script; only its address is used.
    safe static _end: [u8; 0];
}

pub const PAGE: u64 = 4096;

/// First byte past the image.
pub fn image_end() -> u64 {
    (&raw const _end) as u64
}

pub const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Hands out RAM from `next` up to `top`.
pub struct Bump {
    next: u64,
    top: u64,
}

impl Bump {
    /// All RAM from the end of the image to `top`.
    pub fn new(top: u64) -> Self {
        Self {
            next: align_up(image_end(), PAGE),
            top,
        }
    }

    /// `len` bytes aligned to `align`, zeroed.
    pub fn alloc(&mut self, len: u64, align: u64, what: &str) -> Result<u64, Fail> {
        let start = align_up(self.next, align);
        match start.checked_add(len) {
            Some(end) if end <= self.top => {
                // SAFETY: [start, end) is RAM past the image (below `top`, which the
                // memory map says is RAM) that nothing else has been given.
                unsafe { core::ptr::write_bytes(start as *mut u8, 0, len as usize) };
                self.next = end;
                Ok(start)
            }
            _ => fail!(
                "{what} needs {} KiB of RAM; {} KiB are left (RAM ends at {:#x})",
                len.div_ceil(1024),
                self.top.saturating_sub(start) / 1024,
                self.top
            ),
        }
    }

    /// What is left: page-aligned start and end.
    pub fn rest(&self) -> (u64, u64) {
        let start = align_up(self.next, PAGE);
        (start.min(self.top & !(PAGE - 1)), self.top & !(PAGE - 1))
    }
}
