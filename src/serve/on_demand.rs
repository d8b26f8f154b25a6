//! Renders on demand: one key's fragment loaded, rendered and written through the same ticketed,
//! version-checked path as every other render ([`crate::refresh::refresh`]), then read back from
//! Redis, so that the answer is exactly what Redis holds: the render itself, or a newer one that
//! won the checked write. Concurrent misses of one key share one render; fresh reads (`?fresh=1`)
//! each start their own, since a render already under way may have loaded before the caller's
//! commit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared as SharedFuture};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::Context;
use crate::fragment::{DynFragment, UserClient};
use crate::ops::board::ServeCounts;
use crate::pg::queue::requeue;
use crate::refresh::{REDIS_REFUSED, Refreshed, Writes, refresh};

/// How an on-demand render ended.
#[derive(Clone, Debug)]
pub(super) enum Rendered {
    /// Written (or refused for a newer render): Redis holds the answer, or nothing if the row is
    /// gone.
    Done,
    /// The fragment's code failed on this key (its error, recorded like a listener's).
    Failed(String),
    /// PostgreSQL or Redis could not be reached, or Redis refused the write.
    Unreachable(String),
    /// The load failed with an error PostgreSQL calls transient (a serialization failure, a
    /// deadlock, a lock timeout, a standby's recovery conflict): asking again may do.
    Transient(String),
    /// More renders are in flight than `--serve-max-pending`.
    Busy,
}

/// How long a render waits for its turn to hold sessions: as long as a pool lets a caller wait.
const SESSION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The renders in flight, by fragment key (a render writes every variant of its key).
pub(super) struct OnDemand {
    context: Context,
    in_flight: Mutex<HashMap<String, SharedFuture<BoxFuture<'static, Rendered>>>>,
    pending: Arc<Semaphore>,
    /// Renders holding PostgreSQL sessions, at most `Context::render_slots`.
    sessions: Semaphore,
    /// Every render's task, to wait for at shutdown: one whose request stopped waiting for it
    /// still holds sessions and writes to Redis.
    pub(super) renders: TaskTracker,
    pub(super) counts: Arc<ServeCounts>,
}

impl OnDemand {
    pub(super) fn new(context: Context, counts: Arc<ServeCounts>) -> Arc<Self> {
        let pending = Arc::new(Semaphore::new(context.max_pending.max(1)));
        let sessions = Semaphore::new(context.render_slots.max(1));
        Arc::new(OnDemand {
            context,
            in_flight: Mutex::default(),
            pending,
            sessions,
            renders: TaskTracker::new(),
            counts,
        })
    }

    pub(super) fn context(&self) -> &Context {
        &self.context
    }

