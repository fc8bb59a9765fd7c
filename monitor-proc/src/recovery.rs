//! Crash recovery of block-proc: what the monitor records while block-proc runs, and how it
//! puts a restarted block-proc back in the same place (DESIGN.md §1, §3).
//!
//! The monitor keeps, in command order:
//! - a journal of the block configuration commands that succeeded (`blockdev-add`/`-del`,
//!   the NBD server with a duplicate of its listening socket, exports). Replaying it runs
//!   each command again through the same monitor-side path (NBD client connections are
//!   made anew), so it records itself again;
//! - the block jobs that are running (from their `JOB_STATUS_CHANGE` events), with their
//!   type from the command that made them. Their state died with block-proc: each ends
//!   with `BLOCK_JOB_COMPLETED` carrying an `error`, as an aborted QEMU job does.
//!
//! Some changes cannot be replayed from the start-up configuration and the journal: a job
//! that pivoted the graph (`block-job-complete`/`job-complete` on a mirror or an active
//! commit) and external snapshots. After one of them a block-proc death is not recovered
//! (splitvmm shuts down as before, saying why) rather than reopen images the guest no
//! longer writes to. Restarts are limited ([`MAX_RESTARTS`]) so a block-proc that keeps
//! dying ends splitvmm instead of looping.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use ipc::QmpError;
use ipc::block::BlockConfig;
use serde_json::{Map, Value, json};

use crate::state::Monitor;

/// How many times block-proc is restarted over splitvmm's life; the next death shuts down.
pub const MAX_RESTARTS: u32 = 3;

/// The commands whose effect the journal replays.
const JOURNALED: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "block-export-add",
    "block-export-del",
];

/// Commands that change which image a drive writes to in a way the journal cannot replay.
const UNREPLAYABLE: &[&str] = &["blockdev-snapshot", "blockdev-snapshot-sync"];

/// One configuration command that succeeded.
#[derive(Debug)]
struct Entry {
    command: String,
    args: Map<String, Value>,
    /// `nbd-server-start`'s listening socket (a duplicate the monitor keeps).
    fd: Option<OwnedFd>,
}

/// A job block-proc was running, as far as the monitor knows.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    /// From the command that made it (its reply comes after the `created` event).
    kind: Option<&'static str>,
    len: u64,
    offset: u64,
    speed: u64,
    /// `block-job-complete`/`job-complete` was asked: success means a graph change.
    completing: bool,
}

#[derive(Debug, Default)]
struct Inner {
    config: Option<BlockConfig>,
    journal: Vec<Entry>,
    running: Vec<Job>,
    /// Why a restarted block-proc could not be put back as it was.
    unreplayable: Option<String>,
    restarts: u32,
}

/// What the monitor records for recovery.
#[derive(Debug, Default)]
pub struct Recovery(Mutex<Inner>);

