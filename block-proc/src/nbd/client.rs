//! The NBD client: a remote export used as a [`BlockDevice`] (for `blockdev-add
//! driver=nbd`, e.g. a mirror target), over a stream that is already connected (block-proc
//! creates no sockets).
//!
//! Negotiation: fixed newstyle (non-fixed servers get `NBD_OPT_EXPORT_NAME` directly),
//! `NBD_OPT_STRUCTURED_REPLY` if the server takes it, then `NBD_OPT_SET_META_CONTEXT
//! base:allocation`, then `NBD_OPT_GO` asking for the block sizes (falling back to
//! `NBD_OPT_EXPORT_NAME` if GO is unsupported). Transmission: many requests in flight at
//! once (callers may call concurrently; at most [`MAX_INFLIGHT`] requests and
//! [`INFLIGHT_BYTES`] of payload), one task reading the replies and handing each to its
//! caller by cookie. Every length the server sends is checked before anything is allocated;
//! a server breaking the protocol closes the connection and fails every request.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

use super::proto::*;
use crate::device::{BlockDevice, Extent};

/// Requests in flight at once.
pub const MAX_INFLIGHT: usize = 16;
/// READ/WRITE payload bytes in flight at once.
pub const INFLIGHT_BYTES: usize = 2 * MAX_BLOCK as usize;
/// Longest option reply accepted during negotiation.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Longest BLOCK_STATUS chunk accepted (8 bytes per extent).
const MAX_STATUS_CHUNK: u32 = 1 << 20;
/// Longest error chunk accepted.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;
/// Most disjoint pieces a READ reply may be assembled from before it counts as abuse.
const MAX_READ_PIECES: usize = 4096;
/// Largest TRIM / BLOCK_STATUS request (their length is not a payload).
const MAX_NO_PAYLOAD_LEN: u64 = 1 << 30;
/// Buffer of zeroes used when the server cannot write zeroes itself.
const ZERO_BUF: usize = 1 << 20;

/// What negotiation established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientInfo {
    pub export: String,
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// The server's maximum block size (READ/WRITE/WRITE_ZEROES are split to it, and to
    /// 32 MiB at most).
    pub max_block: u32,
    pub structured: bool,
    /// `base:allocation` was negotiated: `block_status` asks the server.
    pub base_allocation: bool,
}

/// A connected NBD client. Dropping it closes the connection (hard disconnect); use
/// [`disconnect`](Self::disconnect) for the polite one.
pub struct NbdClient {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Shared {
    info: NbdClientInfo,
    meta_id: Option<u32>,
    /// Largest READ/WRITE/WRITE_ZEROES length sent.
    max_io: u32,
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<Pending>,
    slots: Semaphore,
    bytes: Semaphore,
    next_cookie: AtomicU64,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Waiter {
    kind: Kind,
    tx: oneshot::Sender<io::Result<Answer>>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read { offset: u64, len: u32 },
    Status { len: u32 },
    Plain,
}

enum Answer {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

fn protocol_error(msg: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD server: {msg}"))
}

fn closed_error(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("NBD connection closed: {reason}"),
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kind_of(&self, cookie: u64) -> Option<Kind> {
        self.lock().waiters.get(&cookie).map(|w| w.kind)
    }

    fn complete(&self, cookie: u64, result: io::Result<Answer>) {
        if let Some(w) = self.lock().waiters.remove(&cookie) {
            // The caller may have given up waiting.
            let _ = w.tx.send(result);
        }
    }

    /// Marks the connection unusable and fails every waiting request.
    fn fail(&self, reason: String) {
        let mut p = self.lock();
        if p.dead.is_none() {
            p.dead = Some(reason);
        }
        let reason = p.dead.clone().unwrap_or_default();
        for (_, w) in p.waiters.drain() {
            let _ = w.tx.send(Err(closed_error(&reason)));
        }
    }
}

/// Marks the connection broken if a request is abandoned half-written.
struct SendGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .fail("a request was cancelled while being sent".into());
        }
    }
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    put_option(&mut buf, opt, data);
    w.write_all(&buf).await?;
    w.flush().await
}

