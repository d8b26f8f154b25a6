//! Crashes and failovers, and what they may have lost (see [`notice`]).

use crate::pg::Database;
use crate::pg::sweeps::note_epoch;

/// Notices that PostgreSQL crashed or failed over to a replica, either of which may have lost
/// commits that were already rendered (`synchronous_commit = off` in any session, the listener's
/// own or a writer's, or a replica that had not received them). Redis may then hold renders of rows
/// that no longer exist as rendered, and the render ticket sequence may have gone back below
/// tickets stored in Redis, which would have Redis refuse every new render.
///
/// Both empty the unlogged `pgfresh.server_epoch` (a clean restart, which loses nothing, does not).
/// Each round, the listener notes the epoch again if it is gone: whoever notes it moves the tickets
/// ahead in the same statement, and from then on every fragment whose last complete sweep started
/// before the epoch is due (`pg::sweeps::swept_so_far`), whoever sweeps it, a one-off sweep
/// included.
pub(crate) async fn notice(db: &Database) {
    let noted = match db.pinned().await {
        Ok(client) => note_epoch(&client).await,
        Err(error) => Err(error),
    };
    match noted {
        Ok(true) => tracing::warn!(
            "PostgreSQL crashed or failed over: commits it lost may have been rendered; render tickets moved ahead, and every fragment will be swept"
        ),
        Ok(false) => {}
        Err(error) => tracing::debug!(%error, "cannot read pgfresh.server_epoch"),
    }
}
