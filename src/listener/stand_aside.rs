//! Rolling deploys: a listener stands aside while another renders a newer version of its fragments.
//!
//! Every listener records in `pgfresh.listeners` the fragments it renders and their versions. Once a
//! second each one asks whether a live listener renders a newer version of one of its fragments. If
//! so it stands aside: it finishes the batches in hand, records that (in the column `superseded`),
//! and claims nothing and sweeps nothing until that listener is gone (stopped, or silent for 15 s).
//! Before a sweep, a listener waits (up to [`STAND_ASIDE_WAIT`]) until listeners with older versions
//! have stood aside, so no old batch can land after the sweep has passed its keys. A listener that
//! stood aside and resumes (the newer one went away: a rollback) checks its fragments' markers as at
//! start-up, so the markup Redis holds is brought back to its version.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::pg::Database;
use crate::pg::registry::{self, ListenerIdentity};
use crate::shutdown::{Shutdown, pause};

/// How often a listener asks whether a newer listener runs.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a sweep waits for listeners with older versions to stand aside. Longer than a batch
/// takes; listeners of releases before this mechanism never stand aside, so it must end.
pub(crate) const STAND_ASIDE_WAIT: Duration = Duration::from_secs(10);

/// Whether this listener stands aside, as asked by [`watch`] and as recorded by the drain loop.
#[derive(Debug, Default)]
pub(crate) struct StandAside {
    /// A newer listener is running: stop claiming.
    requested: AtomicBool,
    /// The registry says this listener stands aside (its batches in hand are done).
    recorded: AtomicBool,
    /// It stood aside and has resumed since the maintenance loop last looked.
    resumed: AtomicBool,
}

impl StandAside {
    /// Whether a newer listener asks this one to stop claiming changes. (Sequentially consistent,
    /// as its store: a render on demand that reads `false` after taking its ticket took it before
    /// the drain loop read `true` and recorded standing aside, so before the newer version's sweep
    /// took any; see `serve::on_demand`.)
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Whether this listener stands aside now, or is about to: it must not sweep.
    pub(crate) fn active(&self) -> bool {
        self.requested() || self.recorded.load(Ordering::Relaxed)
    }

    /// Whether the registry says so.
    pub(crate) fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Notes what the registry now says.
    pub(crate) fn set_recorded(&self, standing_aside: bool) {
        let was = self.recorded.swap(standing_aside, Ordering::Relaxed);
        if was && !standing_aside {
            self.resumed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether this listener resumed since the last call.
    pub(crate) fn take_resumed(&self) -> bool {
        self.resumed.swap(false, Ordering::Relaxed)
    }
}

/// Asks once a second whether a newer listener runs, until shutdown; logs each change of answer.
pub(crate) async fn watch(
    db: Database,
    me: ListenerIdentity,
    state: std::sync::Arc<StandAside>,
    shutdown: Shutdown,
) {
    loop {
        if let Err(error) = look(&db, &me, &state).await {
            tracing::debug!(%error, "cannot tell whether a newer listener runs");
        }
        if !pause(&shutdown, CHECK_INTERVAL).await {
            return;
        }
    }
}

/// Asks once whether a newer listener runs, and notes the answer (logging a change of it). Also
/// called as the listener starts, before it renders anything: one started beside a newer listener
/// (an old release restarted mid-deploy) stands aside from its first batch and its first render on
/// demand, not from this watch's first look a moment later.
pub(crate) async fn look(
    db: &Database,
    me: &ListenerIdentity,
    state: &StandAside,
) -> Result<(), crate::Error> {
    let newer = registry::newer_listener_running(&*db.pinned().await?, me).await?;
    if newer != state.requested() {
        if newer {
            tracing::warn!(
                "a listener with a newer version of these fragments is running: standing aside until it is gone"
            );
        } else {
            tracing::info!("no newer listener is running any more: applying changes again");
        }
        state.requested.store(newer, Ordering::SeqCst);
    }
    Ok(())
}

/// Waits until no live listener applies changes with an older version of `me`'s fragments, or
/// [`STAND_ASIDE_WAIT`] has passed.
pub(crate) async fn wait_for_older(db: &Database, me: &ListenerIdentity, shutdown: &Shutdown) {
    let started = Instant::now();
    let mut logged = false;
    loop {
        let working = match db.pinned().await {
            Ok(client) => registry::older_listeners_working(&client, me).await,
            Err(error) => Err(error),
        };
        match working {
            Ok(0) | Err(_) => return,
            Ok(working) if started.elapsed() >= STAND_ASIDE_WAIT => {
                tracing::warn!(
                    working,
                    "listeners with an older version of these fragments have not stood aside; sweeping anyway"
                );
                return;
            }
            Ok(working) if !logged => {
                tracing::info!(
                    working,
                    "waiting for listeners with an older version to stand aside"
                );
                logged = true;
            }
            Ok(_) => {}
        }
        if !pause(shutdown, Duration::from_millis(100)).await {
            return;
        }
    }
}
