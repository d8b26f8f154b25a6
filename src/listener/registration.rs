//! This listener's row in the registry (`pgfresh.listeners`), and its one writer.
//!
//! Registering, switching between idle and busy, standing aside and the heartbeat each change what
//! the row says. All of them go through [`Registration::say`], which holds a lock across the write and
//! always writes the whole row: a heartbeat can never undo a switch it raced, and a row re-created
//! after a PostgreSQL crash (the table is unlogged) says where this listener stores its fragments,
//! which another listener's start-up check relies on.

use tokio::sync::Mutex;

use crate::Error;
use crate::ops::board::StatusBoard;
use crate::pg::Database;
use crate::pg::registry::{self, ListenerIdentity, ListenerRow};

/// What this listener has told the database about its state.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Said {
    /// It waits for NOTIFYs.
    pub(crate) idle: bool,
    /// It stands aside for a newer listener.
    pub(crate) standing_aside: bool,
    /// When it registered, as the registry recorded it.
    started_at: Option<f64>,
}

/// The listener's row and the lock that serializes writing it.
pub(crate) struct Registration {
    me: ListenerIdentity,
    /// What the row says now; held across each write.
    said: Mutex<Said>,
}

impl Registration {
    pub(crate) fn new(me: ListenerIdentity) -> Self {
        Self {
            me,
            said: Mutex::new(Said::default()),
        }
    }

    /// Registers the listener, unless another live listener would share Redis with it badly (see
    /// `registry::check_sharing`): the check and the first row in one transaction, serialized with
    /// every other listener's start. The rows of listeners long gone go in the same transaction.
    pub(crate) async fn register(&self, db: &Database, board: &StatusBoard) -> Result<(), Error> {
        let mut said = self.said.lock().await;
        let mut client = db.pinned().await?;
        let txn = client.transaction().await?;
        registry::lock_registrations(txn.client()).await?;
        registry::forget_long_gone(txn.client()).await?;
        registry::check_sharing(txn.client(), &self.me).await?;
        let (applied, refused) = board.totals();
        let row = ListenerRow {
            me: &self.me,
            idle: said.idle,
            standing_aside: said.standing_aside,
            applied,
            refused,
            started_at: said.started_at,
        };
        let started_at = registry::write_row(txn.client(), &row).await?;
        txn.commit().await?;
        registry::publish_idle(&*db.pinned().await?).await?;
        said.started_at = Some(started_at);
        Ok(())
    }

    /// Checks again that no live listener registered before this one shares Redis with it badly:
    /// a crash of PostgreSQL empties the registry, and a conflicting listener may have started in
    /// between.
    pub(crate) async fn check_sharing(&self, db: &Database) -> Result<(), Error> {
        registry::check_sharing(&*db.pinned().await?, &self.me).await
    }

    /// Writes the row with `change` applied to what it says, the board's totals and the time;
    /// returns what it now says. On failure the row and this record are left as they were.
    pub(crate) async fn say(
        &self,
        db: &Database,
        board: &StatusBoard,
        change: impl FnOnce(&mut Said),
    ) -> Result<Said, Error> {
        let mut said = self.said.lock().await;
        let mut next = *said;
        change(&mut next);
        let (applied, refused) = board.totals();
        let row = ListenerRow {
            me: &self.me,
            idle: next.idle,
            standing_aside: next.standing_aside,
            applied,
            refused,
            started_at: next.started_at,
        };
        let client = db.pinned().await?;
        registry::write_row(&client, &row).await?;
        // Committed already (no transaction): the idle flag it publishes includes this row.
        registry::publish_idle(&client).await?;
        *said = next;
        Ok(next)
    }
}
