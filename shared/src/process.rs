//! What every Portcullis binary does at start-up and shutdown, done one way: structured logging
//! to stderr (text or JSON, filtered by `RUST_LOG`, `info` by default) and one shutdown signal
//! (SIGTERM or Ctrl-C) turned into the codebase's one shutdown primitive, a `CancellationToken`.
//!
//! Behind the `process` feature so the upstream-side claims library does not pull in tokio.

use tokio_util::sync::CancellationToken;

/// Installs the global tracing subscriber. Call once, first thing in `main`.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Waits for SIGTERM or Ctrl-C, then cancels `token` (everything drains from there).
pub async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; draining");
    token.cancel();
}
