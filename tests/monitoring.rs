//! The monitoring kit in `examples/monitoring`: its alert rules pass `promtool check` and their unit
//! tests, and a real Prometheus, loaded with them, scrapes a real listener and answers for the
//! freshness histogram after a few commits; every query of the Grafana dashboard parses.
//!
//! Prometheus and promtool come from Debian's `prometheus` package (`.ci/run` installs it). Where
//! they are missing the tests say so and pass, except under CI (`CI` set), where that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::servers::{free_port, http_get, installed, output_within};
use common::{TestEnv, eventually};

fn kit(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/monitoring")
        .join(file)
}

#[test]
fn promtool_checks_the_rules_and_the_config_and_runs_the_rules_unit_tests() {
    let Some(promtool) = installed("promtool", "prometheus") else {
        return;
    };
    for args in [
        ["check", "rules", "pgfresh.rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "pgfresh.rules.test.yml"],
    ] {
        let out = output_within(
            Command::new(&promtool).args(args).current_dir(kit("")),
            common::servers::CHILD_PATIENCE,
        );
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server, stopped on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second, with pgfresh's rules loaded.
    fn start(binary: &Path, target: &str) -> Prometheus {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("pgfresh-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{rules:?}]\n\
                 scrape_configs:\n  - job_name: pgfresh\n    static_configs:\n      - targets: [{target:?}]\n",
                rules = kit("pgfresh.rules.yml"),
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus { child, port, dir }
    }

    /// A PromQL query through the HTTP API: the response body, if the API answered 200.
    async fn query(&self, promql: &str) -> Option<String> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .await;
        (status == 200).then_some(body)
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The first sample value in a query response, if it has one.
fn first_value(body: &str) -> Option<f64> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let value = &json["data"]["result"][0]["value"][1];
    value.as_str()?.parse().ok()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_a_listener_and_reads_its_freshness_back() {
    let Some(prometheus) = installed("prometheus", "prometheus") else {
        return;
    };
    let env = TestEnv::shop(20).await;
    env.sweep().await;
    let (listener, port) = env.start_listener_with_http().await;
    let server = Prometheus::start(&prometheus, &format!("127.0.0.1:{port}"));
    eventually("Prometheus to scrape the listener", || async {
        let up = server.query(r#"up{job="pgfresh"}"#).await;
        up.and_then(|body| first_value(&body)) == Some(1.0)
    })
    .await;

    env.rename_products("Scraped", 1..=5).await;
    eventually("the freshness histogram to reach Prometheus", || async {
        let count = server
            .query(r#"sum(pgfresh_freshness_seconds_count{job="pgfresh",fragment="product_card"})"#)
            .await;
        count
            .and_then(|body| first_value(&body))
            .is_some_and(|n| n >= 5.0)
    })
    .await;
    let p99 = server
        .query(r#"histogram_quantile(0.99, sum by (le) (pgfresh_freshness_seconds_bucket{job="pgfresh"}))"#)
        .await
        .and_then(|body| first_value(&body))
        .expect("a freshness p99");
    assert!(p99 > 0.0 && p99 <= 300.0, "p99 {p99}");

    // The rules are loaded, and none fires for this healthy listener.
    let (_, rules) = http_get(server.port, "/api/v1/rules").await;
    for alert in [
        "PgfreshFreshnessSLO",
        "PgfreshListenerDown",
        "PgfreshRedisCanEvict",
    ] {
        assert!(
            rules.contains(&format!("\"name\":\"{alert}\"")),
            "{alert} not loaded: {rules}"
        );
    }
    assert!(!rules.contains("\"state\":\"firing\""), "{rules}");

    // Every query of the Grafana dashboard is valid PromQL.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kit("grafana-dashboard.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut checked = 0;
    for target in panels.iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = target["expr"].as_str().unwrap();
        assert!(
            server.query(expr).await.is_some(),
            "the dashboard's {expr} does not parse"
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked} queries");

    drop(server);
    listener.stop().await;
    env.cleanup().await;
}
