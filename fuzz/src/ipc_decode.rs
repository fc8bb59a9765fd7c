//! `ipc_decode`: one frame as a peer process might send it, decoded as each message type
//! of each link, and vmm-proc's guest I/O requests run through block-proc's checks.
//!
//! The first input byte picks the message type; the rest is the frame. Checks:
//! - decoding returns a message or an error, never panics, and never allocates past the
//!   frame limit (libFuzzer's memory limit catches that);
//! - a decoded message re-encodes within the frame limit, into no more bytes than it came
//!   in, and that encoding decodes and re-encodes to itself; its `fd_count` is defined;
//! - a `Hello` is checked against every link without panicking;
//! - vmm-proc → block-proc: `SetMemory` maps a sealed memfd exactly when the size fits and
//!   refuses an unsealed one; each request of a `Submit` batch runs through
//!   [`guest::execute`] against two in-memory drives (one read-only) and a sealed 64 KiB
//!   guest memory, and its status, the guest memory and both drives afterwards must be
//!   exactly what a simple model of the documented rules gives: a request that fails a
//!   check gets `IoErr` and changes nothing.

use std::fmt::Debug;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use block_proc::device::BlockDevice;
use block_proc::guest::{self, GuestDevice, GuestMemory};
use ipc::block::{BlockCall, BlockMessage};
use ipc::handshake::{Hello, Link};
use ipc::launcher::{LaunchRequest, LauncherMessage};
use ipc::vmm::{VmmCall, VmmMessage};
use ipc::vmm_block::{
    BlockToVmm, ID_BYTES, IoOp, IoRequest, IoStatus, MAX_BATCH, MAX_REQUEST_BYTES, MAX_SEGMENTS,
    VmmBlockRequest, VmmToBlock,
};
use ipc::{MAX_FRAME, Message, codec};

use crate::device::MemDevice;

/// Guest memory size.
const MEM: u64 = 64 << 10;
/// Size of each drive.
const DRIVE: usize = 64 << 10;
const SECTOR: u64 = 512;
/// The drives' ids; the second is longer than a virtio-blk id (truncated).
const IDS: [&str; 2] = ["disk0", "a-read-only-drive-with-a-long-id"];

/// Decodes `frame` as `T` and checks the round trip.
fn decode<T: Message + Debug>(frame: &[u8]) -> Option<T> {
    let msg: T = codec::decode(frame).ok()?;
    let _ = msg.fd_count();
    let bytes = codec::encode(&msg).unwrap_or_else(|e| panic!("{msg:?} does not re-encode: {e}"));
    assert!(
        bytes.len() <= frame.len() && bytes.len() <= MAX_FRAME,
        "{msg:?} re-encodes into {} bytes from a {}-byte frame",
        bytes.len(),
        frame.len()
    );
    let again: T = codec::decode(&bytes).expect("a re-encoded message decodes");
    assert_eq!(
        codec::encode(&again).expect("re-encode"),
        bytes,
        "encoding is not a fixed point"
    );
    let _ = again.fd_count();
    Some(msg)
}

/// The target.
pub fn run(data: &[u8]) {
    decoded(data);
}

/// Runs the target; says whether the frame decoded as the type its first byte selects.
pub fn decoded(data: &[u8]) -> bool {
    let Some((&kind, frame)) = data.split_first() else {
        return false;
    };
    match kind % 9 {
        0 => decode::<Hello>(frame).map(|h| {
            for link in [
                Link::Launcher,
                Link::MonitorBlock,
                Link::MonitorVmm,
                Link::VmmBlock,
            ] {
                let _ = h.check(link);
            }
        }),
        1 => decode::<LaunchRequest>(frame).map(drop),
        2 => decode::<LauncherMessage>(frame).map(drop),
        3 => decode::<BlockCall>(frame).map(drop),
        4 => decode::<BlockMessage>(frame).map(drop),
        5 => decode::<VmmCall>(frame).map(drop),
        6 => decode::<VmmMessage>(frame).map(drop),
        7 => decode::<VmmToBlock>(frame).map(|m| match m {
            VmmToBlock::Call {
                request: VmmBlockRequest::SetMemory { size },
                ..
            } => set_memory(size),
            VmmToBlock::Submit(batch) if batch.len() <= MAX_BATCH => guest_io(&batch),
            _ => {}
        }),
        _ => decode::<BlockToVmm>(frame).map(drop),
    }
    .is_some()
}

/// A memfd of [`MEM`] bytes, sealed against shrinking if `seal`.
fn memfd(seal: bool) -> OwnedFd {
    // SAFETY: memfd_create with a valid C string; the result is checked before use.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::ftruncate(&fd, MEM as i64).expect("ftruncate");
    if seal {
        // SAFETY: F_ADD_SEALS on our own memfd, with a valid seal set.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0, "F_ADD_SEALS");
    }
    fd
}

