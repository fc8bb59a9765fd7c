//! The NBD server: named exports of [`BlockDevice`]s, served over listening sockets that
//! block-proc was handed (it creates none), with QEMU's `nbd-server-*` semantics for
//! adding, removing (`safe` / `hard`) and stopping, and a channel announcing when an
//! export is really gone (for `BLOCK_EXPORT_DELETED`).
//!
//! Protocol: fixed newstyle negotiation only (with `NBD_FLAG_NO_ZEROES`), no TLS
//! (`NBD_OPT_STARTTLS` → `NBD_REP_ERR_POLICY`), `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`,
//! `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` with the single
//! context `base:allocation`; anything else (including `NBD_OPT_EXTENDED_HEADERS`) gets
//! `NBD_REP_ERR_UNSUP`. Transmission: READ (sparse structured replies when negotiated),
//! WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE; +FAST_ZERO always fails quickly with
//! `ENOTSUP`, see [`transmission_flags`]), CACHE (no-op), BLOCK_STATUS, DISC.
//!
//! Defences against a hostile peer: option data is bounded ([`MAX_OPTION_LEN`]; longer
//! options are drained and refused with `NBD_REP_ERR_TOO_BIG`, absurd ones drop the
//! connection); negotiation must finish within a timeout; READ/WRITE payloads are bounded by
//! the advertised maximum block size (32 MiB; a longer WRITE drops the connection, since its
//! payload cannot be skipped cheaply); at most [`MAX_INFLIGHT`] requests and
//! [`INFLIGHT_BYTES`] of payload per connection are outstanding, a request's slot being
//! released only once its reply has been written, so a client that floods without reading
//! is stopped by TCP back-pressure; a wrong request magic drops the connection. Requests
//! run concurrently and are answered as they finish, each reply written whole by one writer
//! task, which sends every reply that is ready in one vectored write.
//!
//! Payloads and replies live in buffers the connection reuses ([`super::buffers`]); a READ
//! is read from the device straight into its reply, behind the reply's header.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::buffers::{Buf, BufPool};
use super::proto::*;
use crate::device::BlockDevice;

/// Default limit for a client to finish negotiation (QEMU's `handshake-max-seconds`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests outstanding per connection.
pub const MAX_INFLIGHT: usize = 32;
/// READ/WRITE payload bytes outstanding per connection.
pub const INFLIGHT_BYTES: usize = 2 * MAX_BLOCK as usize;
/// Longest option data processed; longer is refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest option data drained before refusing; longer drops the connection.
const OPTION_DRAIN_LIMIT: u32 = 1 << 20;
/// Most content chunks in one structured READ reply (the rest is sent as data).
const MAX_READ_SEGMENTS: usize = 1024;
/// Most descriptors in one BLOCK_STATUS reply.
const MAX_STATUS_DESCRIPTORS: usize = 1024;
/// Most `block_status` calls made for one BLOCK_STATUS request.
const MAX_STATUS_CALLS: usize = 256;
/// The id of `base:allocation` in `NBD_REP_META_CONTEXT` replies to SET.
pub const META_ID_BASE_ALLOCATION: u32 = 1;
/// Buffer sizes of a connection's reader and (while negotiating) writer.
const IO_BUFFER: usize = 64 << 10;
/// Most replies sent in one vectored write (well under `IOV_MAX`).
const MAX_WRITE_BATCH: usize = 64;

/// One export: a device under a name.
#[derive(Debug)]
pub struct Export<D> {
    pub name: String,
    pub description: Option<String>,
    pub device: Arc<D>,
    pub writable: bool,
}

/// How `remove_export` treats connected clients (QMP `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect the clients, then remove.
    Hard,
}

/// What `query-block-exports` needs to know of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    /// Clients that entered transmission on this export and have not finished.
    pub connections: usize,
    /// Removal was requested; the export goes away when its last client has.
    pub shutting_down: bool,
}

/// Server configuration (`nbd-server-start` arguments that are not the address).
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// Most simultaneous connections (0 = unlimited); beyond it a new connection is closed
    /// at once. 1 also withdraws `NBD_FLAG_CAN_MULTI_CONN`.
    pub max_connections: u32,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
}

impl Default for NbdServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Errors of the management operations, worded as QEMU words them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("NBD server not running")]
    NotRunning,
    #[error("NBD server already has export named '{0}'")]
    DuplicateExport(String),
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    #[error("Cannot export read-only node as writable")]
    ReadOnlyDevice,
    #[error("Export '{0}' is not found")]
    NotFound(String),
    #[error("export '{0}' still in use")]
    InUse(String),
    #[error("Export '{0}' is already shutting down")]
    ShuttingDown(String),
}

impl NbdError {
    /// QEMU's hint for the error, if it has one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            NbdError::InUse(_) => Some("Use mode='hard' to force client disconnect\n"),
            _ => None,
        }
    }
}

