//! The generated part of the seed corpus: encoded IPC frames and NBD client transcripts,
//! built from the real types and constants. `tests/corpus.rs` checks that each seed does
//! what it is for (the frames decode, the transcripts reach transmission) and, with
//! `FUZZ_WRITE_SEEDS=1`, writes them to `fuzz/corpus/`. The QMP seeds are plain text files
//! and the qcow2 ones come from `make-qcow2-seeds.sh`.

use std::path::PathBuf;

use block_proc::nbd::proto::*;
use block_proc::nbd::server::MAX_OPTION_LEN;
use ipc::block::{
    BlockCall, BlockConfig, BlockMessage, BlockReply, BlockRequest, DriveConfig, ImageFormat,
    OnError,
};
use ipc::common::{ErrorClass, RunState};
use ipc::handshake::{Hello, Link};
use ipc::launcher::{ChildKind, ExitStatus, LaunchRequest, LauncherMessage};
use ipc::vmm::{KernelImage, VmmCall, VmmConfig, VmmEvent, VmmMessage, VmmReply, VmmRequest};
use ipc::vmm_block::{
    BlockToVmm, GuestDrive, IoCompletion, IoOp, IoRequest, IoStatus, Segment, VmmBlockAnswer,
    VmmBlockRequest, VmmToBlock,
};
use ipc::{QmpError, codec};

/// A seed: file name and contents.
pub type Seed = (&'static str, Vec<u8>);

/// `kind` (the `ipc_decode` selector byte) followed by the encoded message.
fn frame<T: serde::Serialize>(kind: u8, msg: &T) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(codec::encode(msg).expect("seed encodes"));
    v
}

fn io(tag: u64, device: u16, op: IoOp, sector: u64, segs: &[(u64, u32)]) -> IoRequest {
    IoRequest {
        tag,
        device,
        op,
        sector,
        segments: segs
            .iter()
            .map(|&(gpa, len)| Segment { gpa, len })
            .collect(),
    }
}

