//! PostgreSQL restarts, and what they may have lost (see [`PostgresRestarts`]).

use crate::Error;
use crate::pg::Database;

/// Notices that PostgreSQL restarted (its postmaster start time changed), which may have lost
/// commits that were already rendered: a crash with `synchronous_commit = off` in any session (the
/// listener's own, or a writer's), or a failover to a replica that had not received them. Redis may
/// then hold renders of rows that no longer exist as rendered, and the render ticket sequence may
/// have gone back below tickets stored in Redis (its advances were among the lost WAL), which would
/// have Redis refuse every new render. So the sequence is moved far ahead, and everything swept.
#[derive(Default)]
pub(crate) struct PostgresRestarts {
    /// The postmaster start time last seen.
    started: Option<String>,
    /// A restart was seen, and some fragment may not have been swept since.
    pending: bool,
}

/// How far the ticket sequence is moved after a restart: far more tickets than a crash can lose
/// (those taken since the last WAL flush, seconds of work), far fewer than a bigint holds.
const TICKET_JUMP: i64 = 1_000_000_000;

impl PostgresRestarts {
    /// Reads the postmaster's start time; on a change, moves the tickets ahead and asks for a sweep.
    pub(crate) async fn check(&mut self, db: &Database) {
        let started = match db.pinned().await {
            Ok(client) => client
                .query_one("SELECT pg_postmaster_start_time()::text", &[])
                .await
                .map(|row| row.get::<_, String>(0)),
            Err(_) => return,
        };
        let Ok(started) = started else { return };
        match &self.started {
            Some(known) if *known != started => {
                tracing::warn!(
                    "PostgreSQL restarted: commits lost in a crash or failover may have been rendered; moving render tickets ahead and sweeping"
                );
                if let Err(error) = jump_tickets(db).await {
                    tracing::warn!(%error, "cannot move render tickets ahead; renders may be refused until the sweep");
                }
                self.pending = true;
            }
            _ => {}
        }
        self.started = Some(started);
    }

    /// Whether a restart was seen that sweeps may not have covered yet: every fragment whose last
    /// complete sweep (`pgfresh.sweeps`, by anyone) started before PostgreSQL did is due.
    pub(crate) fn pending(&self) -> bool {
        self.pending
    }

    /// Every fragment has been swept since the restart.
    pub(crate) fn covered(&mut self) {
        self.pending = false;
    }
}

async fn jump_tickets(db: &Database) -> Result<(), Error> {
    db.pinned()
        .await?
        .execute(
            "SELECT setval('pgfresh.render_tickets', nextval('pgfresh.render_tickets') + $1)",
            &[&TICKET_JUMP],
        )
        .await?;
    Ok(())
}
