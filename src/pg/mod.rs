//! PostgreSQL: connecting as libpq would, installing pgfresh's schema, and the tables the listener
//! works: the change queue, the listener registry, recorded TRUNCATEs.
//!
//! - `conninfo`: connection strings read exactly as libpq reads them, and shown without a password.
//! - `tls`: TLS with libpq's meaning of `sslmode` and `sslrootcert`.
//! - `database`: [`Database`], the pool and the dedicated sessions (LISTEN, the sweep lock).
//! - `schema`: install, upgrade, check and uninstall, from the files in `sql/`.
//! - `queue`: claim, settle, retry, park and requeue changes; the queue's figures.
//! - `statements`: the statements of every batch, prepared once where the session allows it.
//! - `transaction`: a batch's claiming transaction, its BEGIN and COMMIT sent with its first and last
//!   statements.
//! - `fan_out`: keys of shared rows mapped to fragment keys and queued, inside the claim.
//! - `snapshot`: what a claim's snapshot saw, for the listener's planning.
//! - `registry`: the listener registry (idle flag, fragment versions, standing aside, heartbeats).
//! - `truncations`: TRUNCATEs of watched tables waiting for a sweep.
//! - `standby`: a hot standby for loads, used once it has replayed a batch's changes.
//! - `dependencies`: what a session read, against what is watched (for `doctor`).
//! - `sweeps`: the sweep lease (which listener sweeps), and the record of complete sweeps.

mod conninfo;
mod database;
pub(crate) mod dependencies;
pub(crate) mod fan_out;
pub(crate) mod queue;
pub(crate) mod registry;
pub(crate) mod schema;
mod snapshot;
pub(crate) mod standby;
pub(crate) mod statements;
pub(crate) mod sweeps;
mod tls;
pub(crate) mod transaction;
pub(crate) mod truncations;

pub(crate) use conninfo::redact_unparsed;
pub use database::Database;
pub(crate) use database::{CLOSING_WAIT, PINNED_SEARCH_PATH, POOLED_SETTINGS_LOCAL};
pub(crate) use snapshot::Snapshot;
pub(crate) use tls::TlsStream;