/// One frame of each message type (selector order of `ipc_decode`), several for the
/// guest data path.
pub fn ipc_decode() -> Vec<Seed> {
    let drive = DriveConfig {
        id: "disk0".into(),
        file: PathBuf::from("/images/disk0.qcow2"),
        format: ImageFormat::Qcow2,
        read_only: false,
        werror: OnError::Enospc,
        rerror: OnError::Report,
    };
    vec![
        ("hello", frame(0, &Hello::new(Link::VmmBlock))),
        (
            "launch-spawn",
            frame(
                1,
                &LaunchRequest::Spawn {
                    kind: ChildKind::Block,
                    peer_link: true,
                    sandbox: true,
                },
            ),
        ),
        (
            "launcher-exited",
            frame(
                2,
                &LauncherMessage::Exited {
                    kind: ChildKind::Vmm,
                    pid: 42,
                    status: ExitStatus::Signal(9),
                },
            ),
        ),
        (
            "block-configure",
            frame(
                3,
                &BlockCall {
                    id: 1,
                    request: BlockRequest::Configure(BlockConfig {
                        drives: vec![drive],
                        image_dirs: vec![PathBuf::from("/images")],
                        sandbox: true,
                        incoming: false,
                    }),
                },
            ),
        ),
        (
            "block-qmp",
            frame(
                3,
                &BlockCall {
                    id: 2,
                    request: BlockRequest::Qmp {
                        command: "nbd-server-add".into(),
                        arguments: r#"{"device": "disk0", "writable": true}"#.into(),
                        fds: 0,
                    },
                },
            ),
        ),
        (
            "block-reply",
            frame(
                4,
                &BlockMessage::Reply {
                    id: 2,
                    result: Ok(BlockReply::Json("{}".into())),
                },
            ),
        ),
        (
            "block-event",
            frame(
                4,
                &BlockMessage::Event {
                    name: "BLOCK_EXPORT_DELETED".into(),
                    data: Some(r#"{"id": "e0"}"#.into()),
                },
            ),
        ),
        (
            "vmm-configure",
            frame(
                5,
                &VmmCall {
                    id: 1,
                    request: VmmRequest::Configure(VmmConfig {
                        memory_bytes: 256 << 20,
                        cpus: 2,
                        kernel: KernelImage::Builtin("workload".into()),
                        initrd: false,
                        cmdline: "console=ttyS0".into(),
                        start_paused: true,
                        no_reboot: false,
                        sandbox: true,
                        serial: false,
                        error_policies: Vec::new(),
                        incoming: false,
                    }),
                },
            ),
        ),
        (
            "vmm-reply-error",
            frame(
                6,
                &VmmMessage::Reply {
                    id: 3,
                    result: Err(QmpError::new(ErrorClass::DeviceNotActive, "no")),
                },
            ),
        ),
        (
            "vmm-event",
            frame(6, &VmmMessage::Event(VmmEvent::RunState(RunState::Paused))),
        ),
        (
            "vmm-status",
            frame(
                6,
                &VmmMessage::Reply {
                    id: 4,
                    result: Ok(VmmReply::Status(RunState::Running)),
                },
            ),
        ),
        (
            "guest-set-memory",
            frame(
                7,
                &VmmToBlock::Call {
                    id: 1,
                    request: VmmBlockRequest::SetMemory { size: 64 << 10 },
                },
            ),
        ),
        (
            "guest-io",
            frame(
                7,
                &VmmToBlock::Submit(vec![
                    io(1, 0, IoOp::Write, 2, &[(0x1000, 512), (0x8000, 1024)]),
                    io(2, 0, IoOp::Read, 2, &[(0x2000, 1536)]),
                    io(3, 1, IoOp::GetId, 0, &[(0x3000, 8), (0x3100, 16)]),
                    io(4, 0, IoOp::Flush, 0, &[]),
                    io(
                        5,
                        0,
                        IoOp::WriteZeroes {
                            ranges: vec![(8, 4), (100, 1)],
                            unmap: true,
                        },
                        0,
                        &[],
                    ),
                    io(6, 0, IoOp::Discard(vec![(16, 8)]), 0, &[]),
                ]),
            ),
        ),
        (
            "guest-io-hostile",
            frame(
                7,
                &VmmToBlock::Submit(vec![
                    io(10, 0, IoOp::Read, 0, &[(0xff00, 512)]),
                    io(11, 1, IoOp::Write, 0, &[(0, 512)]),
                    io(12, 0, IoOp::Write, 127, &[(0, 1024)]),
                    io(13, 0, IoOp::Write, 0, &[(0, 512), (0x10000, 512)]),
                    io(14, 9, IoOp::Read, 0, &[(0, 512)]),
                ]),
            ),
        ),
        (
            "guest-devices",
            frame(
                8,
                &BlockToVmm::Reply {
                    id: 1,
                    result: Ok(VmmBlockAnswer::Devices(vec![GuestDrive {
                        id: "disk0".into(),
                        size_bytes: 1 << 30,
                        read_only: false,
                    }])),
                },
            ),
        ),
        (
            "guest-completed",
            frame(
                8,
                &BlockToVmm::Completed(vec![IoCompletion {
                    tag: 7,
                    status: IoStatus::IoErr,
                    node_name: Some("#block001".into()),
                }]),
            ),
        ),
    ]
}

fn option(buf: &mut Vec<u8>, opt: u32, data: &[u8]) {
    put_option(buf, opt, data);
}

/// `NBD_OPT_INFO`/`GO` data: export name and information requests.
fn info_request(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// `NBD_OPT_*_META_CONTEXT` data: export name and queries.
fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn request(buf: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, length: u32) {
    let cookie = buf.len() as u64;
    buf.extend_from_slice(
        &Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(),
    );
}

/// Client transcripts: handshakes that end in transmission with a few requests each, and
/// ones that do not.
pub fn nbd_server() -> Vec<Seed> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();

    // Structured replies, base:allocation, GO on the writable export, every command.
    let mut full = flags.to_vec();
    option(&mut full, OPT_LIST, &[]);
    option(&mut full, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut full,
        OPT_LIST_META_CONTEXT,
        &meta_request("", &["base:"]),
    );
    option(
        &mut full,
        OPT_SET_META_CONTEXT,
        &meta_request("", &[BASE_ALLOCATION]),
    );
    option(
        &mut full,
        OPT_GO,
        &info_request("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    request(&mut full, CMD_READ, 0, 0, 16384);
    request(&mut full, CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    full.extend_from_slice(&[0x5a; 512]);
    request(&mut full, CMD_BLOCK_STATUS, 0, 0, 65536);
    request(&mut full, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4096, 8192);
    request(&mut full, CMD_TRIM, 0, 8192, 8192);
    request(&mut full, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 16384, 4096);
    request(&mut full, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512);
    request(&mut full, CMD_READ, CMD_FLAG_DF, 0, 8192);
    request(&mut full, CMD_CACHE, 0, 0, 4096);
    request(&mut full, CMD_FLUSH, 0, 0, 0);
    request(&mut full, CMD_DISC, 0, 0, 0);

    // Old-style selection of the read-only export, simple replies, a refused write.
    let mut old = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut old, OPT_EXPORT_NAME, b"ro");
    request(&mut old, CMD_READ, 0, 512, 1024);
    request(&mut old, CMD_WRITE, 0, 0, 512);
    old.extend_from_slice(&[0xee; 512]);
    request(&mut old, CMD_READ, 0, 65536, 512);
    request(&mut old, CMD_DISC, 0, 0, 0);

    // INFO then GO on the read-only view, requests past the end and with bad flags.
    let mut view = flags.to_vec();
    option(&mut view, OPT_INFO, &info_request("view", &[INFO_EXPORT]));
    option(&mut view, OPT_GO, &info_request("view", &[]));
    request(&mut view, CMD_TRIM, 0, 0, 4096);
    request(&mut view, CMD_READ, CMD_FLAG_NO_HOLE, 0, 512);
    request(&mut view, CMD_BLOCK_STATUS, 0, 0, 512);
    request(&mut view, CMD_READ, 0, u64::MAX - 511, 512);

    // Options that are refused or unknown, then ABORT.
    let mut refused = flags.to_vec();
    option(&mut refused, OPT_STARTTLS, &[]);
    option(&mut refused, OPT_EXTENDED_HEADERS, &[]);
    option(&mut refused, OPT_PEEK_EXPORT, &[]);
    option(&mut refused, OPT_GO, &info_request("missing", &[]));
    option(
        &mut refused,
        OPT_SET_META_CONTEXT,
        &meta_request("", &["x"]),
    );
    option(&mut refused, OPT_ABORT, &[]);

    // An option longer than the server reads (it drains it; here the client stops early).
    let mut oversized = flags.to_vec();
    oversized.extend_from_slice(&IHAVEOPT.to_be_bytes());
    oversized.extend_from_slice(&OPT_INFO.to_be_bytes());
    oversized.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    oversized.extend(std::iter::repeat_n(0u8, 64));

    vec![
        ("go-structured", full),
        ("export-name-ro", old),
        ("info-go-view", view),
        ("refused-options", refused),
        ("oversized-option", oversized),
    ]
}

/// Migration streams: a whole one (configuration, zero and normal pages, a vCPU and the
/// devices with undecodable state, end) and its first sections alone.
pub fn migration_stream() -> Vec<Seed> {
    use vmm_proc::migration::stream::{
        PAGE, PageBatch, Section, StreamConfig, write_header, write_section,
    };
    let mut s = Vec::new();
    write_header(&mut s).expect("header");
    let config = StreamConfig {
        ram_size: 1 << 20,
        vcpus: 1,
        disks: 0,
    };
    write_section(&mut s, &Section::Config(config)).expect("config");
    let head = s.clone();
    let mut batch = PageBatch::default();
    batch.push(0, &[0u8; PAGE]);
    batch.push(0x2000, &[0x5a; PAGE]);
    batch.push_zero(0x3000);
    write_section(&mut s, &Section::Pages(batch.take())).expect("pages");
    write_section(
        &mut s,
        &Section::Vcpu {
            index: 0,
            state: vec![1, 2, 3, 4],
        },
    )
    .expect("vcpu");
    write_section(&mut s, &Section::Devices(vec![0; 16])).expect("devices");
    write_section(&mut s, &Section::End).expect("end");
    // The same without checksums, for the mode that adds them.
    let mut bare = s[..12].to_vec();
    let mut rest = &s[12..];
    while let Some((_, after)) = rest.split_first() {
        let len = u32::from_le_bytes([after[0], after[1], after[2], after[3]]) as usize;
        bare.extend_from_slice(&rest[..5 + len]);
        rest = &rest[5 + len + 4..];
    }
    let mode = |m: u8, v: &[u8]| [&[m][..], v].concat();
    vec![
        ("whole", mode(0, &s)),
        ("head", mode(0, &head)),
        ("whole-bare", mode(1, &bare)),
    ]
}
