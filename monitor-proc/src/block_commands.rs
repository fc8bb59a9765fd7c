//! The block-layer and NBD commands: their schemas (QAPI schema order), and the part of
//! their work that belongs to the monitor. block-proc executes them; the monitor checks
//! the arguments and makes every socket they need (block-proc may create none), passing
//! it along with the command: the NBD server's listening socket, and the connections of
//! `blockdev-add`'s `driver=nbd` nodes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipc::QmpError;
use ipc::block::{BLKDEBUG_EVENTS, BLKDEBUG_IO_TYPES};
use ipc::common::os_error_text;
use serde_json::{Map, Value};

use crate::qmp::schema::{Alternate, ArgType, Member, Union};

const EXPORT_MODES: &[&str] = &["safe", "hard"];

/// QEMU 10's `BlockdevDriver`, all of it: a driver outside it is a schema error ("Parameter
/// 'driver' does not accept value 'x'"); one inside it that splitvmm does not implement
/// passes the schema and block-proc refuses it.
const BLOCKDEV_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// `BlockdevOptions`' base members (QEMU 10 order).
const BLOCKDEV_BASE: &[Member] = &[
    Member::required("driver", ArgType::Enum(BLOCKDEV_DRIVERS)),
    Member::optional("node-name", ArgType::Str),
    Member::optional("discard", ArgType::Enum(&["ignore", "unmap"])),
    Member::optional(
        "cache",
        ArgType::Struct(&[
            Member::optional("direct", ArgType::Bool),
            Member::optional("no-flush", ArgType::Bool),
        ]),
    ),
    Member::optional("active", ArgType::Bool),
    Member::optional("read-only", ArgType::Bool),
    Member::optional("auto-read-only", ArgType::Bool),
    Member::optional("force-share", ArgType::Bool),
    Member::optional("detect-zeroes", ArgType::Enum(&["off", "on", "unmap"])),
];

/// `BlockdevOptionsFile`.
const BLOCKDEV_FILE: &[Member] = &[
    Member::required("filename", ArgType::Str),
    Member::optional("pr-manager", ArgType::Str),
    Member::optional("locking", ArgType::Enum(&["auto", "on", "off"])),
    Member::optional("aio", ArgType::Enum(&["threads", "native", "io_uring"])),
    Member::optional("aio-max-batch", ArgType::Int),
    Member::optional("drop-cache", ArgType::Bool),
    Member::optional("x-check-cache-dropped", ArgType::Bool),
];

/// `BlockdevOptionsRaw`. (A `static`, as every type on the `BlockdevOptions` ↔
/// `BlockdevRef` cycle: consts are inlined, statics are referred to by address.)
static BLOCKDEV_RAW: [Member; 3] = [
    Member::required("file", ArgType::Alternate(&BLOCKDEV_REF)),
    Member::optional("offset", ArgType::Int),
    Member::optional("size", ArgType::Int),
];

const QCOW2_OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

/// `Qcow2OverlapChecks`: a mode, or flags per metadata kind.
static QCOW2_OVERLAP_CHECKS: Alternate = Alternate {
    name: "Qcow2OverlapChecks",
    branches: &[
        ArgType::Struct(&[
            Member::optional("template", ArgType::Enum(QCOW2_OVERLAP_MODES)),
            Member::optional("main-header", ArgType::Bool),
            Member::optional("active-l1", ArgType::Bool),
            Member::optional("active-l2", ArgType::Bool),
            Member::optional("refcount-table", ArgType::Bool),
            Member::optional("refcount-block", ArgType::Bool),
            Member::optional("snapshot-table", ArgType::Bool),
            Member::optional("inactive-l1", ArgType::Bool),
            Member::optional("inactive-l2", ArgType::Bool),
            Member::optional("bitmap-directory", ArgType::Bool),
        ]),
        ArgType::Enum(QCOW2_OVERLAP_MODES),
    ],
};

const KEY_SECRET: &[Member] = &[Member::optional("key-secret", ArgType::Str)];

/// `BlockdevQcow2Encryption`.
static QCOW2_ENCRYPTION: Union = Union {
    base: &[Member::required("format", ArgType::Enum(&["aes", "luks"]))],
    tag: "format",
    variants: &[("aes", KEY_SECRET), ("luks", KEY_SECRET)],
};

