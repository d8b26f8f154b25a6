//! What an operator sees of a running listener: the status board its tasks report to, the status
//! page drawn from it, the metrics, and the HTTP endpoints serving both.
//!
//! - `board`: what the listener knows about itself (totals, failures, the last sweep, samples of the
//!   queue and of Redis), updated as things happen.
//! - `page`: the status page, a maud template over the board.
//! - `telemetry`: metrics through the `metrics` facade, and the Prometheus recorder.
//! - `http`: `/`, `/metrics`, `/healthz`, `/readyz`; requests only ever read the board.

pub(crate) mod board;
pub(crate) mod http;
mod page;
pub(crate) mod telemetry;