/// A listening socket handed to the server.
#[derive(Debug)]
pub enum NbdListener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl NbdListener {
    /// Wraps a listening socket of either family (found with `getsockname`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
        let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
        match addr.family() {
            Some(AddressFamily::Unix) => Ok(Self::Unix(fd.into())),
            Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(Self::Tcp(fd.into())),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NBD listener: unsupported socket family {other:?}"),
            )),
        }
    }

    fn into_tokio(self) -> io::Result<Listener> {
        Ok(match self {
            Self::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
            Self::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
        })
    }
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            Self::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// The NBD server. Create it with [`NbdServer::new`], add exports, and run
/// [`NbdServer::serve`] on one or more listeners.
pub struct NbdServer<D: BlockDevice> {
    config: NbdServerConfig,
    state: Mutex<State<D>>,
    stop_tx: watch::Sender<bool>,
    conn_count: watch::Sender<usize>,
    deleted: mpsc::UnboundedSender<String>,
}

struct State<D> {
    stopped: bool,
    exports: BTreeMap<String, ExportEntry<D>>,
    conns: HashMap<u64, ConnEntry>,
    next_conn: u64,
}

struct ExportEntry<D> {
    export: Export<D>,
    connections: usize,
    shutting_down: bool,
}

struct ConnEntry {
    export: Option<String>,
    kill: Arc<watch::Sender<bool>>,
}

impl<D: BlockDevice> fmt::Debug for NbdServer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("NbdServer")
            .field("config", &self.config)
            .field("stopped", &st.stopped)
            .field("exports", &st.exports.keys().collect::<Vec<_>>())
            .field("connections", &st.conns.len())
            .finish()
    }
}

/// What a client gets when it selects an export.
struct Selected<D> {
    name: String,
    description: Option<String>,
    device: Arc<D>,
    writable: bool,
    size: u64,
}

