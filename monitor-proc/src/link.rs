//! The monitor's end of a link to a child: requests with correlation ids, answered in any
//! order, and the child's unsolicited events. One reader task per link routes replies to
//! their waiting callers and events to a handler; when the link breaks, every waiting
//! caller gets an error at once. A link can be [re-attached](RpcClient::reattach) to a
//! restarted child (crash recovery), so every holder of the client keeps using it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ipc::block::{BlockCall, BlockMessage, BlockReply, BlockRequest};
use ipc::vmm::{VmmCall, VmmEvent, VmmMessage, VmmReply, VmmRequest};
use ipc::{AsyncChannel, CallId, IpcError, Message, QmpError};
use std::os::fd::BorrowedFd;
use tokio::sync::oneshot;

/// What one link carries.
pub trait Protocol: Send + Sync + 'static {
    /// The child's name, for errors.
    const PEER: &'static str;
    type Request: Send;
    type Call: Message + Send + Sync;
    type Reply: Send;
    type Event: Send;
    type Incoming: Message + Send;
    fn call(id: CallId, request: Self::Request) -> Self::Call;
    fn split(msg: Self::Incoming) -> Incoming<Self::Reply, Self::Event>;
    /// The reply a call gets when parts of it came first ([`Incoming::Part`]).
    fn join(head: String, reply: Self::Reply) -> Result<Self::Reply, QmpError> {
        let _ = (head, reply);
        Err(QmpError::generic(format!(
            "{} sent a reply in parts, which this link does not use",
            Self::PEER
        )))
    }
}

/// A message from a child, sorted.
#[derive(Debug)]
pub enum Incoming<R, E> {
    Reply(CallId, Result<R, QmpError>),
    /// The beginning of a long reply to a call (block-proc's JSON replies).
    Part(CallId, String),
    Event(E),
}

/// The link to block-proc.
#[derive(Debug)]
pub struct Block;
impl Protocol for Block {
    const PEER: &'static str = "block-proc";
    type Request = BlockRequest;
    type Call = BlockCall;
    type Reply = BlockReply;
    /// A QMP event: its name and its data as JSON text.
    type Event = (String, Option<String>);
    type Incoming = BlockMessage;
    fn call(id: CallId, request: BlockRequest) -> BlockCall {
        BlockCall { id, request }
    }
    fn split(msg: BlockMessage) -> Incoming<BlockReply, Self::Event> {
        match msg {
            BlockMessage::Reply { id, result } => Incoming::Reply(id, result),
            BlockMessage::ReplyPart { id, part } => Incoming::Part(id, part),
            BlockMessage::Event { name, data } => Incoming::Event((name, data)),
        }
    }
    fn join(head: String, reply: BlockReply) -> Result<BlockReply, QmpError> {
        match reply {
            BlockReply::Json(tail) => Ok(BlockReply::Json(head + &tail)),
            other => Err(QmpError::generic(format!(
                "block-proc sent parts of a reply, then {other:?}"
            ))),
        }
    }
}

/// The link to vmm-proc.
#[derive(Debug)]
pub struct Vmm;
impl Protocol for Vmm {
    const PEER: &'static str = "vmm-proc";
    type Request = VmmRequest;
    type Call = VmmCall;
    type Reply = VmmReply;
    type Event = VmmEvent;
    type Incoming = VmmMessage;
    fn call(id: CallId, request: VmmRequest) -> VmmCall {
        VmmCall { id, request }
    }
    fn split(msg: VmmMessage) -> Incoming<VmmReply, VmmEvent> {
        match msg {
            VmmMessage::Reply { id, result } => Incoming::Reply(id, result),
            VmmMessage::Event(e) => Incoming::Event(e),
        }
    }
}

/// Callers waiting for their reply, by request id.
type Waiters<R> = HashMap<CallId, oneshot::Sender<Result<R, QmpError>>>;
type Pending<R> = Mutex<Option<Waiters<R>>>;

/// The monitor's end of a link.
pub struct RpcClient<P: Protocol> {
    /// The link; replaced when the child is restarted.
    chan: std::sync::RwLock<Arc<AsyncChannel>>,
    next_id: AtomicU64,
    /// `None` once the link is broken.
    pending: Pending<P::Reply>,
    /// Parts of long replies received so far, by request id (only the reader task uses
    /// it).
    parts: Mutex<HashMap<CallId, String>>,
}

