//! The command line that users reuse in their own fragment binary: `install`, `uninstall`, `listen`,
//! `sweep`, `render`, `status`, `retry-failed` and `doctor`.
//!
//! This is the only layer that reads flags and the environment; it turns them into typed settings once
//! and hands them to the library. A binary with extra commands (like `examples/shop`) flattens
//! [`Connections`] and [`Command`] into its own parser and calls [`execute`].

mod args;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::Error;
use crate::fragment::Fragments;

/// The argument parser the command line is built with: a binary that adds commands of its own
/// flattens [`Connections`] and [`Command`] into its own `clap` parser, of this version.
pub use clap;

pub use args::{
    CacheFormat, Cli, Command, Connections, ListenArgs, LogFormat, Logging, RenderArgs,
    StorageArgs, SweepArgs, SweepTuning, parse_address,
};

/// Runs the pgfresh command line with these fragments: a complete `main` for a fragment binary.
pub fn main(fragments: Fragments) -> ExitCode {
    let cli = Cli::parse();
    run_command(&cli.logging, || {
        execute(&cli.connections, cli.command.clone(), &fragments)
    })
}

/// Sets up logging, panics as one log line, and a runtime; runs `command`; prints an error as one
/// line and turns it into the exit code.
pub fn run_command<F, Fut>(logging: &Logging, command: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, Error>>,
{
    init_logging(logging.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What is logged when `RUST_LOG` is not set: pgfresh's own events, without the pool's and the
/// driver's per-connection warnings, which would repeat every loss that pgfresh already reports once.
const DEFAULT_LOG_FILTER: &str = "info,deadpool=error,tokio_postgres=warn";

/// Logs to stderr, filtered by `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]); a panic becomes one error
/// line.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!("panic{place}: {message}");
    }));
}

/// Runs one pgfresh command.
pub async fn execute(
    connections: &Connections,
    command: Command,
    fragments: &Fragments,
) -> Result<ExitCode, Error> {
    fragments.validate()?;
    // The commands that read or write fragments store them as their flags say.
    let storage = match &command {
        Command::Listen(args) => Some(&args.storage),
        Command::Sweep(SweepArgs { storage, .. }) | Command::Render(RenderArgs { storage, .. }) => {
            Some(storage)
        }
        _ => None,
    };
    let fragments = match storage {
        Some(storage) => {
            let stored = fragments.stored_as(&storage.storage()?);
            stored.validate()?;
            stored
        }
        None => fragments.clone(),
    };
    let fragments = &fragments;
    if matches!(command, Command::Listen(_) | Command::Sweep(_)) {
        require_fragments(fragments)?;
    }
    let (own, users) = pool_sizes(&command);
    let db = connections.database(own)?;
    db.limit_user_sessions(users);
    db.check().await?;
    let closing = db.clone();
    let outcome = match command {
        Command::Install => commands::install(&db).await,
        Command::Uninstall => commands::uninstall(&db).await,
        Command::Status => commands::status(&db, connections).await,
        Command::RetryFailed => commands::retry_failed(&db).await,
        Command::Doctor(args) => commands::doctor(&db, connections, fragments, &args).await,
        Command::Render(args) => commands::render(&db, fragments, args).await,
        Command::Listen(args) => commands::listen(db, connections, fragments, *args).await,
        Command::Sweep(args) => commands::sweep(&db, connections, fragments, args).await,
    };
    // The runtime, and every connection still open with it, goes when the command returns.
    closing.close().await;
    outcome
}

/// Pooled connections a command may hold at once: for pgfresh's own statements, and for user code.
fn pool_sizes(command: &Command) -> (usize, usize) {
    match command {
        // What the listener's own work holds; with `--serve`, as many more as there are workers,
        // for on-demand renders (each takes one of each; see `listener::serve_render_slots`).
        Command::Listen(args) => {
            let workers = usize::from(args.workers);
            let pages = usize::from(args.sweep.sweep_concurrency);
            let (own, users) = crate::listener::own_sessions(workers, pages);
            let serving = if args.serve.is_some() { workers } else { 0 };
            (own + serving, users + serving)
        }
        Command::Sweep(args) => {
            let pages = usize::from(args.tuning.sweep_concurrency);
            (pages + 1, pages + 1)
        }
        // Its own session, and the loader it tries.
        Command::Doctor(_) => (2, 1),
        _ => (1, 1),
    }
}

fn require_fragments(fragments: &Fragments) -> Result<(), Error> {
    if fragments.is_empty() {
        return Err(Error::Fragment(
            "this binary has no fragments; build your own binary with pgfresh::cli::main (see README, \"Writing your own fragment\")"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn listen_with_serve_gets_as_many_more_sessions_as_it_has_workers() {
        let sizes = |args: &[&str]| {
            let cli = args::Cli::try_parse_from(args).expect("valid arguments");
            pool_sizes(&cli.command)
        };
        let plain = sizes(&["pgfresh", "listen", "--workers", "3"]);
        let serving = sizes(&[
            "pgfresh",
            "listen",
            "--workers",
            "3",
            "--serve",
            "127.0.0.1:9188",
        ]);
        assert_eq!((serving.0 - plain.0, serving.1 - plain.1), (3, 3));
    }
}
