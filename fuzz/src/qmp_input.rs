//! `qmp_input`: bytes a QMP client sends, through everything the monitor does with them
//! before a command runs.
//!
//! The first input byte picks how the rest is fed (in chunks of 1 to 64 bytes) and the
//! parser limits (QEMU's, or tight ones so the limit paths are reached by small inputs).
//! Checks:
//! - the [`JsonStreamer`] yields the same values and errors whether the bytes come all at
//!   once or in chunks (a socket may split them anywhere);
//! - every value and error renders ([`to_wire`], [`response_err`], [`response_ok`]) as one
//!   line of valid, ASCII-only JSON;
//! - each request goes through [`parse_request`] and, for a known command, [`validate_args`]
//!   against the command table (and [`normalize`]);
//! - arguments the schema lets through for a command block-proc executes decode there:
//!   they are run through block-proc's `commands::State` (no drives, no NBD server, no
//!   descriptors, so nothing can take effect), and its "arguments the schema let through
//!   do not decode" error is a finding. Only the commands listed in [`BLOCK_COMMANDS`]
//!   go there, none of which can touch a file in that state: a new command must be added
//!   to the list deliberately.

use std::sync::Arc;

use block_proc::commands::State;
use block_proc::drives::Drives;
use ipc::block::BlockConfig;
use monitor_proc::commands::COMMANDS;
use monitor_proc::qmp::{
    ArgType, JsonStreamer, Limits, QmpError, normalize, parse_request, response_err, response_ok,
    to_wire, validate_args,
};
use serde_json::Value;

/// Commands whose arguments block-proc decodes, and which cannot take effect without drives,
/// a running NBD server or descriptors. `nbd-server-start` reaches block-proc without its
/// `addr` (the monitor binds the socket).
pub const BLOCK_COMMANDS: &[&str] = &[
    "query-named-block-nodes",
    "block_resize",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

/// Limits small enough for fuzz-sized inputs to hit.
const TIGHT: Limits = Limits {
    max_message_bytes: 200,
    max_tokens: 40,
    max_depth: 6,
};

fn feed(limits: Limits, input: &[u8], chunk: usize) -> Vec<Result<Value, QmpError>> {
    let mut streamer = JsonStreamer::new(limits);
    input
        .chunks(chunk.max(1))
        .flat_map(|c| streamer.feed(c))
        .collect()
}

/// One line of QMP output: ASCII, `\r\n`-terminated, no other line break, valid JSON.
fn check_line(line: &str) {
    assert!(line.is_ascii(), "non-ASCII output line {line:?}");
    let body = line.strip_suffix("\r\n").expect("line ends with CRLF");
    assert!(
        !body.contains(['\r', '\n']),
        "line break inside a line {line:?}"
    );
    if let Err(e) = serde_json::from_str::<Value>(body) {
        panic!("output is not JSON ({e}): {body}");
    }
}

fn block_state() -> Arc<State> {
    thread_local! {
        static STATE: Arc<State> = {
            let config = BlockConfig {
                drives: Vec::new(),
                image_dirs: Vec::new(),
                sandbox: false,
                incoming: false,
            };
            let drives = crate::block_on(Drives::open(&config, false)).expect("no drives");
            // Events go nowhere: nothing here can emit one.
            let (tx, _) = tokio::sync::mpsc::unbounded_channel();
            Arc::new(State::new(drives, tx))
        };
    }
    STATE.with(Arc::clone)
}

/// What the monitor does with one parsed value, short of running a command of its own.
/// `Ok(command)` when the request passed the schema.
fn dispatch(value: &Value) -> Result<&'static str, QmpError> {
    let req = match parse_request(value.clone()) {
        Ok(r) => r,
        Err(e) => {
            check_line(&response_err(&e.error, e.id.as_ref()));
            return Err(e.error);
        }
    };
    if let Some(id) = &req.id {
        check_line(&response_ok(&Value::Null, Some(id)));
    }
    let Some(def) = COMMANDS.iter().find(|c| c.name == req.execute) else {
        return Err(QmpError::command_not_found(req.execute));
    };
    let mut args = req.arguments;
    // As `commands::dispatch`: the nesting bound of blockdev-add first, then the schema.
    let checked = if def.name == "blockdev-add" {
        monitor_proc::block_commands::check_nesting(&args)
    } else {
        Ok(())
    }
    .and_then(|()| validate_args(&args, &def.args));
    if let Err(e) = checked {
        check_line(&response_err(&e, req.id.as_ref()));
        return Err(e);
    }
    let mut normalized = args.clone();
    if let ArgType::Struct(members) = &def.args {
        normalize(&mut normalized, members);
    }
    if !BLOCK_COMMANDS.contains(&def.name) {
        return Ok(def.name);
    }
    // What `commands::forward` sends (un-normalized, as the monitor does).
    if def.name == "nbd-server-start" {
        args.remove("addr");
    }
    let text = Value::Object(args).to_string();
    let state = block_state();
    if let Err(e) = crate::block_on(state.execute(def.name, &text, Vec::new())) {
        assert!(
            !e.desc.contains("do not decode"),
            "{}: the schema let through arguments block-proc cannot decode: {text}: {}",
            def.name,
            e.desc
        );
        check_line(&response_err(&e, req.id.as_ref()));
    }
    Ok(def.name)
}

/// The target.
pub fn run(data: &[u8]) {
    checked(data);
}

/// Runs the target; for each message of the input, the command that passed the schema, or
/// the error it got (parse, request or argument error).
pub fn checked(data: &[u8]) -> Vec<Result<&'static str, QmpError>> {
    let Some((&mode, input)) = data.split_first() else {
        return Vec::new();
    };
    let limits = if mode & 0x40 != 0 {
        TIGHT
    } else {
        Limits::default()
    };
    let chunk = usize::from(mode & 0x3f) + 1;
    let whole = feed(limits, input, input.len());
    let chunked = feed(limits, input, chunk);
    assert_eq!(
        whole, chunked,
        "the parser's output depends on how the input is split ({chunk}-byte chunks)"
    );
    whole
        .into_iter()
        .map(|item| match item {
            Ok(value) => {
                check_line(&(to_wire(&value) + "\r\n"));
                dispatch(&value)
            }
            Err(e) => {
                check_line(&response_err(&e, None));
                Err(e)
            }
        })
        .collect()
}