impl<P: Protocol> std::fmt::Debug for RpcClient<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("peer", &P::PEER)
            .finish_non_exhaustive()
    }
}

fn gone(peer: &str) -> QmpError {
    QmpError::generic(format!("{peer} is not running"))
}

impl<P: Protocol> RpcClient<P> {
    /// Wraps a link whose handshake is done.
    pub fn new(chan: AsyncChannel) -> Arc<Self> {
        Arc::new(Self {
            chan: std::sync::RwLock::new(Arc::new(chan)),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Some(HashMap::new())),
            parts: Mutex::default(),
        })
    }

    fn chan(&self) -> Arc<AsyncChannel> {
        self.chan
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a restarted child's link (handshake done) in place of the broken one; calls
    /// made from now on go to it. Run [`read_loop`](Self::read_loop) again to read it.
    pub fn reattach(&self, chan: AsyncChannel) {
        *self
            .chan
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(chan);
        self.parts().clear();
        *self.pending() = Some(HashMap::new());
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<Waiters<P::Reply>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a request (with the descriptors it declares) and waits for its reply.
    pub async fn call(
        &self,
        request: P::Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<P::Reply, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending()
            .as_mut()
            .ok_or_else(|| gone(P::PEER))?
            .insert(id, tx);
        if let Err(e) = self.chan().send(&P::call(id, request), fds).await {
            if let Some(p) = self.pending().as_mut() {
                p.remove(&id);
            }
            tracing::warn!("cannot send to {}: {e}", P::PEER);
            return Err(gone(P::PEER));
        }
        rx.await.unwrap_or_else(|_| Err(gone(P::PEER)))
    }

    /// Reads the link until it breaks; events go to `on_event`. Returns why it broke.
    pub async fn read_loop(&self, mut on_event: impl FnMut(P::Event)) -> IpcError {
        let chan = self.chan();
        let err = loop {
            match chan.recv::<P::Incoming>().await {
                Ok(r) => match P::split(r.msg) {
                    Incoming::Part(id, part) => self.add_part(id, &part),
                    Incoming::Reply(id, result) => {
                        let head = self.parts_of(id);
                        let result = match (head, result) {
                            (Some(Ok(head)), Ok(reply)) => P::join(head, reply),
                            (Some(Err(e)), _) => Err(e),
                            (_, result) => result,
                        };
                        let waiter = self.pending().as_mut().and_then(|p| p.remove(&id));
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(result);
                            }
                            None => tracing::warn!("{} answered unknown request {id}", P::PEER),
                        }
                    }
                    Incoming::Event(e) => on_event(e),
                },
                Err(e) => break e,
            }
        };
        // Dropping the senders fails every waiting call (unless a restarted child's link
        // has already taken this one's place: `reattach` dropped them).
        if Arc::ptr_eq(&self.chan(), &chan) {
            self.pending().take();
        }
        err
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, HashMap<CallId, String>> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a part of a long reply, up to [`ipc::block::MAX_JSON_REPLY`] bytes per call;
    /// past that the call fails (and later parts are dropped). Parts of a call nobody waits
    /// for are dropped at once: a hostile peer cannot make the monitor hoard them.
    fn add_part(&self, id: CallId, part: &str) {
        if !self.pending().as_ref().is_some_and(|p| p.contains_key(&id)) {
            tracing::warn!("{} sent part of a reply to unknown request {id}", P::PEER);
            return;
        }
        let mut parts = self.parts();
        let buf = parts.entry(id).or_default();
        if buf.len() + part.len() > ipc::block::MAX_JSON_REPLY {
            // A marker no JSON text can start with: the reply is too long.
            buf.clear();
            buf.push('\0');
        } else if !buf.starts_with('\0') {
            buf.push_str(part);
        }
    }

    /// The parts received for `id`, if any: their text, or why the reply is unusable.
    fn parts_of(&self, id: CallId) -> Option<Result<String, QmpError>> {
        let head = self.parts().remove(&id)?;
        Some(if head.starts_with('\0') {
            Err(QmpError::generic(format!(
                "{}'s reply is over {} bytes",
                P::PEER,
                ipc::block::MAX_JSON_REPLY
            )))
        } else {
            Ok(head)
        })
    }
}
