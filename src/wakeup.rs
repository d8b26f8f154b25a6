//! The LISTEN connection: a dedicated PostgreSQL session that turns NOTIFYs on channel `pgfresh` into
//! wake-ups for the listener, and keeps itself alive.
//!
//! A notification is only a hint (anyone who can connect may NOTIFY anything): its payload is never
//! read as a command, it only makes the listener look at the queue sooner. Notifications sent while
//! this session is down are lost, so every (re)connect also wakes the listener to drain the queue.
//! A session that silently stops delivering (a half-open TCP connection, a stuck proxy) is caught by a
//! periodic NOTIFY to itself that must come back in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_postgres::AsyncMessage;

use crate::Error;
use crate::backoff::Backoff;
use crate::db::Database;
use crate::shutdown::Shutdown;

/// The channel triggers NOTIFY.
pub const CHANNEL: &str = "pgfresh";

/// How often the session NOTIFYs itself to prove that it still delivers.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a ping may take to come back before the session is replaced.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What a notification on the channel is to this listener.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    /// The ping this session sent itself: it still delivers.
    OwnPing,
    /// Another listener's ping to itself: nothing to do.
    OthersPing,
    /// Anything else (triggers send an empty payload): look at the queue.
    WakeUp,
}

fn classify(payload: &str, own_ping: &str) -> Heard {
    if payload == own_ping {
        Heard::OwnPing
    } else if payload.starts_with(PING_PREFIX) {
        Heard::OthersPing
    } else {
        Heard::WakeUp
    }
}

/// Every listener's ping payload starts with this, then its id.
const PING_PREFIX: &str = "ping:";

/// Keeps a LISTEN session open until shutdown, waking `wake` on every notification and after every
/// (re)connect. Losses and recoveries are logged once each, not on every retry.
/// `connected` tells readiness checks whether a LISTEN session is up.
pub async fn run(
    db: Database,
    listener_id: String,
    wake: Arc<Notify>,
    connected: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut lost_since: Option<std::time::Instant> = None;
    while !shutdown.is_cancelled() {
        let error = match session(
            &connected,
            &db,
            &listener_id,
            &wake,
            &shutdown,
            &mut backoff,
            &mut lost_since,
        )
        .await
        {
            Ok(()) => return,
            Err(error) => error,
        };
        connected.store(false, Ordering::Relaxed);
        if lost_since.is_none() {
            tracing::warn!(error = %error, "LISTEN connection lost; reconnecting with backoff");
            lost_since = Some(std::time::Instant::now());
        } else {
            tracing::debug!(error = %error, attempt = backoff.attempts(), "LISTEN reconnect failed");
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// One LISTEN session, from connect until it fails (Err) or shutdown (Ok).
async fn session(
    connected: &AtomicBool,
    db: &Database,
    listener_id: &str,
    wake: &Notify,
    shutdown: &Shutdown,
    backoff: &mut Backoff,
    lost_since: &mut Option<std::time::Instant>,
) -> Result<(), Error> {
    let (client, mut connection) = db.connect_raw("pgfresh listen").await?;
    let ping_payload = format!("{PING_PREFIX}{listener_id}");
    let (pongs, mut pong_received) = mpsc::unbounded_channel::<()>();

    // The connection half must be polled for the client to make progress and for notifications to
    // arrive; it runs until the session breaks or the client is dropped.
    let own_ping = ping_payload.clone();
    let wake_on_notify = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    match classify(note.payload(), &own_ping) {
                        Heard::OwnPing => {
                            let _ = pongs.send(());
                        }
                        Heard::OthersPing => {}
                        Heard::WakeUp => {
                            crate::telemetry::notification();
                            wake.notify_one();
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Error::from(error),
                None => {
                    return Error::PostgresConnect {
                        url: db.url().to_string(),
                        reason: "connection closed".into(),
                    };
                }
            }
        }
    };

    let keep_alive = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Anything committed while no session listened was never announced: drain now.
        wake.notify_one();
        backoff.reset();
        connected.store(true, Ordering::Relaxed);
        if let Some(since) = lost_since.take() {
            crate::telemetry::reconnected("listen");
            tracing::info!(down_for = ?since.elapsed(), "LISTEN connection restored");
        } else {
            tracing::debug!("LISTEN connection established");
        }
        let ping = format!("NOTIFY {CHANNEL}, '{}'", ping_payload.replace('\'', "''"));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(PING_INTERVAL) => {}
            }
            while pong_received.try_recv().is_ok() {}
            let round_trip = async {
                client.batch_execute(&ping).await?;
                pong_received.recv().await;
                Ok::<(), Error>(())
            };
            match tokio::time::timeout(PING_TIMEOUT, round_trip).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(Error::PostgresConnect {
                        url: db.url().to_string(),
                        reason: format!(
                            "LISTEN session did not deliver its own ping within {PING_TIMEOUT:?}"
                        ),
                    });
                }
            }
        }
    };

    tokio::select! {
        error = wake_on_notify => Err(error),
        result = keep_alive => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_listeners_pings_are_neither_pongs_nor_wake_ups() {
        let own = "ping:host:1:aa";
        assert_eq!(classify(own, own), Heard::OwnPing);
        assert_eq!(classify("ping:host:2:bb", own), Heard::OthersPing);
        assert_eq!(classify("", own), Heard::WakeUp);
        assert_eq!(classify("anything else", own), Heard::WakeUp);
    }
}
