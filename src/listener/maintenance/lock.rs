//! The sweep lock: one listener of all sweeps at a time.

use crate::Error;
use crate::pg::Database;

/// The advisory lock key held by the listener that sweeps ("pgfresh" in ASCII).
const SWEEP_LOCK: i64 = 0x0070_6766_7265_7368;

/// The advisory lock that elects the one listener that sweeps, held on a session of its own that
/// lives as long as the listener (released with it if the process dies): a listener that is not
/// elected asks again every second on the same session instead of opening a new one each time.
#[derive(Default)]
pub(crate) struct SweepLock {
    session: Option<tokio_postgres::Client>,
}

impl SweepLock {
    pub(crate) async fn try_acquire(&mut self, db: &Database) -> Result<bool, Error> {
        if self
            .session
            .as_ref()
            .is_none_or(|session| session.is_closed())
        {
            self.session = Some(db.connect_dedicated("pgfresh sweep lock").await?);
        }
        let session = self.session.as_ref().expect("connected above");
        let elected = session
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
            .await;
        match elected {
            Ok(row) => Ok(row.get(0)),
            Err(error) => {
                self.session = None;
                Err(error.into())
            }
        }
    }

    pub(crate) async fn release(&mut self) {
        let Some(session) = &self.session else {
            return;
        };
        if session
            .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK])
            .await
            .is_err()
        {
            // A session that cannot unlock may still hold the lock: drop it, which releases it.
            self.session = None;
        }
    }
}
