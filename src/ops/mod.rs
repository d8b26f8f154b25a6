//! What an operator sees of a running listener: the status board its tasks report to, the status
//! page drawn from it, the metrics, and the HTTP endpoints serving both.
//!
//! - `board`: what the listener knows about itself (totals, failures, the last sweep, samples of the
//!   queue and of Redis), updated as things happen.
//! - `history`: the last 15 minutes in 10-second slots (changes applied, freshness, queue depth).
//! - `page`: the status page, a maud template over the board; `charts` draws its SVG charts.
//! - `telemetry`: metrics through the `metrics` facade, and the Prometheus recorder.
//! - `doctor`: the `doctor` command's checks of a deployment, each problem with its fix.
//! - `http`: `/`, `/metrics`, `/healthz`, `/readyz`; requests only ever read the board.

pub(crate) mod board;
mod charts;
pub(crate) mod doctor;
pub(crate) mod history;
pub(crate) mod http;
mod page;
pub(crate) mod telemetry;
