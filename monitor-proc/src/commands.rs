//! The QMP commands: one table says which exist and what arguments they take; `handle`
//! validates a request against it with QEMU's rules and wording, then runs it here or
//! forwards it to the process that owns the answer.

use std::sync::atomic::Ordering;

use ipc::QmpError;
use ipc::block::{BlockReply, BlockRequest};
use ipc::common::RunState;
use ipc::vmm::{VmmReply, VmmRequest};
use serde_json::{Map, Value, json};

use crate::block_commands::{self as bc, NbdListener};
use crate::qmp::schema::{ArgType, Member, validate_args};
use crate::qmp::wire::{self, Request};
use crate::server::SessionState;
use crate::state::{Monitor, ShutdownCause};
use crate::{migration, vm_commands};

/// The QMP dialect splitvmm follows (see docs/qmp.md): QEMU 9.2's.
pub const DIALECT: (u32, u32, u32) = (9, 2, 0);

/// `query-version`'s answer, also the greeting's `version`.
pub fn version() -> Value {
    let (major, minor, micro) = DIALECT;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": concat!("splitvmm ", env!("CARGO_PKG_VERSION")),
    })
}

/// Who answers a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The monitor itself.
    Monitor,
    /// block-proc, after the monitor checked the arguments.
    Block,
}

/// A command, its arguments in QAPI schema order, and who answers it.
#[derive(Debug)]
pub struct CommandDef {
    pub name: &'static str,
    /// A struct of members, or a union for the commands QAPI marks `'boxed': true`.
    pub args: ArgType,
    pub route: Route,
}

const CAPABILITIES: &[&str] = &["oob"];

/// `getfd` and `closefd`.
const FDNAME: &[Member] = &[Member::required("fdname", ArgType::Str)];

const fn monitor(name: &'static str, args: &'static [Member]) -> CommandDef {
    CommandDef {
        name,
        args: ArgType::Struct(args),
        route: Route::Monitor,
    }
}

const fn block(name: &'static str, args: &'static [Member]) -> CommandDef {
    CommandDef {
        name,
        args: ArgType::Struct(args),
        route: Route::Block,
    }
}

/// Every command splitvmm implements; `query-commands` lists exactly these.
pub const COMMANDS: &[CommandDef] = &[
    monitor(
        "qmp_capabilities",
        &[Member::optional(
            "enable",
            ArgType::List(&ArgType::Enum(CAPABILITIES)),
        )],
    ),
    monitor("query-version", &[]),
    monitor("query-commands", &[]),
    monitor("query-name", &[]),
    monitor("query-status", &[]),
    monitor("stop", &[]),
    monitor("cont", &[]),
    monitor("system_reset", &[]),
    monitor("quit", &[]),
    monitor("query-block", &[]),
    monitor("query-blockstats", vm_commands::QUERY_BLOCKSTATS),
    monitor("query-cpus-fast", &[]),
    block("query-named-block-nodes", bc::QUERY_NAMED_BLOCK_NODES),
    // The monitor connects the NBD servers `driver=nbd` nodes name, then forwards.
    CommandDef {
        name: "blockdev-add",
        args: ArgType::Union(&bc::BLOCKDEV_OPTIONS),
        route: Route::Monitor,
    },
    block("blockdev-del", bc::BLOCKDEV_DEL),
    block("block_resize", bc::BLOCK_RESIZE),
    monitor("nbd-server-start", bc::NBD_SERVER_START),
    block("nbd-server-add", bc::NBD_SERVER_ADD),
    block("nbd-server-remove", bc::NBD_SERVER_REMOVE),
    monitor("nbd-server-stop", &[]),
    block("block-export-add", bc::BLOCK_EXPORT_ADD),
    block("block-export-del", bc::BLOCK_EXPORT_DEL),
    block("query-block-exports", &[]),
    // The monitor connects an NBD target's server, then forwards.
    monitor("drive-mirror", bc::DRIVE_MIRROR),
    block("blockdev-mirror", bc::BLOCKDEV_MIRROR),
    block("block-stream", bc::BLOCK_STREAM),
    block("block_stream", bc::BLOCK_STREAM),
    block("block-commit", bc::BLOCK_COMMIT),
    block("blockdev-snapshot-sync", bc::BLOCKDEV_SNAPSHOT_SYNC),
    block("blockdev-snapshot", bc::BLOCKDEV_SNAPSHOT),
    monitor("getfd", FDNAME),
    monitor("closefd", FDNAME),
    monitor("migrate", migration::MIGRATE),
    monitor("migrate_cancel", &[]),
    monitor("migrate-incoming", migration::MIGRATE_INCOMING),
    monitor("query-migrate", &[]),
    monitor("migrate-set-parameters", migration::MIGRATE_SET_PARAMETERS),
    monitor("query-migrate-parameters", &[]),
    monitor("migrate_set_speed", migration::MIGRATE_SET_SPEED),
    monitor("migrate_set_downtime", migration::MIGRATE_SET_DOWNTIME),
    monitor(
        "migrate-set-capabilities",
        migration::MIGRATE_SET_CAPABILITIES,
    ),
    monitor("query-migrate-capabilities", &[]),
    block("query-block-jobs", &[]),
    block("query-jobs", &[]),
    block("block-job-set-speed", bc::BLOCK_JOB_SET_SPEED),
    block("block-job-cancel", bc::BLOCK_JOB_CANCEL),
    block("block-job-pause", bc::BLOCK_JOB_DEVICE),
    block("block-job-resume", bc::BLOCK_JOB_DEVICE),
    block("block-job-complete", bc::BLOCK_JOB_DEVICE),
    block("block-job-finalize", bc::JOB_ID),
    block("block-job-dismiss", bc::JOB_ID),
    CommandDef {
        name: "block-job-change",
        args: ArgType::Union(&bc::BLOCK_JOB_CHANGE),
        route: Route::Block,
    },
    block("job-pause", bc::JOB_ID),
    block("job-resume", bc::JOB_ID),
    block("job-cancel", bc::JOB_ID),
    block("job-complete", bc::JOB_ID),
    block("job-finalize", bc::JOB_ID),
    block("job-dismiss", bc::JOB_ID),
];

