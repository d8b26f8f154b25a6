//! Sweeps a listener runs on its own: periodically, when Redis has lost its data, and when a deploy
//! changed a fragment's markup.
//!
//! Each fragment has a marker in Redis, `pgfresh:fragment:<key prefix>`, holding the fragment version
//! of its last complete sweep. Every second the listener reads the markers: a missing marker means
//! Redis came back empty (restart without persistence, FLUSHALL, failover to an empty replica) or was
//! never filled; an older version means this binary renders differently from what Redis holds. Either
//! way the fragment is swept, and the marker set once the sweep has succeeded. Only one listener at a
//! time sweeps: the one holding a PostgreSQL advisory lock on a dedicated session, released with it if
//! the process dies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::config::SweepSettings;
use crate::db::Database;
use crate::fragment::{DynFragment, Fragments};
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;
use crate::sweep::{self, SweepReport};

/// The advisory lock key held by the listener that sweeps ("pgfresh" in ASCII).
const SWEEP_LOCK: i64 = 0x0070_6766_7265_7368;

/// How often the markers are read. One GET per fragment: negligible, and it bounds how long Redis
/// may sit empty before the sweep starts.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until shutdown; never fails (a failed sweep is logged and tried again).
pub async fn run(
    db: Database,
    sink: RedisSink,
    fragments: Fragments,
    periodic: Option<Duration>,
    settings: SweepSettings,
    shutdown: Shutdown,
) {
    let mut next_periodic = periodic.map(|interval| Instant::now() + interval);
    let mut started = true;
    loop {
        let (due, reason) = match next_periodic {
            Some(at) if Instant::now() >= at => (fragments.iter().cloned().collect(), "periodic"),
            _ => match fragments_needing_sweep(&sink, &fragments, started).await {
                Ok(due) => {
                    started = false;
                    (due, "Redis lacks the current render of")
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot read fragment markers");
                    (Vec::new(), "")
                }
            },
        };
        if !due.is_empty() {
            match sweep_if_elected(&db, &sink, &due, &settings, &shutdown).await {
                Ok(Some(report)) => {
                    log_report(reason, &due, &report);
                    if report.succeeded() {
                        mark_swept(&sink, &due).await;
                    }
                    if reason == "periodic" {
                        next_periodic = periodic.map(|interval| Instant::now() + interval);
                    }
                }
                Ok(None) => {
                    tracing::debug!("another listener is sweeping");
                    if reason == "periodic" {
                        next_periodic = periodic.map(|interval| Instant::now() + interval);
                    }
                }
                Err(error) => tracing::warn!(%error, "sweep failed; it will be tried again"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MARKER_CHECK_INTERVAL) => {}
        }
    }
}

/// Fragments whose marker is missing or older than this binary's version. At start-up a newer marker
/// counts too: that is a rollback to older markup.
async fn fragments_needing_sweep(
    sink: &RedisSink,
    fragments: &Fragments,
    at_startup: bool,
) -> Result<Vec<Arc<dyn DynFragment>>, Error> {
    let mut due = Vec::new();
    for fragment in fragments.iter() {
        let needed = match sink.fragment_marker(fragment.key_prefix()).await? {
            None => true,
            Some(version) if version < fragment.version() => true,
            Some(version) => at_startup && version != fragment.version(),
        };
        if needed {
            due.push(fragment.clone());
        }
    }
    Ok(due)
}

/// Sweeps `due` while holding the sweep lock; `None` if another listener holds it.
async fn sweep_if_elected(
    db: &Database,
    sink: &RedisSink,
    due: &[Arc<dyn DynFragment>],
    settings: &SweepSettings,
    shutdown: &Shutdown,
) -> Result<Option<SweepReport>, Error> {
    let lock_session = db.connect_dedicated("pgfresh sweep lock").await?;
    let elected: bool = lock_session
        .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
        .await?
        .get(0);
    if !elected {
        return Ok(None);
    }
    let report = sweep::run_selected(db, sink, due, settings, shutdown).await;
    // Dropping the session releases the lock too; unlocking first frees it without waiting for that.
    let _ = lock_session
        .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK])
        .await;
    report.map(Some)
}

async fn mark_swept(sink: &RedisSink, swept: &[Arc<dyn DynFragment>]) {
    for fragment in swept {
        if let Err(error) = sink
            .set_fragment_marker(fragment.key_prefix(), fragment.version())
            .await
        {
            tracing::warn!(%error, fragment = fragment.name(), "cannot record the sweep in Redis");
        }
    }
}

fn log_report(reason: &str, swept: &[Arc<dyn DynFragment>], report: &SweepReport) {
    let names: Vec<&str> = swept.iter().map(|f| f.name()).collect();
    if report.succeeded() {
        tracing::info!(fragments = %names.join(", "), "{reason} {report}");
    } else {
        tracing::warn!(fragments = %names.join(", "), "{reason} {report}");
    }
}
