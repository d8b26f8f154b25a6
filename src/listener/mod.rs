//! The listener: keeps Redis fresh by working through the change queue as changes commit.
//!
//! It drains the queue at start-up, after every NOTIFY wake-up, after every reconnect, and every
//! poll interval in case a wake-up was lost. Each batch is claimed with `FOR UPDATE SKIP LOCKED` in a
//! transaction that stays open until its fragments are in Redis, so any number of listeners share the
//! queue without doing a batch twice, and a crash at any point leaves the batch queued
//! (at-least-once). One listener at a time (the one holding the sweep lease) also runs the sweeps.
//!
//! - `shared`: what its tasks share.
//! - `drain`: the loop that drains the queue, idle (waiting for NOTIFYs) or busy (polling);
//!   `floor`, where its claims start, past every change that can never be claimed again.
//! - `batch`: one claimed batch, from claim to commit; `plan`, the pure part deciding what to render;
//!   `route`, which fragment each change reaches, and the fan-out of keys of shared rows.
//! - `wakeup`: the LISTEN session that turns NOTIFYs into wake-ups.
//! - `registration`: its row in the registry, written whole by one writer.
//! - `heartbeat`: the registry row kept fresh, totals published, the queue sampled, pooled sessions
//!   not handed out for a while closed.
//! - `stand_aside`: rolling deploys; a listener stands aside for one with newer fragment versions.
//! - `maintenance`: the sweeps it runs itself (periodic, Redis emptied, markup changed, table
//!   truncated, PostgreSQL restarted), by the one holding the sweep lease.

mod batch;
mod drain;
pub(crate) mod floor;
mod heartbeat;
mod maintenance;
mod plan;
mod registration;
mod route;
mod shared;
mod stand_aside;
mod wakeup;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::config::ListenSettings;
use crate::fragment::Fragments;
use crate::ops::board::StatusBoard;
use crate::pg::Database;
use crate::pg::registry::{self, ListenerIdentity};
use crate::shutdown::Shutdown;
use crate::store::RedisStore;
use registration::Registration;
use shared::Shared;

/// How long a pooled session may go without being handed out before the heartbeat closes it
/// (`pg::Database::close_idle`): past a peak's few minutes, and under the idle timeouts of common
/// cloud load balancers and NAT gateways (four minutes and more).
pub(crate) const IDLE_SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs a listener for `fragments` until `shutdown` is cancelled: applies every committed change to
/// the watched tables, and sweeps when needed. Returns early only if pgfresh is not installed (or
/// older than this binary), a fragment or setting is misdefined, or one of the listener's own tasks
/// died (a bug: the process should stop and be restarted, not run half-dead); lost connections are
/// retried forever. Cancelled while it starts (its checks or registration waiting on PostgreSQL),
/// it returns there, `Ok`.
pub async fn listen(
    db: Database,
    store: RedisStore,
    fragments: Fragments,
    settings: ListenSettings,
    shutdown: Shutdown,
) -> Result<(), Error> {
    fragments.validate()?;
    settings.validate()?;
    check_ttls(&fragments, &settings)?;
    // Start-up may wait on PostgreSQL (a migration holding pgfresh's tables, a server that stopped
    // answering after the connection was made): a shutdown asked for meanwhile ends it there.
    let sessions = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!("shutdown requested before the listener started");
            return Ok(());
        }
        sessions = prepare(&db, &fragments, &settings) => sessions?,
    };
    Listener::new(db, store, fragments, settings, shutdown, sessions)
        .run()
        .await
}

