//! The status page: one self-refreshing HTML page, drawn with maud from the board, readable without
//! JavaScript.

use std::time::SystemTime;

use super::board::BoardView;
use crate::store::Eviction;

/// The status page: plain HTML that refreshes itself every two seconds.
pub(crate) fn page(listener_id: &str, problem: Option<&str>, board: &BoardView) -> maud::Markup {
    let uptime = board.started.elapsed().as_secs_f64().max(1.0);
    maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="2";
                title { "pgfresh listener" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                h1 { "pgfresh listener " small { (listener_id) } }
                section {
                    h2 { "Connections" }
                    @match problem {
                        None => p class="ok" { "PostgreSQL LISTEN session up, Redis answering." },
                        Some(problem) => p class="bad" { (problem) },
                    }
                    @if let Some((policy, eviction)) = &board.redis_eviction {
                        p class=(if *eviction == Eviction::Impossible { "ok" } else { "bad" }) {
                            "Redis maxmemory-policy " (policy)
                        }
                    }
                    @if board.standing_aside {
                        p class="bad" {
                            "Standing aside: a listener with a newer version of these fragments is running. "
                            "This one applies no changes until it is gone."
                        }
                    }
                }
                section {
                    h2 { "Queue" }
                    @match &board.queue {
                        None => p { "not sampled yet" },
                        Some((at, Ok(stats))) => p {
                            @if stats.pending_estimated { "about " }
                            (stats.pending) " pending"
                            @if let Some(oldest) = stats.oldest { ", oldest " (format!("{:.1}", oldest.as_secs_f64())) " s" }
                            "; " (stats.parked) " parked in pgfresh.failed"
                            " (sampled " (at.elapsed().as_secs()) " s ago)"
                        },
                        Some((_, Err(error))) => p class="bad" { "cannot read the queue: " (error) },
                    }
                    p {
                        (board.changes_applied) " changes applied since start ("
                        (format!("{:.1}", board.changes_applied as f64 / uptime)) " per second)"
                    }
                }
                section {
                    h2 { "Fragments" }
                    table {
                        tr { th { "fragment" } th { "stored at" } th { "rendered" } th { "written" } th { "unchanged" } th { "stale writes refused" } th { "deleted" } th { "errors" } }
                        @for (name, stored) in &board.stored {
                            @let stats = board.fragments.get(name).cloned().unwrap_or_default();
                            tr {
                                td { (name) } td { code { (stored) } } td { (stats.rendered) } td { (stats.written) } td { (stats.unchanged) }
                                td { (stats.refused) } td { (stats.deleted) } td { (stats.errors) }
                            }
                        }
                    }
                }
                section {
                    h2 { "Last sweep" }
                    @match &board.last_sweep {
                        None => p { "none by this listener yet" },
                        Some(sweep) => p class=(if sweep.succeeded { "ok" } else { "bad" }) {
                            (ago(sweep.at)) " (" (sweep.reason) "): " (sweep.summary)
                        },
                    }
                }
                section {
                    h2 { "Recent failures" }
                    @if board.recent_failures.is_empty() {
                        p { "none" }
                    } @else {
                        table {
                            tr { th { "when" } th { "topic" } th { "key" } th { "error" } }
                            @for failure in &board.recent_failures {
                                tr { td { (ago(failure.at)) } td { (failure.topic) } td { (failure.key) } td { (failure.error) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn ago(at: SystemTime) -> String {
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    format!("{secs} s ago")
}

/// Inline styles: the page needs no other request.
const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;max-width:70em}\
h1 small{font-weight:normal;color:#666}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}.ok{color:#176117}.bad{color:#a31515}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::board::StatusBoard;

    #[test]
    fn the_page_says_when_the_listener_stands_aside() {
        let board = StatusBoard::default();
        let before = page("me", None, &board.view()).into_string();
        assert!(!before.contains("Standing aside"));
        board.standing_aside(true);
        let during = page("me", None, &board.view()).into_string();
        assert!(during.contains("Standing aside: a listener with a newer version"));
    }
}
