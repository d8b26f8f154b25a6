//! The `cluster` scenario: the same sweep against a throwaway three-master Redis Cluster (started here
//! with `redis-server` and `redis-cli --cluster create`, removed afterwards) and against the single
//! server, so the cost of splitting writes by hash slot is one comparison on one machine.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgfresh::Database;
use pgfresh::RedisStore;

use crate::cost::CpuSample;
use crate::scenarios::{Bench, PRODUCTS, sweep_all};

/// Three `redis-server --cluster-enabled yes` processes joined into one cluster; killed on drop.
struct ThrowawayCluster {
    ports: Vec<u16>,
    servers: Vec<Child>,
    dir: PathBuf,
}

impl ThrowawayCluster {
    fn start() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("pgfresh-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = ThrowawayCluster {
            ports: Vec::new(),
            servers: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let (port, bus) = (free_port()?, free_port()?);
            let server = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args([
                    "--port",
                    &port.to_string(),
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .spawn()
                .context("starting redis-server")?;
            cluster.servers.push(server);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_for(|| redis_cli(port, &["PING"]).is_ok_and(|out| out.contains("PONG")))?;
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .status()?;
        if !created.success() {
            bail!("redis-cli --cluster create failed");
        }
        for &port in &cluster.ports {
            wait_for(|| {
                redis_cli(port, &["CLUSTER", "INFO"])
                    .is_ok_and(|out| out.contains("cluster_state:ok"))
            })?;
        }
        Ok(cluster)
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline {
            bail!("the throwaway Redis Cluster did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Two sweeps (the first writes everything, the second finds everything unchanged): fragments/s
/// and what each cost, with Redis's CPU summed over `redis_urls`.
async fn two_sweeps(
    db: &Database,
    sink: &RedisStore,
    redis_urls: &[&str],
) -> Result<[(f64, String); 2]> {
    let mut runs = [(0.0, String::new()), (0.0, String::new())];
    for run in &mut runs {
        let before = CpuSample::across(redis_urls).await?;
        let report = sweep_all(db, sink).await?;
        let cost = CpuSample::across(redis_urls).await?.since(before);
        let rendered = report.stats.rendered as f64;
        *run = (
            rendered / report.elapsed.as_secs_f64(),
            cost.per_thousand(rendered, "fragments"),
        );
    }
    Ok(runs)
}

impl Bench {
    /// Sweeps of 20,000 products into a three-master cluster and into the single server.
    pub async fn cluster(&self) -> Result<()> {
        let (db, _) = self.shop(PRODUCTS).await?;
        let (server, _) = self.redis().await?;
        let [
            (server_new, server_new_cost),
            (server_same, server_same_cost),
        ] = two_sweeps(&db, &server, &[self.redis_url()]).await?;
        let cluster = ThrowawayCluster::start()?;
        let urls = cluster.urls();
        let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
        let sink = RedisStore::connect_cluster(&nodes).await?;
        let [
            (cluster_new, cluster_new_cost),
            (cluster_same, cluster_same_cost),
        ] = two_sweeps(&db, &sink, &nodes).await?;
        println!(
            "cluster: sweep of {PRODUCTS} products ({} fragments) into 3 masters {cluster_new:.0} fragments/s written, \
             {cluster_same:.0} unchanged; into one server {server_new:.0} written, {server_same:.0} unchanged",
            2 * PRODUCTS
        );
        for (what, cost) in [
            ("3 masters, written", cluster_new_cost),
            ("3 masters, unchanged", cluster_same_cost),
            ("one server, written", server_new_cost),
            ("one server, unchanged", server_same_cost),
        ] {
            println!("cluster: {what}: {cost} (the sweep runs in this process)");
        }
        Ok(())
    }
}
