//! The QMP commands: one table says which exist and what arguments they take; `handle`
//! validates a request against it with QEMU's rules and wording, then runs it here or
//! forwards it to the process that owns the answer.

use std::sync::atomic::Ordering;

use ipc::QmpError;
use ipc::block::{BlockReply, BlockRequest};
use ipc::common::RunState;
use ipc::vmm::{VmmReply, VmmRequest};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::qmp::schema::{ArgType, Member, validate};
use crate::qmp::wire::{self, Request};
use crate::server::SessionState;
use crate::state::{Monitor, ShutdownCause};

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

/// A command and its arguments, in QAPI schema order.
#[derive(Debug)]
pub struct CommandDef {
    pub name: &'static str,
    pub args: &'static [Member],
}

const CAPABILITIES: &[&str] = &["oob"];

/// Every command splitvmm implements; `query-commands` lists exactly these.
pub const COMMANDS: &[CommandDef] = &[
    CommandDef {
        name: "qmp_capabilities",
        args: &[Member::optional(
            "enable",
            ArgType::List(&ArgType::Enum(CAPABILITIES)),
        )],
    },
    CommandDef {
        name: "query-version",
        args: &[],
    },
    CommandDef {
        name: "query-commands",
        args: &[],
    },
    CommandDef {
        name: "query-name",
        args: &[],
    },
    CommandDef {
        name: "query-status",
        args: &[],
    },
    CommandDef {
        name: "stop",
        args: &[],
    },
    CommandDef {
        name: "cont",
        args: &[],
    },
    CommandDef {
        name: "quit",
        args: &[],
    },
    CommandDef {
        name: "query-block",
        args: &[],
    },
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
    validate(&req.arguments, def.args)?;
    execute(monitor, session, def.name, &req.arguments).await
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
                    VmmReply::Done => monitor.runstate(),
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
            match &monitor.vmm {
                // vmm-proc reports the new state as an event before it answers.
                Some(vmm) => {
                    vmm.call(request, &[]).await?;
                }
                None => monitor.set_runstate(target),
            }
            Ok(json!({}))
        }
        "quit" => {
            monitor.request_shutdown(ShutdownCause::Quit);
            Ok(json!({}))
        }
        "query-block" => match monitor.block.call(BlockRequest::QueryBlock, &[]).await? {
            BlockReply::Block(info) => Ok(qapi_json(&info)),
            other => Err(QmpError::generic(format!(
                "block-proc: unexpected reply {other:?}"
            ))),
        },
        _ => Err(QmpError::command_not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}

/// Renders a typed IPC answer as QAPI JSON. IPC types keep absent optional members as
/// `None` (the codec is not self-describing, so they cannot be skipped there); QAPI has no
/// null for them, so object members that are null are dropped here.
pub fn qapi_json<T: Serialize>(v: &T) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(v).unwrap_or(Value::Null);
    strip(&mut v);
    v
}
