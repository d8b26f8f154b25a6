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

/// `text` (from the database: an error, a table or key name) as one printable line: control
/// characters (a newline, a terminal escape) are shown escaped, so that nobody who can write a row
/// can forge a line of a report or drive the operator's terminal.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_shown_escaped_and_the_rest_as_it_is() {
        assert_eq!(
            super::one_line("bad \"row\"\n\u{1b}[31mFAKE é"),
            "bad \"row\"\\n\\u{1b}[31mFAKE é"
        );
    }
}
