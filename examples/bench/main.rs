//! pgfresh's benchmark: the shop's product card (and, for `fan-out`, the blog) on the local
//! PostgreSQL and Redis, one line of figures per scenario. BENCHMARKS.md records the results and the
//! machine.
//!
//!     cargo run --release --example bench -- all
//!
//! Scenarios: `sweep`, `latency`, `write-overhead`, `burst`, `catch-up`, `fan-out`, `cluster`, `serve`,
//! `all`
//! (which ends with a table of round two's targets beside today's figures; `sweep`, `latency` and
//! `write-overhead` print their rows of it),
//! `triggers` (the trigger study, about 30 minutes; not part of `all`), and `standby` (a sweep's CPU on
//! a throwaway primary with and without a streaming standby of it; not part of `all`).
//! Each works in databases of its own (`pgfresh_bench_<products>`, `pgfresh_bench_blog_<posts>`,
//! created and filled on first use, kept for later runs) and in a Redis database of its own
//! (`--redis-url`, default database 9), which it empties; `cluster` also starts a throwaway Redis
//! Cluster of its own.

// The blog's fragments and setup, for the fan-out scenario.
#[allow(dead_code)]
#[path = "../blog/fragments.rs"]
mod blog_fragments;
#[allow(dead_code)]
#[path = "../blog/setup.rs"]
mod blog_setup;
mod cluster;
mod cost;
mod fan_out;
// The shop's fragment, under the benchmark's own prefixes (its KEY_PREFIX is not used).
#[allow(dead_code)]
#[path = "../shop/product_card.rs"]
mod product_card;
mod queue_only;
mod scenarios;
mod serve;
#[allow(dead_code)] // the bench only needs `setup` itself
#[path = "../shop/setup.rs"]
mod setup;
mod standby;
mod triggers;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

/// The shop's allocator (see `examples/shop/main.rs`), so that the benchmark measures pgfresh as
/// the shop runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "pgfresh benchmarks on the shop example")]
struct BenchCli {
    /// A database to connect to for creating the benchmark databases.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The Redis database to use; it is emptied.
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/9"
    )]
    redis_url: String,
    /// What to measure.
    scenario: Scenario,
    /// Internal: the product count of a `sweep-once` child, the post count of a `fan-out-once` one.
    #[arg(long, hide = true, default_value_t = 0)]
    products: i64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Sweep,
    Latency,
    WriteOverhead,
    Burst,
    CatchUp,
    FanOut,
    Cluster,
    All,
    /// The trigger study: each part of the capture trigger's cost (about 30 minutes).
    Triggers,
    /// What a hot standby takes off the primary during a sweep of 200,000 products, on a throwaway
    /// primary and standby of its own (a few minutes; not part of `all`).
    Standby,
    /// What `GET /fragments/{key}` costs: misses rendered on demand, hits, a stampede.
    Serve,
    /// Internal: one sweep in a fresh process, so its peak RSS is its own.
    #[value(hide = true)]
    SweepOnce,
    /// Internal: one fan-out in a fresh process, so its resident set is its own.
    #[value(hide = true)]
    FanOutOnce,
}

fn main() -> ExitCode {
    let cli = BenchCli::parse();
    let logging = pgfresh::cli::Logging {
        log_format: pgfresh::cli::LogFormat::Text,
    };
    pgfresh::cli::run_command(&logging, || async move {
        let bench = scenarios::Bench::new(&cli.database_url, &cli.redis_url);
        if !matches!(cli.scenario, Scenario::SweepOnce | Scenario::FanOutOnce) {
            bench
                .note_server_settings()
                .await
                .map_err(|e| pgfresh::Error::Fragment(format!("{e:#}")))?;
        }
        let result = match cli.scenario {
            Scenario::SweepOnce => bench.sweep_once(cli.products).await,
            Scenario::Sweep => bench.sweep().await,
            Scenario::Latency => bench.latency().await,
            Scenario::WriteOverhead => bench.write_overhead().await,
            Scenario::Burst => bench.burst().await,
            Scenario::CatchUp => bench.catch_up().await,
            Scenario::FanOut => bench.fan_out().await,
            Scenario::FanOutOnce => bench.fan_out_once(cli.products).await,
            Scenario::Cluster => bench.cluster().await,
            Scenario::All => bench.all().await,
            Scenario::Triggers => bench.triggers().await,
            Scenario::Standby => standby::standby(&bench).await,
            Scenario::Serve => serve::serve(&bench).await,
        };
        bench.print_targets();
        result
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| pgfresh::Error::Fragment(format!("{e:#}")))
    })
}
