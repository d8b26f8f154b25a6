//! The listener: keeps Redis fresh by working through the change queue as changes commit.
//!
//! It drains the queue at start-up, after every NOTIFY wake-up, after every reconnect, and every
//! poll interval in case a wake-up was lost. Each batch is claimed with `FOR UPDATE SKIP LOCKED` in a
//! transaction that stays open until its fragments are in Redis, so any number of listeners share the
//! queue without doing a batch twice, and a crash at any point leaves the batch queued
//! (at-least-once). One listener at a time (an advisory lock elects it) also runs the periodic sweep.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::Error;
use crate::backoff::Backoff;
use crate::coalesce::RecentRenders;
use crate::config::ListenSettings;
use crate::db::Database;
use crate::deploy::StandAside;
use crate::fragment::Fragments;
use crate::queue::{self, ListenerIdentity};
use crate::refresh::RefreshStats;
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;
use crate::status::StatusBoard;

/// How often a listener tells the database it is alive.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Above this many changes per second the listener stops asking for NOTIFYs and polls instead. Every
/// notifying commit takes a cluster-wide lock; at this rate that costs writers little, while a listener
/// that kept notifications on under load was measured to cut 8-client write throughput to a fifth.
const BUSY_RATE: f64 = 300.0;

/// How often a busy listener looks at the queue: this bounds the latency it adds under load.
const BUSY_POLL: Duration = Duration::from_millis(20);

/// How long the queue must stay empty before a busy listener asks for NOTIFYs again.
const QUIET_BEFORE_IDLE: Duration = Duration::from_millis(100);

/// The window over which the change rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// Everything the listener's tasks share.
pub(crate) struct Shared {
    pub(crate) db: Database,
    pub(crate) sink: RedisSink,
    pub(crate) fragments: Fragments,
    pub(crate) settings: ListenSettings,
    /// This listener's id and fragment versions, as registered.
    pub(crate) me: ListenerIdentity,
    /// Whether it stands aside for a listener with newer fragment versions (see `deploy`).
    pub(crate) stand_aside: Arc<StandAside>,
    pub(crate) shutdown: Shutdown,
    pub(crate) counters: Counters,
    /// Whether this listener last told the database it is idle (wants NOTIFYs). The heartbeat
    /// re-asserts it, since a PostgreSQL crash empties the unlogged registry.
    pub(crate) idle: AtomicBool,
    /// Recent renders, to settle covered changes and slow down hot keys.
    pub(crate) recent: RecentRenders,
    /// When deferred changes become ready: the drain loop looks at the queue again then.
    pub(crate) next_wake: Mutex<Option<Instant>>,
    /// What the status page shows.
    pub(crate) board: Arc<StatusBoard>,
}

impl Shared {
    /// Makes the drain loop look at the queue again no later than `at`.
    pub(crate) fn wake_by(&self, at: Instant) {
        let mut next = self.next_wake.lock().expect("next wake lock");
        *next = Some(next.map_or(at, |earlier| earlier.min(at)));
    }
}

/// Running totals, reported in `pgfresh.listeners` (and so by `status`) at every heartbeat.
#[derive(Default)]
pub(crate) struct Counters {
    changes_done: AtomicI64,
    refused_writes: AtomicI64,
}

impl Counters {
    pub(crate) fn add(&self, changes: usize, stats: &RefreshStats) {
        self.changes_done
            .fetch_add(changes as i64, Ordering::Relaxed);
        self.refused_writes
            .fetch_add(stats.refused as i64, Ordering::Relaxed);
    }

    fn read(&self) -> (i64, i64) {
        (
            self.changes_done.load(Ordering::Relaxed),
            self.refused_writes.load(Ordering::Relaxed),
        )
    }
}

/// What one pass over the queue found.
#[derive(Default)]
struct Drained {
    stats: RefreshStats,
    changes: u64,
}

