//! pgfresh keeps pre-rendered HTML fragments in Redis fresh from PostgreSQL.
//!
//! Triggers (installed from `sql/`) queue every committed change to watched tables; a listener
//! re-renders only the affected fragments with maud and writes them to Redis within milliseconds; a
//! full sweep repairs anything else. You write fragments against [`Fragment`] and reuse the command
//! line with [`cli::main`].
//!
//! # Layout
//! - [`fragment`]: the [`Fragment`] trait users implement, and the [`Fragments`] a binary serves.
//! - [`schema`]: installing, upgrading, checking and removing the SQL in `sql/`.
//! - [`queue`]: claiming and settling batches of changes; the listener registry.
//! - [`refresh`]: the load → render → write path shared by the listener and the sweep.
//! - [`coalesce`]: settling changes a recent render already covers; rendering hot keys less often.
//! - [`sink`]: version-checked batched writes to Redis, one server or a cluster.
//! - [`keys`]: where pgfresh's own Redis keys live (tickets, markers), cluster hash slots included.
//! - [`listener`]: the long-running `listen` loop.
//! - `batch` (internal): one claimed batch, from claim to commit.
//! - [`wakeup`]: the dedicated LISTEN connection that turns NOTIFYs into wake-ups.
//! - [`sweep`]: the full sweep, periodic or one-off.
//! - [`maintenance`]: the sweeps a listener runs itself (periodic, Redis emptied, markup changed,
//!   table truncated).
//! - [`deploy`]: rolling deploys; a listener stands aside for one with newer fragment versions.
//! - [`db`]: the connection pool and dedicated connections.
//! - [`tls`]: TLS to PostgreSQL with libpq's `sslmode` meaning.
//! - [`config`]: typed settings; URL redaction.
//! - [`backoff`]: capped jittered exponential backoff.
//! - [`shutdown`]: the shutdown token and signal handling.
//! - [`telemetry`]: metrics through the `metrics` facade; the Prometheus recorder.
//! - [`http`]: the status page, `/metrics`, `/healthz`, `/readyz` for `listen --http`.
//! - [`status`]: what a running listener knows about itself, for the status page.
//! - [`cli`]: the command line users reuse in their own binary.
//! - [`progress`]: the `sweep` command's progress bar or periodic lines.
//! - [`error`]: the [`Error`] type.

#![warn(missing_docs)]

pub mod backoff;
mod batch;
pub mod cli;
pub mod coalesce;
pub mod config;
pub(crate) mod conninfo;
pub mod db;
pub mod deploy;
pub mod error;
pub mod fragment;
pub mod http;
pub mod keys;
pub mod listener;
pub mod maintenance;
pub mod progress;
pub mod queue;
pub mod refresh;
pub mod schema;
pub mod shutdown;
pub mod sink;
pub mod status;
pub mod sweep;
pub mod telemetry;
pub mod tls;
pub mod wakeup;

pub use error::Error;
pub use fragment::{Fragment, Fragments};
pub use maud;
pub use tokio_postgres;
