//! The migration commands (QMP_REFERENCE.md §6): the monitor parses the URI, makes the
//! connection (vmm-proc cannot create sockets) and hands it over; vmm-proc streams the
//! guest and keeps the figures `query-migrate` shows. The parameters and capabilities
//! live here, and the monitor keeps a copy of the source's socket so `migrate_cancel` can
//! shut it down under a blocked write.
//!
//! Destination: `--incoming tcp:HOST:PORT|unix:PATH` listens at start-up, `--incoming
//! defer` waits for `migrate-incoming`; the first connection accepted is handed to
//! vmm-proc, which loads from it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipc::QmpError;
use ipc::common::{RunState, os_error_text};
use ipc::vmm::{MigrationInfo, MigrationParams, MigrationStatus, VmmReply, VmmRequest};
use serde_json::{Map, Value, json};

use crate::qmp::schema::{ArgType, Member};
use crate::state::Monitor;

/// The largest `downtime-limit`, in ms (QEMU's `MAX_MIGRATE_DOWNTIME`).
const MAX_DOWNTIME_MS: u64 = 2000 * 1000;
const DOWNTIME_RANGE: &str =
    "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms";

pub const MIGRATE: &[Member] = &[
    Member::optional("uri", ArgType::Str),
    Member::optional("channels", ArgType::List(&ArgType::Any)),
    Member::optional("detach", ArgType::Bool),
    Member::optional("resume", ArgType::Bool),
];
pub const MIGRATE_INCOMING: &[Member] = &[
    Member::optional("uri", ArgType::Str),
    Member::optional("channels", ArgType::List(&ArgType::Any)),
    Member::optional("exit-on-error", ArgType::Bool),
];
pub const MIGRATE_SET_PARAMETERS: &[Member] = &[
    Member::optional("max-bandwidth", ArgType::Size),
    Member::optional("downtime-limit", ArgType::UInt64),
    Member::optional("avail-switchover-bandwidth", ArgType::Size),
];
pub const MIGRATE_SET_SPEED: &[Member] = &[Member::required("value", ArgType::Int)];
pub const MIGRATE_SET_DOWNTIME: &[Member] = &[Member::required("value", ArgType::Number)];
const CAPABILITY: &[Member] = &[
    Member::required("capability", ArgType::Enum(&["events"])),
    Member::required("state", ArgType::Bool),
];
pub const MIGRATE_SET_CAPABILITIES: &[Member] = &[Member::required(
    "capabilities",
    ArgType::List(&ArgType::Struct(CAPABILITY)),
)];

/// The monitor's migration settings and the connection it made.
#[derive(Debug, Default)]
pub struct Migration {
    params: Mutex<MigrationParams>,
    events: AtomicBool,
    /// The source's socket, kept to shut it down at `migrate_cancel`.
    sock: Mutex<Option<OwnedFd>>,
    /// Whether this splitvmm was started with `--incoming` (and, once set, whether
    /// `migrate-incoming` or the listener has started it).
    incoming: Mutex<Option<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Migration {
    /// Marks this instance as a destination (`--incoming`).
    pub fn set_incoming(&self) {
        *lock(&self.incoming) = Some(false);
    }

    /// A migration reached a final state: the monitor's copy of its socket goes.
    pub fn status_changed(&self, status: MigrationStatus) {
        if matches!(
            status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        ) {
            lock(&self.sock).take();
        }
    }

    /// Whether `MIGRATION` and `MIGRATION_PASS` are emitted.
    pub fn events_on(&self) -> bool {
        self.events.load(Ordering::Acquire)
    }
}

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Tcp(String, String),
    Unix(String),
    /// A connected socket the client named with `getfd`.
    Fd(String),
}

