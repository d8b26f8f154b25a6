//! What a scenario costs, not only how fast it runs: the CPU seconds each process spent during it
//! (this benchmark's own process with its children, PostgreSQL's processes, the Redis server), read
//! from `/proc` before and after, and shown per 1,000 changes or fragments, so that a user can size a
//! machine and the next optimisation is chosen by measurement.

use anyhow::Result;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far: by this process and the children it waited for (a sweep run in a child),
/// by every `postgres` process (the postmaster's reaped children included), and by Redis.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuSample {
    pgfresh: f64,
    postgres: f64,
    redis: Option<f64>,
}

/// CPU seconds spent between two samples.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cost {
    pgfresh: f64,
    postgres: f64,
    redis: Option<f64>,
}

/// `(user + system, children's user + system)` of one process, in seconds.
pub(crate) fn process_cpu(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let tick = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    Some((
        (tick(11)? + tick(12)?) / TICKS_PER_SECOND,
        (tick(13)? + tick(14)?) / TICKS_PER_SECOND,
    ))
}

/// CPU seconds of every process named `postgres`, and of the children they reaped.
fn postgres_cpu() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "postgres").then_some(())?;
            let (own, children) = process_cpu(&pid)?;
            Some(own + children)
        })
        .sum()
}

impl CpuSample {
    /// Reads the figures now. Redis is found by the `process_id` its `INFO` gives; it counts only
    /// when it runs on this machine.
    pub(crate) async fn now(redis_url: &str) -> Result<CpuSample> {
        CpuSample::across(&[redis_url]).await
    }

    /// Like [`CpuSample::now`], Redis's figure summed over several servers (a cluster's masters).
    pub(crate) async fn across(redis_urls: &[&str]) -> Result<CpuSample> {
        let mut redis_total = Some(0.0);
        for url in redis_urls {
            let client = redis::Client::open(*url)?;
            let mut redis = client.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut redis)
                .await?;
            let cpu = info
                .lines()
                .find_map(|line| line.strip_prefix("process_id:"))
                .and_then(|pid| process_cpu(pid.trim()))
                .map(|(own, _)| own);
            redis_total = redis_total.zip(cpu).map(|(total, cpu)| total + cpu);
        }
        let (own, children) = process_cpu("self").unwrap_or_default();
        Ok(CpuSample {
            pgfresh: own + children,
            postgres: postgres_cpu(),
            redis: redis_total,
        })
    }

    /// What was spent since `earlier`.
    pub(crate) fn since(self, earlier: CpuSample) -> Cost {
        Cost {
            pgfresh: self.pgfresh - earlier.pgfresh,
            postgres: self.postgres - earlier.postgres,
            redis: self.redis.zip(earlier.redis).map(|(now, then)| now - then),
        }
    }
}

impl Cost {
    /// CPU milliseconds of every process together per 1,000 of `units`.
    pub(crate) fn total_per_thousand(self, units: f64) -> f64 {
        (self.pgfresh + self.postgres + self.redis.unwrap_or(0.0)) * 1000.0 / units * 1000.0
    }

    /// CPU seconds of PostgreSQL's processes.
    pub(crate) fn postgres(self) -> f64 {
        self.postgres
    }

    /// `CPU ms per 1,000 <what>: pgfresh 4.1, PostgreSQL 8.3, Redis 11.4, total 23.8`, for `units`
    /// changes or fragments.
    pub(crate) fn per_thousand(self, units: f64, what: &str) -> String {
        let per = |seconds: f64| seconds * 1000.0 / units * 1000.0;
        let redis = self.redis.map_or("not on this machine".to_string(), |r| {
            format!("{:.1}", per(r))
        });
        let total = self.pgfresh + self.postgres + self.redis.unwrap_or(0.0);
        format!(
            "CPU ms per 1,000 {what}: pgfresh {:.1}, PostgreSQL {:.1}, Redis {redis}, total {:.1}",
            per(self.pgfresh),
            per(self.postgres),
            per(total)
        )
    }
}

/// Microseconds Redis spent in each command so far (`INFO commandstats`), to tell what a scenario's
/// Redis share went to. A script's own commands are counted both on their own lines and in the
/// script's (`evalsha`).
pub(crate) async fn redis_command_micros(
    redis_url: &str,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let client = redis::Client::open(redis_url)?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (command, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let micros = stats
                .split(',')
                .find_map(|field| field.strip_prefix("usec="))?;
            Some((command.to_string(), micros.parse().ok()?))
        })
        .collect())
}

/// `evalsha 7.6, mget 2.2, scan 1.8`: the commands that took the most of Redis's time between two
/// samples, in milliseconds per 1,000 `units`.
pub(crate) fn top_commands(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    units: f64,
) -> String {
    let mut spent: Vec<(&String, u64)> = after
        .iter()
        .map(|(command, &micros)| {
            let earlier = before.get(command).copied().unwrap_or(0);
            (command, micros.saturating_sub(earlier))
        })
        .filter(|&(_, micros)| micros > 0)
        .collect();
    spent.sort_by_key(|&(_, micros)| std::cmp::Reverse(micros));
    let per_thousand = |micros: u64| micros as f64 / 1000.0 / units * 1000.0;
    let shown: Vec<String> = spent
        .iter()
        .take(5)
        .map(|(command, micros)| format!("{command} {:.1}", per_thousand(*micros)))
        .collect();
    shown.join(", ")
}
