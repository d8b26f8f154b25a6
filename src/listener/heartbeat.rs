//! The heartbeat: keeps this listener's registry row fresh (triggers stop waking a listener silent
//! for a minute, others count it gone after 15 s), publishes its totals for `status`, samples the
//! queue for the metrics and the status page, and closes pooled sessions not handed out for a
//! while, at once and then every few seconds.

use std::sync::Arc;

use super::shared::Shared;
use crate::pg::{queue, registry};
use crate::shutdown::pause;

/// Keeps this listener's registry row fresh so triggers keep waking it, and its counters current;
/// samples the queue for metrics and the status page, at once and then at every beat.
pub(crate) async fn heartbeat(shared: Arc<Shared>) {
    loop {
        #[cfg(feature = "testing")]
        let lifetime = shared.settings.idle_session_lifetime;
        #[cfg(not(feature = "testing"))]
        let lifetime = super::IDLE_SESSION_LIFETIME;
        // Before this beat takes its own session: the pinned pool keeps one, not two.
        let closed = shared.db.close_idle(lifetime);
        if closed > 0 {
            tracing::debug!(closed, "closed pooled sessions not handed out for a while");
        }
        if let Ok(client) = shared.db.pinned().await {
            beat(&shared, &client).await;
        }
        if !pause(&shared.shutdown, registry::HEARTBEAT).await {
            return;
        }
    }
}

async fn beat(shared: &Shared, client: &tokio_postgres::Client) {
    let stats = queue::stats(client, shared.floor.current()).await;
    if let Ok(stats) = &stats
        && let Ok(usage) = queue::notification_queue_usage(client).await
    {
        crate::ops::telemetry::queue(stats, usage);
    }
    shared
        .board
        .queue_sampled(stats.map_err(|error| error.to_string()));
    let said = shared.registration.say(&shared.db, &shared.board, |_| {});
    if let Err(error) = said.await {
        tracing::debug!(%error, "heartbeat failed");
    }
    if let Err(error) = shared.registration.check_sharing(&shared.db).await {
        let conflict = matches!(
            error,
            crate::Error::StorageConflict { .. } | crate::Error::PrefixConflict { .. }
        );
        if conflict {
            tracing::error!(%error, "stopping");
            *shared.fatal.lock().expect("fatal lock") = Some(error);
            shared.shutdown.cancel();
        }
    }
}
