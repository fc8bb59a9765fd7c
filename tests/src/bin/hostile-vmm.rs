//! A compromised vmm-proc. `tests/tests/hostile_peers.rs` puts it in vmm-proc's slot
//! (`SPLITVMM_HELPER_DIR`), so the real launcher starts it in vmm-proc's namespaces with the
//! real links: the monitor's at fd 3, block-proc's at fd 4. It answers the monitor's
//! `Configure`, enters vmm-proc's real jail, and then attacks what the kernel command line
//! (`--append hostile=SCENARIO`) names, or, for `monitor-version` (which acts before the
//! monitor sends anything), the name of the helper directory it was started from:
//!
//! - `io`: block-proc gets hostile guest I/O (out-of-range and overflowing addresses and
//!   sectors, unknown devices, overlapping, too many and too large segments, oversized
//!   batches, bad memory hand-overs), a flood of valid requests, then a garbage frame;
//! - `fds`: block-proc gets a frame with a descriptor its message does not declare;
//! - `block-version`: block-proc gets a hello of another protocol version;
//! - `monitor`: the monitor gets replies to requests it never made, a flood of events, a
//!   `BLOCK_IO_ERROR` naming a device that does not exist, then a garbage frame;
//! - `monitor-version`: the monitor gets a hello of another protocol version.
//!
//! Each finding is one line `hostile-vmm: NAME: RESULT` on stderr; the test compares them.
//! `hostile-vmm: done` ends a scenario; the program then answers the monitor's `Shutdown`.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use ipc::vmm::{VmmCall, VmmMessage, VmmReply, VmmRequest};
use ipc::vmm_block::{
    BlockToVmm, IoOp, IoRequest, IoStatus, MAX_BATCH, MAX_SEGMENTS, Segment, VmmBlockAnswer,
    VmmBlockRequest, VmmToBlock,
};
use ipc::{Channel, IpcError, Link, Message};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

/// The guest memory handed to block-proc.
const MEM: u64 = 1 << 20;
/// What the memory holds before any I/O.
const SENTINEL: u8 = 0xa5;

/// Reports one finding (see [`tests::say`]).
fn say(name: &str, result: impl std::fmt::Display) {
    tests::say("hostile-vmm", name, result);
}

/// A hello with the real layout and another version.
#[derive(Serialize, Deserialize)]
struct OtherVersionHello {
    magic: [u8; 8],
    version: u32,
    link: Link,
}

impl Message for OtherVersionHello {}

fn other_version_hello(link: Link) -> OtherVersionHello {
    OtherVersionHello {
        magic: *b"SPLITVMM",
        version: ipc::PROTOCOL_VERSION + 97,
        link,
    }
}

/// Sends `bytes` as one frame with `fds`, bypassing the codec.
fn raw_send(chan: &Channel, bytes: &[u8], fds: &[i32]) -> nix::Result<usize> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        chan.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// A memfd of `size` bytes filled with [`SENTINEL`], sealed against shrinking if `seal`.
fn memfd(size: u64, seal: bool) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(size).expect("ftruncate");
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![SENTINEL; size as usize], 0)
        .expect("fill");
    let fd = OwnedFd::from(file);
    if seal {
        // SAFETY: F_ADD_SEALS on a memfd made with MFD_ALLOW_SEALING.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0, "seal: {}", std::io::Error::last_os_error());
    }
    fd
}

/// Maps the guest memory to look at it after block-proc's I/O.
fn map(fd: &OwnedFd) -> &'static [u8] {
    // SAFETY: a fresh shared read-only mapping of MEM bytes of a memfd that large; it lives
    // until the process exits (never unmapped), so the 'static slice stays valid.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            MEM as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        std::slice::from_raw_parts(p.cast::<u8>(), MEM as usize)
    }
}

struct Block {
    chan: Channel,
    next_id: u64,
}

