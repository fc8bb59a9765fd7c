//! The requests block-proc answers: the monitor's (configuration, queries, shutdown) and
//! vmm-proc's (the guest's disks). vmm-proc may be compromised: a broken frame from it
//! closes that link, and block-proc goes on serving the monitor.

use ipc::block::{BlockCall, BlockMessage, BlockReply, BlockRequest};
use ipc::vmm_block::{
    BlockToVmm, IoCompletion, IoStatus, VmmBlockAnswer, VmmBlockRequest, VmmToBlock,
};
use ipc::{AsyncChannel, Channel, IpcError, Link, QmpError};

use crate::Error;
use crate::drives::Drives;

/// Serves both links until the monitor asks for shutdown or closes its link.
pub async fn serve(monitor: Channel, peer: Option<Channel>, drives: Drives) -> Result<(), Error> {
    let monitor = AsyncChannel::new(monitor).map_err(ipc::IpcError::Io)?;
    let drives = std::rc::Rc::new(drives);
    let local = tokio::task::LocalSet::new();
    if let Some(peer) = peer {
        let drives = drives.clone();
        local.spawn_local(async move {
            match serve_guest(peer, &drives).await {
                Err(IpcError::Closed) => tracing::debug!("vmm-proc closed its link"),
                Err(e) => tracing::warn!("vmm-proc link dropped: {e}"),
                Ok(never) => match never {},
            }
        });
    }
    local.run_until(serve_monitor(monitor, &drives)).await
}

async fn serve_monitor(monitor: AsyncChannel, drives: &Drives) -> Result<(), Error> {
    loop {
        let (call, fds) = match monitor.recv::<BlockCall>().await {
            Ok(r) => (r.msg, r.fds),
            Err(IpcError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (result, exit) = match call.request {
            BlockRequest::QueryBlock => (Ok(BlockReply::Block(drives.query_block())), false),
            BlockRequest::Shutdown => (Ok(BlockReply::Done), true),
            BlockRequest::Configure(_) => (
                Err(QmpError::generic("block-proc is already configured")),
                false,
            ),
            BlockRequest::Qmp {
                command, arguments, ..
            } => (
                crate::commands::execute(drives, &command, &arguments, fds)
                    .await
                    .map(BlockReply::Json),
                false,
            ),
        };
        monitor
            .send(
                &BlockMessage::Reply {
                    id: call.id,
                    result,
                },
                &[],
            )
            .await?;
        if exit {
            return Ok(());
        }
    }
}

async fn serve_guest(peer: Channel, drives: &Drives) -> Result<std::convert::Infallible, IpcError> {
    let peer = AsyncChannel::new(peer)?;
    peer.handshake(Link::VmmBlock).await?;
    loop {
        let reply = match peer.recv::<VmmToBlock>().await?.msg {
            VmmToBlock::Call {
                id,
                request: VmmBlockRequest::ListDevices,
            } => BlockToVmm::Reply {
                id,
                result: Ok(VmmBlockAnswer::Devices(drives.guest_drives())),
            },
            VmmToBlock::Call { id, .. } => BlockToVmm::Reply {
                id,
                result: Err("guest I/O is not served yet".into()),
            },
            VmmToBlock::Submit(reqs) => BlockToVmm::Completed(
                reqs.iter()
                    .map(|r| IoCompletion {
                        tag: r.tag,
                        status: IoStatus::IoErr,
                    })
                    .collect(),
            ),
        };
        peer.send(&reply, &[]).await?;
    }
}
