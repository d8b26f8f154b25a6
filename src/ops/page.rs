//! The status page: one self-refreshing HTML page, drawn with maud from the board, readable without
//! JavaScript: connections, the last 15 minutes as SVG charts (changes applied, freshness, queue
//! depth), the standby, the queue, each fragment with its freshness, the last sweep and recent failures.

use std::time::SystemTime;

use super::board::BoardView;
use super::board::ServeCounts;
use super::charts::{Series, line_chart};
use super::history::HistoryView;
use crate::pg::standby::StandbyView;
use crate::store::Eviction;

/// The status page: plain HTML that refreshes itself every two seconds.
pub(crate) fn page(
    listener_id: &str,
    problem: Option<&str>,
    board: &BoardView,
    standby: Option<&StandbyView>,
    serve: Option<&ServeCounts>,
) -> maud::Markup {
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
                    @match (problem, board.polling) {
                        (None, None) => p class="ok" { "PostgreSQL LISTEN session up, Redis answering." },
                        (None, Some(_)) => p class="ok" { "Redis answering." },
                        (Some(problem), _) => p class="bad" { (problem) },
                    }
                    @if let Some(interval) = board.polling {
                        p class="bad polling" {
                            "No LISTEN session (behind a connection pooler, with no --session-url): "
                            "the queue is polled every " (humantime::format_duration(interval).to_string())
                            ", so changes wait up to that long."
                        }
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
                    @if let Some(serve) = serve {
                        @let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
                        p class="serve" {
                            "GET /fragments (--serve): " (count(&serve.requests)) " requests, "
                            (count(&serve.hits)) " answered from Redis, "
                            (count(&serve.renders)) " renders on demand, "
                            (count(&serve.coalesced)) " waited for a render in flight, "
                            (count(&serve.refused)) " refused (too many in flight), "
                            (count(&serve.waited_out)) " answered 503 before their render was done (--serve-wait)."
                        }
                    }
                    @if let Some(standby) = standby {
                        p class=(if standby.down.is_some() { "bad standby" } else { "ok standby" }) {
                            "Standby " (standby.url) ": "
                            @match &standby.down {
                                Some(reason) => { "not used, " (reason) ". " }
                                None if !standby.tried => { "not tried yet (no load since the start). " }
                                None => { "used, " (standby.lag_bytes) " bytes of WAL behind when last asked. " }
                            }
                            "Loads served by the standby " (standby.served)
                            ", by the primary " (standby.behind + standby.unavailable)
                            " (" (standby.behind) " with the standby behind, "
                            (standby.unavailable) " with it unavailable)."
                        }
                    }
                }
                (charts(&board.history))
                section {
                    h2 { "Queue" }
                    @match &board.queue {
                        None => p { "not sampled yet" },
                        Some((at, Ok(stats))) => p {
                            @if stats.pending_estimated { "about " }
                            (stats.pending) " pending"
                            @if let Some(oldest) = stats.oldest { ", oldest " (format!("{:.1}", oldest.as_secs_f64())) " s" }
                            @if let Some(lag) = stats.lag { ", committed " (format!("{:.1}", lag.as_secs_f64())) " s ago" }
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
                        tr { th { "fragment" } th { "stored at" } th { "freshness p50 / p99 (15 min)" } th { "rendered" } th { "written" } th { "unchanged" } th { "stale writes refused" } th { "deleted" } th { "errors" } }
                        @for (name, stored) in &board.stored {
                            @let stats = board.fragments.get(name).cloned().unwrap_or_default();
                            tr {
                                td { (name) } td { code { (stored) } } td class="fresh" { (freshness(&board.history, name)) } td { (stats.rendered) } td { (stats.written) } td { (stats.unchanged) }
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
                    @for (fragment, (at, keys)) in &board.unwatched {
                        p class="bad unwatched" {
                            (fragment) ": a periodic sweep " (ago(*at)) " repaired " (keys)
                            " keys that no watch reported: a table its loader reads is not watched (run doctor)"
                        }
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

/// The charts of the last 15 minutes.
fn charts(history: &HistoryView) -> maud::Markup {
    let points = &history.points;
    let applied = vec![Series {
        name: "applied",
        colour: "#1f5fa8",
        values: points.iter().map(|p| p.applied_per_second).collect(),
    }];
    let freshness = vec![
        Series {
            name: "p50",
            colour: "#176117",
            values: points.iter().map(|p| p.p50.map(|s| s * 1e3)).collect(),
        },
        Series {
            name: "p99",
            colour: "#b35900",
            values: points.iter().map(|p| p.p99.map(|s| s * 1e3)).collect(),
        },
    ];
    let queue = vec![Series {
        name: "pending",
        colour: "#6b3fa0",
        values: points.iter().map(|p| p.queue.map(|q| q as f64)).collect(),
    }];
    maud::html! {
        section class="charts" {
            h2 { "Last 15 minutes" }
            (line_chart("chart-applied", "Changes applied per second", &applied, |v| format!("{v}/s")))
            (line_chart("chart-freshness", "Freshness: commit to Redis, p50 and p99", &freshness, |v| format!("{v} ms")))
            (line_chart("chart-queue", "Queue depth", &queue, |v| format!("{v}")))
        }
    }
}

/// A fragment's freshness over the window: "p50 / p99", or a dash when nothing was applied.
fn freshness(history: &HistoryView, fragment: &str) -> String {
    let Some(buckets) = history.by_fragment.get(fragment) else {
        return "–".into();
    };
    match (buckets.quantile(0.5), buckets.quantile(0.99)) {
        (Some(p50), Some(p99)) => format!("{} / {}", duration(p50), duration(p99)),
        _ => "–".into(),
    }
}

/// Seconds as "3.2 ms" or "1.4 s".
fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.1} s")
    }
}

fn ago(at: SystemTime) -> String {
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    format!("{secs} s ago")
}

/// Inline styles: the page needs no other request.
const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;max-width:70em}\
h1 small{font-weight:normal;color:#666}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}.ok{color:#176117}.bad{color:#a31515}\
figure{display:inline-block;margin:0 1.5em 1em 0}figcaption{font-weight:600}\
svg.chart text{font-size:11px;fill:#555}svg.chart .axis{stroke:#888}svg.chart .grid{stroke:#ddd}\
.legend{margin:.2em 0 0}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::board::StatusBoard;

    #[test]
    fn the_page_says_when_the_listener_stands_aside() {
        let board = StatusBoard::default();
        let before = page("me", None, &board.view(), None, None).into_string();
        assert!(!before.contains("Standing aside"));
        board.standing_aside(true);
        let during = page("me", None, &board.view(), None, None).into_string();
        assert!(during.contains("Standing aside: a listener with a newer version"));
    }

    #[test]
    fn the_page_draws_the_last_fifteen_minutes_and_each_fragments_freshness() {
        let board = StatusBoard::default();
        let quiet = page("me", None, &board.view(), None, None).into_string();
        for chart in ["chart-applied", "chart-freshness", "chart-queue"] {
            assert!(quiet.contains(&format!("<svg id=\"{chart}\"")), "{chart}");
        }
        // A listener that just started has one slot, drawn as a point, and nothing before it.
        assert!(!quiet.contains("<polyline"), "{quiet}");
        board.applied(3);
        board.fresh("card", &[std::time::Duration::from_millis(3)]);
        let view = board.view();
        let busy = page("me", None, &view, None, None).into_string();
        assert!(busy.contains("<circle"), "this slot's point is drawn");
        assert_eq!(freshness(&view.history, "card"), "3.8 ms / 5.0 ms");
    }
}