/// What `listen` checks and reads before it starts: pgfresh installed and granted, the fragments'
/// queries valid, and what the listener's sessions are like.
async fn prepare(
    db: &Database,
    fragments: &Fragments,
    settings: &ListenSettings,
) -> Result<Sessions, Error> {
    crate::pg::schema::ensure_installed(db).await?;
    check_grants(db).await?;
    let mut users = db.get().await?;
    if let Some(privileges) = crate::pg::schema::excess_privileges(&users).await? {
        tracing::warn!(
            "listening as {privileges}: every loader and through query runs with those rights; a role with pgfresh_listener's (sql/roles.sql) and SELECT on what the loaders read is all a listener needs"
        );
    }
    route::check_queries(&mut users, fragments).await?;
    let pooled = db.behind_pooler().await?;
    if pooled && let Some(privileges) = crate::pg::schema::excess_privileges(&users).await? {
        tracing::warn!(
            "listening as {privileges} through a connection pooler, where pgfresh cannot pin its sessions' search_path: a function or operator a database owner puts on the role's default path would run with those rights; connect as a role with pgfresh_listener's rights"
        );
    }
    let users_search_path = match pooled {
        false => Some(crate::pg::fan_out::users_search_path(&users).await?),
        true => None,
    };
    drop(users);
    let notifications = !pooled || db.has_session_url();
    if !notifications {
        tracing::warn!(
            poll_interval = ?settings.poll_interval,
            "behind a connection pooler with no --session-url (PGFRESH_SESSION_URL): no LISTEN session, so changes are found by polling every --poll-interval, and writers are never asked to NOTIFY; give a direct connection for LISTEN to apply changes within milliseconds"
        );
    }
    let ids_in_order = crate::pg::queue::ids_in_order(&*db.pinned().await?).await?;
    if !ids_in_order {
        tracing::warn!(
            "the identity of pgfresh.changes has a cache or does not count up: ids are not taken in order, so claims start from the first id and, while a session holds an old snapshot, read every change applied since; ALTER TABLE pgfresh.changes ALTER COLUMN id SET CACHE 1 (and INCREMENT BY 1)"
        );
    }
    Ok(Sessions {
        users_search_path,
        notifications,
        ids_in_order,
    })
}

/// Fails with one line when the role lacks rights a listener needs (a schema upgraded without
/// `sql/roles.sql` run again): it would apply changes but never sweep.
async fn check_grants(db: &Database) -> Result<(), Error> {
    let client = db.pinned().await?;
    let missing = crate::pg::schema::missing_listener_grants(&client).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let role: String = client
        .query_typed_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    Err(Error::MissingGrants {
        role,
        missing: missing.join(", "),
    })
}

/// Entries with a TTL are renewed only by the periodic sweep (an unchanged row is never rendered
/// otherwise), and the next sweep is due an interval after the last or after a restart: with a
/// TTL under three intervals, unchanged entries would expire and stay missing. Refused up front.
fn check_ttls(fragments: &Fragments, settings: &ListenSettings) -> Result<(), Error> {
    for fragment in fragments.iter() {
        let Some(ttl) = fragment.storage().ttl() else {
            continue;
        };
        let shown = |d: std::time::Duration| humantime::format_duration(d).to_string();
        let needed = std::time::Duration::from_secs(ttl.as_secs() / 3);
        let sweeps = match settings.sweep_interval {
            Some(interval) if interval <= needed => continue,
            Some(interval) => format!("every {} (--sweep-interval)", shown(interval)),
            None => "never (--sweep-interval 0)".to_string(),
        };
        return Err(Error::InvalidSetting(format!(
            "fragment {} expires its entries {} after each write (--cache-ttl), and only the periodic sweep renews an unchanged one, which runs {sweeps}: unchanged entries would expire and stay missing; sweep at least every {} (a third of the TTL, for restarts in between), or drop the TTL",
            fragment.name(),
            shown(ttl),
            shown(needed)
        )));
    }
    Ok(())
}

/// How long the batches in hand at shutdown may take to finish: a batch normally takes milliseconds,
/// and one that takes longer (Redis or PostgreSQL hanging) rolls back, losing nothing.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stopping listener tries to remove its row from `pgfresh.listeners` (and give up the
/// sweep lease): a PostgreSQL that stopped answering must not keep it from exiting. A row left
/// behind stops counting among the listeners sharing work after 15 s, and for `status`, `doctor`
/// and the triggers' wake-ups after a minute (`pg::registry`).
const DEREGISTER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// What the listener's sessions are like: found before it starts (see [`Shared`]).
struct Sessions {
    users_search_path: Option<String>,
    notifications: bool,
    /// Whether the queue's ids are taken in order, which its floor counts on.
    ids_in_order: bool,
}

/// A running listener: its shared state and the tasks around the drain loop.
struct Listener {
    shared: Arc<Shared>,
    wake: Arc<Notify>,
}

