//! A hot standby for loads (`--replica-url`): the reads a render or a sweep page makes go there when
//! the standby has replayed at least what the primary had written once the batch took its ticket, and
//! to the primary otherwise. Claims, tickets, through queries, settles and everything in schema
//! `pgfresh` stay on the primary.
//!
//! A render never shows data older than the change it answers: the batch's changes committed before
//! its claim, the claim took the ticket, and only then is the primary's WAL insert position read
//! ([`Standby::session_at`]); a standby that replayed past it sees every one of those commits. The
//! insert position, not `pg_current_wal_lsn()` (the write position), because a writer with
//! `synchronous_commit = off` may have a commit record inserted but not yet written: the standby
//! can only have it once it is flushed and sent, which the wait then covers.
//!
//! A standby that cannot be reached, was promoted, or belongs to another cluster (another system
//! identifier) is not used, with one line when that starts and one when it ends; it is tried again
//! every [`PROBE_EVERY`], never by more than one batch at a time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::Error;

/// How long a batch may wait for a connection to the standby (a new one included) before it loads
/// from the primary instead.
const CONNECT_WITHIN: Duration = Duration::from_secs(1);
/// How often an unusable standby is tried again.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often a standby in use is checked again to be the same cluster's, and in recovery.
const VERIFY_EVERY: Duration = Duration::from_secs(30);
/// Between two reads of the standby's replay position while a batch waits for it.
const POLL: Duration = Duration::from_millis(1);

/// A setting the standby's sessions are opened with, only to be found again in them: a session
/// without it came through a pooler that ignores startup settings (PgBouncer's
/// `ignore_startup_parameters = options`), which is no place for loads (see [`check`]).
pub(crate) const SESSION_MARK: &str = "-c pgfresh.standby_session=on";

/// What to do about a standby URL that leads through a connection pooler.
const THROUGH_A_POOLER: &str =
    "the URL leads through a connection pooler; give a direct connection to the standby";

/// Why a batch's loads went to the primary, with a standby configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// The standby had not replayed the batch's changes within `--replica-max-wait`.
    Behind,
    /// The standby is down, promoted, or another cluster's (see [`StandbyView::down`]).
    Unavailable,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Fallback::Behind => "behind",
            Fallback::Unavailable => "unavailable",
        }
    }
}

/// A hot standby of the primary, and what it served.
pub(crate) struct Standby {
    url: String,
    pool: Pool,
    max_wait: Duration,
    health: Mutex<Health>,
    served: AtomicU64,
    behind: AtomicU64,
    unavailable: AtomicU64,
    /// How far behind the primary's position the standby last was, in bytes of WAL.
    lag_bytes: AtomicU64,
}

/// Whether the standby is used, as last found.
struct Health {
    /// Why it is not used; `None` while it is.
    down: Option<String>,
    /// Found usable (or not) at least once.
    known: bool,
    /// When it was last found usable and the primary's standby.
    verified_at: Option<Instant>,
    /// When it may be tried again, while down.
    next_probe: Instant,
    /// A batch is trying it now: the others go to the primary meanwhile.
    probing: bool,
}

/// What `doctor` found of a standby that can serve loads.
pub(crate) struct Examined {
    /// How far its replay is behind the primary's WAL position, in bytes.
    pub(crate) behind_bytes: u64,
    /// Replay is paused (`pg_wal_replay_pause()`): every batch's loads go to the primary.
    pub(crate) paused: bool,
}

/// What the status page shows of the standby.
#[derive(Clone, Debug)]
pub(crate) struct StandbyView {
    pub(crate) url: String,
    pub(crate) served: u64,
    pub(crate) behind: u64,
    pub(crate) unavailable: u64,
    pub(crate) lag_bytes: u64,
    /// Why it is not used, while it is not.
    pub(crate) down: Option<String>,
    /// Whether a batch has tried it yet.
    pub(crate) tried: bool,
}