    /// Renders `key` of `fragment` now, or waits for the render of it already in flight unless
    /// `fresh` asks for one that starts after this call.
    pub(super) async fn render(
        self: &Arc<Self>,
        fragment: &Arc<dyn DynFragment>,
        key: &str,
        fresh: bool,
    ) -> Rendered {
        let name = format!("{}{key}", fragment.registered_prefix());
        let (render, joined) = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            match in_flight.get(&name) {
                Some(render) if !fresh => (render.clone(), true),
                _ => {
                    let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                        return Rendered::Busy;
                    };
                    let shared_as = (!fresh).then(|| name.clone());
                    let render = self.start(fragment.clone(), key.to_string(), shared_as, permit);
                    if !fresh {
                        in_flight.insert(name, render.clone());
                    }
                    (render, false)
                }
            }
        };
        if joined {
            self.counts.coalesced.fetch_add(1, Ordering::Relaxed);
            crate::ops::telemetry::serve_coalesced();
        }
        render.await
    }

    /// Spawns the render, so that it completes (and its waiters get their answer) even if the
    /// request that started it goes away; a render `shared_as` a name leaves the in-flight map
    /// when it is done (the map's lock, held by the caller until it has inserted it, orders the two).
    fn start(
        self: &Arc<Self>,
        fragment: Arc<dyn DynFragment>,
        key: String,
        shared_as: Option<String>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> SharedFuture<BoxFuture<'static, Rendered>> {
        self.counts.renders.fetch_add(1, Ordering::Relaxed);
        crate::ops::telemetry::serve_render();
        let this = self.clone();
        let fresh = shared_as.is_none();
        let task = self.renders.spawn(async move {
            // Leaves the map however the task ends, a panic included: a finished render left there
            // would answer every later miss of its key.
            let _leave = Leave {
                on_demand: this.clone(),
                name: shared_as,
            };
            let rendered = this.render_now(fragment.as_ref(), key, fresh).await;
            drop(permit);
            rendered
        });
        async move {
            task.await
                .unwrap_or_else(|error| Rendered::Failed(format!("the render task died: {error}")))
        }
        .boxed()
        .shared()
    }

    /// Renders and writes every variant of `key`, and says how that went.
    async fn render_now(&self, fragment: &dyn DynFragment, key: String, fresh: bool) -> Rendered {
        let shared = &self.context;
        let keys = [key];
        // Taken before any session, held until the last: the listener's batches and sweep pages
        // keep the sessions they need however many misses come at once. Waited for as long as the
        // pools let a caller wait for a session.
        let waited = tokio::time::timeout(SESSION_WAIT, self.sessions.acquire()).await;
        let Ok(Ok(_slot)) = waited else {
            let timeout = deadpool_postgres::TimeoutType::Wait;
            let error = crate::Error::from(deadpool_postgres::PoolError::Timeout(timeout));
            return Rendered::Unreachable(error.to_string());
        };
        let refreshed = match self.write_render(fragment, &keys, fresh).await {
            Ok(Some(refreshed)) => refreshed,
            Ok(None) => return Rendered::Unreachable(super::STANDING_ASIDE.into()),
            Err(error) => return Rendered::Unreachable(error.to_string()),
        };
        shared.board.refreshed(fragment.name(), refreshed.stats);
        if let Some((_, reason)) = refreshed.failed.first().or(refreshed.unresolved.first()) {
            if reason.starts_with(REDIS_REFUSED) {
                return Rendered::Unreachable(reason.clone());
            }
            shared.board.failed(fragment.own_topic(), &keys[0], reason);
            if refreshed.transient {
                return Rendered::Transient(reason.clone());
            }
            return Rendered::Failed(reason.clone());
        }
        // Written without a ticket to check against (Redis may evict keys): rendered once more by
        // the listener, as a batch's would be.
        if !refreshed.unchecked.is_empty() {
            let requeued = match shared.db.pinned().await {
                Ok(primary) => requeue(&primary, fragment.own_topic(), &keys, &[None]).await,
                Err(error) => Err(error),
            };
            if let Err(error) = requeued {
                return Rendered::Unreachable(error.to_string());
            }
        }
        Rendered::Done
    }

    /// Takes a ticket, loads (on the standby once it has replayed what the primary had written by
    /// then, as a batch does), renders and writes through the checked write; or, if the listener
    /// stands aside by the time it has its ticket, nothing (`None`).
    async fn write_render(
        &self,
        fragment: &dyn DynFragment,
        keys: &[String],
        fresh: bool,
    ) -> Result<Option<Refreshed>, crate::Error> {
        let db = &self.context.db;
        let (ticket, session) = db.ticket_and_loads().await?;
        // A render that waited for a session through the start of a newer version (a rolling
        // deploy) could otherwise write this version's markup under a ticket newer than the new
        // version's sweep, which then loses to it, and the old markup stays. Asked once the ticket
        // is taken: a listener records standing aside only after it knows it is asked to, so a
        // ticket taken before it knew precedes every ticket of the new version's sweep.
        if (self.context.standing_aside)() {
            return Ok(None);
        }
        let loader = UserClient::of(db, &session).await?;
        // A miss: Redis holds no entry of this key to delete. A fresh read may find one of a row
        // since deleted: that one goes, but a key that never had one gets no delete's ticket.
        let writes = match fresh {
            true => Writes::HeldDeletes,
            false => Writes::NoDeletes,
        };
        let refreshed =
            refresh(loader, &self.context.store, fragment, keys, ticket, writes).await?;
        Ok(Some(refreshed))
    }
}

/// Takes a shared render out of the in-flight map when dropped.
struct Leave {
    on_demand: Arc<OnDemand>,
    name: Option<String>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            self.on_demand
                .in_flight
                .lock()
                .expect("in-flight lock")
                .remove(name);
        }
    }
}
