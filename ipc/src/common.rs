//! Types that several links share: correlation ids, QMP errors and run states.

use serde::{Deserialize, Serialize};

/// Correlates a reply with its request on one link. Chosen by the requester.
pub type CallId = u64;

/// QMP's error classes (`QapiErrorClass`), named as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire name of the class.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error as QMP reports it: a class and a human-readable description. Processes behind
/// the monitor answer with these so QEMU's wording is produced where the knowledge is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of almost every QMP error.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }
}

/// QEMU's `id_wellformed`, the rule for device ids, node names and export ids: a letter,
/// then letters, digits, '-', '.' and '_'.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// An OS error the way QEMU words it ("No such file or directory"), without Rust's
/// " (os error N)" suffix.
pub fn os_error_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// QEMU's `RunState`, as far as splitvmm reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Not started yet (`--paused` before the first `cont`).
    Prelaunch,
    Running,
    Paused,
    Shutdown,
    /// The guest crashed; only `system_reset` brings it back.
    GuestPanicked,
    /// Stopped by a disk error under `werror`/`rerror=stop` (or `enospc`); `cont` retries.
    IoError,
    /// The destination of a migration, waiting for or loading the stream.
    InMigrate,
    /// The source, stopped to send the last of the migration.
    FinishMigrate,
    /// The source after a completed migration.
    PostMigrate,
}

impl RunState {
    /// The name QMP uses for this state.
    pub fn as_qapi_str(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutdown => "shutdown",
            Self::GuestPanicked => "guest-panicked",
            Self::IoError => "io-error",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
        }
    }
}

/// Renders a typed answer as QAPI JSON. IPC types keep absent optional members as `None`
/// (the codec is not self-describing, so they cannot be skipped there); QAPI has no null
/// for them, so object members that are null are dropped.
pub fn qapi_json<T: Serialize>(v: &T) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
    strip(&mut v);
    v
}