impl Standby {
    pub(crate) fn new(url: String, pool: Pool, max_wait: Duration) -> Self {
        Standby {
            url,
            pool,
            max_wait,
            health: Mutex::new(Health {
                down: None,
                known: false,
                verified_at: None,
                next_probe: Instant::now(),
                probing: false,
            }),
            served: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Its sessions, for [`super::Database::close_idle`].
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn resize(&self, size: usize) {
        self.pool.resize(size.max(1));
    }

    pub(crate) fn view(&self) -> StandbyView {
        let health = self.health.lock().expect("standby health lock");
        StandbyView {
            url: self.url.clone(),
            served: self.served.load(Ordering::Relaxed),
            behind: self.behind.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            down: health.down.clone(),
            tried: health.known,
        }
    }

    /// A session on the standby that sees every commit the primary had made when this is called
    /// (`primary` is a session on it, after the caller took its ticket), or why the caller must
    /// load from the primary.
    pub(crate) async fn session_at(
        &self,
        primary: &Client,
        primary_identifier: &str,
    ) -> Result<Object, Fallback> {
        let Some(verify) = self.may_try() else {
            return self.fell_back(Fallback::Unavailable);
        };
        // This batch's check ends however its future does (a sweep that stops drops its pages).
        let probing = Probing(verify.then_some(self));
        let position = match insert_position(primary).await {
            Ok(position) => position,
            // The primary's own trouble: the caller finds it again on its own session.
            Err(_) => return self.fell_back(Fallback::Unavailable),
        };
        let connected = self.connect(verify, primary_identifier).await;
        drop(probing);
        let session = match connected {
            Ok(session) => session,
            Err(reason) => {
                self.went_down(reason);
                return self.fell_back(Fallback::Unavailable);
            }
        };
        match self.caught_up(&session, &position).await {
            Ok(true) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                crate::ops::telemetry::load_served("standby", "caught_up");
                Ok(session)
            }
            Ok(false) => self.fell_back(Fallback::Behind),
            Err(reason) => {
                self.went_down(reason);
                self.fell_back(Fallback::Unavailable)
            }
        }
    }

    fn fell_back(&self, why: Fallback) -> Result<Object, Fallback> {
        match why {
            Fallback::Behind => &self.behind,
            Fallback::Unavailable => &self.unavailable,
        }
        .fetch_add(1, Ordering::Relaxed);
        crate::ops::telemetry::load_served("primary", why.label());
        Err(why)
    }

    /// What `doctor` says of the standby: how far behind the primary (`primary`, a session on it)
    /// it is, in bytes of WAL, or why loads cannot go there.
    pub(crate) async fn examine(&self, primary: &Client) -> Result<Examined, String> {
        let identifier = system_identifier(primary)
            .await
            .map_err(|error| format!("cannot read the primary's system identifier: {error}"))?;
        let position = insert_position(primary)
            .await
            .map_err(|error| format!("cannot read the primary's WAL position: {error}"))?;
        let session = match tokio::time::timeout(CONNECT_WITHIN, self.pool.get()).await {
            Err(_) => return Err(format!("no connection within {CONNECT_WITHIN:?}")),
            Ok(Err(error)) => {
                return Err(format!("cannot connect: {}", describe_pool_error(error)));
            }
            Ok(Ok(session)) => session,
        };
        check(&session, &identifier).await?;
        let row = session
            .query_typed_one(
                "SELECT pg_catalog.pg_wal_lsn_diff($1::pg_catalog.pg_lsn, pg_catalog.pg_last_wal_replay_lsn())::pg_catalog.float8, \
                 pg_catalog.pg_is_wal_replay_paused()",
                &[(&position, Type::TEXT)],
            )
            .await
            .map_err(|error| crate::error::describe_postgres(&error))?;
        Ok(Examined {
            behind_bytes: row.get::<_, Option<f64>>(0).unwrap_or(0.0).max(0.0) as u64,
            paused: row.get(1),
        })
    }

    /// Whether this batch may use the standby, and whether it must check it first (unknown, due
    /// for a check, or down and due to be tried again, by this batch alone).
    fn may_try(&self) -> Option<bool> {
        let mut health = self.health.lock().expect("standby health lock");
        let now = Instant::now();
        let due = health
            .verified_at
            .is_none_or(|at| now.duration_since(at) >= VERIFY_EVERY);
        // Checked once at least, and not found down since: used while due for a check that
        // another batch is making.
        if health.down.is_none() && health.verified_at.is_some() && (!due || health.probing) {
            return Some(false);
        }
        if health.probing || (health.down.is_some() && now < health.next_probe) {
            return None;
        }
        health.probing = true;
        Some(true)
    }

    /// A pooled session on the standby, checked to be the primary's standby when `verify`, and
    /// whenever it is a new connection (a name may lead elsewhere by now).
    async fn connect(&self, verify: bool, primary_identifier: &str) -> Result<Object, String> {
        let connected = tokio::time::timeout(CONNECT_WITHIN, self.pool.get()).await;
        let new =
            matches!(&connected, Ok(Ok(session)) if Object::metrics(session).recycle_count == 0);
        let verify = verify || new;
        let outcome = match connected {
            Err(_) => Err(format!("no connection within {CONNECT_WITHIN:?}")),
            Ok(Err(error)) => Err(describe_pool_error(error)),
            Ok(Ok(session)) if verify => {
                match tokio::time::timeout(CONNECT_WITHIN, check(&session, primary_identifier))
                    .await
                {
                    Ok(Ok(())) => Ok(session),
                    Ok(Err(reason)) => Err(reason),
                    Err(_) => Err(format!("no answer within {CONNECT_WITHIN:?}")),
                }
            }
            Ok(Ok(session)) => Ok(session),
        };
        if verify {
            let mut health = self.health.lock().expect("standby health lock");
            if outcome.is_ok() {
                health.verified_at = Some(Instant::now());
                if health.down.take().is_some() || !health.known {
                    tracing::info!(standby = %self.url, "loading from the standby: it is in recovery, of the primary's cluster");
                    crate::ops::telemetry::standby_up(true);
                }
                health.known = true;
            }
        }
        outcome
    }

    /// Notes that the standby cannot be used, saying so when that is news.
    fn went_down(&self, reason: String) {
        let mut health = self.health.lock().expect("standby health lock");
        health.next_probe = Instant::now() + PROBE_EVERY;
        health.verified_at = None;
        if health.down.is_none() {
            tracing::warn!(standby = %self.url, %reason, "not loading from the standby until it can be used again: loads go to the primary");
            crate::ops::telemetry::standby_up(false);
        }
        health.known = true;
        health.down = Some(reason);
    }

    /// Waits up to `--replica-max-wait` for the standby to replay `position`; `Ok(false)` if it did
    /// not, an error if it is no longer a standby or cannot be asked.
    async fn caught_up(&self, session: &Client, position: &str) -> Result<bool, String> {
        let deadline = Instant::now() + self.max_wait;
        loop {
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
                [(&position, Type::TEXT)];
            let asked = session.query_typed_one(
                "SELECT pg_catalog.pg_is_in_recovery(), \
                 pg_catalog.pg_wal_lsn_diff($1::pg_catalog.pg_lsn, pg_catalog.pg_last_wal_replay_lsn())::pg_catalog.float8",
                &params,
            );
            // A standby that stops answering holds no batch longer than a connection attempt.
            let row = tokio::time::timeout(CONNECT_WITHIN, asked)
                .await
                .map_err(|_| format!("no answer within {CONNECT_WITHIN:?}"))?
                .map_err(|error| crate::error::describe_postgres(&error))?;
            let (in_recovery, behind): (bool, Option<f64>) = (row.get(0), row.get(1));
            let Some(behind) = behind.filter(|_| in_recovery) else {
                return Err("it is not in recovery (promoted?): not a standby".into());
            };
            let behind = behind.max(0.0);
            self.lag_bytes.store(behind as u64, Ordering::Relaxed);
            crate::ops::telemetry::standby_lag(behind);
            if behind <= 0.0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A batch's check of the standby in progress: when it ends, however its future ends, another batch
/// may check again.
struct Probing<'a>(Option<&'a Standby>);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        if let Some(standby) = self.0 {
            standby.health.lock().expect("standby health lock").probing = false;
        }
    }
}

/// The primary's WAL insert position, as text (see the module's comment for why the insert one).
async fn insert_position(primary: &Client) -> Result<String, Error> {
    Ok(primary
        .query_typed_one(
            "SELECT pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text",
            &[],
        )
        .await?
        .get(0))
}

/// The cluster's system identifier, which a streaming standby shares with its primary.
pub(crate) async fn system_identifier(client: &Client) -> Result<String, Error> {
    Ok(client
        .query_typed_one(
            "SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()",
            &[],
        )
        .await?
        .get(0))
}

/// Whether `session` is on a server in recovery of the cluster whose identifier is `primary`'s,
/// reached directly. Through a transaction pooler, the replay check and the loads after it may
/// run on different server sessions, and a pooler spreading its sessions over several standbys
/// (PgBouncer does, over the hosts a name resolves to or a list gives) would load from one that
/// has not replayed the batch's changes; and statements kept prepared there fail. A pooler that
/// refuses the standby's startup settings fails its connections (see [`describe_pool_error`]); one
/// that ignores them is found here, by the setting missing.
pub(crate) async fn check(session: &Client, primary_identifier: &str) -> Result<(), String> {
    let row = session
        .query_typed_one(
            "SELECT pg_catalog.pg_is_in_recovery(), \
             (SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()), \
             pg_catalog.current_setting('pgfresh.standby_session', true) IS NOT DISTINCT FROM 'on'",
            &[],
        )
        .await
        .map_err(|error| crate::error::describe_postgres(&error))?;
    let (in_recovery, identifier, marked): (bool, String, bool) =
        (row.get(0), row.get(1), row.get(2));
    if !marked {
        return Err(format!(
            "its sessions lack the settings pgfresh opened them with: {THROUGH_A_POOLER}"
        ));
    }
    if !in_recovery {
        return Err(
            "it is not in recovery (a primary, or a promoted standby): not a standby".into(),
        );
    }
    if identifier != primary_identifier {
        return Err(format!(
            "it is a standby of another cluster (system identifier {identifier}, the primary's is {primary_identifier})"
        ));
    }
    Ok(())
}

fn describe_pool_error(error: deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(error) => {
            let reason = crate::error::describe_postgres(&error);
            // PgBouncer refuses the `options` startup parameter the standby's sessions are
            // opened with (see `check` for why a pooler is no place for loads).
            if reason.contains("unsupported startup parameter") {
                format!("{reason} ({THROUGH_A_POOLER})")
            } else {
                reason
            }
        }
        other => other.to_string(),
    }
}