/// Runs a listener until `shutdown` is cancelled. Returns early only if pgfresh is not installed, a
/// fragment or setting is misdefined, or one of its own tasks died (a bug: the process should stop and
/// be restarted rather than run half-dead); lost connections are retried forever.
pub async fn run(
    db: Database,
    sink: RedisSink,
    fragments: Fragments,
    settings: ListenSettings,
    shutdown: Shutdown,
) -> Result<(), Error> {
    fragments.validate()?;
    settings.validate()?;
    crate::schema::ensure_installed(&db).await?;
    let me = ListenerIdentity {
        id: format!(
            "{}:{}:{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        ),
        fragments: fragments.iter().map(|f| f.name().to_string()).collect(),
        versions: fragments.iter().map(|f| i64::from(f.version())).collect(),
    };
    let shared = Arc::new(Shared {
        db,
        sink,
        fragments,
        settings,
        me,
        stand_aside: Arc::new(StandAside::default()),
        shutdown,
        counters: Counters::default(),
        idle: AtomicBool::new(false),
        recent: RecentRenders::default(),
        next_wake: Mutex::new(None),
        board: Arc::new(StatusBoard::default()),
    });
    let wake = Arc::new(Notify::new());
    let mut tasks = start(&shared, &wake).await?;
    let died = tokio::select! {
        _ = drain_loop(&shared, &wake) => None,
        joined = tasks.join_next() => joined,
    };

    // Every task selects on the shutdown token; wait for them to finish their current step.
    shared.shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if let Ok(client) = shared.db.get().await {
        let _ = queue::deregister_listener(&client, &shared.me.id).await;
    }
    let (changes, refused) = shared.counters.read();
    tracing::info!(
        changes_done = changes,
        refused_writes = refused,
        "listener stopped"
    );
    match died {
        None => Ok(()),
        // Tasks end when shutdown asks them to, possibly before the drain loop has noticed.
        Some(Ok(_)) if shared.shutdown.is_cancelled() => Ok(()),
        Some(Ok(task)) => Err(Error::Internal(format!(
            "the {task} task stopped on its own"
        ))),
        Some(Err(error)) => Err(Error::Internal(format!(
            "a listener task died: {}",
            describe_join_error(error)
        ))),
    }
}

/// Binds the HTTP address (before registering, so that a taken port fails start-up cleanly),
/// registers the listener and spawns its tasks; each task returns its name when it ends.
async fn start(shared: &Arc<Shared>, wake: &Arc<Notify>) -> Result<JoinSet<&'static str>, Error> {
    let listen_connected = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    if let Some(address) = &shared.settings.http {
        let sources = crate::http::Sources {
            listen_connected: listen_connected.clone(),
            board: shared.board.clone(),
            listener_id: shared.me.id.clone(),
        };
        let server = crate::http::bind(address, sources, shared.shutdown.clone()).await?;
        tasks.spawn(async move {
            server.await;
            "HTTP server"
        });
        let probe = crate::http::probe_redis(
            shared.sink.clone(),
            shared.board.clone(),
            shared.shutdown.clone(),
        );
        tasks.spawn(async move {
            probe.await;
            "Redis probe"
        });
    }
    queue::register_listener(&*shared.db.get().await?, &shared.me).await?;
    crate::telemetry::register_fragments(shared.fragments.iter().map(|f| f.name()));
    crate::telemetry::standing_aside(false);
    tracing::info!(
        listener = %shared.me.id,
        fragments = %shared.fragments.names(),
        database = %shared.db.url(),
        redis = %shared.sink.url(),
        "listening for changes"
    );
    let wakeup = crate::wakeup::run(
        shared.db.clone(),
        shared.me.id.clone(),
        wake.clone(),
        listen_connected,
        shared.shutdown.clone(),
    );
    tasks.spawn(async move {
        wakeup.await;
        "LISTEN session"
    });
    let beat = heartbeat(shared.clone());
    tasks.spawn(async move {
        beat.await;
        "heartbeat"
    });
    let deploy = crate::deploy::watch(
        shared.db.clone(),
        shared.me.clone(),
        shared.stand_aside.clone(),
        shared.shutdown.clone(),
    );
    tasks.spawn(async move {
        deploy.await;
        "rolling deploy watch"
    });
    let maintenance = crate::maintenance::run(
        crate::maintenance::Maintainer {
            db: shared.db.clone(),
            sink: shared.sink.clone(),
            fragments: shared.fragments.clone(),
            me: shared.me.clone(),
            stand_aside: shared.stand_aside.clone(),
            board: shared.board.clone(),
        },
        shared.settings.sweep_interval,
        shared.settings.sweep.clone(),
        shared.shutdown.clone(),
    );
    tasks.spawn(async move {
        maintenance.await;
        "maintenance"
    });
    Ok(tasks)
}