/// `BlockdevOptionsQcow2`.
static BLOCKDEV_QCOW2: [Member; 15] = [
    Member::required("file", ArgType::Alternate(&BLOCKDEV_REF)),
    Member::optional("backing", ArgType::Alternate(&BLOCKDEV_REF_OR_NULL)),
    Member::optional("lazy-refcounts", ArgType::Bool),
    Member::optional("pass-discard-request", ArgType::Bool),
    Member::optional("pass-discard-snapshot", ArgType::Bool),
    Member::optional("pass-discard-other", ArgType::Bool),
    Member::optional("discard-no-unref", ArgType::Bool),
    Member::optional("overlap-check", ArgType::Alternate(&QCOW2_OVERLAP_CHECKS)),
    Member::optional("cache-size", ArgType::Int),
    Member::optional("l2-cache-size", ArgType::Int),
    Member::optional("l2-cache-entry-size", ArgType::Int),
    Member::optional("refcount-cache-size", ArgType::Int),
    Member::optional("cache-clean-interval", ArgType::Int),
    Member::optional("encrypt", ArgType::Union(&QCOW2_ENCRYPTION)),
    Member::optional("data-file", ArgType::Alternate(&BLOCKDEV_REF)),
];

/// `SocketAddress` (the flat one; `nbd-server-start` takes the legacy, wrapped form).
pub static SOCKET_ADDRESS: Union = Union {
    base: &[Member::required(
        "type",
        ArgType::Enum(&["inet", "unix", "vsock", "fd"]),
    )],
    tag: "type",
    variants: &[
        (
            "inet",
            &[
                Member::required("host", ArgType::Str),
                Member::required("port", ArgType::Str),
                Member::optional("numeric", ArgType::Bool),
                Member::optional("to", ArgType::UInt16),
                Member::optional("ipv4", ArgType::Bool),
                Member::optional("ipv6", ArgType::Bool),
                Member::optional("keep-alive", ArgType::Bool),
                Member::optional("mptcp", ArgType::Bool),
            ],
        ),
        (
            "unix",
            &[
                Member::required("path", ArgType::Str),
                Member::optional("abstract", ArgType::Bool),
                Member::optional("tight", ArgType::Bool),
            ],
        ),
        (
            "vsock",
            &[
                Member::required("cid", ArgType::Str),
                Member::required("port", ArgType::Str),
            ],
        ),
        ("fd", &[Member::required("str", ArgType::Str)]),
    ],
};

/// `BlockdevOptionsNbd`.
const BLOCKDEV_NBD: &[Member] = &[
    Member::required("server", ArgType::Union(&SOCKET_ADDRESS)),
    Member::optional("export", ArgType::Str),
    Member::optional("tls-creds", ArgType::Str),
    Member::optional("tls-hostname", ArgType::Str),
    Member::optional("x-dirty-bitmap", ArgType::Str),
    Member::optional("reconnect-delay", ArgType::UInt32),
    Member::optional("open-timeout", ArgType::UInt32),
];

/// `BlkdebugInjectErrorOptions`.
const BLKDEBUG_INJECT_ERROR: ArgType = ArgType::Struct(&[
    Member::required("event", ArgType::Enum(BLKDEBUG_EVENTS)),
    Member::optional("state", ArgType::Int),
    Member::optional("iotype", ArgType::Enum(BLKDEBUG_IO_TYPES)),
    Member::optional("errno", ArgType::Int),
    Member::optional("sector", ArgType::Int),
    Member::optional("once", ArgType::Bool),
    Member::optional("immediately", ArgType::Bool),
]);

/// `BlkdebugSetStateOptions`.
const BLKDEBUG_SET_STATE: ArgType = ArgType::Struct(&[
    Member::required("event", ArgType::Enum(BLKDEBUG_EVENTS)),
    Member::optional("state", ArgType::Int),
    Member::required("new_state", ArgType::Int),
]);

/// `BlockPermission`.
const BLOCK_PERMISSION: ArgType =
    ArgType::Enum(&["consistent-read", "write", "write-unchanged", "resize"]);

