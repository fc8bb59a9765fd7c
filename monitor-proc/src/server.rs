//! The QMP server: listening sockets, and one session per client.
//!
//! A session reads a byte stream, cuts it into JSON values ([`crate::qmp::json`]), and runs
//! one command at a time, answering in order, as QEMU does without OOB. Its writer merges
//! replies with the event stream, which it joins once the client has negotiated
//! capabilities. When splitvmm shuts down, every writer sends what it still holds, then
//! closes.
//!
//! On a unix socket the session also receives descriptors (SCM_RIGHTS), as QEMU's chardev
//! does: the ones that came with the latest message that carried any wait, per connection,
//! for the next command (`getfd`), and are closed once that command is done.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{Mutex, broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::cli::QmpAddr;
use crate::commands;
use crate::qmp::json::{JsonStreamer, Limits};
use crate::qmp::wire;
use crate::state::Monitor;

/// Removes the unix socket at `path`, if a socket is there: before a bind (a stale one, as
/// QEMU replaces it) and when the monitor closes its own. Anything else at the path stays,
/// and the bind that follows fails with "Address already in use". The monitor's Landlock
/// rules let it remove any entry its user may (they cannot tell a socket from a file), so
/// this check is what keeps a client from deleting a file by naming it as a socket.
pub fn remove_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

/// A bound QMP socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a QMP socket. Like QEMU, a stale unix socket at the path is replaced.
    pub fn bind(addr: &QmpAddr) -> std::io::Result<Self> {
        match addr {
            QmpAddr::Unix(path) => {
                remove_socket(path)?;
                let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?;
                l.set_nonblocking(true)?;
                Ok(Self::Unix(UnixListener::from_std(l)?, path.clone()))
            }
            QmpAddr::Tcp { host, port } => {
                let l = std::net::TcpListener::bind((host.as_str(), *port))
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{host}:{port}: {e}")))?;
                l.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(l)?))
            }
        }
    }

    /// The socket file to remove at exit, if any.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Self::Unix(_, p) => Some(p.clone()),
            Self::Tcp(_) => None,
        }
    }

    /// Accepts clients until splitvmm shuts down.
    pub async fn serve(self, monitor: Arc<Monitor>, sessions: Sessions) {
        loop {
            let accepted = match &self {
                Self::Unix(l, _) => l.accept().await.map(|(s, _)| {
                    let (rd, wr) = s.into_split();
                    sessions.start(Reader::Unix(rd), wr, monitor.clone())
                }),
                Self::Tcp(l) => l.accept().await.map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    let (rd, wr) = s.into_split();
                    sessions.start(Reader::Stream(Box::new(rd)), wr, monitor.clone())
                }),
            };
            if let Err(e) = accepted {
                tracing::warn!("QMP accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// All client sessions, so shutdown can flush them.
#[derive(Debug, Clone)]
pub struct Sessions {
    tasks: Arc<Mutex<JoinSet<()>>>,
    closing: watch::Receiver<bool>,
}

impl Sessions {
    pub fn new(closing: watch::Receiver<bool>) -> Self {
        Self {
            tasks: Arc::default(),
            closing,
        }
    }

    fn start<W>(&self, rd: Reader, wr: W, monitor: Arc<Monitor>)
    where
        W: AsyncWrite + Send + 'static,
    {
        let closing = self.closing.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let mut tasks = tasks.lock().await;
            // Forget the sessions that have ended, so a long life of short connections
            // does not pile them up.
            while tasks.try_join_next().is_some() {}
            tasks.spawn(session(rd, wr, monitor, closing));
        });
    }

    /// Waits (briefly) for every session to send what it holds and close.
    pub async fn drain(&self) {
        let mut tasks = self.tasks.lock().await;
        let all = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), all).await;
    }
}

/// What a session knows about its client.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Capabilities negotiation is complete: commands run and events flow.
    pub negotiated: Arc<AtomicBool>,
    /// Descriptors received (SCM_RIGHTS) for the next command, QEMU's `read_msgfds`.
    pub fds: std::sync::Mutex<Vec<OwnedFd>>,
}

impl SessionState {
    /// The first received descriptor, closing the others (QEMU's `qemu_chr_fe_get_msgfd`).
    pub fn take_fd(&self) -> Option<OwnedFd> {
        let mut fds = self
            .fds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = (!fds.is_empty()).then(|| fds.swap_remove(0));
        fds.clear();
        first
    }

