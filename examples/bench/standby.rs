//! The `standby` scenario: what a hot standby (`--replica-url`) takes off the primary during a sweep
//! of 200,000 products. A throwaway primary (initdb on a free port, PostgreSQL's defaults) gets the
//! shop, a streaming standby of it is made with `pg_basebackup -R`, and the same sweep runs with and
//! without the standby, interleaved, each into an emptied Redis database; the CPU seconds of each
//! cluster's processes (the postmaster, its live children, and the children it reaped) are read from
//! `/proc` before and after.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pgfresh::{Database, Environment};

use crate::cost::process_cpu;
use crate::scenarios::{Bench, sweep_all};

const PRODUCTS: i64 = 200_000;
const ROUNDS: usize = 2;

/// A throwaway PostgreSQL cluster, run as user `postgres`, stopped and removed when dropped.
struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    /// A new cluster from initdb.
    fn primary() -> Result<Cluster> {
        let cluster = Cluster::empty()?;
        run(as_postgres(&bin("initdb"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-D"])
            .arg(cluster.data()))?;
        cluster.start()?;
        Ok(cluster)
    }

    /// A streaming standby of `primary`.
    fn standby_of(primary: &Cluster) -> Result<Cluster> {
        let cluster = Cluster::empty()?;
        run(as_postgres(&bin("pg_basebackup"))
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-D"])
            .arg(cluster.data()))?;
        cluster.start()?;
        Ok(cluster)
    }

    fn empty() -> Result<Cluster> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("pgfresh-bench-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("chown").arg("postgres").arg(&dir))?;
        Ok(Cluster { dir, port })
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start(&self) -> Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        run(as_postgres(&bin("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "120", "-o", &options, "-l"])
            .arg(self.dir.join("server.log"))
            .arg("start"))
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// CPU seconds the cluster's processes used so far: the postmaster with the children it reaped,
    /// and its children still running.
    fn cpu(&self) -> f64 {
        let Some(postmaster) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_string))
        else {
            return 0.0;
        };
        let mut total = process_cpu(&postmaster).map_or(0.0, |(own, reaped)| own + reaped);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if parent(&pid).as_deref() == Some(postmaster.as_str())
                && let Some((own, _)) = process_cpu(&pid)
            {
                total += own;
            }
        }
        total
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&bin("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The parent of a process, from `/proc/<pid>/stat`.
fn parent(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .to_string(),
    )
}

fn bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .last()
        .map(|version| version.join("bin").join(name))
        .unwrap_or_else(|| Path::new(name).to_path_buf())
}

/// `program`, run as user `postgres` when this process is root (initdb refuses root).
fn as_postgres(program: &Path) -> Command {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> Result<()> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .context("running a PostgreSQL program")?;
    if !out.status.success() {
        bail!(
            "{:?}: {}",
            command.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One sweep into an emptied Redis: `(primary CPU s, standby CPU s, sweep's seconds)`.
async fn sweep(
    bench: &Bench,
    db: &Database,
    primary: &Cluster,
    standby: &Cluster,
) -> Result<(f64, f64, f64)> {
    let (sink, _plain) = bench.redis().await?;
    let (primary_before, standby_before) = (primary.cpu(), standby.cpu());
    let report = sweep_all(db, &sink).await?;
    Ok((
        primary.cpu() - primary_before,
        standby.cpu() - standby_before,
        report.elapsed.as_secs_f64(),
    ))
}

pub(crate) async fn standby(bench: &Bench) -> Result<()> {
    let primary = Cluster::primary()?;
    let admin = crate::scenarios::connect(&primary.url("postgres")).await?;
    admin.batch_execute("CREATE DATABASE shop").await?;
    let direct = Database::new(&primary.url("shop"), 16)?;
    crate::setup::setup(&direct, PRODUCTS).await?;
    admin.batch_execute("CHECKPOINT").await?;
    let standby = Cluster::standby_of(&primary)?;
    let replica = Database::new(&primary.url("shop"), 16)?.with_replica_url(
        &standby.url("shop"),
        &Environment::from_process(),
        Duration::from_millis(50),
    )?;
    // Warm both servers' caches once, then interleave.
    sweep(bench, &direct, &primary, &standby).await?;
    sweep(bench, &replica, &primary, &standby).await?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(sweep(bench, &direct, &primary, &standby).await?);
        with.push(sweep(bench, &replica, &primary, &standby).await?);
    }
    let show = |runs: &[(f64, f64, f64)]| {
        runs.iter()
            .map(|(p, s, t)| format!("primary {p:.2} s, standby {s:.2} s in {t:.2} s"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    println!(
        "standby: sweep of {PRODUCTS} products ({} fragments), CPU seconds of each cluster: without a standby [{}]; with one [{}]",
        PRODUCTS * 2,
        show(&without),
        show(&with)
    );
    Ok(())
}