impl Block {
    fn call(&mut self, request: VmmBlockRequest, fds: &[std::os::fd::BorrowedFd<'_>]) -> String {
        self.next_id += 1;
        let id = self.next_id;
        let msg = VmmToBlock::Call { id, request };
        if let Err(e) = self.chan.send(&msg, fds) {
            return format!("send failed: {e}");
        }
        match self.chan.recv::<BlockToVmm>() {
            Ok(r) => match r.msg {
                BlockToVmm::Reply { id: got, result } if got == id => match result {
                    Ok(VmmBlockAnswer::Done) => "done".into(),
                    Ok(VmmBlockAnswer::Devices(d)) => format!(
                        "devices {}",
                        d.iter()
                            .map(|d| format!("{}:{}", d.id, d.size_bytes))
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    Err(e) => format!("error: {e}"),
                },
                other => format!("unexpected {other:?}"),
            },
            Err(e) => format!("recv failed: {e}"),
        }
    }

    /// Submits `reqs` as one batch and collects one status per request, by tag.
    fn io(&mut self, reqs: Vec<IoRequest>) -> Vec<(u64, IoStatus)> {
        let n = reqs.len();
        self.chan
            .send(&VmmToBlock::Submit(reqs), &[])
            .expect("submit");
        let mut done = Vec::new();
        while done.len() < n {
            match self.chan.recv::<BlockToVmm>() {
                Ok(r) => match r.msg {
                    BlockToVmm::Completed(c) => done.extend(c.iter().map(|c| (c.tag, c.status))),
                    other => panic!("unexpected {other:?}"),
                },
                Err(e) => panic!("link lost during I/O: {e}"),
            }
        }
        done.sort_by_key(|d| d.0);
        done
    }

    /// One request; its status.
    fn one(&mut self, req: IoRequest) -> IoStatus {
        self.io(vec![req])[0].1
    }

    /// What a recv gives after something that should make block-proc drop the link.
    fn after_drop(&self) -> String {
        match self.chan.recv::<BlockToVmm>() {
            Err(IpcError::Closed) => "link closed".into(),
            Err(e) => format!("error {e}"),
            Ok(r) => format!("answered {:?}", r.msg),
        }
    }
}

fn req(tag: u64, device: u16, op: IoOp, sector: u64, segments: &[(u64, u32)]) -> IoRequest {
    IoRequest {
        tag,
        device,
        op,
        sector,
        segments: segments
            .iter()
            .map(|&(gpa, len)| Segment { gpa, len })
            .collect(),
    }
}

/// The memfds the scenarios hand over, made before the jail (which forbids memfd_create).
struct Memfds {
    good: OwnedFd,
    loose: OwnedFd,
    small: OwnedFd,
    again: OwnedFd,
}

impl Memfds {
    fn new() -> Self {
        Self {
            good: memfd(MEM, true),
            loose: memfd(MEM, false),
            small: memfd(MEM / 2, true),
            again: memfd(MEM, true),
        }
    }
}

/// Hostile guest I/O; the link survives it all, then a garbage frame ends it.
fn attack_io(block: &mut Block, fds: &Memfds, ram: &[u8]) {
    let Memfds {
        good: good_ram,
        loose,
        small,
        again,
    } = fds;
    say(
        "unsealed memory",
        block.call(VmmBlockRequest::SetMemory { size: MEM }, &[loose.as_fd()]),
    );
    say(
        "memory larger than its memfd",
        block.call(VmmBlockRequest::SetMemory { size: MEM }, &[small.as_fd()]),
    );
    say(
        "set memory",
        block.call(
            VmmBlockRequest::SetMemory { size: MEM },
            &[good_ram.as_fd()],
        ),
    );
    say(
        "set memory twice",
        block.call(VmmBlockRequest::SetMemory { size: MEM }, &[again.as_fd()]),
    );
    let cases: Vec<(&str, IoRequest)> = vec![
        (
            "read past guest memory",
            req(1, 0, IoOp::Read, 0, &[(MEM, 512)]),
        ),
        (
            "read straddling the end of guest memory",
            req(2, 0, IoOp::Read, 0, &[(MEM - 256, 512)]),
        ),
        (
            "read at an overflowing address",
            req(3, 0, IoOp::Read, 0, &[(u64::MAX - 100, 512)]),
        ),
        (
            "write from an overflowing address",
            req(4, 0, IoOp::Write, 0, &[(0, 512), (u64::MAX - 100, 512)]),
        ),
        (
            "read past the disk",
            req(5, 0, IoOp::Read, 2048, &[(0, 512)]),
        ),
        (
            "read at an overflowing sector",
            req(6, 0, IoOp::Read, u64::MAX / 256, &[(0, 512)]),
        ),
        ("unknown device", req(7, 9, IoOp::Read, 0, &[(0, 512)])),
        (
            "too many segments",
            req(8, 0, IoOp::Read, 0, &vec![(0, 1); MAX_SEGMENTS + 1]),
        ),
        (
            "huge segments",
            req(9, 0, IoOp::Read, 0, &vec![(0, u32::MAX); 64]),
        ),
        ("zero-length segment", req(10, 0, IoOp::Write, 0, &[(0, 0)])),
        (
            "discard past the disk",
            req(11, 0, IoOp::Discard(vec![(0, 8), (2040, 16)]), 0, &[]),
        ),
        (
            "write zeroes at an overflowing sector",
            req(
                12,
                0,
                IoOp::WriteZeroes {
                    ranges: vec![(u64::MAX - 1, u32::MAX)],
                    unmap: true,
                },
                0,
                &[],
            ),
        ),
        (
            "get id into memory past the end",
            req(13, 0, IoOp::GetId, 0, &[(0, 8), (MEM, 20)]),
        ),
        (
            "overlapping segments",
            req(14, 0, IoOp::Read, 0, &[(4096, 1024), (4608, 1024)]),
        ),
    ];
    for (name, r) in cases {
        say(name, format!("{:?}", block.one(r)));
    }
    // The overlapping read moved disk bytes into [4096, 5632); nothing else changed.
    let outside_untouched = ram
        .iter()
        .enumerate()
        .all(|(i, b)| (4096..5632).contains(&i) || *b == SENTINEL);
    say("memory outside the requests untouched", outside_untouched);
    say(
        "overlapping read data",
        format!("{:#04x}", ram.get(4096).copied().unwrap_or(0)),
    );
    let batch: Vec<IoRequest> = (0..=MAX_BATCH as u64)
        .map(|t| req(100 + t, 0, IoOp::Read, 0, &[(0, 512)]))
        .collect();
    let statuses = block.io(batch);
    say(
        "oversized batch",
        format!(
            "{} of {} IoErr",
            statuses.iter().filter(|s| s.1 == IoStatus::IoErr).count(),
            statuses.len()
        ),
    );
    // A flood: many batches sent before any completion is read.
    let (batches, per) = (64u64, MAX_BATCH as u64);
    for b in 0..batches {
        let reqs = (0..per)
            .map(|i| {
                req(
                    10_000 + b * per + i,
                    0,
                    IoOp::Read,
                    i % 2048,
                    &[(8192, 512)],
                )
            })
            .collect();
        block
            .chan
            .send(&VmmToBlock::Submit(reqs), &[])
            .expect("flood");
    }
    let mut ok = 0;
    let mut tags = std::collections::BTreeSet::new();
    while tags.len() < (batches * per) as usize {
        match block.chan.recv::<BlockToVmm>() {
            Ok(r) => {
                if let BlockToVmm::Completed(c) = r.msg {
                    for c in c {
                        ok += usize::from(c.status == IoStatus::Ok);
                        tags.insert(c.tag);
                    }
                }
            }
            Err(e) => {
                say("flood", format!("link lost: {e}"));
                break;
            }
        }
    }
    say("flood", format!("{ok} of {} completed Ok", batches * per));
    say(
        "garbage frame",
        match raw_send(&block.chan, b"\xff\xfe\xfd garbage, not bincode", &[]) {
            Ok(_) => block.after_drop(),
            Err(e) => format!("send failed: {e}"),
        },
    );
}

fn main() {
    let (Some(monitor), Some(peer)) = (Channel::from_inherited(3), Channel::from_inherited(4))
    else {
        eprintln!("hostile-vmm: needs the monitor link at fd 3 and block-proc's at fd 4");
        std::process::exit(2);
    };
    // The scenario is only known after the monitor's Configure; a hostile hello to the
    // monitor cannot wait for it, so that one scenario is chosen by the link's first frame:
    // the monitor sends its hello first, and this program always answers with a good one
    // unless the test put `monitor-version` in the helper directory's name.
    let exe = std::env::args().next().unwrap_or_default();
    if exe.contains("monitor-version") {
        let sent = monitor.send(&other_version_hello(Link::MonitorVmm), &[]);
        say("monitor hello of another version", format!("{sent:?}"));
        // The monitor gives up; wait for it to close the link.
        let _ = monitor.recv::<VmmCall>();
        std::process::exit(0);
    }
    monitor
        .handshake(Link::MonitorVmm)
        .expect("monitor handshake");
    let configure = monitor.recv::<VmmCall>().expect("Configure");
    let VmmRequest::Configure(config) = &configure.msg.request else {
        panic!("first request is not Configure: {:?}", configure.msg);
    };
    let scenario = config
        .cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hostile="))
        .unwrap_or_default()
        .to_string();
    drop(configure.fds);
    monitor
        .send(
            &VmmMessage::Reply {
                id: configure.msg.id,
                result: Ok(VmmReply::Done),
            },
            &[],
        )
        .expect("reply to Configure");
    let mems = Memfds::new();
    let view = map(&mems.good);
    // Everything from here runs as a compromised vmm-proc would: in its jail.
    if let Err(e) = vmm_proc::sandbox::enter(None) {
        say("jail", e);
        std::process::exit(2);
    }
    say("jailed", scenario.as_str());
    let mut block = Block {
        chan: peer,
        next_id: 0,
    };
    match scenario.as_str() {
        "io" => {
            block
                .chan
                .handshake(Link::VmmBlock)
                .expect("block handshake");
            say(
                "list devices",
                block.call(VmmBlockRequest::ListDevices, &[]),
            );
            attack_io(&mut block, &mems, view);
        }
        "fds" => {
            block
                .chan
                .handshake(Link::VmmBlock)
                .expect("block handshake");
            let frame = ipc::codec::encode(&VmmToBlock::Call {
                id: 1,
                request: VmmBlockRequest::ListDevices,
            })
            .expect("encode");
            say(
                "undeclared descriptor",
                match raw_send(&block.chan, &frame, &[mems.again.as_raw_fd()]) {
                    Ok(_) => block.after_drop(),
                    Err(e) => format!("send failed: {e}"),
                },
            );
        }
        "block-version" => {
            let sent = block.chan.send(&other_version_hello(Link::VmmBlock), &[]);
            let _ = block.chan.recv::<ipc::Hello>();
            say(
                "block hello of another version",
                match sent {
                    Ok(()) => block.after_drop(),
                    Err(e) => format!("send failed: {e}"),
                },
            );
        }
        "monitor" => attack_monitor(&monitor),
        other => say("unknown scenario", other),
    }
    say("done", "");
    serve_monitor(&monitor);
}

/// Hostile messages to the monitor; the last one, a garbage frame, breaks the link. They
/// start once the monitor's first request (the test's `stop`) is answered, so the test's
/// QMP client is there to see the events.
fn attack_monitor(monitor: &Channel) {
    if let Ok(first) = monitor.recv::<VmmCall>() {
        let reply = VmmMessage::Reply {
            id: first.msg.id,
            result: Ok(VmmReply::Done),
        };
        say("first request", format!("{:?}", first.msg.request));
        let _ = monitor.send(&reply, &[]);
    }
    let unasked = VmmMessage::Reply {
        id: 987_654,
        result: Ok(VmmReply::Done),
    };
    say(
        "reply to no request",
        format!("{:?}", monitor.send(&unasked, &[])),
    );
    let mut sent = 0;
    for _ in 0..2000 {
        let ev = VmmMessage::Event(ipc::vmm::VmmEvent::Reset { guest: true });
        if monitor.send(&ev, &[]).is_ok() {
            sent += 1;
        }
    }
    say("event flood", format!("{sent} sent"));
    let bogus = VmmMessage::Event(ipc::vmm::VmmEvent::BlockIoError(ipc::vmm::BlockIoError {
        device: "no-such-disk\"\n{}".into(),
        node_name: Some("no\"node\n".into()),
        index: u16::MAX,
        write: true,
        action: ipc::vmm::ErrorAction::Report,
        nospace: true,
        io_status: false,
    }));
    say(
        "io error of no disk",
        format!("{:?}", monitor.send(&bogus, &[])),
    );
    say(
        "garbage frame",
        format!(
            "{:?}",
            raw_send(monitor, b"\x07\x07\x07 not a message", &[])
        ),
    );
}

/// Answers the monitor until it asks for a shutdown or goes away.
fn serve_monitor(monitor: &Channel) {
    loop {
        let call = match monitor.recv::<VmmCall>() {
            Ok(c) => c.msg,
            Err(_) => std::process::exit(0),
        };
        let reply = VmmMessage::Reply {
            id: call.id,
            result: Ok(VmmReply::Done),
        };
        let _ = monitor.send(&reply, &[]);
        if matches!(call.request, VmmRequest::Shutdown) {
            std::process::exit(0);
        }
    }
}