impl<D: BlockDevice> NbdServer<D> {
    /// A server with no exports, and the receiver of the names of exports that are gone
    /// (removed, and their last client disconnected): one message per export, the moment
    /// to emit `BLOCK_EXPORT_DELETED`.
    pub fn new(config: NbdServerConfig) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (deleted, rx) = mpsc::unbounded_channel();
        let server = Arc::new(Self {
            config,
            state: Mutex::new(State {
                stopped: false,
                exports: BTreeMap::new(),
                conns: HashMap::new(),
                next_conn: 0,
            }),
            stop_tx: watch::Sender::new(false),
            conn_count: watch::Sender::new(0),
            deleted,
        });
        (server, rx)
    }

    pub fn config(&self) -> &NbdServerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export. A writable export of a read-only device is refused.
    pub fn add_export(&self, export: Export<D>) -> Result<(), NbdError> {
        let mut st = self.lock();
        if st.stopped {
            return Err(NbdError::NotRunning);
        }
        if export.name.len() > MAX_STRING {
            return Err(NbdError::NameTooLong(export.name));
        }
        if let Some(d) = &export.description
            && d.len() > MAX_STRING
        {
            return Err(NbdError::DescriptionTooLong(d.clone()));
        }
        if export.writable && export.device.read_only() {
            return Err(NbdError::ReadOnlyDevice);
        }
        if st.exports.contains_key(&export.name) {
            return Err(NbdError::DuplicateExport(export.name));
        }
        st.exports.insert(
            export.name.clone(),
            ExportEntry {
                export,
                connections: 0,
                shutting_down: false,
            },
        );
        Ok(())
    }

    /// Removes an export (`nbd-server-remove` / `block-export-del`). New clients no longer
    /// see it at once. `Safe` refuses while clients are connected to it; `Hard` disconnects
    /// them (their requests already running on the device finish first). The export's
    /// name arrives on the deleted channel when it is really gone: before this returns if it
    /// had no clients, otherwise when the last one has finished; until then it is listed
    /// with `shutting_down`.
    pub fn remove_export(&self, name: &str, mode: RemoveMode) -> Result<(), NbdError> {
        let mut st = self.lock();
        let Some(entry) = st.exports.get_mut(name) else {
            return Err(NbdError::NotFound(name.to_owned()));
        };
        if entry.shutting_down {
            return Err(NbdError::ShuttingDown(name.to_owned()));
        }
        if mode == RemoveMode::Safe && entry.connections > 0 {
            return Err(NbdError::InUse(name.to_owned()));
        }
        entry.shutting_down = true;
        if entry.connections == 0 {
            st.exports.remove(name);
            self.announce_deleted(name);
        } else {
            for c in st.conns.values() {
                if c.export.as_deref() == Some(name) {
                    c.kill.send_replace(true);
                }
            }
        }
        Ok(())
    }

    fn announce_deleted(&self, name: &str) {
        tracing::debug!("NBD export '{name}' deleted");
        // Nobody listening is fine.
        let _ = self.deleted.send(name.to_owned());
    }

    /// The exports, including those shutting down, by name.
    pub fn exports(&self) -> Vec<ExportInfo> {
        self.lock()
            .exports
            .values()
            .map(|e| ExportInfo {
                name: e.export.name.clone(),
                description: e.export.description.clone(),
                writable: e.export.writable,
                connections: e.connections,
                shutting_down: e.shutting_down,
            })
            .collect()
    }

    /// Open connections, negotiating or transmitting.
    pub fn connection_count(&self) -> usize {
        *self.conn_count.borrow()
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Accepts connections on `listener` until [`stop`](Self::stop); each is served by its
    /// own tasks (spawned on the current tokio runtime, which must have I/O and time
    /// enabled). Returns at once if the server is stopped; an error only if the listener
    /// cannot be used at all.
    pub async fn serve(self: &Arc<Self>, listener: NbdListener) -> io::Result<()> {
        let listener = listener.into_tokio()?;
        let mut stop = self.stop_tx.subscribe();
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            let accepted = tokio::select! {
                r = listener.accept() => r,
                r = stop.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            };
            match accepted {
                Ok(stream) => self.start_connection(stream),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => {
                        return Err(e);
                    }
                    _ => {
                        // EMFILE, ECONNABORTED, ENOBUFS...: wait a little, go on.
                        tracing::warn!("NBD accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Stops the server (`nbd-server-stop`): no more accepting, every client disconnected,
    /// every export removed (each announced on the deleted channel when gone). Returns once
    /// all connections have ended.
    pub async fn stop(&self) {
        {
            let mut st = self.lock();
            st.stopped = true;
            self.stop_tx.send_replace(true);
            for c in st.conns.values() {
                c.kill.send_replace(true);
            }
            let names: Vec<String> = st.exports.keys().cloned().collect();
            for name in names {
                let Some(e) = st.exports.get_mut(&name) else {
                    continue;
                };
                if e.connections == 0 {
                    st.exports.remove(&name);
                    self.announce_deleted(&name);
                } else {
                    e.shutting_down = true;
                }
            }
        }
        let mut count = self.conn_count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Serves one client already connected over any byte stream (`r` from the client, `w`
    /// to it) and returns when the connection has ended, exactly as a client accepted by
    /// [`serve`](Self::serve) is served (limits, negotiation timeout, removal and stop
    /// apply). Must run on a tokio runtime with time enabled. For the fuzzer, which talks to
    /// the server over an in-memory pipe; a connection over the limit, or to a stopped
    /// server, is dropped at once.
    pub async fn serve_stream<R, W>(self: &Arc<Self>, r: R, w: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Some((id, kill)) = self.register() else {
            return;
        };
        let guard = ConnGuard {
            server: self.clone(),
            id,
        };
        run_connection(guard, kill, r, w).await;
    }

    fn start_connection(self: &Arc<Self>, stream: Stream) {
        let Some((id, kill)) = self.register() else {
            tracing::debug!("NBD: connection refused (limit or stopped)");
            return; // dropping the stream closes it
        };
        let guard = ConnGuard {
            server: self.clone(),
            id,
        };
        match stream {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                tokio::spawn(run_connection(guard, kill, r, w));
            }
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                tokio::spawn(run_connection(guard, kill, r, w));
            }
        }
    }

    fn register(&self) -> Option<(u64, Arc<watch::Sender<bool>>)> {
        let mut st = self.lock();
        if st.stopped {
            return None;
        }
        let max = self.config.max_connections as usize;
        if max != 0 && st.conns.len() >= max {
            return None;
        }
        let id = st.next_conn;
        st.next_conn += 1;
        let kill = Arc::new(watch::Sender::new(false));
        st.conns.insert(
            id,
            ConnEntry {
                export: None,
                kill: kill.clone(),
            },
        );
        self.conn_count.send_replace(st.conns.len());
        Some((id, kill))
    }

    fn unregister(&self, id: u64) {
        let mut st = self.lock();
        if let Some(c) = st.conns.remove(&id)
            && let Some(name) = c.export
            && let Some(e) = st.exports.get_mut(&name)
        {
            e.connections = e.connections.saturating_sub(1);
            if e.shutting_down && e.connections == 0 {
                st.exports.remove(&name);
                self.announce_deleted(&name);
            }
        }
        self.conn_count.send_replace(st.conns.len());
    }

    /// The export `name` if it is available to new clients; with `attach`, the connection
    /// `id` becomes one of its clients.
    fn select(&self, id: u64, name: &[u8], attach: bool) -> Option<Selected<D>> {
        let name = std::str::from_utf8(name).ok()?;
        let mut st = self.lock();
        let st = &mut *st;
        let entry = st.exports.get_mut(name)?;
        if entry.shutting_down {
            return None;
        }
        if attach {
            let conn = st.conns.get_mut(&id)?;
            if conn.export.is_some() {
                return None;
            }
            conn.export = Some(name.to_owned());
            entry.connections += 1;
        }
        let e = &entry.export;
        Some(Selected {
            name: e.name.clone(),
            description: e.description.clone(),
            device: e.device.clone(),
            writable: e.writable,
            size: e.device.size() & !511,
        })
    }

    fn multi_conn(&self) -> bool {
        self.config.max_connections != 1
    }
}

/// The transmission flags of an export for one client, as QEMU sets them: always
/// `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE`; `CAN_MULTI_CONN` unless the server
/// allows a single connection (safe: every acknowledged write is in the kernel and FLUSH is
/// device-wide); read-only → `READ_ONLY`; writable → `SEND_TRIM | SEND_WRITE_ZEROES |
/// SEND_FAST_ZERO`; with structured replies `SEND_DF`.
///
/// `SEND_FAST_ZERO` is advertised but every `NBD_CMD_FLAG_FAST_ZERO` request fails at once
/// with `ENOTSUP`, leaving the export untouched, as the specification permits: the
/// `BlockDevice` interface cannot tell whether zeroing a range would be faster than writing
/// it, and a wrong "yes" is what the flag exists to avoid. Clients (qemu-img convert) then
/// zero explicitly only where needed.
pub fn transmission_flags(writable: bool, structured: bool, multi_conn: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if multi_conn {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if writable {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Keeps a connection registered; dropping it unregisters (and may complete a removal).
struct ConnGuard<D: BlockDevice> {
    server: Arc<NbdServer<D>>,
    id: u64,
}

impl<D: BlockDevice> Drop for ConnGuard<D> {
    fn drop(&mut self) {
        self.server.unregister(self.id);
    }
}

/// Completes when the connection is told to close (or its controller is gone).
async fn killed(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn run_connection<D, R, W>(guard: ConnGuard<D>, kill_tx: Arc<watch::Sender<bool>>, r: R, w: W)
where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut kill = kill_tx.subscribe();
    let mut reader = BufReader::with_capacity(IO_BUFFER, r);
    let mut writer = BufWriter::with_capacity(IO_BUFFER, w);
    let server = guard.server.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(
            server.config.handshake_timeout,
            negotiate(&server, guard.id, &mut reader, &mut writer),
        ) => r,
        _ = killed(&mut kill) => return,
    };
    let session = match negotiated {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!("NBD negotiation failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("NBD negotiation timed out");
            return;
        }
    };
    drop(server);
    // Negotiation flushed every reply it wrote; replies are written unbuffered from here.
    if writer.flush().await.is_err() {
        return;
    }
    transmission(session, reader, writer.into_inner(), kill_tx, kill).await;
    drop(guard);
}

/// A client that entered transmission.
struct Session<D> {
    name: String,
    device: Arc<D>,
    size: u64,
    writable: bool,
    structured: bool,
    base_allocation: bool,
}

/// Queued option replies, written and flushed together.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}

fn put_error_reply(out: &mut Vec<u8>, opt: u32, reply: u32, msg: &str) {
    put_option_reply(out, opt, reply, truncate_utf8(msg, MAX_STRING).as_bytes());
}

/// Reads and discards `len` bytes.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let n = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = r.u16()?;
    let mut reqs = Vec::with_capacity(usize::from(n).min(r.remaining() / 2));
    for _ in 0..n {
        reqs.push(r.u16()?);
    }
    r.is_empty().then_some((name, reqs))
}

fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = usize::try_from(r.u32()?).ok()?;
    if n > r.remaining() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(r.string32()?);
    }
    r.is_empty().then_some((name, queries))
}

/// Whether a query selects `base:allocation`: its exact name, or (for LIST only) the
/// namespace wildcard `base:`. Queries of other namespaces, unknown leaf names and
/// malformed queries select nothing.
fn query_selects_base_allocation(query: &[u8], list: bool) -> bool {
    query == BASE_ALLOCATION.as_bytes() || (list && query == b"base:")
}

fn put_info_replies<D>(out: &mut Vec<u8>, opt: u32, sel: &Selected<D>, reqs: &[u16], flags: u16) {
    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(sel.name.as_bytes());
        put_option_reply(out, opt, REP_INFO, &d);
    }
    if reqs.contains(&INFO_DESCRIPTION)
        && let Some(desc) = &sel.description
    {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(desc.as_bytes());
        put_option_reply(out, opt, REP_INFO, &d);
    }
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&MAX_BLOCK.to_be_bytes());
    put_option_reply(out, opt, REP_INFO, &d);
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&sel.size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    put_option_reply(out, opt, REP_INFO, &d);
    put_option_reply(out, opt, REP_ACK, &[]);
}

/// The handshake. `Ok(None)`: the connection is to be closed (client aborted, or broke a
/// rule for which the specification has the server disconnect).
async fn negotiate<D, R, W>(
    server: &NbdServer<D>,
    id: u64,
    r: &mut R,
    w: &mut W,
) -> io::Result<Option<Session<D>>>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(w, &hello).await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!("NBD: unknown client flags {client_flags:#x}");
        return Ok(None);
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export named in the last SET_META_CONTEXT, and whether it selected base:allocation.
    let mut meta: Option<(Vec<u8>, bool)> = None;

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hdr).await?;
        let Some((opt, len)) = decode_option_header(&hdr) else {
            tracing::debug!("NBD: bad option magic");
            return Ok(None);
        };
        if !fixed && opt != OPT_EXPORT_NAME {
            return Ok(None);
        }
        let mut out = Vec::new();
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > OPTION_DRAIN_LIMIT {
                tracing::debug!("NBD: {} of {len} bytes, disconnecting", option_name(opt));
                return Ok(None);
            }
            drain(r, u64::from(len)).await?;
            put_error_reply(&mut out, opt, REP_ERR_TOO_BIG, "option too long");
            send(w, &out).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            OPT_EXPORT_NAME => {
                let Some(sel) = server.select(id, &data, true) else {
                    tracing::debug!("NBD: NBD_OPT_EXPORT_NAME of an unknown export");
                    return Ok(None);
                };
                let flags = transmission_flags(sel.writable, structured, server.multi_conn());
                out.extend_from_slice(&sel.size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &out).await?;
                return Ok(Some(session(sel, structured, &meta)));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, opt, REP_ACK, &[]);
                // The client may already have gone.
                let _ = send(w, &out).await;
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    put_error_reply(&mut out, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for e in server.exports().iter().filter(|e| !e.shutting_down) {
                        let mut d = Vec::with_capacity(4 + e.name.len());
                        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        d.extend_from_slice(e.name.as_bytes());
                        if let Some(desc) = &e.description {
                            d.extend_from_slice(desc.as_bytes());
                        }
                        put_option_reply(&mut out, opt, REP_SERVER, &d);
                    }
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                }
            }
            OPT_STARTTLS => {
                if len != 0 {
                    put_error_reply(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    );
                } else {
                    put_error_reply(&mut out, opt, REP_ERR_POLICY, "TLS not configured");
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => put_error_reply(&mut out, opt, REP_ERR_INVALID, "malformed request"),
                Some((name, reqs)) => match server.select(id, name, opt == OPT_GO) {
                    None => put_error_reply(
                        &mut out,
                        opt,
                        REP_ERR_UNKNOWN,
                        &format!("export '{}' not present", String::from_utf8_lossy(name)),
                    ),
                    Some(sel) => {
                        let flags =
                            transmission_flags(sel.writable, structured, server.multi_conn());
                        put_info_replies(&mut out, opt, &sel, &reqs, flags);
                        send(w, &out).await?;
                        if opt == OPT_GO {
                            return Ok(Some(session(sel, structured, &meta)));
                        }
                        continue;
                    }
                },
            },
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    put_error_reply(&mut out, opt, REP_ERR_INVALID, "option takes no data");
                } else if structured {
                    put_error_reply(&mut out, opt, REP_ERR_INVALID, "already negotiated");
                } else {
                    structured = true;
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = opt == OPT_LIST_META_CONTEXT;
                if !list {
                    // SET replaces the previous selection, even when it fails.
                    meta = None;
                }
                if !structured {
                    put_error_reply(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        "structured replies not negotiated",
                    );
                } else {
                    match parse_meta_request(&data) {
                        None => {
                            put_error_reply(&mut out, opt, REP_ERR_INVALID, "malformed request")
                        }
                        Some((name, queries)) => {
                            if server.select(id, name, false).is_none() {
                                put_error_reply(
                                    &mut out,
                                    opt,
                                    REP_ERR_UNKNOWN,
                                    &format!(
                                        "export '{}' not present",
                                        String::from_utf8_lossy(name)
                                    ),
                                );
                            } else {
                                let selected = if queries.is_empty() {
                                    // LIST: everything; SET: nothing.
                                    list
                                } else {
                                    queries
                                        .iter()
                                        .any(|q| query_selects_base_allocation(q, list))
                                };
                                if selected {
                                    let id = if list { 0 } else { META_ID_BASE_ALLOCATION };
                                    let mut d = id.to_be_bytes().to_vec();
                                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                    put_option_reply(&mut out, opt, REP_META_CONTEXT, &d);
                                }
                                put_option_reply(&mut out, opt, REP_ACK, &[]);
                                if !list {
                                    meta = Some((name.to_vec(), selected));
                                }
                            }
                        }
                    }
                }
            }
            _ => {
                tracing::debug!("NBD: unsupported option {opt} ({})", option_name(opt));
                put_error_reply(&mut out, opt, REP_ERR_UNSUP, "option not supported");
            }
        }
        send(w, &out).await?;
    }
}