/// One option reply: (reply type, data).
async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    opt: u32,
) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let mut rd = Reader::new(&h);
    let (magic, echo, reply, len) = (
        rd.u64().unwrap_or(0),
        rd.u32().unwrap_or(0),
        rd.u32().unwrap_or(0),
        rd.u32().unwrap_or(0),
    );
    if magic != OPTION_REPLY_MAGIC {
        return Err(protocol_error("bad option reply magic"));
    }
    if echo != opt {
        return Err(protocol_error(format!(
            "reply to option {echo} while {} was asked",
            option_name(opt)
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(protocol_error(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok((reply, data))
}

fn option_error(opt: u32, reply: u32, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let kind = match reply {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_POLICY | REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
        REP_ERR_UNSUP => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!(
            "NBD server refused {} ({reply:#x}): {msg}",
            option_name(opt)
        ),
    )
}

struct Negotiated {
    size: u64,
    flags: u16,
    block: Option<(u32, u32, u32)>,
    structured: bool,
    meta_id: Option<u32>,
}

async fn export_name<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    no_zeroes: bool,
) -> io::Result<(u64, u16)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let size = r.read_u64().await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("NBD server closed the connection: no export '{export}'?"),
            )
        } else {
            e
        }
    })?;
    let flags = r.read_u16().await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        r.read_exact(&mut zeroes).await?;
    }
    Ok((size, flags))
}

async fn handshake<R, W>(r: &mut R, w: &mut W, export: &str) -> io::Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if export.len() > MAX_STRING {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NBD export name too long",
        ));
    }
    if r.read_u64().await? != NBDMAGIC {
        return Err(protocol_error("not an NBD server"));
    }
    match r.read_u64().await? {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(protocol_error("oldstyle negotiation is not supported")),
        _ => return Err(protocol_error("bad negotiation magic")),
    }
    let hflags = r.read_u16().await?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0u32;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await?;
    w.flush().await?;

    let mut n = Negotiated {
        size: 0,
        flags: 0,
        block: None,
        structured: false,
        meta_id: None,
    };
    if !fixed {
        (n.size, n.flags) = export_name(r, w, export, no_zeroes).await?;
        return Ok(n);
    }

    send_option(w, OPT_STRUCTURED_REPLY, &[]).await?;
    let (reply, data) = read_option_reply(r, OPT_STRUCTURED_REPLY).await?;
    match reply {
        REP_ACK => n.structured = true,
        e if e & REP_FLAG_ERROR != 0 => {
            tracing::debug!("{}", option_error(OPT_STRUCTURED_REPLY, e, &data));
        }
        other => return Err(protocol_error(format!("reply {other} to STRUCTURED_REPLY"))),
    }

    if n.structured {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        send_option(w, OPT_SET_META_CONTEXT, &d).await?;
        let mut id = None;
        loop {
            let (reply, data) = read_option_reply(r, OPT_SET_META_CONTEXT).await?;
            match reply {
                REP_META_CONTEXT => {
                    let mut rd = Reader::new(&data);
                    let cid = rd
                        .u32()
                        .ok_or_else(|| protocol_error("short META_CONTEXT"))?;
                    if rd.bytes(rd.remaining()) == Some(BASE_ALLOCATION.as_bytes()) {
                        id = Some(cid);
                    }
                }
                REP_ACK => break,
                e if e & REP_FLAG_ERROR != 0 => {
                    tracing::debug!("{}", option_error(OPT_SET_META_CONTEXT, e, &data));
                    id = None;
                    break;
                }
                other => {
                    return Err(protocol_error(format!("reply {other} to SET_META_CONTEXT")));
                }
            }
        }
        n.meta_id = id;
    }

    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &d).await?;
    let mut export_info = None;
    loop {
        let (reply, data) = read_option_reply(r, OPT_GO).await?;
        match reply {
            REP_INFO => {
                let mut rd = Reader::new(&data);
                match rd.u16() {
                    Some(INFO_EXPORT) if data.len() == 12 => {
                        export_info = rd.u64().zip(rd.u16());
                    }
                    Some(INFO_BLOCK_SIZE) if data.len() == 14 => {
                        n.block = rd
                            .u32()
                            .zip(rd.u32())
                            .zip(rd.u32())
                            .map(|((a, b), c)| (a, b, c));
                    }
                    Some(_) => {}
                    None => return Err(protocol_error("empty NBD_REP_INFO")),
                }
            }
            REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| protocol_error("GO succeeded without NBD_INFO_EXPORT"))?;
                (n.size, n.flags) = (size, flags);
                return Ok(n);
            }
            REP_ERR_UNSUP => {
                // An old server: no GO, hence no block sizes and no meta context either.
                n.meta_id = None;
                (n.size, n.flags) = export_name(r, w, export, no_zeroes).await?;
                return Ok(n);
            }
            e if e & REP_FLAG_ERROR != 0 => {
                let mut err = option_error(OPT_GO, e, &data);
                if e == REP_ERR_UNKNOWN {
                    err = io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "NBD export '{export}' not found: {}",
                            String::from_utf8_lossy(&data)
                        ),
                    );
                }
                return Err(err);
            }
            other => return Err(protocol_error(format!("reply {other} to GO"))),
        }
    }
}

