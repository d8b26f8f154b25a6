//! Sweeps a listener runs on its own: periodically, when Redis has lost its data, when a deploy
//! changed a fragment's markup, and when a watched table was truncated.
//!
//! Each fragment has a marker in Redis, `pgfresh:fragment:<key prefix>` (one per master in a cluster,
//! see [`crate::keys`]), holding the fragment version of its last complete sweep. Every second the
//! listener reads the markers: a missing marker means Redis came back empty (restart without
//! persistence, FLUSHALL, failover to an empty replica) or was never filled; an older version means
//! this binary renders differently from what Redis holds. Either way the fragment is swept, and the
//! marker set once the sweep has succeeded. Only one listener at a time sweeps: the one holding a
//! PostgreSQL advisory lock on a dedicated session, released with it if the process dies. A TRUNCATE of
//! a watched table leaves a row in `pgfresh.truncations`, read every second too: the fragments of its
//! topic are swept, and the row deleted once the sweep has succeeded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::config::SweepSettings;
use crate::db::Database;
use crate::deploy::StandAside;
use crate::fragment::{DynFragment, Fragments};
use crate::queue::ListenerIdentity;
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;
use crate::status::StatusBoard;
use crate::sweep::{self, SweepReport};

/// The advisory lock key held by the listener that sweeps ("pgfresh" in ASCII).
const SWEEP_LOCK: i64 = 0x0070_6766_7265_7368;

/// How often the markers are read. One GET per fragment: negligible, and it bounds how long Redis
/// may sit empty before the sweep starts.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the maintenance loop works with: the running listener's connections, fragments and state.
pub struct Maintainer {
    /// The database.
    pub db: Database,
    /// Redis.
    pub sink: RedisSink,
    /// The fragments to keep swept.
    pub fragments: Fragments,
    /// The listener, as registered.
    pub me: ListenerIdentity,
    /// Whether it stands aside for a newer listener: then it sweeps nothing.
    pub stand_aside: Arc<StandAside>,
    /// Where sweep results are shown.
    pub board: Arc<StatusBoard>,
}

/// Runs until shutdown; never fails (a failed sweep is logged and tried again).
pub async fn run(
    maintainer: Maintainer,
    periodic: Option<Duration>,
    settings: SweepSettings,
    shutdown: Shutdown,
) {
    let Maintainer {
        db,
        sink,
        fragments,
        me,
        stand_aside,
        board,
    } = maintainer;
    let mut next_periodic = periodic.map(|interval| Instant::now() + interval);
    let mut at_startup = true;
    loop {
        if stand_aside.take_resumed() {
            // Back from standing aside: the newer listener may have left its markup behind.
            at_startup = true;
        }
        if stand_aside.active() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(MARKER_CHECK_INTERVAL) => {}
            }
            continue;
        }
        let periodic_due = next_periodic.is_some_and(|at| Instant::now() >= at);
        // Read before sweeping, so the sweep sees the truncated tables.
        let truncated = match truncations(&db, &fragments).await {
            Ok(truncated) => truncated,
            Err(error) => {
                tracing::debug!(%error, "cannot read pgfresh.truncations");
                Truncations::default()
            }
        };
        let mut due: Vec<Arc<dyn DynFragment>> = if periodic_due {
            fragments.iter().cloned().collect()
        } else {
            match fragments_needing_sweep(&sink, &fragments, at_startup).await {
                Ok(due) => {
                    at_startup = false;
                    due
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot read fragment markers");
                    Vec::new()
                }
            }
        };
        let marker_due = !due.is_empty();
        for fragment in &truncated.fragments {
            if !due.iter().any(|f| f.name() == fragment.name()) {
                due.push(fragment.clone());
            }
        }
        if !due.is_empty() {
            let (reason, label) = if periodic_due {
                ("periodic", "periodic")
            } else if marker_due {
                ("missing or outdated in Redis", "marker")
            } else {
                ("a watched table was truncated", "truncate")
            };
            crate::deploy::wait_for_older(&db, &me, &shutdown).await;
            match sweep_if_elected(&db, &sink, &due, &settings, &shutdown).await {
                Ok(Some(report)) => {
                    log_report(reason, &due, &report);
                    crate::telemetry::swept(label, report.stats.written + report.orphans_deleted);
                    board.swept(label, report.to_string(), report.succeeded());
                    let swept: Vec<&str> = due.iter().map(|f| f.name()).collect();
                    let covered = truncated.covered_by(&swept);
                    if report.succeeded()
                        && !covered.is_empty()
                        && let Err(error) = settle_truncations(&db, &covered).await
                    {
                        tracing::warn!(%error, "cannot settle swept truncations; they will be swept again");
                    }
                }
                Ok(None) => tracing::debug!("another listener is sweeping"),
                Err(error) => tracing::warn!(%error, "sweep failed; it will be tried again"),
            }
            if periodic_due {
                next_periodic = periodic.map(|interval| Instant::now() + interval);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MARKER_CHECK_INTERVAL) => {}
        }
    }
}