/// Handles one request value and renders the reply line.
pub async fn handle(monitor: &Monitor, session: &SessionState, value: Value) -> String {
    let req = match wire::parse_request(value) {
        Ok(r) => r,
        Err(e) => return wire::response_err(&e.error, e.id.as_ref()),
    };
    match run(monitor, session, &req).await {
        Ok(ret) => wire::response_ok(&ret, req.id.as_ref()),
        Err(e) => wire::response_err(&e, req.id.as_ref()),
    }
}

async fn run(monitor: &Monitor, session: &SessionState, req: &Request) -> Result<Value, QmpError> {
    let negotiated = session.negotiated.load(Ordering::Acquire);
    let def = COMMANDS.iter().find(|c| c.name == req.execute);
    let def = match def {
        _ if !negotiated && req.execute != "qmp_capabilities" => {
            return Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        Some(def) => def,
        None => {
            return Err(QmpError::command_not_found(format!(
                "The command {} has not been found",
                req.execute
            )));
        }
    };
    if def.name == "blockdev-add" {
        bc::check_nesting(&req.arguments)?;
    }
    validate_args(&req.arguments, &def.args)?;
    match def.route {
        Route::Monitor => execute(monitor, session, def.name, &req.arguments).await,
        Route::Block => forward(monitor, def.name, &req.arguments, None).await,
    }
}

async fn execute(
    monitor: &Monitor,
    session: &SessionState,
    name: &str,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    match name {
        "qmp_capabilities" => {
            if session.negotiated.load(Ordering::Acquire) {
                return Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            // The schema admits only known capabilities; none of them is offered.
            if let Some(Value::Array(caps)) = args.get("enable")
                && !caps.is_empty()
            {
                let names: Vec<&str> = caps.iter().filter_map(Value::as_str).collect();
                return Err(QmpError::generic(format!(
                    "Capability {} not available",
                    names.join(", ")
                )));
            }
            session.negotiated.store(true, Ordering::Release);
            Ok(json!({}))
        }
        "query-version" => Ok(version()),
        "query-commands" => Ok(COMMANDS.iter().map(|c| json!({ "name": c.name })).collect()),
        "query-name" => Ok(match &monitor.name {
            Some(n) => json!({ "name": n }),
            None => json!({}),
        }),
        "query-status" => {
            let state = match &monitor.vmm {
                Some(vmm) => match vmm.call(VmmRequest::QueryStatus, &[]).await? {
                    VmmReply::Status(s) => s,
                    other => {
                        return Err(QmpError::generic(format!(
                            "vmm-proc: unexpected reply {other:?}"
                        )));
                    }
                },
                None => monitor.runstate(),
            };
            Ok(json!({ "running": state == RunState::Running, "status": state.as_qapi_str() }))
        }
        "stop" | "cont" => {
            let (request, target) = if name == "stop" {
                (VmmRequest::Stop, RunState::Paused)
            } else {
                (VmmRequest::Cont, RunState::Running)
            };
            // QEMU's qmp_cont resets every drive's io-status before it starts the VM (so
            // an error of the retried requests sets it again), unless the VM needs a reset.
            if name == "cont"
                && !matches!(
                    monitor.runstate(),
                    RunState::Shutdown | RunState::GuestPanicked
                )
            {
                monitor.reset_io_status();
            }
            match &monitor.vmm {
                // vmm-proc reports the new state as an event before it answers.
                Some(vmm) => {
                    vmm.call(request, &[]).await?;
                }
                None => monitor.set_runstate(target),
            }
            Ok(json!({}))
        }
        "system_reset" => {
            match &monitor.vmm {
                // vmm-proc reports RESET (and a run-state change) before it answers.
                Some(vmm) => {
                    vmm.call(VmmRequest::SystemReset, &[]).await?;
                }
                // No guest to reset: only the event, as for stop and cont.
                None => monitor.events.emit(
                    "RESET",
                    Some(json!({ "guest": false, "reason": "host-qmp-system-reset" })),
                ),
            }
            Ok(json!({}))
        }
        "quit" => {
            monitor.request_shutdown(ShutdownCause::Quit);
            Ok(json!({}))
        }
        "nbd-server-start" => {
            let (listener, path) = monitor.nbd.bind(args)?;
            let mut rest = args.clone();
            rest.remove("addr");
            match forward(monitor, name, &rest, Some(listener)).await {
                Ok(v) => {
                    monitor.nbd.started(path);
                    Ok(v)
                }
                Err(e) => {
                    NbdListener::abandon(path);
                    Err(e)
                }
            }
        }
        "blockdev-add" => {
            let fds = bc::connect_nbd_nodes(args).await?;
            forward_fds(monitor, name, args, fds).await
        }
        "drive-mirror" => {
            let (args, fd) = bc::connect_mirror_target(args).await;
            forward(monitor, name, &args, fd).await
        }
        "nbd-server-stop" => {
            let v = forward(monitor, name, args, None).await?;
            monitor.nbd.stopped();
            Ok(v)
        }
        "query-blockstats" => vm_commands::query_blockstats(monitor, args).await,
        "getfd" => crate::fds::getfd(&monitor.fds, session, args),
        "closefd" => crate::fds::closefd(&monitor.fds, args),
        "migrate" => migration::migrate(monitor, args).await,
        "migrate_cancel" => migration::migrate_cancel(monitor).await,
        "migrate-incoming" => migration::migrate_incoming(monitor, args).await,
        "query-migrate" => migration::query_migrate(monitor).await,
        "migrate-set-parameters" | "migrate_set_speed" | "migrate_set_downtime" => {
            migration::set_parameters(monitor, name, args).await
        }
        "query-migrate-parameters" => Ok(migration::query_parameters(monitor)),
        "migrate-set-capabilities" => migration::set_capabilities(monitor, args).await,
        "query-migrate-capabilities" => Ok(migration::query_capabilities(monitor)),
        "query-cpus-fast" => vm_commands::query_cpus_fast(monitor).await,
        "query-block" => match monitor.block.call(BlockRequest::QueryBlock, &[]).await? {
            BlockReply::Block(mut info) => {
                monitor.fill_io_status(&mut info);
                Ok(ipc::common::qapi_json(&info))
            }
            other => Err(QmpError::generic(format!(
                "block-proc: unexpected reply {other:?}"
            ))),
        },
        _ => Err(QmpError::command_not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}

/// Has block-proc execute a command whose arguments passed the schema, with the descriptor
/// the monitor made for it, if any.
async fn forward(
    monitor: &Monitor,
    name: &str,
    args: &Map<String, Value>,
    fd: Option<std::os::fd::OwnedFd>,
) -> Result<Value, QmpError> {
    forward_fds(monitor, name, args, fd.into_iter().collect()).await
}

/// [`forward`] with any number of descriptors (at most [`ipc::channel::MAX_FDS`]). What
/// succeeds is recorded for crash recovery.
pub(crate) async fn forward_fds(
    monitor: &Monitor,
    name: &str,
    args: &Map<String, Value>,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Value, QmpError> {
    let count = u8::try_from(fds.len())
        .ok()
        .filter(|n| usize::from(*n) <= ipc::channel::MAX_FDS)
        .ok_or_else(|| {
            QmpError::generic(format!(
                "{name}: at most {} descriptors can go with one command",
                ipc::channel::MAX_FDS
            ))
        })?;
    let request = BlockRequest::Qmp {
        command: name.to_string(),
        arguments: Value::Object(args.clone()).to_string(),
        fds: count,
    };
    let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
    match monitor.block.call(request, &borrowed).await? {
        BlockReply::Json(text) => {
            let v = serde_json::from_str(&text).map_err(|e| {
                QmpError::generic(format!("block-proc answered {name} with bad JSON: {e}"))
            })?;
            monitor.recovery.record(name, args, &fds);
            Ok(v)
        }
        other => Err(QmpError::generic(format!(
            "block-proc: unexpected reply {other:?}"
        ))),
    }
}
