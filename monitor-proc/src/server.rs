//! The QMP server: listening sockets, and one session per client.
//!
//! A session reads a byte stream, cuts it into JSON values ([`crate::qmp::json`]), and runs
//! one command at a time, answering in order, as QEMU does without OOB. Its writer merges
//! replies with the event stream, which it joins once the client has negotiated
//! capabilities. When splitvmm shuts down, every writer sends what it still holds, then
//! closes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::cli::QmpAddr;
use crate::commands;
use crate::qmp::json::{JsonStreamer, Limits};
use crate::qmp::wire;
use crate::state::Monitor;

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
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
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
                Self::Unix(l, _) => l
                    .accept()
                    .await
                    .map(|(s, _)| sessions.start(s, monitor.clone())),
                Self::Tcp(l) => l.accept().await.map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    sessions.start(s, monitor.clone())
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

    fn start<S>(&self, stream: S, monitor: Arc<Monitor>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let closing = self.closing.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let mut tasks = tasks.lock().await;
            // Forget the sessions that have ended, so a long life of short connections
            // does not pile them up.
            while tasks.try_join_next().is_some() {}
            tasks.spawn(session(stream, monitor, closing));
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
}

async fn session<S>(stream: S, monitor: Arc<Monitor>, mut closing: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
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
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = closed(&mut closing) => break,
        };
        for value in streamer.feed(buf.get(..n).unwrap_or_default()) {
            let line = match value {
                Err(e) => wire::response_err(&e, None),
                Ok(v) => commands::handle(&monitor, &state, v).await,
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