/// `BlockdevOptionsBlkdebug`.
static BLOCKDEV_BLKDEBUG: [Member; 12] = [
    Member::required("image", ArgType::Alternate(&BLOCKDEV_REF)),
    Member::optional("config", ArgType::Str),
    Member::optional("align", ArgType::Int),
    Member::optional("max-transfer", ArgType::Int32),
    Member::optional("opt-write-zero", ArgType::Int32),
    Member::optional("max-write-zero", ArgType::Int32),
    Member::optional("opt-discard", ArgType::Int32),
    Member::optional("max-discard", ArgType::Int32),
    Member::optional("inject-error", ArgType::List(&BLKDEBUG_INJECT_ERROR)),
    Member::optional("set-state", ArgType::List(&BLKDEBUG_SET_STATE)),
    Member::optional("take-child-perms", ArgType::List(&BLOCK_PERMISSION)),
    Member::optional("unshare-child-perms", ArgType::List(&BLOCK_PERMISSION)),
];

/// `BlockdevOptions`, `blockdev-add`'s argument (`'boxed': true`), with the variants
/// splitvmm implements.
pub static BLOCKDEV_OPTIONS: Union = Union {
    base: BLOCKDEV_BASE,
    tag: "driver",
    variants: &[
        ("file", BLOCKDEV_FILE),
        ("raw", &BLOCKDEV_RAW),
        ("qcow2", &BLOCKDEV_QCOW2),
        ("nbd", BLOCKDEV_NBD),
        ("blkdebug", &BLOCKDEV_BLKDEBUG),
    ],
};

/// `BlockdevRef`: a nested definition or a node name.
static BLOCKDEV_REF: Alternate = Alternate {
    name: "BlockdevRef",
    branches: &[ArgType::Union(&BLOCKDEV_OPTIONS), ArgType::Str],
};

/// `BlockdevRefOrNull`: also `null`, for "no backing".
static BLOCKDEV_REF_OR_NULL: Alternate = Alternate {
    name: "BlockdevRefOrNull",
    branches: &[
        ArgType::Union(&BLOCKDEV_OPTIONS),
        ArgType::Str,
        ArgType::Null,
    ],
};

pub const BLOCKDEV_DEL: &[Member] = &[Member::required("node-name", ArgType::Str)];

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

/// QAPI `BlockdevOnError`.
const ON_ERROR: ArgType = ArgType::Enum(&["report", "ignore", "enospc", "stop", "auto"]);

/// `DriveMirror` (`drive-mirror` is `'boxed': true`; its struct is checked as a command's
/// arguments).
pub const DRIVE_MIRROR: &[Member] = &[
    Member::optional("job-id", ArgType::Str),
    Member::required("device", ArgType::Str),
    Member::required("target", ArgType::Str),
    Member::optional("format", ArgType::Str),
    Member::optional("node-name", ArgType::Str),
    Member::optional("replaces", ArgType::Str),
    Member::required(
        "sync",
        ArgType::Enum(&["top", "full", "none", "incremental", "bitmap"]),
    ),
    Member::optional("mode", ArgType::Enum(&["existing", "absolute-paths"])),
    Member::optional("speed", ArgType::Int),
    Member::optional("granularity", ArgType::UInt32),
    Member::optional("buf-size", ArgType::Int),
    Member::optional("on-source-error", ON_ERROR),
    Member::optional("on-target-error", ON_ERROR),
    Member::optional("unmap", ArgType::Bool),
    Member::optional("copy-mode", COPY_MODE),
    Member::optional("auto-finalize", ArgType::Bool),
    Member::optional("auto-dismiss", ArgType::Bool),
];

/// `block-stream` (QEMU 10; also `block_stream`, its 2012 name).
pub const BLOCK_STREAM: &[Member] = &[
    Member::optional("job-id", ArgType::Str),
    Member::required("device", ArgType::Str),
    Member::optional("base", ArgType::Str),
    Member::optional("base-node", ArgType::Str),
    Member::optional("backing-file", ArgType::Str),
    Member::optional("backing-mask-protocol", ArgType::Bool),
    Member::optional("bottom", ArgType::Str),
    Member::optional("speed", ArgType::Int),
    Member::optional("on-error", ON_ERROR),
    Member::optional("filter-node-name", ArgType::Str),
    Member::optional("auto-finalize", ArgType::Bool),
    Member::optional("auto-dismiss", ArgType::Bool),
];