impl Listener {
    fn new(
        db: Database,
        store: RedisStore,
        fragments: Fragments,
        settings: ListenSettings,
        shutdown: Shutdown,
        sessions: Sessions,
    ) -> Self {
        let me = ListenerIdentity {
            id: format!(
                "{}:{}:{:08x}",
                hostname(),
                std::process::id(),
                fastrand::u32(..)
            ),
            fragments: fragments.iter().map(|f| f.name().to_string()).collect(),
            versions: fragments.iter().map(|f| i64::from(f.version())).collect(),
            stored: fragments.iter().map(|f| f.stored_at()).collect(),
        };
        let board = Arc::new(StatusBoard::new(&fragments));
        let floor = floor::QueueFloor::new(sessions.ids_in_order);
        #[cfg(feature = "testing")]
        let floor = floor.walking_every(settings.walk_from_start);
        let shared = Arc::new(Shared {
            db,
            store,
            fragments,
            settings,
            me: me.clone(),
            stand_aside: Arc::default(),
            shutdown,
            idle: AtomicBool::new(false),
            loads_apart: AtomicBool::new(false),
            recent: Default::default(),
            floor,
            next_wake: Mutex::new(None),
            board,
            registration: Registration::new(me.clone()),
            fatal: Mutex::default(),
            users_search_path: sessions.users_search_path,
            notifications: sessions.notifications,
        });
        Self {
            shared,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Starts the tasks, drains until shutdown (or until a task dies), then stops everything and
    /// deregisters. The batches in hand at shutdown finish (within [`SHUTDOWN_GRACE`]): their changes
    /// reach Redis and leave the queue before the listener exits. The other tasks get the same
    /// grace, and deregistering [`DEREGISTER_WITHIN`]: a server that stopped answering does not
    /// keep the listener from returning.
    async fn run(self) -> Result<(), Error> {
        let shared = &self.shared;
        // Registering (or binding an address) may wait on PostgreSQL too. Stopped there, the
        // tasks spawned so far go with `start`'s future, and a row written is removed. (A
        // registration given up inside its transaction rolls back; one given up as its COMMIT was
        // on its way can land after the removal, to expire.)
        let mut tasks = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => {
                tracing::info!("shutdown requested while the listener was starting");
                self.deregister().await;
                return Ok(());
            }
            started = self.start() => started?,
        };
        // The drain loop runs as a task of its own, on the runtime's workers like the tasks that
        // wake it and the connections it talks through: awaited here, in the caller's future, each
        // wake-up and each batch's end would pass through the thread that polls that future (for
        // the CLI, the main thread), two more thread switches per batch (BENCHMARKS.md, "A batch
        // at low rates"). Aborted when this future is dropped, as the other tasks are.
        let mut drain = AbortOnDropHandle::new(tokio::spawn({
            let (shared, wake) = (shared.clone(), self.wake.clone());
            async move { drain::drain_loop(&shared, &wake).await }
        }));
        let (died, drained) = tokio::select! {
            drained = &mut drain => (None, Some(drained)),
            joined = tasks.join_next() => (joined.map(|joined| joined.map_err(describe_join_error)), None),
        };
        // Read before cancelling below: whether a task that ended was asked to.
        let asked_to_stop = shared.shutdown.is_cancelled();
        // Every task selects on the shutdown token; the drain loop claims nothing more, and the
        // batches it has in hand commit.
        shared.shutdown.cancel();
        let grace_over = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let drained = match drained {
            Some(drained) => Some(drained),
            None => match tokio::time::timeout_at(grace_over, &mut drain).await {
                Ok(drained) => Some(drained),
                Err(_) => {
                    tracing::warn!(
                        grace = ?SHUTDOWN_GRACE,
                        "batches still in hand after the grace period roll back; their changes stay queued"
                    );
                    drain.abort();
                    if let Err(error) = (&mut drain).await
                        && error.is_panic()
                    {
                        let why = describe_join_error(error);
                        tracing::error!(%why, "the drain loop panicked as its grace period ended");
                    }
                    None
                }
            },
        };
        // A drain loop that panicked is a task that died.
        let died = died.or(drained
            .and_then(Result::err)
            .map(|error| Err(describe_join_error(error))));
        // The other tasks end at the token too, but one waiting on a server that stopped answering
        // (a heartbeat's write, a sweep's page) would never see it: within the same grace, or not at
        // all.
        let ended = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(grace_over, ended).await.is_err() {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "tasks still waiting on PostgreSQL or Redis after the grace period are stopped"
            );
            tasks.shutdown().await;
        }
        let fatal = shared.fatal.lock().expect("fatal lock").take();
        self.deregister().await;
        let (applied, refused) = shared.board.totals();
        tracing::info!(
            changes_applied = applied,
            refused_writes = refused,
            "listener stopped"
        );
        if let Some(error) = fatal {
            return Err(error);
        }
        outcome(died, asked_to_stop)
    }