fn parse_uri(uri: &str) -> Result<Address, QmpError> {
    if let Some(rest) = uri.strip_prefix("tcp:") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| QmpError::generic(format!("error parsing address '{rest}'")))?;
        return Ok(Address::Tcp(host.to_string(), port.to_string()));
    }
    if let Some(path) = uri.strip_prefix("unix:") {
        return Ok(Address::Unix(path.to_string()));
    }
    if let Some(name) = uri.strip_prefix("fd:") {
        return Ok(Address::Fd(name.to_string()));
    }
    Err(QmpError::generic(format!(
        "unknown migration protocol: {uri}"
    )))
}

/// `uri` or the one `channels` entry, as QEMU requires exactly one of them.
fn address(args: &Map<String, Value>) -> Result<Address, QmpError> {
    match (args.get("uri"), args.get("channels")) {
        (Some(Value::String(uri)), None) => parse_uri(uri),
        (None, Some(Value::Array(channels))) => {
            let [channel] = channels.as_slice() else {
                return Err(QmpError::generic("Channel list has more than one entries"));
            };
            let addr = channel
                .get("addr")
                .and_then(Value::as_object)
                .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?;
            let s = |k: &str| addr.get(k).and_then(Value::as_str).unwrap_or_default();
            match (s("transport"), s("type")) {
                ("socket", "inet") => Ok(Address::Tcp(s("host").into(), s("port").into())),
                ("socket", "unix") => Ok(Address::Unix(s("path").into())),
                ("socket", "fd") => Ok(Address::Fd(s("str").into())),
                (t, ty) => Err(QmpError::generic(format!(
                    "unknown migration protocol: {t}:{ty}"
                ))),
            }
        }
        (Some(_), Some(_)) => Err(QmpError::generic(
            "need either 'uri' or 'channels' argument",
        )),
        _ => Err(QmpError::generic(
            "need either 'uri' or 'channels' argument",
        )),
    }
}

/// Connects to `addr`, blocking (vmm-proc writes with plain `write`). `fd:NAME` takes the
/// named descriptor, which is then no longer the monitor's (QEMU's `monitor_get_fd`).
async fn connect(monitor: &Monitor, addr: &Address) -> Result<OwnedFd, QmpError> {
    let fd = match addr {
        Address::Fd(name) => monitor.fds.take(name)?,
        Address::Unix(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                std::os::unix::net::UnixStream::connect(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| {
                        QmpError::generic(format!(
                            "Failed to connect to '{path}': {}",
                            os_error_text(&e)
                        ))
                    })
            })
            .await
            .map_err(|e| QmpError::generic(format!("migrate: {e}")))??
        }
        Address::Tcp(host, port) => {
            let addrs = crate::block_commands::resolve(host, port, &Map::new())?;
            let mut last = None;
            let mut found = None;
            for a in addrs {
                match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => {
                        let s = s
                            .into_std()
                            .map_err(|e| QmpError::generic(format!("migrate: {e}")))?;
                        s.set_nodelay(true)
                            .map_err(|e| QmpError::generic(format!("migrate: {e}")))?;
                        found = Some(OwnedFd::from(s));
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            found.ok_or_else(|| {
                let why = last.map(|e| os_error_text(&e)).unwrap_or_default();
                QmpError::generic(format!("Failed to connect to '{host}:{port}': {why}"))
            })?
        }
    };
    set_blocking(&fd)?;
    Ok(fd)
}

fn set_blocking(fd: &OwnedFd) -> Result<(), QmpError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL)
        .map_err(|e| QmpError::generic(format!("migrate: {}", e.desc())))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))
        .map_err(|e| QmpError::generic(format!("migrate: {}", e.desc())))?;
    Ok(())
}

fn vmm(monitor: &Monitor) -> Result<&Arc<crate::link::RpcClient<crate::link::Vmm>>, QmpError> {
    monitor
        .vmm
        .as_ref()
        .ok_or_else(|| QmpError::generic("There is no guest to migrate"))
}