fn session<D>(sel: Selected<D>, structured: bool, meta: &Option<(Vec<u8>, bool)>) -> Session<D> {
    let base_allocation =
        structured && matches!(meta, Some((name, true)) if name.as_slice() == sel.name.as_bytes());
    Session {
        name: sel.name,
        device: sel.device,
        size: sel.size,
        writable: sel.writable,
        structured,
        base_allocation,
    }
}

// ---------------------------------------------------------------------------------------
// Transmission.

/// A reply ready to write, holding the request's slots until it is written.
struct Outgoing {
    buf: Buf,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Why a request is refused before it runs.
enum Reject {
    Error(u32, &'static str),
    Disconnect(&'static str),
}

struct Ctx<D> {
    device: Arc<D>,
    size: u64,
    writable: bool,
    structured: bool,
    base_allocation: bool,
    pool: Arc<BufPool>,
}

impl<D: BlockDevice> Ctx<D> {
    /// Validates a request (other than DISC) against the specification and the export.
    fn check(&self, req: &Request) -> Result<(), Reject> {
        let allowed = match req.kind {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err(Reject::Error(EINVAL, "unknown command")),
        };
        if req.length > MAX_BLOCK {
            if req.kind == CMD_WRITE {
                return Err(Reject::Disconnect(
                    "WRITE payload over the maximum block size",
                ));
            }
            if req.kind == CMD_READ {
                return Err(Reject::Error(EINVAL, "length over the maximum block size"));
            }
        }
        if req.flags & !allowed != 0 {
            return Err(Reject::Error(EINVAL, "invalid command flags"));
        }
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && !self.writable {
            return Err(Reject::Error(EPERM, "export is read-only"));
        }
        if req.kind != CMD_FLUSH {
            let end = req.offset.checked_add(u64::from(req.length));
            if end.is_none_or(|e| e > self.size) {
                let err = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                    ENOSPC
                } else {
                    EINVAL
                };
                return Err(Reject::Error(err, "request past the end of the export"));
            }
        }
        if req.kind == CMD_BLOCK_STATUS {
            if !self.base_allocation {
                return Err(Reject::Error(EINVAL, "no metadata context negotiated"));
            }
            if req.length == 0 {
                return Err(Reject::Error(EINVAL, "empty block status request"));
            }
        }
        Ok(())
    }

    /// The error reply to `req`, in `b` (whose content it replaces).
    fn error_reply(&self, mut b: Buf, req: &Request, err: u32, msg: &str) -> Buf {
        b.clear();
        if self.structured {
            put_error_chunk(&mut b, req.cookie, err, msg);
        } else {
            put_simple_reply(&mut b, err, req.cookie);
        }
        b
    }

    /// The reply to `req` that carries no data, in `b` (whose content it replaces).
    fn result_reply(&self, mut b: Buf, req: &Request, res: io::Result<()>) -> Buf {
        match res {
            Ok(()) => {
                b.clear();
                put_simple_reply(&mut b, 0, req.cookie);
                b
            }
            Err(e) => {
                tracing::debug!("NBD {} failed: {e}", command_name(req.kind));
                self.error_reply(b, req, errno_to_nbd(&e), &e.to_string())
            }
        }
    }

    /// Runs `req` (with its WRITE payload in `buf`) and returns its reply, in `buf`.
    async fn execute(&self, req: Request, buf: Buf) -> Buf {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (off, len) = (req.offset, u64::from(req.length));
        let d = &*self.device;
        let res = match req.kind {
            CMD_READ => return self.read(&req, buf).await,
            CMD_BLOCK_STATUS => return self.block_status(&req, buf).await,
            CMD_WRITE if len == 0 => Ok(()),
            CMD_WRITE => d.write(buf.as_slice(), off, fua).await,
            CMD_FLUSH => d.flush().await,
            CMD_CACHE => Ok(()),
            CMD_TRIM | CMD_WRITE_ZEROES if len == 0 => Ok(()),
            CMD_TRIM => match d.discard(off, len).await {
                Ok(()) if fua => d.flush().await,
                r => r,
            },
            CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
                return self.error_reply(buf, &req, ENOTSUP, "fast zeroing is not available");
            }
            CMD_WRITE_ZEROES => {
                let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                match d.write_zeroes(off, len, may_unmap).await {
                    Ok(()) if fua => d.flush().await,
                    r => r,
                }
            }
            _ => return self.error_reply(buf, &req, EINVAL, "unknown command"),
        };
        self.result_reply(buf, &req, res)
    }

