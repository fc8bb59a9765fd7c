//! A compromised block-proc. `tests/tests/hostile_peers.rs` puts it in block-proc's slot
//! (`SPLITVMM_HELPER_DIR`), so the real launcher starts it with the real links: the
//! monitor's at fd 3 and, with a guest, vmm-proc's at fd 4. It answers the monitor's
//! `Configure`, enters block-proc's real jail, then attacks what the name of the helper
//! directory it was started from says (`...-monitor/` or `...-vmm/`):
//!
//! - `monitor`: once the monitor's first request (the test's `query-block`) arrives, reply
//!   parts for requests never made, events the monitor must not pass on (names that are no
//!   block events, data that is no JSON object), one that it must, a reply of the wrong
//!   kind, then a garbage frame;
//! - `vmm`: vmm-proc gets a drive of absurd size and name, completions of requests it never
//!   made, a reply to a call it never made, then a garbage frame.
//!
//! Each finding is one line `hostile-block: NAME: RESULT` on stderr; `hostile-block: done`
//! ends a scenario. The program then waits for the monitor to go away.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};

use ipc::block::{BlockCall, BlockMessage, BlockReply, BlockRequest};
use ipc::vmm_block::{
    BlockToVmm, GuestDrive, IoCompletion, IoStatus, VmmBlockAnswer, VmmBlockRequest, VmmToBlock,
};
use ipc::{Channel, Link};
use nix::sys::socket::{MsgFlags, sendmsg};

/// Reports one finding (see [`tests::say`]).
fn say(name: &str, result: impl std::fmt::Display) {
    tests::say("hostile-block", name, result);
}

/// Sends `bytes` as one frame, bypassing the codec.
fn garbage(chan: &Channel, bytes: &[u8]) -> String {
    let sent = sendmsg::<()>(
        chan.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    format!("{sent:?}")
}

fn main() {
    let Some(monitor) = Channel::from_inherited(3) else {
        eprintln!("hostile-block: needs the monitor link at fd 3");
        std::process::exit(2);
    };
    let peer = Channel::from_inherited(4);
    let exe = std::env::args().next().unwrap_or_default();
    let scenario = if exe.contains("-vmm/") {
        "vmm"
    } else {
        "monitor"
    };
    monitor
        .handshake(Link::MonitorBlock)
        .expect("monitor handshake");
    let configure = monitor.recv::<BlockCall>().expect("Configure");
    let BlockRequest::Configure(config) = &configure.msg.request else {
        panic!("first request is not Configure: {:?}", configure.msg);
    };
    if let Err(e) = block_proc::sandbox::enter(&config.image_dirs, None) {
        say("jail", e);
        std::process::exit(2);
    }
    monitor
        .send(
            &BlockMessage::Reply {
                id: configure.msg.id,
                result: Ok(BlockReply::Done),
            },
            &[],
        )
        .expect("reply to Configure");
    say("jailed", scenario);
    match (scenario, peer) {
        ("vmm", Some(peer)) => attack_vmm(&peer),
        ("vmm", None) => say("vmm", "no link to vmm-proc"),
        _ => attack_monitor(&monitor),
    }
    say("done", "");
    // Stay until the monitor closes the link (or the launcher kills this process).
    while monitor.recv::<BlockCall>().is_ok() {}
}

fn attack_monitor(monitor: &Channel) {
    let first = match monitor.recv::<BlockCall>() {
        Ok(c) => c.msg,
        Err(e) => {
            say("first request", e);
            return;
        }
    };
    say("first request", format!("{:?}", first.request));
    let part = "x".repeat(ipc::block::JSON_PART);
    let mut sent = 0;
    for id in 1_000_000..1_000_500 {
        let msg = BlockMessage::ReplyPart {
            id,
            part: part.clone(),
        };
        if monitor.send(&msg, &[]).is_ok() {
            sent += 1;
        }
    }
    say("parts of no request", format!("{sent} sent"));
    for (name, data) in [
        (
            "SHUTDOWN",
            Some(r#"{"guest": true, "reason": "guest-shutdown"}"#),
        ),
        ("STOP", None),
        ("BLOCK_JOB_READY", Some("{not json")),
        ("JOB_STATUS_CHANGE", Some("[1, 2]")),
        ("bad name\n{\"x\": 1}", Some("{}")),
        (
            "BLOCK_JOB_COMPLETED",
            Some(r#"{"device": "spoofed", "len": 1, "offset": 1, "speed": 0, "type": "mirror"}"#),
        ),
    ] {
        let msg = BlockMessage::Event {
            name: name.into(),
            data: data.map(String::from),
        };
        say(
            &format!("event {name:?}"),
            format!("{:?}", monitor.send(&msg, &[])),
        );
    }
    let wrong = BlockMessage::Reply {
        id: first.id,
        result: Ok(BlockReply::Done),
    };
    say(
        "reply of the wrong kind",
        format!("{:?}", monitor.send(&wrong, &[])),
    );
    say("garbage frame", garbage(monitor, b"\xee\xee not a message"));
}

fn attack_vmm(peer: &Channel) {
    if let Err(e) = peer.handshake(Link::VmmBlock) {
        say("vmm handshake", e);
        return;
    }
    // Answer vmm-proc's set-up calls with what a hostile block-proc would.
    for _ in 0..2 {
        let call = match peer.recv::<VmmToBlock>() {
            Ok(c) => c.msg,
            Err(e) => {
                say("vmm call", e);
                return;
            }
        };
        let VmmToBlock::Call { id, request } = call else {
            say("vmm call", "I/O before set-up");
            return;
        };
        let answer = match request {
            VmmBlockRequest::ListDevices => VmmBlockAnswer::Devices(vec![GuestDrive {
                id: "d".repeat(4000),
                size_bytes: u64::MAX,
                read_only: false,
            }]),
            VmmBlockRequest::SetMemory { .. } | VmmBlockRequest::SetImageLocks { .. } => {
                VmmBlockAnswer::Done
            }
        };
        say("vmm call", "answered");
        let reply = BlockToVmm::Reply {
            id,
            result: Ok(answer),
        };
        if let Err(e) = peer.send(&reply, &[]) {
            say("vmm reply", e);
            return;
        }
    }
    let unasked: Vec<IoCompletion> = (0..200)
        .map(|tag| IoCompletion {
            tag: tag * 7919,
            status: IoStatus::Ok,
            node_name: None,
        })
        .collect();
    say(
        "completions of no request",
        format!("{:?}", peer.send(&BlockToVmm::Completed(unasked), &[])),
    );
    let reply = BlockToVmm::Reply {
        id: 424_242,
        result: Err("no such call".into()),
    };
    say("reply to no call", format!("{:?}", peer.send(&reply, &[])));
    say("garbage frame", garbage(peer, b"\xdd\xdd not a message"));
}
