//! SIGTERM, SIGINT and SIGHUP ask splitvmm to shut down, as they do QEMU.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The installed handlers.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// Installs the handlers; done before the sandbox is entered.
pub fn install() -> std::io::Result<Signals> {
    Ok(Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    })
}

impl Signals {
    /// Returns when any of the signals arrives.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}