/// `BlockdevMirror`.
pub const BLOCKDEV_MIRROR: &[Member] = &[
    Member::optional("job-id", ArgType::Str),
    Member::required("device", ArgType::Str),
    Member::required("target", ArgType::Str),
    Member::optional("replaces", ArgType::Str),
    Member::required(
        "sync",
        ArgType::Enum(&["top", "full", "none", "incremental", "bitmap"]),
    ),
    Member::optional("speed", ArgType::Int),
    Member::optional("granularity", ArgType::UInt32),
    Member::optional("buf-size", ArgType::Int),
    Member::optional("on-source-error", ON_ERROR),
    Member::optional("on-target-error", ON_ERROR),
    Member::optional("filter-node-name", ArgType::Str),
    Member::optional("copy-mode", COPY_MODE),
    Member::optional("auto-finalize", ArgType::Bool),
    Member::optional("auto-dismiss", ArgType::Bool),
];

/// `block-commit`.
pub const BLOCK_COMMIT: &[Member] = &[
    Member::optional("job-id", ArgType::Str),
    Member::required("device", ArgType::Str),
    Member::optional("base-node", ArgType::Str),
    Member::optional("base", ArgType::Str),
    Member::optional("top-node", ArgType::Str),
    Member::optional("top", ArgType::Str),
    Member::optional("backing-file", ArgType::Str),
    Member::optional("backing-mask-protocol", ArgType::Bool),
    Member::optional("speed", ArgType::Int),
    Member::optional("on-error", ON_ERROR),
    Member::optional("filter-node-name", ArgType::Str),
    Member::optional("auto-finalize", ArgType::Bool),
    Member::optional("auto-dismiss", ArgType::Bool),
];

/// `BlockdevSnapshotSync` (`blockdev-snapshot-sync` is `'boxed': true`).
pub const BLOCKDEV_SNAPSHOT_SYNC: &[Member] = &[
    Member::optional("device", ArgType::Str),
    Member::optional("node-name", ArgType::Str),
    Member::required("snapshot-file", ArgType::Str),
    Member::optional("snapshot-node-name", ArgType::Str),
    Member::optional("format", ArgType::Str),
    Member::optional("mode", ArgType::Enum(&["existing", "absolute-paths"])),
];

/// `BlockdevSnapshot` (`blockdev-snapshot` is `'boxed': true`).
pub const BLOCKDEV_SNAPSHOT: &[Member] = &[
    Member::required("node", ArgType::Str),
    Member::required("overlay", ArgType::Str),
];

/// QAPI `MirrorCopyMode`.
const COPY_MODE: ArgType = ArgType::Enum(&["background", "write-blocking"]);

/// QAPI `JobType`.
const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

/// `BlockJobChangeOptions` (`block-job-change` is `'boxed': true`): a union on `type`,
/// whose `mirror` branch has `copy-mode`.
pub static BLOCK_JOB_CHANGE: Union = Union {
    base: &[
        Member::required("id", ArgType::Str),
        Member::required("type", ArgType::Enum(JOB_TYPES)),
    ],
    tag: "type",
    variants: &[("mirror", &[Member::required("copy-mode", COPY_MODE)])],
};