async fn query(monitor: &Monitor) -> Result<MigrationInfo, QmpError> {
    match vmm(monitor)?.call(VmmRequest::QueryMigrate, &[]).await? {
        VmmReply::Migration(info) => Ok(info),
        other => Err(QmpError::generic(format!(
            "vmm-proc: unexpected reply {other:?}"
        ))),
    }
}

/// `migrate`.
pub async fn migrate(monitor: &Monitor, args: &Map<String, Value>) -> Result<Value, QmpError> {
    if args.get("resume").and_then(Value::as_bool) == Some(true) {
        return Err(QmpError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    let addr = address(args)?;
    let vmm = vmm(monitor)?;
    if lock(&monitor.migration.incoming).is_some() {
        return Err(QmpError::generic(
            "Guest is waiting for an incoming migration",
        ));
    }
    if query(monitor)
        .await?
        .status
        .is_some_and(MigrationStatus::in_progress)
    {
        return Err(QmpError::generic("There's a migration process in progress"));
    }
    // QEMU's `migrate_prepare` checks, before any connection is made.
    if let VmmReply::Status(RunState::PostMigrate) = vmm.call(VmmRequest::QueryStatus, &[]).await? {
        return Err(QmpError::generic(
            "Can't migrate the vm that was paused due to previous migration",
        ));
    }
    let sock = connect(monitor, &addr).await?;
    let keep = sock
        .try_clone()
        .map_err(|e| QmpError::generic(format!("migrate: {e}")))?;
    let params = *lock(&monitor.migration.params);
    vmm.call(VmmRequest::MigrateOut(params), &[sock.as_fd()])
        .await?;
    *lock(&monitor.migration.sock) = Some(keep);
    Ok(json!({}))
}

/// `migrate_cancel`: "succeeds even if there is no migration process running".
pub async fn migrate_cancel(monitor: &Monitor) -> Result<Value, QmpError> {
    let Some(vmm) = &monitor.vmm else {
        return Ok(json!({}));
    };
    vmm.call(VmmRequest::MigrateCancel, &[]).await?;
    // After the flag: a write that fails now is seen as the cancel it is.
    if let Some(sock) = lock(&monitor.migration.sock).take() {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            nix::sys::socket::Shutdown::Both,
        );
    }
    Ok(json!({}))
}

/// `migrate-incoming`.
pub async fn migrate_incoming(
    monitor: &Monitor,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let addr = address(args)?;
    {
        let mut incoming = lock(&monitor.migration.incoming);
        match *incoming {
            None => {
                return Err(QmpError::generic(
                    "'-incoming' was not specified on the command line",
                ));
            }
            Some(true) => {
                return Err(QmpError::generic(
                    "The incoming migration has already been started",
                ));
            }
            Some(false) => *incoming = Some(true),
        }
    }
    listen(monitor, &addr).await
}

/// `--incoming URI` at start-up.
pub async fn listen_at_start(monitor: &Monitor, uri: &str) -> Result<(), String> {
    let addr = parse_uri(uri).map_err(|e| e.desc)?;
    *lock(&monitor.migration.incoming) = Some(true);
    listen(monitor, &addr).await.map(drop).map_err(|e| e.desc)
}

/// Listens on `addr` and hands the first connection to vmm-proc; `fd:NAME` is that
/// connection already.
async fn listen(monitor: &Monitor, addr: &Address) -> Result<Value, QmpError> {
    let vmm = monitor.vmm.clone();
    let bind_err = |e: std::io::Error| {
        QmpError::generic(format!("Failed to bind socket: {}", os_error_text(&e)))
    };
    enum L {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, String),
        Fd(OwnedFd),
    }
    let listener = match addr {
        Address::Tcp(host, port) => {
            let addrs = crate::block_commands::resolve(host, port, &Map::new())?;
            let a = addrs
                .first()
                .copied()
                .ok_or_else(|| QmpError::generic(format!("no address for {host}:{port}")))?;
            L::Tcp(tokio::net::TcpListener::bind(a).await.map_err(bind_err)?)
        }
        Address::Unix(path) => {
            let _ = crate::server::remove_socket(path.as_ref());
            L::Unix(
                tokio::net::UnixListener::bind(path).map_err(bind_err)?,
                path.clone(),
            )
        }
        Address::Fd(name) => L::Fd(monitor.fds.take(name)?),
    };
    tokio::spawn(async move {
        let accepted: std::io::Result<OwnedFd> = match listener {
            L::Tcp(l) => l.accept().await.and_then(|(s, _)| {
                s.set_nodelay(true)?;
                Ok(OwnedFd::from(s.into_std()?))
            }),
            L::Unix(l, path) => {
                let r = l
                    .accept()
                    .await
                    .and_then(|(s, _)| Ok(OwnedFd::from(s.into_std()?)));
                let _ = crate::server::remove_socket(path.as_ref());
                r
            }
            L::Fd(fd) => Ok(fd),
        };
        let result = match accepted {
            Ok(fd) => match set_blocking(&fd) {
                Ok(()) => match &vmm {
                    Some(vmm) => vmm
                        .call(VmmRequest::MigrateIn, &[fd.as_fd()])
                        .await
                        .map(drop),
                    None => Err(QmpError::generic("no guest")),
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(QmpError::generic(format!("accept: {e}"))),
        };
        if let Err(e) = result {
            tracing::error!("incoming migration: {}", e.desc);
        }
    });
    Ok(json!({}))
}

/// `query-migrate`, with the members each state shows (QMP_REFERENCE.md §6.3).
pub async fn query_migrate(monitor: &Monitor) -> Result<Value, QmpError> {
    if monitor.vmm.is_none() {
        return Ok(json!({}));
    }
    let info = query(monitor).await?;
    let Some(status) = info.status else {
        return Ok(json!({}));
    };
    let mut v = Map::new();
    v.insert("status".into(), status.as_qapi_str().into());
    let incoming = lock(&monitor.migration.incoming).is_some();
    let r = &info.ram;
    let ram = json!({
        "transferred": r.transferred,
        "remaining": r.remaining,
        "total": r.total,
        "duplicate": r.duplicate,
        "normal": r.normal,
        "normal-bytes": r.normal_bytes,
        "dirty-pages-rate": r.dirty_pages_rate,
        "mbps": r.mbps,
        "dirty-sync-count": r.dirty_sync_count,
        "postcopy-requests": 0,
        "page-size": 4096,
        "multifd-bytes": 0,
        "pages-per-second": r.pages_per_second,
        "precopy-bytes": r.precopy_bytes,
        "downtime-bytes": r.downtime_bytes,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    });
    match status {
        _ if incoming => {}
        MigrationStatus::Active | MigrationStatus::Device | MigrationStatus::Cancelling => {
            v.insert("setup-time".into(), info.setup_time.into());
            v.insert("total-time".into(), info.total_time.into());
            v.insert("expected-downtime".into(), info.expected_downtime.into());
            v.insert("ram".into(), ram);
        }
        MigrationStatus::Completed => {
            v.insert("setup-time".into(), info.setup_time.into());
            v.insert("total-time".into(), info.total_time.into());
            v.insert("downtime".into(), info.downtime.into());
            v.insert("ram".into(), ram);
        }
        _ => {}
    }
    if let Some(e) = info
        .error_desc
        .filter(|_| status == MigrationStatus::Failed)
    {
        v.insert("error-desc".into(), e.into());
    }
    Ok(Value::Object(v))
}

/// `migrate-set-parameters`, `migrate_set_speed` and `migrate_set_downtime`.
pub async fn set_parameters(
    monitor: &Monitor,
    name: &str,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut p = *lock(&monitor.migration.params);
    match name {
        "migrate_set_speed" => {
            // The seed era clamps a negative speed to 0.
            p.max_bandwidth = args
                .get("value")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .max(0) as u64;
        }
        "migrate_set_downtime" => {
            let secs = args.get("value").and_then(Value::as_f64).unwrap_or(0.0);
            let ms = secs * 1000.0;
            if !(0.0..=MAX_DOWNTIME_MS as f64).contains(&ms) {
                return Err(QmpError::generic(DOWNTIME_RANGE));
            }
            p.downtime_limit = ms as u64;
        }
        _ => {
            if let Some(v) = args.get("downtime-limit").and_then(Value::as_u64) {
                if v > MAX_DOWNTIME_MS {
                    return Err(QmpError::generic(DOWNTIME_RANGE));
                }
                p.downtime_limit = v;
            }
            if let Some(v) = args.get("max-bandwidth").and_then(Value::as_u64) {
                p.max_bandwidth = v;
            }
            if let Some(v) = args
                .get("avail-switchover-bandwidth")
                .and_then(Value::as_u64)
            {
                p.avail_switchover_bandwidth = v;
            }
        }
    }
    *lock(&monitor.migration.params) = p;
    if let Some(vmm) = &monitor.vmm {
        vmm.call(VmmRequest::MigrateSetParams(p), &[]).await?;
    }
    Ok(json!({}))
}

/// `query-migrate-parameters` (the parameters splitvmm has).
pub fn query_parameters(monitor: &Monitor) -> Value {
    let p = *lock(&monitor.migration.params);
    json!({
        "downtime-limit": p.downtime_limit,
        "max-bandwidth": p.max_bandwidth,
        "avail-switchover-bandwidth": p.avail_switchover_bandwidth,
    })
}

/// `migrate-set-capabilities` (only `events`).
pub async fn set_capabilities(
    monitor: &Monitor,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    if monitor.vmm.is_some()
        && query(monitor)
            .await?
            .status
            .is_some_and(MigrationStatus::in_progress)
    {
        return Err(QmpError::generic("There's a migration process in progress"));
    }
    for cap in args
        .get("capabilities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if cap.get("capability").and_then(Value::as_str) == Some("events") {
            let on = cap.get("state").and_then(Value::as_bool).unwrap_or(false);
            monitor.migration.events.store(on, Ordering::Release);
        }
    }
    Ok(json!({}))
}

pub fn query_capabilities(monitor: &Monitor) -> Value {
    json!([{ "capability": "events", "state": monitor.migration.events_on() }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_qemu_reads_them() {
        assert_eq!(
            parse_uri("tcp:127.0.0.1:4444").expect("tcp"),
            Address::Tcp("127.0.0.1".into(), "4444".into())
        );
        assert_eq!(
            parse_uri("tcp:[::1]:4444").expect("tcp6"),
            Address::Tcp("[::1]".into(), "4444".into())
        );
        assert_eq!(
            parse_uri("unix:/tmp/m.sock").expect("unix"),
            Address::Unix("/tmp/m.sock".into())
        );
        assert_eq!(parse_uri("fd:mig").expect("fd"), Address::Fd("mig".into()));
        assert_eq!(
            parse_uri("gopher:x").expect_err("unknown").desc,
            "unknown migration protocol: gopher:x"
        );
        let both: Map<String, Value> =
            serde_json::from_value(json!({"uri": "tcp:a:1", "channels": []})).expect("json");
        assert_eq!(
            address(&both).expect_err("both").desc,
            "need either 'uri' or 'channels' argument"
        );
        let ch: Map<String, Value> = serde_json::from_value(json!({"channels": [{
            "channel-type": "main",
            "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "9"}
        }]}))
        .expect("json");
        assert_eq!(
            address(&ch).expect("channels"),
            Address::Tcp("h".into(), "9".into())
        );
        let ch: Map<String, Value> = serde_json::from_value(json!({"channels": [{
            "channel-type": "main",
            "addr": {"transport": "socket", "type": "fd", "str": "mig"}
        }]}))
        .expect("json");
        assert_eq!(address(&ch).expect("fd channel"), Address::Fd("mig".into()));
    }
}