impl NbdClient {
    /// Negotiates `export` over a connected stream and starts reading replies (on the
    /// current tokio runtime).
    pub async fn connect<S>(stream: S, export: &str) -> io::Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut r = BufReader::with_capacity(64 << 10, r);
        let mut w: Writer = Box::new(w);
        let n = match handshake(&mut r, &mut w, export).await {
            Ok(n) => n,
            Err(e) => {
                // Say goodbye, as QEMU's client does (`nbd_send_opt_abort`), so the server
                // sees an orderly end rather than a dropped connection. Without waiting:
                // the server may already be gone.
                let _ = send_option(&mut w, OPT_ABORT, &[]).await;
                return Err(e);
            }
        };
        if n.flags & TFLAG_HAS_FLAGS == 0 {
            // Flags without HAS_FLAGS mean nothing: assume none.
            tracing::debug!("NBD server sent transmission flags without HAS_FLAGS");
        }
        let (min, pref, max) = n.block.unwrap_or((1, 4096, MAX_BLOCK));
        if !min.is_power_of_two() || min > 1 << 16 || max < min {
            return Err(protocol_error(format!(
                "bad block sizes min {min} preferred {pref} max {max}"
            )));
        }
        let max_io = max.min(MAX_BLOCK) / min * min;
        let flags = if n.flags & TFLAG_HAS_FLAGS != 0 {
            n.flags
        } else {
            TFLAG_HAS_FLAGS
        };
        let info = NbdClientInfo {
            export: export.to_owned(),
            size: n.size,
            flags,
            min_block: min,
            preferred_block: pref,
            max_block: max,
            structured: n.structured,
            base_allocation: n.meta_id.is_some(),
        };
        let shared = Arc::new(Shared {
            info,
            meta_id: n.meta_id,
            max_io,
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(Pending::default()),
            slots: Semaphore::new(MAX_INFLIGHT),
            bytes: Semaphore::new(INFLIGHT_BYTES),
            next_cookie: AtomicU64::new(1),
        });
        let reader = tokio::spawn(reply_loop(r, shared.clone()));
        Ok(Self { shared, reader })
    }

    /// Like [`connect`](Self::connect), over a connected socket of either family.
    pub async fn connect_fd(fd: OwnedFd, export: &str) -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
        let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
        match addr.family() {
            Some(AddressFamily::Unix) => {
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(true)?;
                Self::connect(tokio::net::UnixStream::from_std(s)?, export).await
            }
            Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                let s = std::net::TcpStream::from(fd);
                s.set_nonblocking(true)?;
                Self::connect(tokio::net::TcpStream::from_std(s)?, export).await
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NBD client: unsupported socket family {other:?}"),
            )),
        }
    }

    pub fn info(&self) -> &NbdClientInfo {
        &self.shared.info
    }

    fn has(&self, flag: u16) -> bool {
        self.shared.info.flags & flag != 0
    }

    /// Waits for the requests in flight, then sends NBD_CMD_DISC and closes.
    pub async fn disconnect(&self) -> io::Result<()> {
        let sh = &*self.shared;
        let _all = sh
            .slots
            .acquire_many(MAX_INFLIGHT as u32)
            .await
            .map_err(|_| closed_error("closed"))?;
        if let Some(reason) = sh.lock().dead.clone() {
            return Err(closed_error(&reason));
        }
        let mut w = sh.writer.lock().await;
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: sh.next_cookie.fetch_add(1, Ordering::Relaxed),
            offset: 0,
            length: 0,
        };
        let res = async {
            w.write_all(&req.encode()).await?;
            w.flush().await?;
            w.shutdown().await
        }
        .await;
        sh.fail("disconnected".into());
        res
    }

    /// Sends one request and waits for its reply.
    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Answer> {
        let sh = &*self.shared;
        let _slot = sh
            .slots
            .acquire()
            .await
            .map_err(|_| closed_error("closed"))?;
        let payload_bytes = match kind {
            CMD_READ | CMD_WRITE => length,
            _ => 0,
        };
        let _bytes = if payload_bytes > 0 {
            Some(
                sh.bytes
                    .acquire_many(payload_bytes)
                    .await
                    .map_err(|_| closed_error("closed"))?,
            )
        } else {
            None
        };
        let wait = match kind {
            CMD_READ => Kind::Read {
                offset,
                len: length,
            },
            CMD_BLOCK_STATUS => Kind::Status { len: length },
            _ => Kind::Plain,
        };
        let rx = {
            let mut w = sh.writer.lock().await;
            // Registered only now, so that a caller giving up while queueing for the writer
            // leaves nothing behind; from here on, giving up half-way through the send
            // breaks the connection (the guard), and giving up later leaves a waiter that the
            // reply removes.
            let cookie = sh.next_cookie.fetch_add(1, Ordering::Relaxed);
            let rx = {
                let mut p = sh.lock();
                if let Some(reason) = &p.dead {
                    return Err(closed_error(reason));
                }
                let (tx, rx) = oneshot::channel();
                p.waiters.insert(cookie, Waiter { kind: wait, tx });
                rx
            };
            let mut guard = SendGuard {
                shared: sh,
                armed: true,
            };
            let hdr = Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            }
            .encode();
            let res = async {
                w.write_all(&hdr).await?;
                if !payload.is_empty() {
                    w.write_all(payload).await?;
                }
                w.flush().await
            }
            .await;
            guard.armed = false;
            if let Err(e) = res {
                sh.fail(format!("sending a request: {e}"));
                return Err(e);
            }
            rx
        };
        rx.await.map_err(|_| closed_error("reply lost"))?
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let info = &self.shared.info;
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > info.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let min = u64::from(info.min_block);
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NBD request not aligned to the server's {min}-byte blocks"),
            ));
        }
        Ok(())
    }

    fn writable(&self) -> io::Result<()> {
        if self.has(TFLAG_READ_ONLY) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    async fn flush_if_possible(&self) -> io::Result<()> {
        if self.has(TFLAG_SEND_FLUSH) {
            self.request(CMD_FLUSH, 0, 0, 0, &[]).await?;
        }
        Ok(())
    }

    /// Longest TRIM / BLOCK_STATUS length, aligned to the minimum block size.
    fn no_payload_max(&self) -> u64 {
        let min = u64::from(self.shared.info.min_block);
        MAX_NO_PAYLOAD_LEN / min * min
    }
}

