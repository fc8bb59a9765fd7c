//! QMP events: stamped when they happen, rendered once, and broadcast to every client that
//! has finished capabilities negotiation.

use serde_json::Value;
use tokio::sync::broadcast;

use crate::qmp::wire::{self, Timestamp};

/// How many events a slow client may fall behind before it loses some.
const BACKLOG: usize = 4096;

/// The name prefix of splitvmm's own events (QMP's downstream-extension rule).
pub const VENDOR_PREFIX: &str = "__org.splitvmm_";

/// Fan-out of rendered event lines.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<std::sync::Arc<str>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl EventBus {
    /// Emits an event now. `data: None` omits the member, as QEMU does for STOP and RESUME.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        tracing::debug!(event = name, "event");
        let line = wire::event(name, data.as_ref(), Timestamp::now());
        // No receiver means no negotiated client: nothing to deliver.
        let _ = self.tx.send(line.into());
    }

    /// A new receiver, for a client that just finished negotiation.
    pub fn subscribe(&self) -> broadcast::Receiver<std::sync::Arc<str>> {
        self.tx.subscribe()
    }
}
