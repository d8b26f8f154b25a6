//! The LISTEN connection: a dedicated PostgreSQL session that turns NOTIFYs on channel `pgfresh` into
//! wake-ups for the listener, and keeps itself alive.
//!
//! A notification is only a hint (anyone who can connect may NOTIFY anything): its payload is never
//! read as a command, it only makes the listener look at the queue sooner. Notifications sent while
//! this session is down are lost, so every (re)connect also wakes the listener to drain the queue.
//! A session that silently stops delivering (a half-open TCP connection, a stuck proxy) is caught by a
//! periodic NOTIFY to itself that must come back in time. At shutdown the session ends as
//! PostgreSQL expects, with its Terminate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_postgres::AsyncMessage;

use crate::Error;
use crate::backoff::Backoff;
use crate::pg::{CLOSING_WAIT, Database, TlsStream};
use crate::shutdown::Shutdown;

/// The channel triggers NOTIFY.
pub(crate) const CHANNEL: &str = "pgfresh";

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

/// Keeps a LISTEN session open until shutdown, waking the drain loop on every notification and after
/// every (re)connect. Losses and recoveries are logged once each, not on every retry.
pub(crate) struct Wakeup {
    db: Database,
    /// Its pings carry it, to tell them from other listeners'.
    listener_id: String,
    wake: Arc<Notify>,
    /// Tells readiness checks whether a LISTEN session is up.
    connected: Arc<AtomicBool>,
    shutdown: Shutdown,
    backoff: Backoff,
    /// Since when the session has been down, if it has: to log the recovery once.
    lost_since: Option<Instant>,
}

impl Wakeup {
    pub(crate) fn new(
        db: Database,
        listener_id: String,
        wake: Arc<Notify>,
        connected: Arc<AtomicBool>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            db,
            listener_id,
            wake,
            connected,
            shutdown,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            lost_since: None,
        }
    }

    pub(crate) async fn run(mut self) {
        while !self.shutdown.is_cancelled() {
            let error = match self.session().await {
                Ok(()) => return,
                Err(error) => error,
            };
            self.connected.store(false, Ordering::Relaxed);
            if self.lost_since.is_none() {
                tracing::warn!(error = %error, "LISTEN connection lost; reconnecting with backoff");
                self.lost_since = Some(Instant::now());
            } else {
                tracing::debug!(error = %error, attempt = self.backoff.attempts(), "LISTEN reconnect failed");
            }
            if !self.backoff.wait(&self.shutdown).await {
                return;
            }
        }
    }

    /// One LISTEN session, from connect until it fails (Err) or shutdown (Ok).
    async fn session(&mut self) -> Result<(), Error> {
        let (client, mut connection) = self.db.connect_raw("pgfresh listen").await?;
        let ping = format!("{PING_PREFIX}{}", self.listener_id);
        let (pongs, pong_received) = mpsc::unbounded_channel::<()>();
        // The connection half must be polled for the client to make progress and for notifications
        // to arrive; it runs until the session breaks or the client is dropped.
        let (wake, url) = (self.wake.clone(), self.db.listen_url().to_string());
        let delivering = deliver(&mut connection, &ping, &pongs, &wake, &url);
        tokio::select! {
            error = delivering => return Err(error),
            result = self.keep_alive(&client, &ping, pong_received) => result?,
        }
        // Shutting down: the connection, left alone with its client gone, sends PostgreSQL's
        // Terminate and closes (over TLS, its TLS session too), so the server logs nothing for it.
        drop(client);
        let _ = tokio::time::timeout(CLOSING_WAIT, connection).await;
        Ok(())
    }

    /// LISTENs, says so, then pings the session every [`PING_INTERVAL`]: a ping not back within
    /// [`PING_TIMEOUT`] means the session delivers nothing any more.
    async fn keep_alive(
        &mut self,
        client: &tokio_postgres::Client,
        ping: &str,
        mut pong_received: mpsc::UnboundedReceiver<()>,
    ) -> Result<(), Error> {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        self.established();
        let notify = format!("NOTIFY {CHANNEL}, '{}'", ping.replace('\'', "''"));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(PING_INTERVAL) => {}
            }
            while pong_received.try_recv().is_ok() {}
            let round_trip = async {
                client.batch_execute(&notify).await?;
                pong_received.recv().await;
                Ok::<(), Error>(())
            };
            match tokio::time::timeout(PING_TIMEOUT, round_trip).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(Error::PostgresConnect {
                        url: self.db.listen_url().to_string(),
                        reason: format!(
                            "LISTEN session did not deliver its own ping within {PING_TIMEOUT:?}"
                        ),
                    });
                }
            }
        }
    }

    /// A session is up: drain now (anything committed while none listened was never announced).
    fn established(&mut self) {
        self.wake.notify_one();
        self.backoff.reset();
        self.connected.store(true, Ordering::Relaxed);
        if let Some(since) = self.lost_since.take() {
            crate::ops::telemetry::reconnected("listen");
            tracing::info!(down_for = ?since.elapsed(), "LISTEN connection restored");
        } else {
            tracing::debug!("LISTEN connection established");
        }
    }
}

/// Reads the session's messages until it breaks: own pings answer the keep-alive, other listeners'
/// are ignored, anything else wakes the drain loop.
async fn deliver(
    connection: &mut tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>,
    own_ping: &str,
    pongs: &mpsc::UnboundedSender<()>,
    wake: &Notify,
    url: &str,
) -> Error {
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(note))) => {
                match classify(note.payload(), own_ping) {
                    Heard::OwnPing => {
                        let _ = pongs.send(());
                    }
                    Heard::OthersPing => {}
                    Heard::WakeUp => {
                        crate::ops::telemetry::notification();
                        wake.notify_one();
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => return Error::from(error),
            None => {
                return Error::PostgresConnect {
                    url: url.to_string(),
                    reason: "connection closed".into(),
                };
            }
        }
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