/// One line for a task that panicked or was cancelled.
fn describe_join_error(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(panic) => format!("panicked: {}", crate::fragment::panic_message(&panic)),
        Err(error) => error.to_string(),
    }
}

/// Drains the queue whenever there may be work, until shutdown.
///
/// While changes are rare the listener is *idle*: it has told the database so (triggers then NOTIFY)
/// and waits for a notification or the poll interval. When they arrive faster than [`BUSY_RATE`] it
/// turns *busy*: triggers stop notifying and the listener polls every [`BUSY_POLL`] until the queue
/// has been empty for [`QUIET_BEFORE_IDLE`].
async fn drain_loop(shared: &Arc<Shared>, wake: &Notify) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut failing_since: Option<Instant> = None;
    let mut rate = ChangeRate::default();
    let mut last_change = Instant::now();
    while !shared.shutdown.is_cancelled() {
        if stand_aside(shared).await {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {}
                _ = tokio::time::sleep(shared.settings.poll_interval) => {}
            }
            continue;
        }
        let drained = match drain(shared).await {
            Ok(drained) => drained,
            Err(error) => {
                if failing_since.is_none() {
                    tracing::warn!(%error, "cannot process changes; they stay queued, retrying with backoff");
                    failing_since = Some(Instant::now());
                } else {
                    tracing::debug!(%error, "still cannot process changes");
                }
                backoff.wait(&shared.shutdown).await;
                continue;
            }
        };
        backoff.reset();
        if let Some(since) = failing_since.take() {
            tracing::info!(after = ?since.elapsed(), "processing changes again");
        }
        if drained.changes > 0 {
            last_change = Instant::now();
            tracing::debug!(changes = drained.changes, stats = ?drained.stats, "drained");
        }
        let per_second = rate.record(drained.changes);
        let idle = shared.idle.load(Ordering::Relaxed);
        let want_idle = if idle {
            per_second <= BUSY_RATE
        } else {
            last_change.elapsed() >= QUIET_BEFORE_IDLE
        };
        // After asking for NOTIFYs, drain once more: a change whose trigger read the flag just before
        // it was set would otherwise wait for the next poll.
        if want_idle != idle && set_idle(shared, want_idle).await && want_idle {
            continue;
        }
        let mut pause = if shared.idle.load(Ordering::Relaxed) {
            shared.settings.poll_interval
        } else {
            BUSY_POLL
        };
        if let Some(at) = shared.next_wake.lock().expect("next wake lock").take() {
            // A little after the deferred changes' retry time, which PostgreSQL's clock decides.
            pause =
                pause.min(at.saturating_duration_since(Instant::now()) + Duration::from_millis(2));
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Records in the registry whether this listener stands aside for a newer one, and returns whether it
/// does. The drain loop calls it between drains, so by the time `superseded` is recorded no batch of
/// this listener is in hand; a standing-aside listener also stops asking for NOTIFYs.
async fn stand_aside(shared: &Shared) -> bool {
    let requested = shared.stand_aside.requested();
    if requested != shared.stand_aside.recorded() {
        if requested && shared.idle.load(Ordering::Relaxed) {
            set_idle(shared, false).await;
        }
        let recorded = match shared.db.get().await {
            Ok(client) => queue::set_superseded(&client, &shared.me.id, requested).await,
            Err(error) => Err(error),
        };
        match recorded {
            Ok(()) => {
                shared.stand_aside.set_recorded(requested);
                shared.board.standing_aside(requested);
                crate::telemetry::standing_aside(requested);
            }
            Err(error) => tracing::debug!(%error, "cannot record standing aside"),
        }
    }
    shared.stand_aside.active()
}

/// Tells the database whether this listener wants NOTIFYs; returns whether that was recorded. If it
/// cannot be, nothing is lost: the poll still finds every change.
async fn set_idle(shared: &Shared, idle: bool) -> bool {
    let recorded = match shared.db.get().await {
        Ok(client) => queue::set_listener_idle(&client, &shared.me.id, idle).await,
        Err(error) => Err(error),
    };
    match recorded {
        Ok(()) => {
            shared.idle.store(idle, Ordering::Relaxed);
            tracing::debug!(idle, "told the database whether to notify");
            true
        }
        Err(error) => {
            tracing::debug!(%error, "cannot record the idle flag");
            false
        }
    }
}

/// Changes per second over the last [`RATE_WINDOW`].
#[derive(Default)]
struct ChangeRate {
    recent: std::collections::VecDeque<(Instant, u64)>,
}

impl ChangeRate {
    fn record(&mut self, changes: u64) -> f64 {
        let now = Instant::now();
        if changes > 0 {
            self.recent.push_back((now, changes));
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.iter().map(|(_, n)| *n).sum::<u64>() as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// Works through the queue with `workers` concurrent batches until a claim comes back short.
async fn drain(shared: &Arc<Shared>) -> Result<Drained, Error> {
    let mut workers = JoinSet::new();
    for _ in 0..shared.settings.workers.max(1) {
        let shared = shared.clone();
        workers.spawn(async move {
            let mut drained = Drained::default();
            while !shared.shutdown.is_cancelled() && !shared.stand_aside.requested() {
                let (claimed, stats) = crate::batch::process(&shared).await?;
                drained.changes += claimed as u64;
                drained.stats += stats;
                if (claimed as i64) < shared.settings.batch_size {
                    break;
                }
            }
            Ok::<Drained, Error>(drained)
        });
    }
    let mut total = Drained::default();
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(drained)) => {
                total.changes += drained.changes;
                total.stats += drained.stats;
            }
            Ok(Err(error)) => first_error = first_error.or(Some(error)),
            Err(join_error) => {
                first_error = first_error.or(Some(Error::Internal(format!(
                    "batch worker died: {join_error}"
                ))))
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(total),
    }
}

/// Keeps this listener's registry row fresh so triggers keep waking it, and its counters current;
/// samples the queue for metrics and the status page, at once and then at every beat.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        if let Ok(client) = shared.db.get().await {
            beat(&shared, &client).await;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
    }
}

async fn beat(shared: &Shared, client: &tokio_postgres::Client) {
    let stats = queue::stats(client).await;
    if let Ok(stats) = &stats
        && let Ok(usage) = queue::notification_queue_usage(client).await
    {
        crate::telemetry::queue(stats, usage);
    }
    shared
        .board
        .queue_sampled(stats.map_err(|error| error.to_string()));
    let (changes, refused) = shared.counters.read();
    let idle = shared.idle.load(Ordering::Relaxed);
    let superseded = shared.stand_aside.recorded();
    if let Err(error) =
        queue::heartbeat(client, &shared.me, idle, superseded, changes, refused).await
    {
        tracing::debug!(%error, "heartbeat failed");
    }
}

/// This machine's name, for the listener id; "localhost" when it cannot be read.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