/// The job type a command makes, QEMU's `JobType` name.
fn job_kind(command: &str) -> Option<&'static str> {
    match command {
        "drive-mirror" | "blockdev-mirror" => Some("mirror"),
        "block-stream" | "block_stream" => Some("stream"),
        "block-commit" => Some("commit"),
        _ => None,
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

impl Recovery {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The configuration block-proc was started with (sent again to its successor).
    pub fn set_config(&self, config: BlockConfig) {
        self.lock().config = Some(config);
    }

    /// Something a restarted block-proc cannot be put back to (the first reason stays).
    pub fn set_unreplayable(&self, why: &str) {
        self.lock()
            .unreplayable
            .get_or_insert_with(|| why.to_string());
    }

    /// A command block-proc carried out. `fds` are the descriptors that went with it.
    pub fn record(&self, command: &str, args: &Map<String, Value>, fds: &[OwnedFd]) {
        let mut inner = self.lock();
        if JOURNALED.contains(&command) {
            let fd = match (command, fds.first()) {
                ("nbd-server-start", Some(fd)) => match fd.try_clone() {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        inner.unreplayable =
                            Some(format!("cannot keep the NBD server's socket: {e}"));
                        None
                    }
                },
                _ => None,
            };
            inner.journal.push(Entry {
                command: command.to_string(),
                args: args.clone(),
                fd,
            });
        } else if UNREPLAYABLE.contains(&command) {
            inner.unreplayable = Some(format!("{command} changed the block graph"));
        } else if let Some(kind) = job_kind(command) {
            let device = str_arg(args, "device");
            let on_drive = inner
                .config
                .as_ref()
                .is_some_and(|c| c.drives.iter().any(|d| Some(d.id.as_str()) == device));
            if kind == "stream" && !on_drive {
                // The replayed `blockdev-add` would name the backing the stream removed.
                inner.unreplayable = Some(format!(
                    "{command} changed the backing of node '{}'",
                    device.unwrap_or_default()
                ));
            }
            let id = str_arg(args, "job-id").or(device);
            for j in inner
                .running
                .iter_mut()
                .filter(|j| Some(j.id.as_str()) == id)
            {
                j.kind = Some(kind);
                j.speed = args.get("speed").and_then(Value::as_u64).unwrap_or(0);
            }
        } else if matches!(command, "block-job-complete" | "job-complete") {
            let id = str_arg(args, "device").or_else(|| str_arg(args, "id"));
            for j in inner
                .running
                .iter_mut()
                .filter(|j| Some(j.id.as_str()) == id)
            {
                j.completing = true;
            }
        }
    }

    /// An event from block-proc: keeps the list of running jobs.
    pub fn observe(&self, name: &str, data: Option<&Value>) {
        let Some(data) = data.and_then(Value::as_object) else {
            return;
        };
        let mut inner = self.lock();
        match name {
            "JOB_STATUS_CHANGE" => {
                let (Some(id), Some(status)) = (str_arg(data, "id"), str_arg(data, "status"))
                else {
                    return;
                };
                match status {
                    "created" => inner.running.push(Job {
                        id: id.to_string(),
                        kind: None,
                        len: 0,
                        offset: 0,
                        speed: 0,
                        completing: false,
                    }),
                    "null" => inner.running.retain(|j| j.id != id),
                    _ => {}
                }
            }
            "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" => {
                let Some(id) = str_arg(data, "device") else {
                    return;
                };
                let failed = data.contains_key("error");
                let mut pivoted = false;
                for j in inner.running.iter_mut().filter(|j| j.id == id) {
                    let num = |k: &str| data.get(k).and_then(Value::as_u64);
                    j.len = num("len").unwrap_or(j.len);
                    j.offset = num("offset").unwrap_or(j.offset);
                    j.speed = num("speed").unwrap_or(j.speed);
                    pivoted |= name == "BLOCK_JOB_COMPLETED" && !failed && j.completing;
                }
                if pivoted {
                    inner.unreplayable = Some(format!("job '{id}' changed the block graph"));
                }
            }
            _ => {}
        }
    }

    /// block-proc died: whether (and with what configuration) it may be restarted. Counts
    /// the restart.
    pub fn begin(&self) -> Result<BlockConfig, String> {
        let mut inner = self.lock();
        if let Some(why) = &inner.unreplayable {
            return Err(format!("cannot restore its configuration: {why}"));
        }
        if inner.restarts >= MAX_RESTARTS {
            return Err(format!("it was restarted {MAX_RESTARTS} times already"));
        }
        let config = inner
            .config
            .clone()
            .ok_or_else(|| "it was never configured".to_string())?;
        inner.restarts += 1;
        Ok(config)
    }

    /// Ends the jobs that died with block-proc: what QEMU reports for a job that fails
    /// (aborting, `BLOCK_JOB_COMPLETED` with the error, concluded, null).
    pub fn fail_jobs(&self, monitor: &Monitor) {
        let jobs = std::mem::take(&mut self.lock().running);
        for j in jobs {
            let status = |s: &str| {
                monitor.events.emit(
                    "JOB_STATUS_CHANGE",
                    Some(json!({ "id": j.id, "status": s })),
                );
            };
            status("aborting");
            // A job whose command's reply never came has no known type: no event can
            // describe it, only its status.
            if let Some(kind) = j.kind {
                monitor.events.emit(
                    "BLOCK_JOB_COMPLETED",
                    Some(json!({
                        "type": kind,
                        "device": j.id,
                        "len": j.len,
                        "offset": j.offset,
                        "speed": j.speed,
                        "error": "Input/output error",
                    })),
                );
            }
            status("concluded");
            status("null");
        }
    }

    /// Runs the journal again on a restarted block-proc, in the original order.
    pub async fn replay(&self, monitor: &Monitor) -> Result<(), QmpError> {
        let journal = std::mem::take(&mut self.lock().journal);
        for e in journal {
            let fds = match (e.command.as_str(), e.fd) {
                ("blockdev-add", _) => crate::block_commands::connect_nbd_nodes(&e.args).await?,
                (_, Some(fd)) => vec![fd],
                (_, None) => Vec::new(),
            };
            crate::commands::forward_fds(monitor, &e.command, &e.args, fds)
                .await
                .map_err(|err| {
                    QmpError::generic(format!("replaying {}: {}", e.command, err.desc))
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// Two drives, `d` and `s`.
    fn config() -> BlockConfig {
        let drive = |id: &str| ipc::block::DriveConfig {
            id: id.to_string(),
            file: format!("/images/{id}.qcow2").into(),
            format: ipc::block::ImageFormat::Qcow2,
            read_only: false,
            werror: ipc::block::OnError::Enospc,
            rerror: ipc::block::OnError::Report,
        };
        BlockConfig {
            drives: vec![drive("d"), drive("s")],
            image_dirs: Vec::new(),
            sandbox: false,
            incoming: false,
        }
    }

    #[test]
    fn the_journal_keeps_configuration_commands_in_order_and_nothing_else() {
        let r = Recovery::default();
        r.record("blockdev-add", &args(json!({"node-name": "a"})), &[]);
        r.record("query-block", &Map::new(), &[]);
        r.record("block-export-add", &args(json!({"id": "a"})), &[]);
        r.record("blockdev-del", &args(json!({"node-name": "a"})), &[]);
        let names: Vec<String> = r.lock().journal.iter().map(|e| e.command.clone()).collect();
        assert_eq!(names, ["blockdev-add", "block-export-add", "blockdev-del"]);
    }

    #[test]
    fn restarts_are_limited_and_need_a_configuration() {
        let r = Recovery::default();
        assert!(r.begin().is_err());
        r.set_config(config());
        for _ in 0..MAX_RESTARTS {
            assert!(r.begin().is_ok());
        }
        let e = r.begin().expect_err("limit");
        assert!(e.contains("restarted 3 times"), "{e}");
    }

    #[test]
    fn jobs_are_tracked_from_their_events_and_a_pivot_forbids_recovery() {
        let r = Recovery::default();
        r.set_config(config());
        let status = |id: &str, s: &str| json!({"id": id, "status": s});
        r.observe("JOB_STATUS_CHANGE", Some(&status("m", "created")));
        r.record(
            "drive-mirror",
            &args(json!({"device": "d", "job-id": "m", "speed": 7})),
            &[],
        );
        r.observe("JOB_STATUS_CHANGE", Some(&status("s", "created")));
        r.record("block-stream", &args(json!({"device": "s"})), &[]);
        r.observe(
            "BLOCK_JOB_READY",
            Some(&json!({"device": "m", "len": 10, "offset": 10, "speed": 7})),
        );
        {
            let inner = r.lock();
            let m = &inner.running[0];
            assert_eq!(
                (m.kind, m.len, m.offset, m.speed),
                (Some("mirror"), 10, 10, 7)
            );
            assert_eq!(inner.running[1].kind, Some("stream"));
        }
        // A stream that ends is gone; nothing changed that a replay cannot restore.
        r.observe(
            "BLOCK_JOB_COMPLETED",
            Some(&json!({"device": "s", "len": 1, "offset": 1, "speed": 0})),
        );
        r.observe("JOB_STATUS_CHANGE", Some(&status("s", "null")));
        assert_eq!(r.lock().running.len(), 1);
        assert!(r.begin().is_ok());
        // The mirror pivots.
        r.record("block-job-complete", &args(json!({"device": "m"})), &[]);
        r.observe(
            "BLOCK_JOB_COMPLETED",
            Some(&json!({"device": "m", "len": 10, "offset": 10, "speed": 7})),
        );
        let e = r.begin().expect_err("pivot");
        assert!(e.contains("job 'm' changed the block graph"), "{e}");
    }

    #[test]
    fn a_stream_into_a_blockdev_add_node_forbids_recovery() {
        let r = Recovery::default();
        r.set_config(config());
        r.record("block-stream", &args(json!({"device": "s"})), &[]);
        assert!(
            r.begin().is_ok(),
            "a drive's stream rewrites the header it reopens"
        );
        r.record(
            "block-stream",
            &args(json!({"device": "node1", "job-id": "j"})),
            &[],
        );
        let e = r.begin().expect_err("stream into a node");
        assert!(e.contains("changed the backing of node 'node1'"), "{e}");
    }

    #[test]
    fn a_snapshot_forbids_recovery() {
        let r = Recovery::default();
        r.set_config(config());
        r.record("blockdev-snapshot-sync", &Map::new(), &[]);
        assert!(r.begin().is_err());
    }
}
