//! The command line's arguments, as clap parses them: connections (shared by every command),
//! logging, each command's flags, with every value checked as it is parsed.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::Error;
use crate::config::Environment;
use crate::pg::Database;
use crate::store::Storage;
use crate::store::{RedisStore, shown_redis_url};

/// Where PostgreSQL and Redis are.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Connections")]
pub struct Connections {
    /// PostgreSQL connection URL or libpq key=value string. What it leaves out comes from libpq's
    /// PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, ... and ~/.pgpass, then defaults
    /// to postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// A direct connection to the same database (not through a pooler), in the same forms, for what
    /// needs a session of its own: the listener's LISTEN. Give it when --database-url leads through
    /// PgBouncer in transaction pooling; without it, the listener polls every --poll-interval there.
    #[arg(
        long,
        env = "PGFRESH_SESSION_URL",
        hide_env_values = true,
        global = true
    )]
    pub session_url: Option<String>,
    /// A hot standby of the database (streaming replication), in the same forms, for the loads of
    /// listen and sweep: a batch loads there once the standby has replayed its changes, and from the
    /// primary otherwise. Claims, tickets, through queries and pgfresh's own tables stay on the
    /// primary. doctor checks it.
    #[arg(
        long,
        env = "PGFRESH_REPLICA_URL",
        hide_env_values = true,
        global = true
    )]
    pub replica_url: Option<String>,
    /// How long a batch (or a sweep page) waits for the standby to replay its changes before it
    /// loads from the primary instead.
    #[arg(
        long,
        env = "PGFRESH_REPLICA_MAX_WAIT",
        default_value = "50ms",
        value_parser = parse_duration,
        global = true
    )]
    pub replica_max_wait: Duration,
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
        let environment = Environment::from_process();
        let mut db = Database::with_environment(url, pool_size, &environment)?;
        if let Some(session) = &self.session_url {
            db = db.with_session_url(session, &environment)?;
        }
        if let Some(replica) = &self.replica_url {
            db = db.with_replica_url(replica, &environment, self.replica_max_wait)?;
        }
        Ok(db)
    }

    /// Connects to Redis, a cluster or one server as the flags say, and checks that it answers.
    pub async fn redis(&self) -> Result<RedisStore, Error> {
        let store = if self.redis_cluster {
            let nodes: Vec<&str> = self
                .redis_url
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .collect();
            RedisStore::connect_cluster(&nodes).await?
        } else if self.redis_url.contains(',') {
            return Err(Error::InvalidUrl {
                what: "Redis",
                url: shown_redis_url(&self.redis_url),
                reason:
                    "several nodes are listed, which is for a Redis Cluster: add --redis-cluster \
                         (REDIS_CLUSTER=1)"
                        .into(),
            });
        } else {
            RedisStore::connect(&self.redis_url).await?
        };
        // Connecting is lazy on a cluster: a PING tells now whether Redis answers.
        store.ping().await.map_err(|error| Error::RedisConnect {
            url: store.url().to_string(),
            reason: error.to_string(),
        })?;
        Ok(store)
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
    // Boxed: its flags outweigh every other command's, and an enum that embeds `Command` (as a
    // program adding commands of its own does) would otherwise carry their size in every variant.
    Listen(Box<ListenArgs>),
    /// Re-render every fragment once and delete entries whose row is gone.
    Sweep(SweepArgs),
    /// Print the HTML of one fragment for one key, touching nothing.
    Render(RenderArgs),
    /// Show the installed version, watches, queue and listeners.
    Status,
    /// Put changes parked in pgfresh.failed back into the queue.
    RetryFailed,
    /// Check the deployment (schema, watches against fragments, key columns, loaders for this role,
    /// Redis's memory policy, listeners, queue, NOTIFY queue); print each problem with its fix and
    /// exit 1 if there is any. Run it with the listener's connection settings.
    Doctor(DoctorArgs),
}