/// `block-job-set-speed`: both members are required on the wire.
pub const BLOCK_JOB_SET_SPEED: &[Member] = &[
    Member::required("device", ArgType::Str),
    Member::required("speed", ArgType::Int),
];
pub const BLOCK_JOB_CANCEL: &[Member] = &[
    Member::required("device", ArgType::Str),
    Member::optional("force", ArgType::Bool),
];
/// `block-job-pause`, `-resume`, `-complete`.
pub const BLOCK_JOB_DEVICE: &[Member] = &[Member::required("device", ArgType::Str)];
/// `block-job-finalize`, `-dismiss` and every `job-*` verb.
pub const JOB_ID: &[Member] = &[Member::required("id", ArgType::Str)];

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
                // QEMU unlinks the path before binding; we only do if it is a socket.
                let _ = crate::server::remove_socket(&path);
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
                let addrs = resolve(host, port, &data)?;
                let l = std::net::TcpListener::bind(&addrs[..]).map_err(|e| {
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
            let _ = crate::server::remove_socket(&p);
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

/// The addresses of an inet `host`/`port` pair, in QEMU's wording when there are none.
///
/// Only IP literals and `localhost` are resolved. A host name would need `getaddrinfo`,
/// which reads files the monitor's jail refuses and sends DNS queries with system calls
/// its filter does not allow (a filter violation kills the process), so it is refused with
/// a clear error instead. `ipv4`/`ipv6` (when given) keep or drop each family, as QEMU's.
pub(crate) fn resolve(
    host: &str,
    port: &str,
    opts: &Map<String, Value>,
) -> Result<Vec<SocketAddr>, QmpError> {
    let fail = |why: &str| {
        QmpError::generic(format!(
            "address resolution failed for {host}:{port}: {why}"
        ))
    };
    let num: u16 = port
        .parse()
        .map_err(|_| fail("Servname not supported for ai_socktype"))?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ips: Vec<IpAddr> = if let Ok(ip) = bare.parse::<IpAddr>() {
        vec![ip]
    } else if bare.eq_ignore_ascii_case("localhost") {
        vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    } else {
        return Err(fail(
            "splitvmm resolves no host names (its monitor sends no DNS queries); give an IP address",
        ));
    };
    let want = |key: &str| opts.get(key).and_then(Value::as_bool);
    let (v4, v6) = match (want("ipv4"), want("ipv6")) {
        (None, None) => (true, true),
        (a, b) => (a.unwrap_or(b == Some(false)), b.unwrap_or(a == Some(false))),
    };
    let addrs: Vec<SocketAddr> = ips
        .into_iter()
        .filter(|ip| if ip.is_ipv4() { v4 } else { v6 })
        .map(|ip| SocketAddr::new(ip, num))
        .collect();
    if addrs.is_empty() {
        return Err(fail("Address family for hostname not supported"));
    }
    Ok(addrs)
}

/// Refuses `blockdev-add` definitions nested deeper than
/// [`ipc::block::MAX_BLOCKDEV_NESTING`], before the (recursive) schema check sees them.
pub fn check_nesting(args: &Map<String, Value>) -> Result<(), QmpError> {
    let depth = ipc::block::blockdev_nesting(args);
    if depth > ipc::block::MAX_BLOCKDEV_NESTING {
        return Err(QmpError::generic(format!(
            "Block node definitions are nested {depth} levels deep; splitvmm accepts at most {}",
            ipc::block::MAX_BLOCKDEV_NESTING
        )));
    }
    Ok(())
}

/// `blockdev-add`'s monitor half: checks what QEMU checks before opening anything, then
/// connects the server of every `driver=nbd` definition (in the order of
/// [`ipc::block::blockdev_nbd_nodes`]) and returns the connected sockets for block-proc,
/// which runs the NBD handshake over them.
pub async fn connect_nbd_nodes(args: &Map<String, Value>) -> Result<Vec<OwnedFd>, QmpError> {
    if !args.contains_key("node-name") {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    let nodes = ipc::block::blockdev_nbd_nodes(args);
    if nodes.len() > ipc::channel::MAX_FDS {
        return Err(QmpError::generic(format!(
            "At most {} NBD nodes can be added by one blockdev-add",
            ipc::channel::MAX_FDS
        )));
    }
    let mut fds = Vec::with_capacity(nodes.len());
    for (_, def) in nodes {
        if let Some(id) = def.get("tls-creds").and_then(Value::as_str) {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            )));
        }
        let server = def
            .get("server")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // open-timeout (seconds): keep trying to connect until it has passed, as QEMU's
        // NBD driver does; 0 or absent is one attempt.
        let timeout = def.get("open-timeout").and_then(Value::as_u64).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(timeout);
        let fd = loop {
            match connect_socket(&server).await {
                Ok(fd) => break fd,
                Err((e, true)) if Instant::now() < deadline => {
                    tracing::debug!("NBD connect: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((e, _)) => return Err(e),
            }
        };
        fds.push(fd);
    }
    Ok(fds)
}

/// `drive-mirror`'s monitor half: when `target` names an NBD export, connects its server
/// and returns the socket for block-proc, which runs the handshake over it. A name that
/// does not parse goes on unchanged (block-proc parses it again and reports the error in
/// its place); a failed connection goes on as [`ipc::nbd_uri::CONNECT_ERROR_KEY`].
pub async fn connect_mirror_target(
    args: &Map<String, Value>,
) -> (Map<String, Value>, Option<OwnedFd>) {
    let mut args = args.clone();
    let target = args
        .get("target")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Ok(ipc::nbd_uri::Target::Nbd(t)) = ipc::nbd_uri::parse_target(target) else {
        return (args, None);
    };
    match connect_socket(&t.server).await {
        Ok(fd) => (args, Some(fd)),
        Err((e, _)) => {
            args.insert(
                ipc::nbd_uri::CONNECT_ERROR_KEY.into(),
                Value::String(e.desc),
            );
            (args, None)
        }
    }
}

/// Connects to a (schema-checked) QAPI `SocketAddress`. The flag says whether trying
/// again could succeed (a connection error, not a bad address).
async fn connect_socket(server: &Map<String, Value>) -> Result<OwnedFd, (QmpError, bool)> {
    let str_of = |key: &str| server.get(key).and_then(Value::as_str).unwrap_or_default();
    let flag = |key: &str| server.get(key).and_then(Value::as_bool);
    let permanent = |e: QmpError| (e, false);
    match str_of("type") {
        "unix" => {
            let path = str_of("path").to_owned();
            let abstract_ = flag("abstract").unwrap_or(false);
            if abstract_ && flag("tight") == Some(false) {
                return Err(permanent(QmpError::generic(
                    "Abstract unix socket addresses with tight=off are not supported",
                )));
            }
            // A blocking connect, as QEMU's: a unix connect completes or fails at once
            // unless the listener's backlog is full.
            let connected = tokio::task::spawn_blocking(move || {
                let stream = if abstract_ {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(path.as_bytes())
                        .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
                } else {
                    std::os::unix::net::UnixStream::connect(&path)
                };
                stream.map_err(|e| {
                    QmpError::generic(format!(
                        "Failed to connect to '{path}': {}",
                        os_error_text(&e)
                    ))
                })
            })
            .await
            .map_err(|e| permanent(QmpError::generic(format!("NBD connect: {e}"))))?;
            connected.map(OwnedFd::from).map_err(|e| (e, true))
        }
        "inet" => {
            let (host, port) = (str_of("host"), str_of("port"));
            if flag("mptcp") == Some(true) {
                return Err(permanent(QmpError::generic(
                    "MPTCP connections are not supported",
                )));
            }
            let addrs = resolve(host, port, server).map_err(permanent)?;
            let mut last = None;
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => {
                        let s = s.into_std().map_err(|e| {
                            permanent(QmpError::generic(format!("NBD connect: {e}")))
                        })?;
                        if flag("keep-alive") == Some(true) {
                            nix::sys::socket::setsockopt(
                                &s,
                                nix::sys::socket::sockopt::KeepAlive,
                                &true,
                            )
                            .map_err(|e| {
                                permanent(QmpError::generic(format!(
                                    "Unable to set KEEPALIVE: {}",
                                    e.desc()
                                )))
                            })?;
                        }
                        return Ok(OwnedFd::from(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            let why = last.map(|e| os_error_text(&e)).unwrap_or_default();
            Err((
                QmpError::generic(format!("Failed to connect to '{host}:{port}': {why}")),
                true,
            ))
        }
        // What qemu-storage-daemon says: there is no `getfd` to name a descriptor with.
        "fd" => Err(permanent(QmpError::generic(
            "only QEMU supports file descriptor passing",
        ))),
        other => Err(permanent(QmpError::generic(format!(
            "NBD server addresses of type '{other}' are not supported"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qmp::schema::validate_args;

    fn check(args: Value) -> Result<(), String> {
        let Value::Object(args) = args else {
            panic!("not an object: {args}")
        };
        validate_args(&args, &ArgType::Union(&BLOCKDEV_OPTIONS)).map_err(|e| e.desc)
    }

    /// Each case's text is what qemu-storage-daemon 10.0.2 answered to the same arguments.
    #[test]
    fn blockdev_add_schema_errors_as_measured() {
        let cases = [
            (json!({}), "Parameter 'driver' is missing"),
            (json!({"driver": "file"}), "Parameter 'filename' is missing"),
            (
                json!({"driver": "nope"}),
                "Parameter 'driver' does not accept value 'nope'",
            ),
            (
                json!({"driver": 1, "node-name": 1, "filename": "x"}),
                "Invalid parameter type for 'driver', expected: string",
            ),
            (
                json!({"driver": "file", "node-name": 1, "filename": "x"}),
                "Invalid parameter type for 'node-name', expected: string",
            ),
            (
                json!({"driver": "file", "read-only": "x", "filename": "x"}),
                "Invalid parameter type for 'read-only', expected: boolean",
            ),
            (
                json!({"driver": "file", "node-name": "x", "filename": "/a", "bogus": 1}),
                "Parameter 'bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "node-name": "x"}),
                "Parameter 'file' is missing",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": 1}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": null}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": [1]}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver": "qcow2", "node-name": "x", "file": "f1", "backing": 1}),
                "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": {"driver": "nope"}}),
                "Parameter 'driver' does not accept value 'nope'",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": {}}),
                "Parameter 'file.driver' is missing",
            ),
            (
                json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"driver": "raw", "node-name": "x",
                       "file": {"driver": "file", "filename": "/a", "locking": "maybe"}}),
                "Parameter 'locking' does not accept value 'maybe'",
            ),
            (
                json!({"driver": "raw", "node-name": "x",
                       "file": {"driver": "file", "filename": "/a", "cache": {"direct": 1}}}),
                "Invalid parameter type for 'file.cache.direct', expected: boolean",
            ),
            (
                json!({"driver": "qcow2", "node-name": "top",
                       "file": {"driver": "file", "filename": "/a", "bogus": 1}}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "discard": "x", "file": "y"}),
                "Parameter 'discard' does not accept value 'x'",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "cache": [], "file": "y"}),
                "Invalid parameter type for 'cache', expected: object",
            ),
            (
                json!({"driver": "qcow2", "node-name": "x", "file": "y", "backing":
                       {"driver": "raw", "file": {"driver": "nbd",
                        "server": {"type": "unix", "path": 1}}}}),
                "Invalid parameter type for 'backing.file.server.path', expected: string",
            ),
            (
                json!({"driver": "qcow2", "node-name": "x", "file": "y", "backing":
                       {"driver": "raw", "file": {"driver": "nbd", "server": {"type": "bogus"}}}}),
                "Parameter 'type' does not accept value 'bogus'",
            ),
            (
                json!({"driver": "qcow2", "node-name": "x", "file": "y", "backing":
                       {"driver": "raw", "file": {"driver": "nbd",
                        "server": {"type": "unix", "path": "p", "zz": 1}}}}),
                "Parameter 'backing.file.server.zz' is unexpected",
            ),
            (
                json!({"driver": "qcow2", "node-name": "x", "file": "y", "backing":
                       {"driver": "raw", "file": {"driver": "nbd",
                        "server": {"type": "unix", "path": "p"}, "zz": 1}}}),
                "Parameter 'backing.file.zz' is unexpected",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": "y", "zz": 1, "offset": "a"}),
                "Invalid parameter type for 'offset', expected: integer",
            ),
            (
                json!({"driver": "raw", "node-name": "x", "file": "y", "active": "y"}),
                "Invalid parameter type for 'active', expected: boolean",
            ),
            (
                json!({"driver": "nbd", "node-name": "x"}),
                "Parameter 'server' is missing",
            ),
            (
                json!({"driver": "nbd", "node-name": "x", "server": {"type": "unix"}}),
                "Parameter 'server.path' is missing",
            ),
            (
                json!({"driver": "nbd", "node-name": "x",
                       "server": {"type": "inet", "host": "127.0.0.1", "port": 1}}),
                "Invalid parameter type for 'server.port', expected: string",
            ),
            (
                json!({"driver": "nbd", "node-name": "n",
                       "server": {"type": "unix", "path": "/x"}, "reconnect-delay": -1}),
                "Parameter 'reconnect-delay' expects uint32_t",
            ),
            (
                json!({"driver": "nbd", "node-name": "n",
                       "server": {"type": "unix", "path": "/x"}, "reconnect-delay": "x"}),
                "Parameter 'reconnect-delay' expects uint64",
            ),
            (
                json!({"driver": "nbd", "node-name": "n",
                       "server": {"type": "inet", "host": "h", "port": "1", "to": 70000}}),
                "Parameter 'to' expects uint16_t",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n", "file": "x", "overlap-check": 1}),
                "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n", "file": "x", "overlap-check": "bogus"}),
                "Parameter 'overlap-check' does not accept value 'bogus'",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n", "file": "x",
                       "encrypt": {"format": "luks", "bogus": 1}}),
                "Parameter 'encrypt.bogus' is unexpected",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n", "file": "x", "data-file": 1}),
                "Invalid parameter type for 'data-file', expected: BlockdevRef",
            ),
        ];
        for (args, desc) in cases {
            assert_eq!(check(args.clone()), Err(desc.to_owned()), "{args}");
        }
    }

    #[test]
    fn blockdev_add_schema_accepts_every_form_of_child() {
        let file = json!({"driver": "file", "filename": "/a"});
        for args in [
            json!({"driver": "file", "node-name": "f", "filename": "/a", "locking": "off",
                   "cache": {"direct": false, "no-flush": true}, "detect-zeroes": "on"}),
            json!({"driver": "raw", "node-name": "r", "file": "f", "offset": 0, "size": 512}),
            json!({"driver": "raw", "node-name": "r", "file": file}),
            json!({"driver": "qcow2", "node-name": "q", "file": file, "backing": null}),
            json!({"driver": "qcow2", "node-name": "q", "file": file, "backing": "b"}),
            json!({"driver": "qcow2", "node-name": "q", "file": file,
                   "backing": {"driver": "qcow2", "file": file, "backing": null},
                   "overlap-check": {"template": "all", "main-header": true}}),
            json!({"driver": "nbd", "node-name": "n", "export": "e",
                   "server": {"type": "inet", "host": "::1", "port": "10809", "ipv6": true}}),
            // A QEMU driver splitvmm lacks passes the schema (block-proc refuses it).
            json!({"driver": "vmdk", "node-name": "v", "file": "x"}),
        ] {
            assert_eq!(check(args.clone()), Ok(()), "{args}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_the_recursive_check() {
        let mut def = json!({"driver": "file", "filename": "/a"});
        for _ in 0..ipc::block::MAX_BLOCKDEV_NESTING - 1 {
            def = json!({"driver": "raw", "file": def});
        }
        let Value::Object(ok) = def.clone() else {
            panic!()
        };
        assert_eq!(check_nesting(&ok), Ok(()));
        let Value::Object(deep) = json!({"driver": "qcow2", "file": "f", "backing": def}) else {
            panic!()
        };
        assert!(check_nesting(&deep).is_err());
        // Far deeper than the stack would take recursively (built by moving, not by
        // json!, which serializes what it embeds).
        let mut huge = Map::new();
        for _ in 0..100_000 {
            let mut outer = Map::new();
            outer.insert("driver".into(), json!("raw"));
            outer.insert("file".into(), Value::Object(huge));
            huge = outer;
        }
        assert!(check_nesting(&huge).is_err());
        // Dropping it recursively would overflow the test's stack too.
        std::mem::forget(huge);
    }

    #[test]
    fn nbd_connections_follow_the_shared_order() {
        let nbd = |e: &str| {
            json!({"driver": "nbd", "export": e,
                                    "server": {"type": "unix", "path": "/s"}})
        };
        let Value::Object(args) = json!({"driver": "qcow2", "node-name": "q",
            "file": {"driver": "raw", "file": nbd("a")},
            "backing": {"driver": "raw", "file": nbd("b")}})
        else {
            panic!()
        };
        let paths: Vec<String> = ipc::block::blockdev_nbd_nodes(&args)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(paths, ["file.file", "backing.file"]);
    }

    #[test]
    fn only_literal_addresses_and_localhost_resolve() {
        let none = Map::new();
        assert_eq!(
            resolve("127.0.0.1", "10809", &none).ok(),
            Some(vec!["127.0.0.1:10809".parse().expect("addr")])
        );
        assert_eq!(
            resolve("[::1]", "1", &none).ok(),
            Some(vec!["[::1]:1".parse().expect("addr")])
        );
        assert_eq!(
            resolve("localhost", "1", &none).map(|a| a.len()).ok(),
            Some(2)
        );
        let Value::Object(v6) = json!({"ipv6": true}) else {
            panic!()
        };
        assert_eq!(
            resolve("localhost", "1", &v6).ok(),
            Some(vec!["[::1]:1".parse().expect("addr")])
        );
        let e = resolve("127.0.0.1", "nbd", &none).err().map(|e| e.desc);
        assert_eq!(
            e.as_deref(),
            Some(
                "address resolution failed for 127.0.0.1:nbd: Servname not supported for ai_socktype"
            )
        );
        assert!(resolve("example.org", "1", &none).is_err());
    }
}
