//! The command line that users reuse in their own fragment binary: `install`, `uninstall`, `listen`,
//! `sweep`, `render`, `status` and `retry-failed`.
//!
//! This is the only layer that reads flags and the environment; it turns them into typed settings once
//! and hands them to the library. A binary with extra commands (like `examples/shop`) flattens
//! [`Connections`] and [`Command`] into its own parser and calls [`execute`].

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::Error;
use crate::config::{Environment, ListenSettings, SweepSettings};
use crate::db::Database;
use crate::fragment::{Fragments, KeyOutcome};
use crate::sink::RedisSink;
use crate::{queue, schema, shutdown};

/// Where PostgreSQL and Redis are.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Connections")]
pub struct Connections {
    /// PostgreSQL connection URL or libpq key=value string. What it leaves out comes from libpq's
    /// PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, ... and ~/.pgpass, then defaults
    /// to postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Redis connection URL; a /N path selects database N. With --redis-cluster, one or more cluster
    /// nodes, comma-separated (the others are discovered).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    pub redis_url: String,
    /// Redis is a Redis Cluster: --redis-url names some of its nodes.
    #[arg(long, env = "REDIS_CLUSTER", hide_env_values = true, global = true)]
    pub redis_cluster: bool,
}

impl Connections {
    /// The PostgreSQL database, with a pool of at most `pool_size` connections, its settings
    /// completed from this process's environment as libpq would (see [`Environment`]).
    pub fn database(&self, pool_size: usize) -> Result<Database, Error> {
        let url = self.database_url.as_deref().unwrap_or("");
        Database::with_environment(url, pool_size, &Environment::from_process())
    }

    /// Connects to Redis, a cluster or one server as the flags say, and checks that it answers.
    pub async fn redis(&self) -> Result<RedisSink, Error> {
        let sink = if self.redis_cluster {
            let nodes: Vec<&str> = self
                .redis_url
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .collect();
            RedisSink::connect_cluster(&nodes).await?
        } else if self.redis_url.contains(',') {
            return Err(Error::InvalidUrl {
                what: "Redis",
                url: crate::config::shown_redis_url(&self.redis_url),
                reason:
                    "several nodes are listed, which is for a Redis Cluster: add --redis-cluster \
                         (REDIS_CLUSTER=1)"
                        .into(),
            });
        } else {
            RedisSink::connect(&self.redis_url).await?
        };
        sink.ping().await.map_err(|e| redis_unreachable(&sink, e))?;
        Ok(sink)
    }
}

/// How logs are written.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Logging")]
pub struct Logging {
    /// Log format on stderr: human-readable text, or one JSON object per line for log collectors.
    #[arg(
        long,
        env = "PGFRESH_LOG_FORMAT",
        hide_env_values = true,
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// See [`Logging`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// pgfresh's commands.
#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Install pgfresh in the database, or upgrade it (runs the same SQL as sql/install.sql).
    Install,
    /// Remove every pgfresh object, triggers included; your tables are untouched.
    Uninstall,
    /// Keep Redis fresh: apply committed changes as they happen, until SIGINT or SIGTERM.
    Listen(ListenArgs),
    /// Re-render every fragment once and delete entries whose row is gone.
    Sweep(SweepArgs),
    /// Print the HTML of one fragment for one key, touching nothing.
    Render(RenderArgs),
    /// Show the installed version, watches, queue and listeners.
    Status,
    /// Put changes parked in pgfresh.failed back into the queue.
    RetryFailed,
}

/// Flags of `listen`.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Listener")]
pub struct ListenArgs {
    /// How often to check the queue when no NOTIFY arrives (the fallback for lost wake-ups; at
    /// least 10ms).
    #[arg(long, default_value = "1s", value_parser = parse_poll_interval)]
    pub poll_interval: Duration,
    /// How often to run a full sweep (one listener of all at a time); 0 disables; at most 366d.
    #[arg(long, default_value = "1h", value_parser = parse_sweep_interval)]
    pub sweep_interval: Duration,
    /// Most changes claimed per batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,
    /// Batches processed concurrently.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Serve the status page (/), /metrics (Prometheus), /healthz and /readyz on this address, e.g.
    /// 127.0.0.1:9187 or localhost:9187.
    #[arg(long, value_parser = parse_address)]
    pub http: Option<String>,
    /// Failed attempts before a change is parked in pgfresh.failed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: i32,
    /// How the periodic sweep pages through keys.
    #[command(flatten)]
    pub sweep: SweepTuning,
}

/// Flags of `sweep`.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Sweep")]
pub struct SweepArgs {
    /// Sweep only this fragment.
    #[arg(long)]
    pub fragment: Option<String>,
    /// How the sweep pages through keys.
    #[command(flatten)]
    pub tuning: SweepTuning,
}

/// How a sweep pages through keys.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Sweep")]
pub struct SweepTuning {
    /// Keys per sweep page.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub page_size: i64,
    /// Sweep pages in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub sweep_concurrency: u16,
}

