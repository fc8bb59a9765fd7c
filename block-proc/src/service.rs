//! The requests block-proc answers: the monitor's (configuration, queries, QMP commands,
//! shutdown) and vmm-proc's (the guest's disks), and the events it sends the monitor.
//! vmm-proc may be compromised: a broken frame from it closes that link, and block-proc
//! goes on serving the monitor.

use std::sync::Arc;

use ipc::block::{BlockCall, BlockMessage, BlockReply, BlockRequest};
use ipc::{AsyncChannel, Channel, IpcError, QmpError};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::Drives;

/// Serves both links until the monitor asks for shutdown or closes its link.
pub async fn serve(monitor: Channel, peer: Option<Channel>, drives: Drives) -> Result<(), Error> {
    let monitor = Arc::new(AsyncChannel::new(monitor).map_err(IpcError::Io)?);
    if let Some(peer) = peer {
        let pool = tokio::runtime::Handle::current();
        crate::guest::start(peer, drives.guest_devices(), pool, |e| match e {
            IpcError::Closed => tracing::debug!("vmm-proc closed its link"),
            e => tracing::warn!("vmm-proc link dropped: {e}"),
        })
        .map_err(Error::Runtime)?;
    }
    let (events, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let sender = monitor.clone();
    tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let (name, data) = match out {
                Outgoing::Event(name, data) => (name, data),
                Outgoing::Barrier(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            if sender
                .send(&BlockMessage::Event { name, data }, &[])
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let state = Arc::new(State::new(drives, events));
    let result = serve_monitor(&monitor, &state).await;
    // Jobs end first (force-cancelled, as QEMU's `quit` does), so their targets are
    // closed and nothing writes behind the flush below.
    state.jobs.cancel_all().await;
    // Acknowledged writes are already in the kernel; this writes back whatever else the
    // images cache and makes it durable.
    for d in &state.drives.drives {
        if let Err(e) = d.backend.current().flush().await {
            tracing::warn!("flushing {} at exit: {e}", d.config.id);
        }
    }
    // blockdev-add's nodes, newest (the users) first.
    for node in state.nodes().iter().rev() {
        node.close().await;
    }
    result
}

/// What goes to the monitor besides replies: events, and barriers that let a reply wait
/// until the events its command caused have been sent (QEMU sends them first).
#[derive(Debug)]
pub enum Outgoing {
    Event(String, Option<String>),
    Barrier(oneshot::Sender<()>),
}

async fn serve_monitor(monitor: &AsyncChannel, state: &Arc<State>) -> Result<(), Error> {
    loop {
        let (call, fds) = match monitor.recv::<BlockCall>().await {
            Ok(r) => (r.msg, r.fds),
            Err(IpcError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (result, exit) = match call.request {
            BlockRequest::QueryBlock => (Ok(BlockReply::Block(state.drives.query_block())), false),
            BlockRequest::Shutdown => (Ok(BlockReply::Done), true),
            BlockRequest::Configure(_) => (
                Err(QmpError::generic("block-proc is already configured")),
                false,
            ),
            BlockRequest::Qmp {
                command, arguments, ..
            } => (
                state
                    .execute(&command, &arguments, fds)
                    .await
                    .map(BlockReply::Json),
                false,
            ),
        };
        // Events the command caused go first.
        let (done, sent) = oneshot::channel();
        if state.events.send(Outgoing::Barrier(done)).is_ok() {
            let _ = sent.await;
        }
        send_reply(monitor, call.id, result).await?;
        if exit {
            return Ok(());
        }
    }
}

/// Sends a reply, a long JSON one in parts. A reply that cannot be encoded becomes an
/// error reply: the command failed, block-proc goes on.
async fn send_reply(
    monitor: &AsyncChannel,
    id: ipc::CallId,
    result: Result<BlockReply, QmpError>,
) -> Result<(), Error> {
    let result = match result {
        Ok(BlockReply::Json(text)) if text.len() > ipc::block::JSON_PART => {
            let parts = ipc::block::json_parts(&text);
            let (last, head) = parts.split_last().unwrap_or((&"", &[]));
            for part in head {
                let msg = BlockMessage::ReplyPart {
                    id,
                    part: (*part).to_string(),
                };
                monitor.send(&msg, &[]).await?;
            }
            Ok(BlockReply::Json((*last).to_string()))
        }
        other => other,
    };
    let reply = BlockMessage::Reply { id, result };
    match monitor.send(&reply, &[]).await {
        Err(IpcError::Codec(e)) => {
            tracing::warn!("reply {id} cannot be sent: {e}");
            let reply = BlockMessage::Reply {
                id,
                result: Err(QmpError::generic(format!(
                    "block-proc cannot send its reply: {e}"
                ))),
            };
            Ok(monitor.send(&reply, &[]).await?)
        }
        r => Ok(r?),
    }
}