/// TRUNCATEs of watched tables waiting for a sweep (see `sql/migrations/0002_truncate.sql`): the rows
/// and the fragments that subscribe to their topics. Rows of topics no fragment here handles are left
/// for a binary that does.
#[derive(Default)]
pub(crate) struct Truncations {
    /// Each recorded TRUNCATE: its id, and the fragments that subscribe to its topic.
    rows: Vec<(i64, Vec<String>)>,
    /// Every fragment that subscribes to a truncated topic.
    pub(crate) fragments: Vec<Arc<dyn DynFragment>>,
}

impl Truncations {
    /// The TRUNCATEs that a successful sweep of the fragments named `swept` covers.
    pub(crate) fn covered_by(&self, swept: &[&str]) -> Vec<i64> {
        self.rows
            .iter()
            .filter(|(_, subscribers)| subscribers.iter().all(|s| swept.contains(&s.as_str())))
            .map(|(id, _)| *id)
            .collect()
    }
}

pub(crate) async fn truncations(
    db: &Database,
    fragments: &Fragments,
) -> Result<Truncations, Error> {
    let rows = db
        .get()
        .await?
        .query("SELECT id, topic FROM pgfresh.truncations", &[])
        .await?;
    let mut truncated = Truncations::default();
    for row in rows {
        let topic: &str = row.get(1);
        let subscribers: Vec<_> = fragments
            .iter()
            .filter(|f| f.topics().contains(&topic))
            .collect();
        if subscribers.is_empty() {
            continue;
        }
        let names = subscribers.iter().map(|f| f.name().to_string()).collect();
        truncated.rows.push((row.get(0), names));
        for fragment in subscribers {
            if !truncated
                .fragments
                .iter()
                .any(|f| f.name() == fragment.name())
            {
                truncated.fragments.push(fragment.clone());
            }
        }
    }
    Ok(truncated)
}

/// Deletes exactly the truncations a sweep covered: one committed meanwhile keeps its row.
pub(crate) async fn settle_truncations(db: &Database, ids: &[i64]) -> Result<(), Error> {
    db.get()
        .await?
        .execute(
            "DELETE FROM pgfresh.truncations WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(())
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
        let markers = sink.fragment_markers(fragment.key_prefix()).await?;
        let needed = markers.into_iter().any(|marker| match marker {
            None => true,
            Some(version) if version < fragment.version() => true,
            Some(version) => at_startup && version != fragment.version(),
        });
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
    let mut tokens = Vec::with_capacity(due.len());
    for fragment in due {
        tokens.push(sink.start_sweep(fragment.key_prefix()).await?);
    }
    let report = sweep::run_selected(db, sink, due, settings, shutdown, &sweep::Silent).await;
    if report.as_ref().is_ok_and(SweepReport::succeeded) {
        for (fragment, token) in due.iter().zip(&tokens) {
            let key_prefix = fragment.key_prefix();
            if !sink
                .finish_sweep(key_prefix, token, fragment.version())
                .await?
            {
                tracing::warn!(
                    fragment = fragment.name(),
                    "Redis lost its data during the sweep; sweeping again"
                );
            }
        }
    }
    // Dropping the session releases the lock too; unlocking first frees it without waiting for that.
    let _ = lock_session
        .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK])
        .await;
    report.map(Some)
}

fn log_report(reason: &str, swept: &[Arc<dyn DynFragment>], report: &SweepReport) {
    let names: Vec<&str> = swept.iter().map(|f| f.name()).collect();
    let fragments = names.join(", ");
    if report.succeeded() {
        tracing::info!(%fragments, reason, "{report}");
    } else {
        tracing::warn!(%fragments, reason, "{report}");
    }
}
