//! Graceful shutdown: one token, cancelled once on SIGINT or SIGTERM, that every loop selects on.
//!
//! Library functions take the token rather than installing signal handlers themselves, so a program
//! embedding pgfresh decides when to stop it.

/// The shutdown token: cancel it to stop a listener or a sweep; clones share it.
pub use tokio_util::sync::CancellationToken as Shutdown;

/// Sleeps for `duration`, or until `shutdown` comes; returns whether the caller should go on. The
/// one way pgfresh's loops wait between rounds of work:
/// `loop { work().await; if !pause(&shutdown, EVERY).await { return } }`.
pub(crate) async fn pause(shutdown: &Shutdown, duration: std::time::Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled at the first SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> Shutdown {
    let shutdown = Shutdown::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested: finishing the batches in hand");
        trigger.cancel();
    });
    shutdown
}