    /// Removes this listener's row from `pgfresh.listeners` and gives up the sweep lease, should a
    /// sweep stopped on the way out have held it (otherwise the next listener could not sweep until
    /// it ran out), within [`DEREGISTER_WITHIN`]. On a session of its own: the pool's session
    /// returned last may still wait behind a statement of a task stopped on the way out.
    async fn deregister(&self) {
        let shared = &self.shared;
        let deregistered = async {
            let client = shared.db.fresh_pinned().await?;
            registry::deregister_listener(&client, &shared.me.id).await?;
            crate::pg::sweeps::release_lease(&client, &shared.me.id).await
        };
        if !matches!(
            tokio::time::timeout(DEREGISTER_WITHIN, deregistered).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(
                "could not remove this listener's row from pgfresh.listeners: status lists it, and triggers may notify for it, for up to a minute"
            );
        }
    }

    /// Binds the HTTP address (before registering, so that a taken port fails start-up cleanly),
    /// registers the listener and spawns its tasks; each returns its name when it ends.
    async fn start(&self) -> Result<JoinSet<&'static str>, Error> {
        let shared = &self.shared;
        let listen_connected = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let (mut serve_counts, mut fragment_server) = (None, None);
        if let Some(address) = &shared.settings.serve {
            let stand_aside = shared.stand_aside.clone();
            let context = crate::serve::Context {
                db: shared.db.clone(),
                store: shared.store.clone(),
                fragments: shared.fragments.clone(),
                board: shared.board.clone(),
                max_pending: shared.settings.serve_max_pending,
                wait: shared.settings.serve_wait,
                render_slots: serve_render_slots(&shared.db, &shared.settings),
                token: shared.settings.serve_token.clone(),
                standing_aside: Box::new(move || stand_aside.active()),
                shutdown: shared.shutdown.clone(),
            };
            let (server, counts) = crate::serve::bind(address, context).await?;
            fragment_server = Some(server);
            serve_counts = Some(counts);
        }
        if let Some(address) = &shared.settings.http {
            self.start_http(address, &listen_connected, serve_counts, &mut tasks)
                .await?;
        }
        shared
            .registration
            .register(&shared.db, &shared.board)
            .await?;
        // Before it renders anything (its first batch, a miss on demand), and after registering:
        // registrations are serialized, so of an old listener and a newer one starting at once,
        // either this look sees the newer one, or the newer one's wait for older listeners before
        // its sweep counts this one.
        stand_aside::look(&shared.db, &shared.me, &shared.stand_aside).await?;
        if let Some(server) = fragment_server {
            spawn(&mut tasks, "fragment server", server);
        }
        crate::ops::telemetry::register_fragments(shared.fragments.iter().map(|f| f.name()));
        crate::ops::telemetry::standing_aside(false);
        tracing::info!(
            listener = %shared.me.id,
            fragments = %shared.fragments.names(),
            database = %shared.db.url(),
            redis = %shared.store.url(),
            "listening for changes"
        );
        if shared.notifications {
            let wakeup = wakeup::Wakeup::new(
                shared.db.clone(),
                shared.me.id.clone(),
                self.wake.clone(),
                listen_connected,
                shared.shutdown.clone(),
            );
            spawn(&mut tasks, "LISTEN session", wakeup.run());
        } else {
            shared.board.polling(shared.settings.poll_interval);
        }
        spawn(
            &mut tasks,
            "heartbeat",
            heartbeat::heartbeat(shared.clone()),
        );
        let deploy = stand_aside::watch(
            shared.db.clone(),
            shared.me.clone(),
            shared.stand_aside.clone(),
            shared.shutdown.clone(),
        );
        spawn(&mut tasks, "rolling deploy watch", deploy);
        spawn(&mut tasks, "maintenance", maintenance::run(shared.clone()));
        Ok(tasks)
    }

    async fn start_http(
        &self,
        address: &str,
        listen_connected: &Arc<AtomicBool>,
        serve: Option<Arc<crate::ops::board::ServeCounts>>,
        tasks: &mut JoinSet<&'static str>,
    ) -> Result<(), Error> {
        let shared = &self.shared;
        let sources = crate::ops::http::Sources {
            listen_connected: listen_connected.clone(),
            board: shared.board.clone(),
            listener_id: shared.me.id.clone(),
            standby: shared.db.standby(),
            serve,
        };
        let server = crate::ops::http::bind(address, sources, shared.shutdown.clone()).await?;
        spawn(tasks, "HTTP server", server);
        let probe = crate::ops::http::probe_redis(
            shared.store.clone(),
            shared.board.clone(),
            shared.shutdown.clone(),
        );
        spawn(tasks, "Redis probe", probe);
        Ok(())
    }
}