fn set_memory(size: u64) {
    let mapped = GuestMemory::map(memfd(true), size);
    assert_eq!(
        mapped.is_ok(),
        (1..=MEM).contains(&size),
        "mapping {size} bytes of a {MEM}-byte memfd: {mapped:?}"
    );
    assert!(GuestMemory::map(memfd(false), size.clamp(1, MEM)).is_err());
}

fn pread_all(fd: &OwnedFd) -> Vec<u8> {
    let mut v = vec![0u8; MEM as usize];
    let n = nix::sys::uio::pread(fd, &mut v, 0).expect("pread");
    assert_eq!(n, v.len());
    v
}

/// Whether `[gpa, gpa+len)` is a valid guest range.
fn seg_ok(gpa: u64, len: u32) -> bool {
    len > 0 && gpa.checked_add(u64::from(len)).is_some_and(|e| e <= MEM)
}

/// Byte offset of `[sector*512, +len)` if inside a drive.
fn byte_range(sector: u64, len: u64) -> Option<usize> {
    let start = sector.checked_mul(SECTOR)?;
    (start.checked_add(len)? <= DRIVE as u64).then_some(start as usize)
}

/// What a request must do, by the rules `guest.rs` documents, applied to copies of the
/// guest memory and the drives.
fn model(req: &IoRequest, mem: &mut [u8], drives: &mut [Vec<u8>; 2]) -> IoStatus {
    let idx = usize::from(req.device);
    let Some(drive) = drives.get_mut(idx) else {
        return IoStatus::IoErr;
    };
    let read_only = idx == 1;
    if req.segments.len() > MAX_SEGMENTS {
        return IoStatus::IoErr;
    }
    let writes = matches!(
        req.op,
        IoOp::Write | IoOp::Discard(_) | IoOp::WriteZeroes { .. }
    );
    if writes && read_only {
        return IoStatus::IoErr;
    }
    let segs_ok = req.segments.iter().all(|s| seg_ok(s.gpa, s.len));
    match &req.op {
        IoOp::Read | IoOp::Write => {
            let total: u64 = req.segments.iter().map(|s| u64::from(s.len)).sum();
            let Some(mut off) = byte_range(req.sector, total) else {
                return IoStatus::IoErr;
            };
            if total > MAX_REQUEST_BYTES || !segs_ok {
                return IoStatus::IoErr;
            }
            for s in &req.segments {
                let (g, n) = (s.gpa as usize, s.len as usize);
                if req.op == IoOp::Read {
                    mem[g..g + n].copy_from_slice(&drive[off..off + n]);
                } else {
                    drive[off..off + n].copy_from_slice(&mem[g..g + n]);
                }
                off += n;
            }
            IoStatus::Ok
        }
        IoOp::Flush => IoStatus::Ok,
        IoOp::Discard(ranges) | IoOp::WriteZeroes { ranges, .. } => {
            let mut checked = Vec::new();
            for &(sector, count) in ranges {
                let len = u64::from(count) * SECTOR;
                match byte_range(sector, len) {
                    Some(start) if len > 0 => checked.push(start..start + len as usize),
                    _ => return IoStatus::IoErr,
                }
            }
            for r in checked {
                drive[r].fill(0);
            }
            IoStatus::Ok
        }
        IoOp::GetId => {
            if !segs_ok {
                return IoStatus::IoErr;
            }
            let mut id = IDS[idx].as_bytes().to_vec();
            id.resize(ID_BYTES as usize, 0);
            let mut rest = id.as_slice();
            for s in &req.segments {
                let n = (s.len as usize).min(rest.len());
                let g = s.gpa as usize;
                mem[g..g + n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            IoStatus::Ok
        }
    }
}

fn guest_io(batch: &[IoRequest]) {
    let fd = memfd(true);
    let pattern: Vec<u8> = (0..MEM).map(|i| (i % 251) as u8).collect();
    nix::sys::uio::pwrite(&fd, &pattern, 0).expect("pwrite");
    let view = fd.try_clone().expect("dup");
    let mem = GuestMemory::map(fd, MEM).expect("map guest memory");
    let drives = [
        Arc::new(MemDevice::new(DRIVE, false)),
        Arc::new(MemDevice::new(DRIVE, true)),
    ];
    let devices: Vec<GuestDevice<MemDevice>> = drives
        .iter()
        .zip(IDS)
        .map(|(d, id)| GuestDevice {
            id: id.to_string(),
            device: d.clone(),
        })
        .collect();
    assert!(drives.iter().all(|d| d.size() == DRIVE as u64));
    let mut want_mem = pread_all(&view);
    let mut want: [Vec<u8>; 2] = [drives[0].contents(), drives[1].contents()];
    for req in batch {
        let status = crate::block_on(guest::execute(&devices, &mem, req));
        let expected = model(req, &mut want_mem, &mut want);
        assert_eq!(status, expected, "status of {req:?}");
        assert!(pread_all(&view) == want_mem, "guest memory after {req:?}");
        for (i, d) in drives.iter().enumerate() {
            assert!(d.contents() == want[i], "drive {i} after {req:?}");
        }
    }
}
