//! The block-layer and NBD commands: their schemas (QAPI schema order), and the part of
//! their work that belongs to the monitor. block-proc executes them; the monitor checks
//! the arguments and makes every socket they need (block-proc may create none), passing
//! it along with the command.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use ipc::QmpError;
use ipc::common::os_error_text;
use serde_json::{Map, Value};

use crate::qmp::schema::{ArgType, Member};

const EXPORT_MODES: &[&str] = &["safe", "hard"];

pub const QUERY_NAMED_BLOCK_NODES: &[Member] = &[Member::optional("flat", ArgType::Bool)];
pub const BLOCK_RESIZE: &[Member] = &[
    Member::optional("device", ArgType::Str),
    Member::optional("node-name", ArgType::Str),
    Member::required("size", ArgType::Int),
];
pub const NBD_SERVER_START: &[Member] = &[
    // SocketAddressLegacy: {"type": ..., "data": {...}}; the data is checked per type below.
    Member::required(
        "addr",
        ArgType::Struct(&[
            Member::required("type", ArgType::Enum(&["inet", "unix", "vsock", "fd"])),
            Member::required("data", ArgType::Any),
        ]),
    ),
    Member::optional("tls-creds", ArgType::Str),
    Member::optional("tls-authz", ArgType::Str),
    Member::optional("max-connections", ArgType::UInt32),
];
pub const NBD_SERVER_ADD: &[Member] = &[
    Member::required("device", ArgType::Str),
    Member::optional("name", ArgType::Str),
    Member::optional("description", ArgType::Str),
    Member::optional("writable", ArgType::Bool),
    Member::optional("bitmap", ArgType::Str),
];
pub const NBD_SERVER_REMOVE: &[Member] = &[
    Member::required("name", ArgType::Str),
    Member::optional("mode", ArgType::Enum(EXPORT_MODES)),
];
pub const BLOCK_EXPORT_ADD: &[Member] = &[
    Member::required(
        "type",
        ArgType::Enum(&["nbd", "vhost-user-blk", "fuse", "vduse-blk"]),
    ),
    Member::required("id", ArgType::Str),
    Member::optional("fixed-iothread", ArgType::Bool),
    Member::optional("iothread", ArgType::Str),
    Member::required("node-name", ArgType::Str),
    Member::optional("writable", ArgType::Bool),
    Member::optional("writethrough", ArgType::Bool),
    Member::optional("allow-inactive", ArgType::Bool),
    Member::optional("name", ArgType::Str),
    Member::optional("description", ArgType::Str),
    Member::optional("bitmaps", ArgType::List(&ArgType::Any)),
    Member::optional("allocation-depth", ArgType::Bool),
];
pub const BLOCK_EXPORT_DEL: &[Member] = &[
    Member::required("id", ArgType::Str),
    Member::optional("mode", ArgType::Enum(EXPORT_MODES)),
];

/// The NBD server's listening socket, as far as the monitor is concerned: it made it, and
/// removes a unix socket file it created when the server stops or splitvmm exits.
#[derive(Debug, Default)]
pub struct NbdListener {
    running: Mutex<Option<Option<std::path::PathBuf>>>,
}

fn data_str<'a>(
    data: &'a Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Result<&'a str, QmpError> {
    match data.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{prefix}{key}', expected: string"
        ))),
        None => Err(QmpError::generic(format!(
            "Parameter '{prefix}{key}' is missing"
        ))),
    }
}

impl NbdListener {
    /// `nbd-server-start`'s monitor half: refuses a second server, then binds the socket
    /// `addr` names. The caller hands the socket to block-proc and calls [`started`] or
    /// [`abandon`] with the outcome.
    ///
    /// [`started`]: Self::started
    /// [`abandon`]: Self::abandon
    pub fn bind(
        &self,
        args: &Map<String, Value>,
    ) -> Result<(OwnedFd, Option<std::path::PathBuf>), QmpError> {
        if self.lock().is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        if args.contains_key("tls-creds") || args.contains_key("tls-authz") {
            let id = args
                .get("tls-creds")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            )));
        }
        let addr = args
            .get("addr")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let data = match addr.get("data") {
            Some(Value::Object(d)) => d.clone(),
            _ => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'addr.data', expected: object",
                ));
            }
        };
        match addr.get("type").and_then(Value::as_str) {
            Some("unix") => {
                if let Some(key) = data
                    .keys()
                    .find(|k| !matches!(k.as_str(), "path" | "abstract" | "tight"))
                {
                    return Err(QmpError::generic(format!(
                        "Parameter 'addr.data.{key}' is unexpected"
                    )));
                }
                let path = std::path::PathBuf::from(data_str(&data, "path", "addr.data.")?);
                // QEMU unlinks the path before binding.
                let _ = std::fs::remove_file(&path);
                let l = std::os::unix::net::UnixListener::bind(&path).map_err(|e| {
                    QmpError::generic(format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        os_error_text(&e)
                    ))
                })?;
                Ok((l.into(), Some(path)))
            }
            Some("inet") => {
                const INET: &[&str] = &[
                    "host",
                    "port",
                    "numeric",
                    "to",
                    "ipv4",
                    "ipv6",
                    "keep-alive",
                    "mptcp",
                ];
                if let Some(key) = data.keys().find(|k| !INET.contains(&k.as_str())) {
                    return Err(QmpError::generic(format!(
                        "Parameter 'addr.data.{key}' is unexpected"
                    )));
                }
                let host = data_str(&data, "host", "addr.data.")?;
                let port = data_str(&data, "port", "addr.data.")?;
                let num: u16 = port.parse().map_err(|_| {
                    QmpError::generic(format!("address resolution failed for {host}:{port}: Servname not supported for ai_socktype"))
                })?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let l = std::net::TcpListener::bind((host, num)).map_err(|e| {
                    QmpError::generic(format!("Failed to bind socket: {}", os_error_text(&e)))
                })?;
                Ok((l.into(), None))
            }
            Some(other) => Err(QmpError::generic(format!(
                "NBD server addresses of type '{other}' are not supported"
            ))),
            None => Err(QmpError::generic("Parameter 'addr.type' is missing")),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Option<std::path::PathBuf>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// block-proc took the socket: the server runs.
    pub fn started(&self, path: Option<std::path::PathBuf>) {
        *self.lock() = Some(path);
    }

    /// block-proc refused: remove what was bound.
    pub fn abandon(path: Option<std::path::PathBuf>) {
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The server stopped (`nbd-server-stop`, or splitvmm is exiting): removes the socket
    /// file. Returns whether a server was running.
    pub fn stopped(&self) -> bool {
        match self.lock().take() {
            Some(path) => {
                Self::abandon(path);
                true
            }
            None => false,
        }
    }
}