/// What `listen` returns once its tasks are done: `died` is the task that ended first (its name, or
/// why it died), if the drain loop did not; `asked_to_stop`, whether shutdown had been asked for
/// when it ended. A task that stops on its own is a bug: the process must exit non-zero, so that a
/// supervisor restarts it.
fn outcome(died: Option<Result<&'static str, String>>, asked_to_stop: bool) -> Result<(), Error> {
    match died {
        None => Ok(()),
        // Tasks end when shutdown asks them to, possibly before the drain loop has noticed.
        Some(Ok(_)) if asked_to_stop => Ok(()),
        Some(Ok(task)) => Err(Error::Internal(format!(
            "the {task} task stopped on its own"
        ))),
        Some(Err(why)) => Err(Error::Internal(format!("a listener task died: {why}"))),
    }
}

/// Spawns a task that returns its name when it ends, so the listener can say which one stopped.
fn spawn(
    tasks: &mut JoinSet<&'static str>,
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) {
    tasks.spawn(async move {
        task.await;
        name
    });
}

/// One line for a task that panicked or was cancelled.
fn describe_join_error(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(panic) => format!("panicked: {}", crate::fragment::panic_message(&panic)),
        Err(error) => error.to_string(),
    }
}

/// This machine's name, for the listener id; "localhost" when it cannot be read.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The sessions of each pool (pgfresh's own statements, user code) a listener's own work may hold
/// at once, with `workers` and `pages` sweep pages: a claim per worker, a ticket per sweep page and
/// three bookkeeping tasks; the loads of each worker and sweep page, and the sweep's pager. What
/// `listen` sizes its pools by (`cli::pool_sizes`).
pub(crate) fn own_sessions(workers: usize, pages: usize) -> (usize, usize) {
    (workers + pages + 3, workers + pages + 1)
}

/// How many on-demand renders (`--serve`) may hold sessions at once (each holds one of each pool):
/// what the database's pools hold beyond [`own_sessions`] (`listen --serve` adds as many as it has
/// workers), one at least.
fn serve_render_slots(db: &Database, settings: &ListenSettings) -> usize {
    let (pinned, users) = db.pool_sizes();
    let (own, users_own) = own_sessions(settings.workers, settings.sweep.concurrency);
    let room = pinned
        .saturating_sub(own)
        .min(users.saturating_sub(users_own));
    room.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_renders_hold_only_the_sessions_the_listener_leaves() {
        let settings = ListenSettings::default();
        let (workers, pages) = (settings.workers, settings.sweep.concurrency);
        let db = |size| Database::new("postgres://127.0.0.1/x", size).unwrap();
        // Pools of 16: 16 - (2 + 4 + 3) for pgfresh's statements, 16 - (2 + 4 + 1) for user code.
        assert_eq!(serve_render_slots(&db(16), &settings), 7);
        assert_eq!(serve_render_slots(&db(4), &settings), 1);
        // As `listen --serve` sizes them: as many as it has workers.
        let (own, users) = own_sessions(workers, pages);
        let cli = db(own + workers);
        cli.limit_user_sessions(users + workers);
        assert_eq!(serve_render_slots(&cli, &settings), workers);
    }

    #[test]
    fn a_task_that_stops_unasked_is_an_error_and_one_asked_to_stop_is_not() {
        assert!(outcome(None, false).is_ok());
        assert!(outcome(Some(Ok("heartbeat")), true).is_ok());
        let unasked = outcome(Some(Ok("heartbeat")), false).unwrap_err();
        assert_eq!(
            unasked.to_string(),
            "internal error: the heartbeat task stopped on its own"
        );
        let died = outcome(Some(Err("panicked: boom".into())), true).unwrap_err();
        assert_eq!(
            died.to_string(),
            "internal error: a listener task died: panicked: boom"
        );
    }
}
