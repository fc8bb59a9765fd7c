//! block-proc: the process that owns every disk image (DESIGN.md §5).
//!
//! - [`device`]: the block-device interface the NBD server and the guest path use;
//! - [`block`]: image formats (raw, qcow2 on imago), backing chains, locking, creation;
//! - [`nbd`]: the NBD server;
//! - [`commands`]: the QMP commands block-proc executes;
//! - [`guest`]: the guest's disk data path (vmm-proc's requests, straight into guest RAM);
//! - [`drives`]: the images opened for `--drive`, and what `query-block` says of them;
//! - [`graph`]: the block nodes by name (drives' and `blockdev-add`'s), their permissions
//!   and locks, `blockdev-add`/`blockdev-del`;
//! - [`jobs`]: the block jobs (mirror) and their state machine, events and commands;
//! - [`mapping`]: shared mappings of files (guest RAM, the image read windows);
//! - [`service`]: the two links it answers, the monitor's and vmm-proc's;
//! - [`sandbox`]: its jail (Landlock over the image directories, seccomp allowlist).

pub mod block;
pub mod commands;
pub mod device;
pub mod drives;
pub mod graph;
pub mod guest;
pub mod jobs;
pub mod mapping;
pub mod nbd;
pub mod sandbox;
pub mod service;

use std::os::fd::RawFd;

use ipc::block::{BlockCall, BlockMessage, BlockReply, BlockRequest};
use ipc::{Channel, Link, QmpError};

/// Why block-proc stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("descriptor {0} from the command line is not open")]
    BadFd(RawFd),
    #[error("monitor link: {0}")]
    Link(#[from] ipc::IpcError),
    #[error("the first request must be Configure")]
    NotConfigured,
    #[error("{0}")]
    Setup(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Configures block-proc from the monitor's first request, enters the jail, then serves
/// both links until the monitor says `Shutdown` or goes away.
pub fn run(
    monitor_fd: RawFd,
    peer_fd: Option<RawFd>,
    runas: Option<(u32, u32)>,
) -> Result<(), Error> {
    let monitor = Channel::from_inherited(monitor_fd).ok_or(Error::BadFd(monitor_fd))?;
    let peer = peer_fd
        .map(|fd| Channel::from_inherited(fd).ok_or(Error::BadFd(fd)))
        .transpose()?;
    monitor.handshake(Link::MonitorBlock)?;
    let first = monitor.recv::<BlockCall>()?.msg;
    let BlockRequest::Configure(config) = first.request else {
        return Err(Error::NotConfigured);
    };
    let reply = |result: Result<BlockReply, QmpError>| BlockMessage::Reply {
        id: first.id,
        result,
    };
    // Reads the page cache holds go through file mappings once their SIGBUS guard is in.
    if let Err(e) = block::mapped::install_guard() {
        tracing::warn!("image reads through file mappings are off: {e}");
    }
    // Still single-threaded (the jail needs that): drive the opens without a runtime.
    let drives = match block_on(drives::Drives::open(&config, peer.is_some())) {
        Ok(d) => d,
        Err(e) => {
            monitor.send(&reply(Err(e.clone())), &[])?;
            return Err(Error::Setup(e.desc));
        }
    };
    if config.sandbox
        && let Err(e) = sandbox::enter(&config.image_dirs, runas)
    {
        monitor.send(
            &reply(Err(QmpError::generic(format!("block-proc sandbox: {e}")))),
            &[],
        )?;
        return Err(Error::Setup(e.to_string()));
    }
    monitor.send(&reply(Ok(BlockReply::Done)), &[])?;
    // Multi-threaded: the block layer runs what waits for the disk with `block_in_place`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(service::serve(monitor, peer, drives))
}

/// Runs a future to completion on this thread, without a runtime. For start-up, before the
/// jail: the block layer's calls complete without waiting on I/O readiness (imago runs in
/// its synchronous mode), so a parked thread is woken by the future itself at most.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