    fn set_fds(&self, new: Vec<OwnedFd>) {
        *self
            .fds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }
}

/// At most this many descriptors are taken from one message, QEMU's `TCP_MAX_FDS`; a
/// message with more has them all closed.
const MAX_MSG_FDS: usize = 16;

/// The most descriptors Linux passes in one message (`SCM_MAX_FD`). The control buffer has
/// room for them all, so the kernel never truncates it and every descriptor that arrives
/// is ours to close.
const SCM_MAX_FD: usize = 253;

/// Where a session reads from: a unix socket also brings descriptors.
enum Reader {
    Unix(tokio::net::unix::OwnedReadHalf),
    Stream(Box<dyn AsyncRead + Send + Unpin>),
}

impl Reader {
    /// Reads bytes; descriptors that came with them replace `fds` (`None`: none came).
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Option<Vec<OwnedFd>>)> {
        match self {
            Self::Stream(s) => Ok((s.read(buf).await?, None)),
            Self::Unix(half) => {
                let sock: &UnixStream = half.as_ref();
                loop {
                    sock.readable().await?;
                    match sock.try_io(tokio::io::Interest::READABLE, || {
                        recv_with_fds(sock.as_raw_fd(), buf)
                    }) {
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                            ) => {}
                        r => return r,
                    }
                }
            }
        }
    }
}

/// One `recvmsg`, keeping at most [`MAX_MSG_FDS`] descriptors.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<Vec<OwnedFd>>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let received = if fds.len() > MAX_MSG_FDS {
        tracing::warn!("QMP client sent more than {MAX_MSG_FDS} descriptors at once; refused");
        // Dropping them closes them; what an earlier message brought is dropped too.
        Some(Vec::new())
    } else {
        (!fds.is_empty()).then_some(fds)
    };
    Ok((msg.bytes, received))
}

async fn session<W>(
    mut rd: Reader,
    wr: W,
    monitor: Arc<Monitor>,
    mut closing: watch::Receiver<bool>,
) where
    W: AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let state = SessionState::default();
    let events = monitor.events.subscribe();
    let writer = tokio::spawn(writer(
        wr,
        rx,
        events,
        state.negotiated.clone(),
        closing.clone(),
    ));
    let _ = tx.send(wire::greeting(&commands::version()));
    let mut streamer = JsonStreamer::new(Limits::default());
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok((0, None)) | Err(_) => break,
                Ok((n, fds)) => {
                    if let Some(fds) = fds {
                        state.set_fds(fds);
                    }
                    n
                }
            },
            () = closed(&mut closing) => break,
        };
        for value in streamer.feed(buf.get(..n).unwrap_or_default()) {
            let line = match value {
                Err(e) => wire::response_err(&e, None),
                Ok(v) => {
                    let line = commands::handle(&monitor, &state, v).await;
                    // What the command did not use is closed, not kept for later ones.
                    state.set_fds(Vec::new());
                    line
                }
            };
            if tx.send(line).is_err() {
                break 'read;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn writer<W: AsyncWrite>(
    wr: W,
    mut replies: mpsc::UnboundedReceiver<String>,
    mut events: broadcast::Receiver<Arc<str>>,
    negotiated: Arc<AtomicBool>,
    mut closing: watch::Receiver<bool>,
) {
    let mut wr = std::pin::pin!(wr);
    loop {
        let ok = tokio::select! {
            // Events first: one that was emitted before a reply was produced is written
            // before it (QEMU sends a command's events before its reply).
            biased;
            e = events.recv() => match e {
                Ok(line) if negotiated.load(Ordering::Acquire) => wr.write_all(line.as_bytes()).await.is_ok(),
                Ok(_) => true,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("a QMP client fell behind and lost {n} events");
                    true
                }
                Err(broadcast::error::RecvError::Closed) => true,
            },
            r = replies.recv() => match r {
                Some(line) => wr.write_all(line.as_bytes()).await.is_ok(),
                None => false,
            },
            () = closed(&mut closing) => false,
        };
        if !ok {
            break;
        }
    }
    // Shutting down or the reader is gone: send what is left, events first (SHUTDOWN
    // precedes the reply to `quit`, as in QEMU's iotests), then close.
    while let Ok(line) = events.try_recv() {
        if negotiated.load(Ordering::Acquire) && wr.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
    while let Ok(line) = replies.try_recv() {
        if wr.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// Returns once splitvmm starts shutting down.
async fn closed(closing: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped at once: it must not live across an await.
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