/// Flags of `doctor`.
#[derive(Args, Clone, Debug, Default)]
pub struct DoctorArgs {
    /// Print the findings as JSON lines for scripts, one object each:
    /// `{"level": "ok" | "note" | "problem", "what": ..., "fix": ...}` (`fix` for problems only).
    /// The exit status is the same.
    #[arg(long)]
    pub json: bool,
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
    /// Most batches processed concurrently: a drain starts with one and takes in another whenever a
    /// claim comes back full, or a wake-up or poll comes while a batch runs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Serve the status page (/), /metrics (Prometheus), /healthz and /readyz on this address, e.g.
    /// 127.0.0.1:9187 or localhost:9187.
    #[arg(long, value_parser = parse_address)]
    pub http: Option<String>,
    /// Serve GET /fragments/{key} on this address: the fragment's HTML from Redis, rendered on
    /// demand when Redis misses it (or with ?fresh=1), e.g. 127.0.0.1:9188. A non-loopback address
    /// needs --serve-token.
    #[arg(long, env = "PGFRESH_SERVE", value_parser = parse_address)]
    pub serve: Option<String>,
    /// The bearer token clients of --serve must send (Authorization: Bearer ...).
    #[arg(long, env = "PGFRESH_SERVE_TOKEN", hide_env_values = true)]
    pub serve_token: Option<String>,
    /// Most on-demand renders in flight at once; a request beyond is answered 429.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub serve_max_pending: u32,
    /// How long a request to --serve waits for its render before it is answered 503 (the render
    /// goes on and stores the entry); at most 50s.
    #[arg(long, default_value = "30s", value_parser = parse_serve_wait)]
    pub serve_wait: Duration,
    /// Failed attempts before a change is parked in pgfresh.failed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: i32,
    /// How the periodic sweep pages through keys.
    #[command(flatten)]
    pub sweep: SweepTuning,
    /// How fragments are stored in Redis.
    #[command(flatten)]
    pub storage: StorageArgs,
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
    /// How fragments are stored in Redis.
    #[command(flatten)]
    pub storage: StorageArgs,
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
    /// How fragments are stored in Redis (`render` says where this one would be).
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// How fragments are stored in Redis, for every fragment the binary registered without a storage
/// of its own: the flags of every command that reads or writes fragments.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Cache format")]
pub struct StorageArgs {
    /// plain: the HTML at the fragment key. django: as Django's cache stores it, so that the site's
    /// cache.get(key) returns it (a pickled string at KEY_PREFIX:VERSION:key).
    #[arg(long, env = "PGFRESH_CACHE_FORMAT", value_enum, default_value_t = CacheFormat::Plain)]
    pub cache_format: CacheFormat,
    /// With --cache-format django: the KEY_PREFIX of the site's cache setting [default: empty].
    #[arg(long, env = "PGFRESH_CACHE_KEY_PREFIX")]
    pub cache_key_prefix: Option<String>,
    /// With --cache-format django: the VERSION of the site's cache setting [default: 1].
    #[arg(long, env = "PGFRESH_CACHE_VERSION", allow_negative_numbers = true)]
    pub cache_version: Option<i64>,
    /// Entries expire this long after each write, e.g. 3700s or 1h; 0 (the default) never. Only a
    /// guard: an expired entry is missing until its rows change or the next sweep.
    #[arg(long, env = "PGFRESH_CACHE_TTL", value_parser = parse_cache_ttl)]
    pub cache_ttl: Option<Duration>,
}

/// See [`StorageArgs::cache_format`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheFormat {
    /// The HTML as it is, at the fragment key.
    #[default]
    Plain,
    /// Django's cache format.
    Django,
}

impl StorageArgs {
    /// The storage these flags describe.
    pub fn storage(&self) -> Result<Storage, Error> {
        let storage = match self.cache_format {
            CacheFormat::Plain => {
                if self.cache_key_prefix.is_some() || self.cache_version.is_some() {
                    return Err(Error::InvalidSetting(
                        "--cache-key-prefix and --cache-version describe Django's cache: add --cache-format django (PGFRESH_CACHE_FORMAT=django)".into(),
                    ));
                }
                Storage::plain()
            }
            CacheFormat::Django => Storage::django(
                self.cache_key_prefix.clone().unwrap_or_default(),
                self.cache_version.unwrap_or(1),
            ),
        };
        Ok(match self.cache_ttl {
            Some(ttl) => storage.with_ttl(ttl),
            None => storage,
        })
    }
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

/// Parses "500ms", "1s", "1h", or "0".
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 1s, 10m, 1h, 0)"))
}

fn parse_cache_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl > Storage::MAX_TTL {
        return Err("at most 366d (examples: 3700s, 1h, 1d; 0 for none)".into());
    }
    Ok(ttl)
}

fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < crate::config::MIN_POLL_INTERVAL {
        return Err("at least 10ms: a shorter poll would only spin (examples: 100ms, 1s)".into());
    }
    Ok(interval)
}

fn parse_serve_wait(text: &str) -> Result<Duration, String> {
    let wait = parse_duration(text)?;
    if wait.is_zero() || wait > crate::config::MAX_SERVE_WAIT {
        return Err("more than 0 and at most 50s (examples: 2s, 30s)".into());
    }
    Ok(wait)
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