    /// The reply to a READ, in `b` (whose content it replaces): the data is read from the
    /// device straight into the reply.
    async fn read(&self, req: &Request, mut b: Buf) -> Buf {
        let len = req.length as usize;
        let d = &*self.device;
        b.clear();
        if !self.structured {
            b.reserve(SIMPLE_REPLY_LEN + len);
            put_simple_reply(&mut b, 0, req.cookie);
            if len > 0
                && let Err(e) = d.read(b.append(len), req.offset).await
            {
                return self.result_reply(b, req, Err(e));
            }
            return b;
        }
        if len == 0 {
            put_chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return b;
        }
        let segments = if req.flags & CMD_FLAG_DF != 0 {
            vec![(req.offset, req.length, false)]
        } else {
            self.read_plan(req.offset, req.length).await
        };
        let data: usize = segments
            .iter()
            .filter(|s| !s.2)
            .map(|s| s.1 as usize + 8)
            .sum();
        b.reserve(data + segments.len() * (CHUNK_HEADER_LEN + 12));
        let last = segments.len().saturating_sub(1);
        for (i, &(off, n, hole)) in segments.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if hole {
                put_chunk_header(&mut b, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
                b.put(&off.to_be_bytes());
                b.put(&n.to_be_bytes());
            } else {
                put_chunk_header(&mut b, flags, REPLY_TYPE_OFFSET_DATA, req.cookie, n + 8);
                b.put(&off.to_be_bytes());
                if let Err(e) = d.read(b.append(n as usize), off).await {
                    return self.result_reply(b, req, Err(e));
                }
            }
        }
        b
    }

