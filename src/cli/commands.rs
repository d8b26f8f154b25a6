//! What each command does, once its arguments are parsed and the database is reachable: the DBA's
//! `install`, `uninstall`, `status` and `retry-failed`, and `render`, `listen`, `sweep`, `doctor`.

use std::process::ExitCode;

use super::args::{Connections, DoctorArgs, ListenArgs, RenderArgs, SweepArgs, SweepTuning};
use crate::Error;
use crate::config::{ListenSettings, SweepSettings};
use crate::fragment::{Fragments, KeyOutcome};
use crate::ops::one_line;
use crate::pg::{Database, queue, registry, schema, truncations};
use crate::shutdown::shutdown_on_signal;
use crate::sweep::progress::SweepProgress;

pub(super) async fn install(db: &Database) -> Result<ExitCode, Error> {
    let applied = schema::install(db).await?;
    let version = schema::required_version();
    let database = db.name();
    if applied.is_empty() {
        println!(
            "pgfresh schema version {version} is already installed in database {database}; nothing to do"
        );
    } else {
        println!(
            "pgfresh schema version {version} installed in database {database} (applied {})",
            applied.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn uninstall(db: &Database) -> Result<ExitCode, Error> {
    schema::uninstall(db).await?;
    println!(
        "pgfresh uninstalled from database {}; your tables are untouched",
        db.name()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn retry_failed(db: &Database) -> Result<ExitCode, Error> {
    schema::ensure_installed(db).await?;
    let moved = queue::retry_failed(db).await?;
    println!("{moved} parked changes put back in the queue");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn listen(
    db: Database,
    connections: &Connections,
    fragments: &Fragments,
    args: ListenArgs,
) -> Result<ExitCode, Error> {
    let store = connections.redis().await?;
    let settings = ListenSettings {
        batch_size: args.batch_size,
        workers: args.workers.into(),
        poll_interval: args.poll_interval,
        sweep_interval: (!args.sweep_interval.is_zero()).then_some(args.sweep_interval),
        max_attempts: args.max_attempts,
        http: args.http,
        serve: args.serve,
        serve_token: args.serve_token,
        serve_max_pending: args.serve_max_pending as usize,
        serve_wait: args.serve_wait,
        sweep: sweep_settings(&args.sweep),
        ..ListenSettings::default()
    };
    let shutdown = shutdown_on_signal();
    crate::listener::listen(db, store, fragments.clone(), settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// The one-off sweep: every fragment or one, with a progress bar; settles the TRUNCATEs it covers;
/// exits non-zero if any key failed.
pub(super) async fn sweep(
    db: &Database,
    connections: &Connections,
    fragments: &Fragments,
    args: SweepArgs,
) -> Result<ExitCode, Error> {
    schema::ensure_installed(db).await?;
    let store = connections.redis().await?;
    let fragments = match &args.fragment {
        Some(name) => fragments.only(name)?,
        None => fragments.clone(),
    };
    let settings = sweep_settings(&args.tuning);
    let shutdown = shutdown_on_signal();
    let progress = SweepProgress::for_stderr();
    let report =
        crate::sweep::sweep_with_progress(db, &store, &fragments, &settings, &shutdown, &progress)
            .await?;
    println!("{report}");
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn sweep_settings(tuning: &SweepTuning) -> SweepSettings {
    SweepSettings {
        page_size: tuning.page_size,
        concurrency: tuning.sweep_concurrency.into(),
    }
}

pub(super) async fn render(
    db: &Database,
    fragments: &Fragments,
    args: RenderArgs,
) -> Result<ExitCode, Error> {
    let fragment = fragments.only(&args.fragment)?;
    let fragment = fragment.iter().next().expect("only() gives one fragment");
    let variants = fragment.variants();
    let variant = args.variant.as_deref().unwrap_or(variants[0]);
    let Some(index) = variants.iter().position(|v| *v == variant) else {
        return Err(Error::Fragment(format!(
            "{} has no variant {variant:?}; it has: {}",
            fragment.name(),
            variants.join(", ")
        )));
    };
    let client = db.get().await?;
    let keys = [args.key.clone()];
    let user = crate::fragment::UserClient::of(db, &client).await?;
    let rendered = fragment.render_keys(user, &keys).await?;
    match rendered.outcomes.into_iter().next() {
        Some(KeyOutcome::Rendered(entries)) => {
            if args.variant.is_none() && variants.len() > 1 {
                // On stderr: stdout stays the HTML alone, for piping into a file or a diff.
                eprintln!(
                    "{} {}: variant {variant} (the first of {}; choose with --variant)",
                    fragment.name(),
                    args.key,
                    variants.join(", ")
                );
            }
            eprintln!(
                "stored in Redis at {} ({})",
                entries[index].0,
                fragment.storage()
            );
            println!("{}", entries[index].1);
            Ok(ExitCode::SUCCESS)
        }
        Some(KeyOutcome::Gone(_)) => Err(Error::Fragment(format!(
            "{} has no row for key {:?}",
            fragment.name(),
            args.key
        ))),
        Some(KeyOutcome::Failed(reason) | KeyOutcome::Unresolved(reason)) => {
            Err(Error::Fragment(reason))
        }
        Some(KeyOutcome::SameAs(_)) | None => Err(Error::Fragment("nothing rendered".into())),
    }
}

/// `doctor`: every check of `ops::doctor`, printed as text or JSON lines; exit 1 when it found a
/// problem.
pub(super) async fn doctor(
    db: &Database,
    connections: &Connections,
    fragments: &Fragments,
    args: &DoctorArgs,
) -> Result<ExitCode, Error> {
    if !args.json {
        println!("pgfresh doctor: database {} at {}", db.name(), db.url());
    }
    let report = crate::ops::doctor::examine(db, connections.redis().await, fragments).await?;
    match args.json {
        true => print!("{}", report.json_lines()),
        false => println!("{report}"),
    }
    Ok(if report.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `status`: the installed version, the watches (and disabled triggers), the queue, the live
/// listeners, and Redis's memory policy.
pub(super) async fn status(db: &Database, connections: &Connections) -> Result<ExitCode, Error> {
    let client = db.pinned().await?;
    let Some(version) = schema::version_on(&client).await? else {
        return Err(Error::NotInstalled {
            database: db.name(),
        });
    };
    println!(
        "pgfresh {} (schema version {version}, this binary needs {}) in database {} at {}",
        env!("CARGO_PKG_VERSION"),
        schema::required_version(),
        db.name(),
        db.url()
    );
    print_watches(&client).await?;
    print_queue(&client, version).await?;
    print_listeners(&client, version).await?;
    print_redis(connections).await;
    Ok(ExitCode::SUCCESS)
}

async fn print_watches(client: &tokio_postgres::Client) -> Result<(), Error> {
    let watches = schema::watches(client).await?;
    println!("watches: {}", watches.len());
    for watch in &watches {
        println!(
            "  {}.{} -> topic {}",
            watch.table, watch.key_column, watch.topic
        );
    }
    for gap in schema::capture_gaps(client).await? {
        println!(
            "  warning: {}: changes there are not captured; fix: {}",
            one_line(&gap.what),
            one_line(&gap.fix)
        );
    }
    Ok(())
}

/// How many retrying and how many parked changes `status` shows, the latest of each.
const TROUBLES_SHOWN: i64 = 5;

async fn print_queue(client: &tokio_postgres::Client, version: i32) -> Result<(), Error> {
    let stats = queue::stats(client, i64::MIN).await?;
    let oldest = stats.oldest.map_or("none".to_string(), |age| {
        format!("{:.1} s old", age.as_secs_f64())
    });
    // Schema version 2 added recorded TRUNCATEs.
    let truncated = if version >= 2 {
        truncations::count(client).await?
    } else {
        0
    };
    let about = if stats.pending_estimated {
        "about "
    } else {
        ""
    };
    println!(
        "queue: {about}{} pending (oldest {oldest}), {} parked in pgfresh.failed, {truncated} truncated tables awaiting a sweep",
        stats.pending, stats.parked
    );
    for trouble in queue::troubles(client, TROUBLES_SHOWN).await? {
        let queue::Trouble {
            topic,
            key,
            attempts,
            error,
            retry_in,
        } = trouble;
        let state = match retry_in {
            Some(secs) => format!("retrying in {secs:.0} s"),
            None => "parked".to_string(),
        };
        let (topic, key, error) = (one_line(&topic), one_line(&key), one_line(&error));
        println!("  {state}: {topic} {key} ({attempts} attempts): {error}");
    }
    Ok(())
}

async fn print_listeners(client: &tokio_postgres::Client, version: i32) -> Result<(), Error> {
    let listeners = registry::live_listeners(client, version).await?;
    println!("listeners: {}", listeners.len());
    for listener in &listeners {
        let state = match (listener.standing_aside, listener.idle) {
            (true, _) => "standing aside for a newer version",
            (false, true) => "idle",
            (false, false) => "busy",
        };
        let renders = if listener.renders.is_empty() {
            String::new()
        } else {
            format!(" rendering {}", listener.renders)
        };
        println!(
            "  {}{renders} ({state}, seen {:.0} s ago): {} changes applied, {} stale writes refused",
            listener.id, listener.seen_seconds_ago, listener.applied, listener.refused
        );
    }
    Ok(())
}

/// The last line of `status`: Redis, and whether its memory policy can evict pgfresh's keys. Redis
/// is not needed for the rest, so a failure to connect is reported here, not as an error.
async fn print_redis(connections: &Connections) {
    match connections.redis().await {
        Ok(store) => {
            let (eviction, policy) = store.eviction();
            println!(
                "redis: {} answering; maxmemory-policy {}",
                store.url(),
                eviction.describe(&policy)
            );
        }
        Err(error) => println!("redis: {error}"),
    }
}
