//! How the `sweep` command shows its progress: a bar with rate and ETA when stderr is a terminal
//! (indicatif), and a plain log line every 5 seconds otherwise (cron, systemd, CI logs).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use super::Progress;

/// Between two plain progress lines.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// Progress for a sweep run from the command line.
pub(crate) enum SweepProgress {
    /// A live bar on a terminal.
    Bar(ProgressBar),
    /// Periodic log lines.
    Lines(Mutex<Lines>),
}

/// State of the plain-lines mode.
pub(crate) struct Lines {
    fragment: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    printed: Instant,
}

impl SweepProgress {
    /// A bar if stderr is a terminal, lines otherwise.
    pub(crate) fn for_stderr() -> SweepProgress {
        if std::io::stderr().is_terminal() {
            SweepProgress::Bar(ProgressBar::hidden())
        } else {
            SweepProgress::Lines(Mutex::new(Lines {
                fragment: String::new(),
                total: None,
                done: 0,
                started: Instant::now(),
                printed: Instant::now(),
            }))
        }
    }
}

impl Progress for SweepProgress {
    fn fragment_started(&self, name: &str, fragments: Option<u64>) {
        match self {
            SweepProgress::Bar(bar) => {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_position(0);
                let template = match fragments {
                    Some(total) => {
                        bar.set_length(total);
                        "{msg} [{bar:30}] {pos}/{len} fragments, {rate}, ETA {eta}"
                    }
                    None => {
                        bar.unset_length();
                        "{msg} {spinner} {pos} fragments, {rate}"
                    }
                };
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style.progress_chars("=> ").with_key(
                        "rate",
                        |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                            let _ = write!(out, "{:.0} fragments/s", state.per_sec());
                        },
                    ));
                }
                bar.set_message(format!("sweeping {name}"));
                bar.reset_eta();
            }
            SweepProgress::Lines(lines) => {
                let mut lines = lines.lock().expect("progress lock");
                *lines = Lines {
                    fragment: name.into(),
                    total: fragments,
                    done: 0,
                    started: Instant::now(),
                    printed: Instant::now(),
                };
            }
        }
    }

    fn advanced(&self, fragments: u64) {
        match self {
            SweepProgress::Bar(bar) => bar.inc(fragments),
            SweepProgress::Lines(lines) => {
                let mut lines = lines.lock().expect("progress lock");
                lines.done += fragments;
                if lines.printed.elapsed() >= LINE_INTERVAL {
                    lines.printed = Instant::now();
                    let rate = lines.done as f64 / lines.started.elapsed().as_secs_f64().max(1e-3);
                    let of = lines.total.map(|t| format!("/{t}")).unwrap_or_default();
                    tracing::info!(
                        "sweeping {}: {}{of} fragments, {rate:.0}/s",
                        lines.fragment,
                        lines.done
                    );
                }
            }
        }
    }

    fn fragment_finished(&self, _name: &str) {
        if let SweepProgress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
