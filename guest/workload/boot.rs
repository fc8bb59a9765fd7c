//! What the VMM hands the guest: the PVH `hvm_start_info` (command line, memory map),
//! read defensively since a VMM under test may get it wrong.

use crate::abi::{HVM_START_MAGIC, LOAD_ADDR, RAM_LIMIT};
use crate::console::{Fail, fail};
use crate::mem::image_end;

/// The most bytes of command line read (splitvmm's limit).
const CMDLINE_MAX: u64 = 4096;

/// The most memory-map entries looked at.
const MEMMAP_MAX: u32 = 128;

/// Everything the guest pointer (identity-mapped 0–4 GiB) may reach.
const MAPPED: u64 = 1 << 32;

const E820_RAM: u32 = 1;

/// What the guest learns from the start info.
pub struct StartInfo {
    pub cmdline: &'static str,
    /// End of the RAM region holding the image (capped below the device window).
    pub ram_top: u64,
}

/// Reads `len` bytes at guest-physical `addr`, if they are mapped and not null.
fn checked(addr: u64, len: u64, what: &str) -> Result<u64, Fail> {
    match addr.checked_add(len) {
        Some(end) if addr != 0 && end <= MAPPED => Ok(addr),
        _ => fail!("{what} at {addr:#x} (+{len:#x}) is outside the mapped 0-4 GiB"),
    }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses `checked` to lie in the identity-mapped 0-4 GiB;
    // the VMM's structures there are plain memory.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in `read_u32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// Reads and checks the `hvm_start_info` at `addr`.
pub fn read(addr: u64) -> Result<StartInfo, Fail> {
    let info = checked(addr, 56, "hvm_start_info")?;
    let magic = read_u32(info);
    if magic != HVM_START_MAGIC {
        return fail!(
            "hvm_start_info at {addr:#x}: magic {magic:#x}, expected {HVM_START_MAGIC:#x}"
        );
    }
    let version = read_u32(info + 4);
    let cmdline_paddr = read_u64(info + 24);
    let cmdline = if cmdline_paddr == 0 {
        ""
    } else {
        read_cmdline(cmdline_paddr)?
    };
    if version < 1 {
        return fail!("hvm_start_info version {version}: no memory map (version 1 has one)");
    }
    let memmap = read_u64(info + 40);
    let entries = read_u32(info + 48);
    if entries == 0 || entries > MEMMAP_MAX {
        return fail!("hvm_start_info: {entries} memory-map entries");
    }
    let map = checked(memmap, u64::from(entries) * 24, "memory map")?;
    let image = (LOAD_ADDR, image_end());
    for i in 0..u64::from(entries) {
        let e = map + i * 24;
        let (start, size, kind) = (read_u64(e), read_u64(e + 8), read_u32(e + 16));
        let end = start.saturating_add(size);
        if kind == E820_RAM && start <= image.0 && image.1 <= end {
            return Ok(StartInfo {
                cmdline,
                ram_top: end.min(RAM_LIMIT),
            });
        }
    }
    fail!(
        "memory map ({entries} entries at {memmap:#x}) has no RAM holding the image {:#x}-{:#x}",
        image.0,
        image.1
    )
}

fn read_cmdline(addr: u64) -> Result<&'static str, Fail> {
    let base = checked(addr, CMDLINE_MAX, "command line")?;
    // SAFETY: the range is mapped (checked above) and the guest never writes it: it
    // lies in the VMM's low memory or the firmware's, below the image.
    let bytes = unsafe { core::slice::from_raw_parts(base as *const u8, CMDLINE_MAX as usize) };
    let Some(len) = bytes.iter().position(|b| *b == 0) else {
        return fail!("command line at {addr:#x} has no NUL within {CMDLINE_MAX} bytes");
    };
    match core::str::from_utf8(&bytes[..len]) {
        Ok(s) => Ok(s),
        Err(e) => fail!("command line is not UTF-8 (at byte {})", e.valid_up_to()),
    }
}