impl BlockDevice for NbdClient {
    fn size(&self) -> u64 {
        self.shared.info.size
    }

    fn read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let max = self.shared.max_io as usize;
        let mut off = offset;
        for chunk in buf.chunks_mut(max) {
            // chunk.len() <= max_io <= MAX_BLOCK
            let n = chunk.len() as u32;
            match self.request(CMD_READ, 0, off, n, &[]).await? {
                Answer::Data(d) if d.len() == chunk.len() => chunk.copy_from_slice(&d),
                _ => return Err(protocol_error("READ answered without its data")),
            }
            off += u64::from(n);
        }
        Ok(())
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.check(offset, buf.len() as u64)?;
        let wire_fua = fua && self.has(TFLAG_SEND_FUA);
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let mut off = offset;
        for chunk in buf.chunks(self.shared.max_io as usize) {
            let n = chunk.len() as u32;
            self.request(CMD_WRITE, flags, off, n, chunk).await?;
            off += u64::from(n);
        }
        if fua && !wire_fua {
            self.flush_if_possible().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        self.writable()?;
        self.check(offset, length)?;
        let (mut off, end) = (offset, offset + length);
        if self.has(TFLAG_SEND_WRITE_ZEROES) {
            let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
            while off < end {
                let n = (end - off).min(u64::from(self.shared.max_io)) as u32;
                self.request(CMD_WRITE_ZEROES, flags, off, n, &[]).await?;
                off += u64::from(n);
            }
        } else {
            let zeroes = vec![0u8; (ZERO_BUF as u64).min(length) as usize];
            while off < end {
                let n = (end - off).min(zeroes.len() as u64) as usize;
                self.write(&zeroes[..n], off, false).await?;
                off += n as u64;
            }
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        self.check(offset, length)?;
        if !self.has(TFLAG_SEND_TRIM) {
            return Ok(());
        }
        let (mut off, end) = (offset, offset + length);
        while off < end {
            let n = (end - off).min(self.no_payload_max()) as u32;
            self.request(CMD_TRIM, 0, off, n, &[]).await?;
            off += u64::from(n);
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flush_if_possible().await
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        if self.shared.meta_id.is_none() {
            return Ok(vec![Extent {
                length,
                zero: false,
                data: true,
                allocated_here: true,
            }]);
        }
        let n = length.min(self.no_payload_max()) as u32;
        match self.request(CMD_BLOCK_STATUS, 0, offset, n, &[]).await? {
            Answer::Extents(e) => Ok(e),
            _ => Err(protocol_error("BLOCK_STATUS answered without extents")),
        }
    }
}

/// A structured reply being assembled.
struct Partial {
    kind: Kind,
    data: Vec<u8>,
    /// Received pieces of a READ, start → end relative to the request, merged.
    pieces: BTreeMap<u64, u64>,
    received: u64,
    extents: Option<Vec<Extent>>,
    error: Option<u32>,
}

impl Partial {
    fn new(kind: Kind) -> Self {
        let data = match kind {
            Kind::Read { len, .. } => vec![0u8; len as usize],
            _ => Vec::new(),
        };
        Self {
            kind,
            data,
            pieces: BTreeMap::new(),
            received: 0,
            extents: None,
            error: None,
        }
    }

    /// Records `[start, start + n)` of a READ, refusing overlaps.
    fn cover(&mut self, start: u64, n: u64) -> io::Result<()> {
        let end = start + n;
        if let Some((_, &prev_end)) = self.pieces.range(..=start).next_back()
            && prev_end > start
        {
            return Err(protocol_error("overlapping READ chunks"));
        }
        if let Some((&next_start, _)) = self.pieces.range(start..).next()
            && next_start < end
        {
            return Err(protocol_error("overlapping READ chunks"));
        }
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.pieces.range(..=start).next_back()
            && pe == start
        {
            s = ps;
            self.pieces.remove(&ps);
        }
        if let Some(ne) = self.pieces.remove(&end) {
            e = ne;
        }
        self.pieces.insert(s, e);
        if self.pieces.len() > MAX_READ_PIECES {
            return Err(protocol_error("READ reply in too many pieces"));
        }
        self.received += n;
        Ok(())
    }

    fn finish(self) -> io::Result<Answer> {
        if let Some(e) = self.error {
            return Err(nbd_to_io_error(e));
        }
        match self.kind {
            Kind::Read { len, .. } => {
                if self.received != u64::from(len) {
                    return Err(protocol_error("READ reply does not cover the request"));
                }
                Ok(Answer::Data(self.data))
            }
            Kind::Status { .. } => match self.extents {
                Some(e) => Ok(Answer::Extents(e)),
                None => Err(protocol_error("BLOCK_STATUS reply without extents")),
            },
            Kind::Plain => Ok(Answer::Done),
        }
    }
}

async fn reply_loop<R: AsyncRead + Unpin>(mut r: R, shared: Arc<Shared>) {
    let reason = match read_replies(&mut r, &shared).await {
        Ok(()) => "the server closed the connection".to_owned(),
        Err(e) => {
            tracing::debug!("NBD client: {e}");
            e.to_string()
        }
    };
    shared.fail(reason);
}

async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, sh: &Shared) -> io::Result<()> {
    let mut partial: HashMap<u64, Partial> = HashMap::new();
    loop {
        let magic = match r.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = r.read_u32().await?;
                let cookie = r.read_u64().await?;
                let kind = sh
                    .kind_of(cookie)
                    .ok_or_else(|| protocol_error("reply with an unknown cookie"))?;
                if partial.contains_key(&cookie) {
                    return Err(protocol_error("simple reply inside a structured one"));
                }
                let result = if error != 0 {
                    Err(nbd_to_io_error(error))
                } else {
                    match kind {
                        Kind::Read { len, .. } => {
                            let mut buf = vec![0u8; len as usize];
                            r.read_exact(&mut buf).await?;
                            Ok(Answer::Data(buf))
                        }
                        Kind::Status { .. } => {
                            return Err(protocol_error("simple reply to BLOCK_STATUS"));
                        }
                        Kind::Plain => Ok(Answer::Done),
                    }
                };
                sh.complete(cookie, result);
            }
            STRUCTURED_REPLY_MAGIC => {
                if !sh.info.structured {
                    return Err(protocol_error("structured reply not negotiated"));
                }
                let flags = r.read_u16().await?;
                let typ = r.read_u16().await?;
                let cookie = r.read_u64().await?;
                let len = r.read_u32().await?;
                let kind = sh
                    .kind_of(cookie)
                    .ok_or_else(|| protocol_error("reply with an unknown cookie"))?;
                let p = partial.entry(cookie).or_insert_with(|| Partial::new(kind));
                read_chunk(r, sh, p, typ, len).await?;
                if flags & REPLY_FLAG_DONE != 0
                    && let Some(p) = partial.remove(&cookie)
                {
                    sh.complete(cookie, p.finish());
                }
            }
            _ => return Err(protocol_error(format!("bad reply magic {magic:#x}"))),
        }
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    sh: &Shared,
    p: &mut Partial,
    typ: u16,
    len: u32,
) -> io::Result<()> {
    match (typ, p.kind) {
        (REPLY_TYPE_NONE, _) => {
            if len != 0 {
                return Err(protocol_error("NONE chunk with a payload"));
            }
        }
        (REPLY_TYPE_OFFSET_DATA, Kind::Read { offset, len: rlen }) => {
            if len < 9 {
                return Err(protocol_error("short OFFSET_DATA chunk"));
            }
            let off = r.read_u64().await?;
            let n = u64::from(len - 8);
            let start = off
                .checked_sub(offset)
                .filter(|s| s.checked_add(n).is_some_and(|e| e <= u64::from(rlen)))
                .ok_or_else(|| protocol_error("OFFSET_DATA outside the request"))?;
            p.cover(start, n)?;
            let (s, e) = (start as usize, (start + n) as usize);
            r.read_exact(&mut p.data[s..e]).await?;
        }
        (REPLY_TYPE_OFFSET_HOLE, Kind::Read { offset, len: rlen }) => {
            if len != 12 {
                return Err(protocol_error("bad OFFSET_HOLE chunk"));
            }
            let off = r.read_u64().await?;
            let n = u64::from(r.read_u32().await?);
            let start = off
                .checked_sub(offset)
                .filter(|s| n > 0 && s.checked_add(n).is_some_and(|e| e <= u64::from(rlen)))
                .ok_or_else(|| protocol_error("OFFSET_HOLE outside the request"))?;
            // The buffer starts zeroed and pieces never overlap: nothing to write.
            p.cover(start, n)?;
        }
        (REPLY_TYPE_BLOCK_STATUS, Kind::Status { len: rlen }) => {
            if len < 12 || !(len - 4).is_multiple_of(8) || len > MAX_STATUS_CHUNK {
                return Err(protocol_error("bad BLOCK_STATUS chunk"));
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).await?;
            let mut rd = Reader::new(&payload);
            let id = rd.u32().unwrap_or(u32::MAX);
            if Some(id) != sh.meta_id {
                return Err(protocol_error("BLOCK_STATUS for a context not negotiated"));
            }
            if p.extents.is_some() {
                return Err(protocol_error("two BLOCK_STATUS chunks for one context"));
            }
            let mut extents = Vec::new();
            let mut left = u64::from(rlen);
            while let (Some(n), Some(flags)) = (rd.u32(), rd.u32()) {
                if n == 0 {
                    return Err(protocol_error("zero-length extent"));
                }
                if left == 0 {
                    break;
                }
                let n = u64::from(n).min(left);
                left -= n;
                let hole = flags & STATE_HOLE != 0;
                extents.push(Extent {
                    length: n,
                    zero: flags & STATE_ZERO != 0,
                    data: !hole,
                    allocated_here: !hole,
                });
            }
            p.extents = Some(extents);
        }
        (t, _) if t & REPLY_TYPE_ERROR_BIT != 0 => {
            if !(6..=MAX_ERROR_CHUNK).contains(&len) {
                return Err(protocol_error("bad error chunk"));
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).await?;
            let mut rd = Reader::new(&payload);
            let err = rd.u32().unwrap_or(EIO);
            let msg_len = usize::from(rd.u16().unwrap_or(0));
            let msg = rd
                .bytes(msg_len)
                .ok_or_else(|| protocol_error("error message longer than its chunk"))?;
            tracing::debug!("NBD server error {err}: {}", String::from_utf8_lossy(msg));
            p.error.get_or_insert(if err == 0 { EIO } else { err });
        }
        (t, k) => {
            return Err(protocol_error(format!(
                "unexpected chunk type {t} for {k:?}"
            )));
        }
    }
    Ok(())
}