/// Arguments of `render`.
#[derive(Args, Clone, Debug)]
pub struct RenderArgs {
    /// Fragment name.
    pub fragment: String,
    /// Key, as its text form in the queue (e.g. a product id).
    pub key: String,
    /// Variant to render (default: the fragment's first).
    #[arg(long)]
    pub variant: Option<String>,
}

/// The plain pgfresh command line.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Keep pre-rendered HTML fragments in Redis fresh from PostgreSQL"
)]
pub struct Cli {
    /// Where PostgreSQL and Redis are.
    #[command(flatten)]
    pub connections: Connections,
    /// How logs are written.
    #[command(flatten)]
    pub logging: Logging,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

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
pub fn init_logging(format: LogFormat) {
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
    let db = connections.database(pool_size(&command))?;
    db.check().await?;
    match command {
        Command::Install => install(&db).await,
        Command::Uninstall => {
            schema::uninstall(&db).await?;
            println!(
                "pgfresh uninstalled from database {}; your tables are untouched",
                db.name()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let code = status(&db).await?;
            redis_status(connections).await;
            Ok(code)
        }
        Command::RetryFailed => {
            schema::ensure_installed(&db).await?;
            let moved = queue::retry_failed(&*db.get().await?).await?;
            println!("{moved} parked changes put back in the queue");
            Ok(ExitCode::SUCCESS)
        }
        Command::Render(args) => render(&db, fragments, args).await,
        Command::Listen(args) => {
            require_fragments(fragments)?;
            let sink = connections.redis().await?;
            let settings = ListenSettings {
                batch_size: args.batch_size,
                workers: args.workers.into(),
                poll_interval: args.poll_interval,
                sweep_interval: (!args.sweep_interval.is_zero()).then_some(args.sweep_interval),
                max_attempts: args.max_attempts,
                http: args.http,
                sweep: sweep_settings(&args.sweep, None),
            };
            crate::listener::run(db, sink, fragments.clone(), settings, shutdown::on_signal())
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep(args) => {
            require_fragments(fragments)?;
            schema::ensure_installed(&db).await?;
            let sink = connections.redis().await?;
            let settings = sweep_settings(&args.tuning, args.fragment);
            // Read before sweeping: the sweep covers the TRUNCATEs recorded so far whose fragments it
            // sweeps.
            let truncated = crate::maintenance::truncations(&db, fragments).await?;
            let progress = crate::progress::SweepProgress::for_stderr();
            let report = crate::sweep::run_with_progress(
                &db,
                &sink,
                fragments,
                &settings,
                &shutdown::on_signal(),
                &progress,
            )
            .await?;
            let swept: Vec<&str> = match &settings.only {
                Some(name) => vec![name.as_str()],
                None => fragments.iter().map(|f| f.name()).collect(),
            };
            let covered = truncated.covered_by(&swept);
            if report.succeeded() && !covered.is_empty() {
                crate::maintenance::settle_truncations(&db, &covered).await?;
            }
            println!("{report}");
            Ok(if report.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn pool_size(command: &Command) -> usize {
    match command {
        // Two per worker (claim, load), the sweep's pages and its pager, and the bookkeeping.
        Command::Listen(args) => {
            2 * usize::from(args.workers) + usize::from(args.sweep.sweep_concurrency) + 3
        }
        Command::Sweep(args) => usize::from(args.tuning.sweep_concurrency) + 1,
        _ => 1,
    }
}

fn sweep_settings(tuning: &SweepTuning, only: Option<String>) -> SweepSettings {
    SweepSettings {
        page_size: tuning.page_size,
        concurrency: tuning.sweep_concurrency.into(),
        only,
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

fn redis_unreachable(sink: &RedisSink, error: Error) -> Error {
    Error::RedisConnect {
        url: sink.url().to_string(),
        reason: error.to_string(),
    }
}

async fn install(db: &Database) -> Result<ExitCode, Error> {
    let applied = schema::install(db).await?;
    if applied.is_empty() {
        println!(
            "pgfresh schema version {} is already installed in database {}; nothing to do",
            schema::required_version(),
            db.name()
        );
    } else {
        println!(
            "pgfresh schema version {} installed in database {} (applied {})",
            schema::required_version(),
            db.name(),
            applied.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn render(db: &Database, fragments: &Fragments, args: RenderArgs) -> Result<ExitCode, Error> {
    let fragment = fragments.get(&args.fragment).ok_or_else(|| {
        Error::Fragment(format!(
            "no fragment named {:?}; this binary has: {}",
            args.fragment,
            fragments.names()
        ))
    })?;
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
    match fragment.render_keys(&client, &keys).await?.pop() {
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
            println!("{}", entries[index].1);
            Ok(ExitCode::SUCCESS)
        }
        Some(KeyOutcome::Gone(_)) => Err(Error::Fragment(format!(
            "{} has no row for key {:?}",
            fragment.name(),
            args.key
        ))),
        Some(KeyOutcome::Failed(reason)) => Err(Error::Fragment(reason)),
        Some(KeyOutcome::SameAs(_)) | None => Err(Error::Fragment("nothing rendered".into())),
    }
}

async fn status(db: &Database) -> Result<ExitCode, Error> {
    let client = db.get().await?;
    let Some(version) = schema::installed_version(&client).await? else {
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
    let watches = client
        .query(
            "SELECT table_oid::regclass::text, key_column::text, topic FROM pgfresh.watches ORDER BY 1, 3",
            &[],
        )
        .await?;
    println!("watches: {}", watches.len());
    for row in &watches {
        println!(
            "  {}.{} -> topic {}",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        );
    }
    // A table's owner (or a partition's) may disable pgfresh's trigger: nothing is captured there.
    let disabled = client
        .query(
            "SELECT t.tgname::text, t.tgrelid::regclass::text FROM pg_trigger t
             JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE p.pronamespace = 'pgfresh'::regnamespace AND t.tgenabled = 'D'
             ORDER BY 2, 1",
            &[],
        )
        .await?;
    for row in &disabled {
        println!(
            "  warning: trigger {} on {} is disabled: changes there are not captured (ALTER TABLE ... ENABLE TRIGGER, then sweep)",
            row.get::<_, String>(0),
            row.get::<_, String>(1)
        );
    }
    let stats = queue::stats(&client).await?;
    let oldest = stats.oldest.map_or("none".to_string(), |age| {
        format!("{:.1} s old", age.as_secs_f64())
    });
    let truncations: i64 = if version >= 2 {
        client
            .query_one("SELECT count(*) FROM pgfresh.truncations", &[])
            .await?
            .get(0)
    } else {
        0
    };
    let about = if stats.pending_estimated {
        "about "
    } else {
        ""
    };
    println!(
        "queue: {about}{} pending (oldest {oldest}), {} parked in pgfresh.failed, {truncations} truncated tables awaiting a sweep",
        stats.pending, stats.failed
    );
    // Schema version 3 added what each listener renders, and whether it stands aside for a newer one.
    let versions = if version >= 3 {
        "superseded, array_to_string(ARRAY(SELECT f || ' v' || v FROM unnest(fragments, versions) AS x(f, v)), ', ')"
    } else {
        "false, ''"
    };
    let listeners = client
        .query(
            &format!(
                "SELECT id, idle, extract(epoch FROM now() - seen_at)::float8, changes_done, refused_writes, {versions}
                 FROM pgfresh.listeners
                 WHERE seen_at > now() - interval '1 minute' ORDER BY started_at"
            ),
            &[],
        )
        .await?;
    println!("listeners: {}", listeners.len());
    for row in &listeners {
        let state = match (row.get::<_, bool>(5), row.get::<_, bool>(1)) {
            (true, _) => "standing aside for a newer version",
            (false, true) => "idle",
            (false, false) => "busy",
        };
        let renders: String = row.get(6);
        let renders = if renders.is_empty() {
            String::new()
        } else {
            format!(" rendering {renders}")
        };
        println!(
            "  {}{renders} ({state}, seen {:.0} s ago): {} changes applied, {} stale writes refused",
            row.get::<_, String>(0),
            row.get::<_, f64>(2),
            row.get::<_, i64>(3),
            row.get::<_, i64>(4)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The last line of `status`: Redis, and whether its memory policy can evict pgfresh's keys. Redis
/// is not needed for the rest, so a failure to connect is reported here, not as an error.
async fn redis_status(connections: &Connections) {
    match connections.redis().await {
        Ok(sink) => {
            let (eviction, policy) = sink.eviction();
            println!(
                "redis: {} answering; maxmemory-policy {}",
                sink.url(),
                eviction.describe(&policy)
            );
        }
        Err(error) => println!("redis: {error}"),
    }
}

/// Parses "500ms", "1s", "1h", or "0".
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 1s, 10m, 1h, 0)"))
}

fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < crate::config::MIN_POLL_INTERVAL {
        return Err("at least 10ms: a shorter poll would only spin (examples: 100ms, 1s)".into());
    }
    Ok(interval)
}

fn parse_sweep_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval > crate::config::MAX_SWEEP_INTERVAL {
        return Err("at most 366d (examples: 1h, 1d; 0 disables the periodic sweep)".into());
    }
    Ok(interval)
}

/// Checks that `host:port` names a port and a host that resolves (a name like localhost, or an
/// address), so that a typo is caught with the other flags rather than when the listener starts.
pub fn parse_address(text: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let (_, port) = text
        .rsplit_once(':')
        .ok_or("expected host:port, e.g. 127.0.0.1:9187 or localhost:9187")?;
    port.parse::<u16>()
        .map_err(|_| format!("{port:?} is not a port number (expected host:port)"))?;
    match text.to_socket_addrs().map(|mut addresses| addresses.next()) {
        Ok(Some(_)) => Ok(text.to_string()),
        Ok(None) => Err(format!("{text} resolves to no address")),
        Err(error) => Err(format!("cannot resolve {text}: {error}")),
    }
}
