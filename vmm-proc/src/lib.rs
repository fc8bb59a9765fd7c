//! vmm-proc: the only process facing the guest, and the most confined (DESIGN.md §4).
//!
//! - [`control`]: the monitor's requests and the run-state machine;
//! - [`sandbox`]: its jail (empty root, no network, seccomp allowlist).
//!
//! It opens nothing: everything it uses arrives as a descriptor.

pub mod control;
pub mod linux;
pub mod sandbox;

use std::os::fd::RawFd;

use ipc::vmm::{VmmCall, VmmMessage, VmmReply, VmmRequest};
use ipc::vmm_block::{BlockToVmm, VmmBlockAnswer, VmmBlockRequest, VmmToBlock};
use ipc::{Channel, Link, QmpError};

/// Why vmm-proc stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("descriptor {0} from the command line is not open")]
    BadFd(RawFd),
    #[error("link: {0}")]
    Link(#[from] ipc::IpcError),
    #[error("the first request must be Configure")]
    NotConfigured,
    #[error("block-proc: {0}")]
    Block(String),
    #[error("sandbox: {0}")]
    Sandbox(#[from] jail::JailError),
}

/// Sets up from the monitor's first request, enters the jail, then serves the monitor
/// until `Shutdown` or until it goes away.
pub fn run(monitor_fd: RawFd, peer_fd: RawFd) -> Result<(), Error> {
    let monitor = Channel::from_inherited(monitor_fd).ok_or(Error::BadFd(monitor_fd))?;
    let block = Channel::from_inherited(peer_fd).ok_or(Error::BadFd(peer_fd))?;
    monitor.handshake(Link::MonitorVmm)?;
    let first = monitor.recv::<VmmCall>()?;
    let VmmRequest::Configure(config) = first.msg.request else {
        return Err(Error::NotConfigured);
    };
    let id = first.msg.id;
    let reply = |result: Result<VmmReply, QmpError>| VmmMessage::Reply { id, result };

    block.handshake(Link::VmmBlock)?;
    block.send(
        &VmmToBlock::Call {
            id: 1,
            request: VmmBlockRequest::ListDevices,
        },
        &[],
    )?;
    let drives = match block.recv::<BlockToVmm>()?.msg {
        BlockToVmm::Reply {
            id: 1,
            result: Ok(VmmBlockAnswer::Devices(d)),
        } => d,
        BlockToVmm::Reply { result: Err(e), .. } => return Err(Error::Block(e)),
        other => return Err(Error::Block(format!("unexpected answer {other:?}"))),
    };
    tracing::info!(?drives, "guest drives");

    let kernel = first.fds.into_iter().next();
    if config.sandbox {
        let mut keep = vec![monitor_fd, peer_fd];
        keep.extend(kernel.as_ref().map(std::os::fd::AsRawFd::as_raw_fd));
        if let Err(e) = sandbox::enter(&keep) {
            monitor.send(
                &reply(Err(QmpError::generic(format!("vmm-proc sandbox: {e}")))),
                &[],
            )?;
            return Err(e.into());
        }
    }
    let mut vm = control::Vm::new(config, kernel, drives);
    monitor.send(&reply(Ok(VmmReply::Done)), &[])?;
    vm.serve(&monitor)?;
    Ok(())
}