    /// Splits a read into data and hole segments by the allocation map (at most
    /// [`MAX_READ_SEGMENTS`]; whatever the map does not cover, or covers too finely, is
    /// data).
    async fn read_plan(&self, offset: u64, length: u32) -> Vec<(u64, u32, bool)> {
        let end = offset + u64::from(length);
        fn push(segs: &mut Vec<(u64, u32, bool)>, off: u64, n: u64, hole: bool) {
            // n <= length <= MAX_BLOCK, so it fits.
            let n = n as u32;
            match segs.last_mut() {
                Some(last) if last.2 == hole => last.1 += n,
                _ => segs.push((off, n, hole)),
            }
        }
        let mut segs: Vec<(u64, u32, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end && segs.len() < MAX_READ_SEGMENTS {
            let Ok(extents) = self.device.block_status(pos, end - pos).await else {
                break;
            };
            let before = pos;
            for e in extents {
                let n = e.length.min(end - pos);
                if n == 0 {
                    continue;
                }
                push(&mut segs, pos, n, e.zero);
                pos += n;
                if pos >= end || segs.len() >= MAX_READ_SEGMENTS {
                    break;
                }
            }
            if pos == before {
                break;
            }
        }
        if pos < end {
            push(&mut segs, pos, end - pos, false);
        }
        segs
    }

    /// The reply to a BLOCK_STATUS, in `b` (whose content it replaces).
    async fn block_status(&self, req: &Request, mut b: Buf) -> Buf {
        let end = req.offset + u64::from(req.length);
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_STATUS_DESCRIPTORS
        };
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        let mut calls = 0;
        'outer: while pos < end && calls < MAX_STATUS_CALLS {
            calls += 1;
            let extents = match self.device.block_status(pos, end - pos).await {
                Ok(e) => e,
                Err(e) if descs.is_empty() => return self.result_reply(b, req, Err(e)),
                Err(_) => break,
            };
            let before = pos;
            for e in extents {
                let n = e.length.min(end - pos);
                if n == 0 {
                    continue;
                }
                let flags =
                    if e.data { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
                // n <= request length, and merged runs never exceed it either.
                let n = n as u32;
                match descs.last_mut() {
                    Some(last) if last.1 == flags => last.0 += n,
                    _ => {
                        if descs.len() == max {
                            break 'outer;
                        }
                        descs.push((n, flags));
                    }
                }
                pos += u64::from(n);
                if pos >= end {
                    break;
                }
            }
            if pos == before {
                break;
            }
        }
        if descs.is_empty() {
            // Nothing known: status 0 ("allocated, contents unknown") is always true.
            descs.push((req.length, 0));
        }
        b.clear();
        put_chunk_header(
            &mut b,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            4 + 8 * descs.len() as u32,
        );
        b.put(&META_ID_BASE_ALLOCATION.to_be_bytes());
        for (n, flags) in descs {
            b.put(&n.to_be_bytes());
            b.put(&flags.to_be_bytes());
        }
        b
    }
}

/// How the request loop ended.
#[derive(Debug)]
enum End {
    /// NBD_CMD_DISC or end of input: finish what is in flight, send its replies.
    Graceful,
    /// Told to close, a broken request stream, or the writer failed: stop at once.
    Abrupt,
}

async fn transmission<D, R, W>(
    s: Session<D>,
    mut reader: BufReader<R>,
    writer: W,
    kill_tx: Arc<watch::Sender<bool>>,
    mut kill: watch::Receiver<bool>,
) where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(
        "NBD client on '{}' (structured {}, base:allocation {})",
        s.name,
        s.structured,
        s.base_allocation
    );
    let ctx = Arc::new(Ctx {
        device: s.device,
        size: s.size,
        writable: s.writable,
        structured: s.structured,
        base_allocation: s.base_allocation,
        pool: Arc::default(),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer_task = tokio::spawn(write_replies(writer, rx, kill_tx, ctx.pool.clone()));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let bytes = Arc::new(Semaphore::new(INFLIGHT_BYTES));
    let mut jobs = JoinSet::new();

    let end = loop {
        while jobs.try_join_next().is_some() {}
        let slot = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = killed(&mut kill) => break End::Abrupt,
        };
        let Ok(slot) = slot else { break End::Abrupt };
        let mut hdr = [0u8; REQUEST_LEN];
        tokio::select! {
            r = reader.read_exact(&mut hdr) => if r.is_err() { break End::Graceful },
            _ = killed(&mut kill) => break End::Abrupt,
        }
        let Some(req) = Request::decode(&hdr) else {
            tracing::debug!("NBD: bad request magic, disconnecting");
            break End::Abrupt;
        };
        if req.kind == CMD_DISC {
            break End::Graceful;
        }
        match ctx.check(&req) {
            Ok(()) => {
                let payload_len = match req.kind {
                    CMD_READ | CMD_WRITE => req.length,
                    _ => 0,
                };
                let byte_permit = if payload_len > 0 {
                    tokio::select! {
                        p = bytes.clone().acquire_many_owned(payload_len) => match p {
                            Ok(p) => Some(p),
                            Err(_) => break End::Abrupt,
                        },
                        _ = killed(&mut kill) => break End::Abrupt,
                    }
                } else {
                    None
                };
                let mut buf = ctx.pool.take();
                if req.kind == CMD_WRITE && req.length > 0 {
                    let payload = buf.append(req.length as usize);
                    tokio::select! {
                        r = reader.read_exact(payload) => if r.is_err() { break End::Abrupt },
                        _ = killed(&mut kill) => break End::Abrupt,
                    }
                }
                let (ctx, tx) = (ctx.clone(), tx.clone());
                jobs.spawn(async move {
                    let buf = ctx.execute(req, buf).await;
                    let _ = tx.send(Outgoing {
                        buf,
                        _slot: slot,
                        _bytes: byte_permit,
                    });
                });
            }
            Err(Reject::Error(err, msg)) => {
                tracing::debug!("NBD {} refused: {msg}", command_name(req.kind));
                if req.kind == CMD_WRITE {
                    tokio::select! {
                        r = drain(&mut reader, u64::from(req.length)) => if r.is_err() { break End::Abrupt },
                        _ = killed(&mut kill) => break End::Abrupt,
                    }
                }
                let _ = tx.send(Outgoing {
                    buf: ctx.error_reply(ctx.pool.take(), &req, err, msg),
                    _slot: slot,
                    _bytes: None,
                });
            }
            Err(Reject::Disconnect(msg)) => {
                tracing::debug!("NBD {}: {msg}, disconnecting", command_name(req.kind));
                break End::Abrupt;
            }
        }
    };
    drop(reader);
    if let End::Graceful = end {
        let finish = async {
            while jobs.join_next().await.is_some() {}
            drop(tx);
            let _ = (&mut writer_task).await;
        };
        tokio::select! {
            _ = finish => {}
            _ = killed(&mut kill) => {}
        }
    }
    writer_task.abort();
    // Requests already running on the device finish before the connection counts as gone.
    while jobs.join_next().await.is_some() {}
}

/// Writes replies as they come, every reply that is ready in one vectored write, and gives
/// their buffers back to the pool. A write error closes the connection.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    kill: Arc<watch::Sender<bool>>,
    pool: Arc<BufPool>,
) {
    let res: io::Result<()> = async {
        let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_WRITE_BATCH);
        while let Some(o) = rx.recv().await {
            batch.push(o);
            while batch.len() < MAX_WRITE_BATCH
                && let Ok(o) = rx.try_recv()
            {
                batch.push(o);
            }
            write_all_vectored(&mut w, &batch).await?;
            for o in batch.drain(..) {
                pool.give(o.buf);
            }
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        tracing::debug!("NBD: writing replies failed: {e}");
        kill.send_replace(true);
    }
}

/// Writes the replies of `batch` in order, in as few vectored writes as the socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Outgoing],
) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = batch
        .iter()
        .filter(|o| !o.buf.is_empty())
        .map(|o| io::IoSlice::new(o.buf.as_slice()))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
