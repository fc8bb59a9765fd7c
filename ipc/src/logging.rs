//! Logging set-up shared by the three processes: `tracing` to stderr, filtered by
//! `RUST_LOG` (default: warnings).

/// Installs the subscriber for `process`.
pub fn init(process: &'static str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .compact()
        .try_init();
    tracing::debug!("{process} started");
}
