//! The sweep lease: one listener of all sweeps at a time, the one holding `pgfresh.sweep_lease`.
//!
//! Only `pgfresh_listener` may update the lease, so no other role can keep listeners from sweeping
//! (an advisory lock, which anyone who connects can take, could). The holder renews it while it
//! sweeps and gives it up when done; a listener that dies holding it loses it when its term runs
//! out, and another takes over.

use std::future::Future;
use std::time::Duration;

use crate::Error;
use crate::pg::Database;
use crate::pg::sweeps::{release_lease, take_lease};

/// How long a lease lasts unless renewed: a listener that died while sweeping holds up sweeps
/// this long at most.
const TERM: Duration = Duration::from_secs(30);

/// How often a sweeping listener renews its lease: three chances before it runs out.
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// This listener's claim on the sweep lease.
pub(crate) struct SweepLease {
    /// The listener's id, as the lease records its holder.
    holder: String,
}

impl SweepLease {
    pub(crate) fn new(holder: String) -> Self {
        Self { holder }
    }

    /// Takes the lease (or keeps it); `false` while another listener holds it.
    pub(crate) async fn take(&self, db: &Database) -> Result<bool, Error> {
        take_lease(&*db.pinned().await?, &self.holder, TERM).await
    }

    /// Runs `work` holding the lease, renewing it until `work` ends, then gives it up.
    pub(crate) async fn hold_while<T>(&self, db: &Database, work: impl Future<Output = T>) -> T {
        let renew = async {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match self.take(db).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        "the sweep lease ran out and another listener took it: two sweeps run at once until this one ends (harmless, but twice the work)"
                    ),
                    Err(error) => tracing::debug!(%error, "cannot renew the sweep lease"),
                }
            }
        };
        let output = tokio::select! {
            output = work => output,
            _ = renew => unreachable!("renewing never ends"),
        };
        let released = match db.pinned().await {
            Ok(client) => release_lease(&client, &self.holder).await,
            Err(error) => Err(error),
        };
        if let Err(error) = released {
            tracing::debug!(%error, "cannot give the sweep lease up; it runs out by itself");
        }
        output
    }
}
