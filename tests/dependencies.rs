//! Dependencies nobody declared: `doctor` runs each fragment's loader and through queries and names
//! every table they read that no watch of the fragment's topics covers (behind views, and partitions
//! as the table they belong to), with the watch to add when a foreign key says which; a correct
//! deployment of the shop and of the blog stays clean. At run time, a periodic sweep that repairs
//! what no watch reported, while its listener ran all along, is a finding: logged, counted in
//! metrics, on the status page and in `doctor`; the repairs after a listener was down are not.

mod common;

#[path = "../examples/blog/fragments.rs"]
#[allow(dead_code)]
mod blog_fragments;
#[path = "../examples/blog/setup.rs"]
#[allow(dead_code)]
mod blog_setup;

use common::product_card::Card;
use common::servers::{free_port, http_get, metric};
use common::{TestEnv, eventually, test_settings, tweak};
use pgfresh::tokio_postgres::{Client, Error};
use pgfresh::{Fragment, Fragments, Topics};

/// The findings of `doctor` about what fragments read (the lines that say "covers").
async fn coverage(env: &TestEnv, fragments: &Fragments) -> Vec<String> {
    let report = pgfresh::testing::doctor(&env.db, env.sink.clone(), fragments)
        .await
        .unwrap();
    let lines: Vec<&str> = report.lines().collect();
    let mut findings = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        if line.starts_with("PROBLEM") && line.contains("covers") {
            findings.push(format!("{line}\n{}", lines[index + 1]));
        } else if line.contains("watched under its topics") {
            findings.push(line.to_string());
        }
    }
    findings
}

/// A card that shows a product's brand through a view, and its visits from a partitioned table.
struct BrandCard;

impl Fragment for BrandCard {
    type Key = i64;
    type Row = (String, Option<String>, i64);
    type Variant = Card;
    type Error = Error;
    fn name(&self) -> &str {
        "brand_card"
    }
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }
    async fn load(&self, db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        let rows = db
            .query(
                "SELECT v.id, v.name, v.brand,
                        (SELECT count(*) FROM visits WHERE product_id = v.id)
                 FROM product_view v WHERE v.id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
            .collect())
    }
    fn render(&self, _: &i64, row: &Self::Row, _: Card) -> pgfresh::maud::Markup {
        pgfresh::maud::html! { p { (row.0) } }
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        common::product_card::ProductCard
            .keys_after(db, after, limit)
            .await
    }
}

#[tokio::test]
async fn tables_behind_a_view_and_a_partitioned_table_are_named_and_covered_once_watched() {
    let env = TestEnv::shop(3).await;
    let admin = env.client().await;
    admin
        .batch_execute(
            "CREATE TABLE brands (id bigint PRIMARY KEY, name text NOT NULL);
             INSERT INTO brands VALUES (1, 'Acme');
             ALTER TABLE products ADD COLUMN brand_id bigint REFERENCES brands (id);
             UPDATE products SET brand_id = 1;
             CREATE VIEW product_view AS
                 SELECT p.id, p.name, b.name AS brand
                 FROM products p LEFT JOIN brands b ON b.id = p.brand_id;
             CREATE TABLE visits (product_id bigint, day date) PARTITION BY RANGE (day);
             CREATE TABLE visits_2026 PARTITION OF visits
                 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             INSERT INTO visits VALUES (1, '2026-05-01');",
        )
        .await
        .unwrap();
    let fragments = Fragments::new().with(&env.prefix, BrandCard);
    let findings = coverage(&env, &fragments).await;
    assert_eq!(findings.len(), 2, "{findings:#?}");
    // Behind the view: brands, which products point at; no foreign key from it leads to a key.
    assert!(
        findings[0].contains(
            "brand_card: its loader reads brands, which no watch of its topics (product) covers"
        ) && findings[0]
            .contains("no foreign key says which of brands's columns leads to brand_card's key"),
        "{findings:#?}"
    );
    // The partition scanned, named as the partitioned table a watch would name.
    assert!(
        findings[1].contains("brand_card: its loader reads visits, which"),
        "{findings:#?}"
    );

    // With a foreign key, the fix is the watch; once it is made, the partitions are covered too.
    admin
        .batch_execute("ALTER TABLE visits ADD FOREIGN KEY (product_id) REFERENCES products (id)")
        .await
        .unwrap();
    let findings = coverage(&env, &fragments).await;
    let visits = findings
        .iter()
        .find(|f| f.contains("reads visits"))
        .unwrap();
    assert!(
        visits.contains("fix: SELECT pgfresh.watch('visits', 'product_id', 'product');"),
        "{visits}"
    );
    admin
        .batch_execute(
            "SELECT pgfresh.watch('visits', 'product_id', 'product');
             SELECT pgfresh.watch('brands', 'id', 'brand');",
        )
        .await
        .unwrap();
    // Watched, but under a topic the card does not take: still not covered.
    let findings = coverage(&env, &fragments).await;
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert!(findings[0].contains("reads brands"), "{findings:#?}");
    env.cleanup().await;
}

/// A card that counts a product's reviews from a materialized view, its stock from a foreign
/// table, and its shipments from a table partitioned into a foreign table.
struct StatsCard;

impl Fragment for StatsCard {
    type Key = i64;
    type Row = (i64, i64, i64);
    type Variant = Card;
    type Error = Error;
    fn name(&self) -> &str {
        "stats_card"
    }
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }
    async fn load(&self, db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        let rows = db
            .query(
                "SELECT p.id, coalesce(s.reviews, 0),
                        (SELECT count(*) FROM stock WHERE stock.product_id = p.id),
                        (SELECT count(*) FROM shipments WHERE shipments.product_id = p.id)
                 FROM products p LEFT JOIN review_counts s ON s.product_id = p.id
                 WHERE p.id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
            .collect())
    }
    fn render(&self, _: &i64, row: &Self::Row, _: Card) -> pgfresh::maud::Markup {
        pgfresh::maud::html! { p { (row.0) " reviews, " (row.1) " in stock" } }
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        common::product_card::ProductCard
            .keys_after(db, after, limit)
            .await
    }
}

#[tokio::test]
async fn a_materialized_view_and_a_foreign_table_read_are_noted_as_beyond_any_watch() {
    let env = TestEnv::shop(3).await;
    let admin = env.client().await;
    admin
        .batch_execute(
            "CREATE MATERIALIZED VIEW review_counts AS
                 SELECT product_id, count(*) AS reviews FROM reviews GROUP BY product_id;
             CREATE EXTENSION file_fdw;
             CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
             CREATE FOREIGN TABLE stock (product_id bigint, warehouse text)
                 SERVER files OPTIONS (filename '/dev/null', format 'csv');
             CREATE TABLE shipments (product_id bigint, region text)
                 PARTITION BY LIST (region);
             CREATE TABLE shipments_near PARTITION OF shipments FOR VALUES IN ('near');
             CREATE FOREIGN TABLE shipments_far PARTITION OF shipments FOR VALUES IN ('far')
                 SERVER files OPTIONS (filename '/dev/null', format 'csv');
             SELECT pgfresh.watch('shipments', 'product_id', 'product');",
        )
        .await
        .unwrap();
    let fragments = Fragments::new().with(&env.prefix, StatsCard);
    let report = pgfresh::testing::doctor(&env.db, env.sink.clone(), &fragments)
        .await
        .unwrap();
    let line = |needle: &str| {
        report
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{report}"))
            .to_string()
    };
    let view = line("reads materialized view review_counts");
    assert!(view.starts_with("note"), "{view}");
    assert!(
        view.contains("stats_card: its loader reads materialized view review_counts, which no trigger can watch: after each REFRESH MATERIALIZED VIEW review_counts")
            && view.contains("run `sweep` after refreshing it"),
        "{view}"
    );
    let foreign = line("reads foreign table stock");
    assert!(foreign.starts_with("note"), "{foreign}");
    assert!(foreign.contains("only at the periodic sweep"), "{foreign}");
    // A foreign partition too.
    let partition = line("reads foreign table shipments_far");
    assert!(partition.starts_with("note"), "{partition}");
    // Notes, not problems: the tables it reads (products; shipments, with its local partition)
    // are all watched.
    assert!(
        report.contains(
            "stats_card: the 2 tables its loader and queries read are watched under its topics"
        ),
        "{report}"
    );
    assert!(!report.contains("PROBLEM  stats_card"), "{report}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_blog_is_clean_and_a_dropped_comments_watch_is_named() {
    let env = TestEnv::empty().await;
    blog_setup::setup(&env.db, 20).await.unwrap();
    let fragments = blog_fragments::with_prefix(&format!("{}:", env.name));
    let findings = coverage(&env, &fragments).await;
    assert_eq!(
        findings,
        [
            "ok       post_teaser: the 5 tables its loader and queries read are watched under its topics",
            "ok       tag_index: the 4 tables its loader and queries read are watched under its topics",
            "ok       author_box: the 2 tables its loader and queries read are watched under its topics",
        ]
    );
    env.client()
        .await
        .batch_execute("SELECT pgfresh.unwatch('comments', 'comment')")
        .await
        .unwrap();
    let findings = coverage(&env, &fragments).await;
    assert_eq!(findings.len(), 3, "{findings:#?}");
    assert!(
        findings[0]
            .contains("post_teaser: its loader reads comments, which no watch of its topics")
            && findings[0].contains("fix: SELECT pgfresh.watch('comments', 'post_id', 'post');"),
        "{findings:#?}"
    );
    env.cleanup().await;
}

/// A row of `pgfresh.sweeps`: id, swept_by, reason, unexplained, unwatched.
type Sweep = (i64, String, String, i64, bool);

/// The sweeps of product_card recorded after row `after`.
async fn sweeps_after(env: &TestEnv, after: i64) -> Vec<Sweep> {
    let rows = env
        .client()
        .await
        .query(
            "SELECT id, swept_by, reason, unexplained, unwatched FROM pgfresh.sweeps
             WHERE fragment = 'product_card' AND id > $1 ORDER BY id",
            &[&after],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// Starts a listener sweeping every second, serving `--http`; returns it, its port and its id.
async fn sweeping_listener(env: &TestEnv) -> (common::RunningListener, u16, String) {
    let port = free_port();
    let listener = env.start_listener(tweak(test_settings(), |s| {
        s.sweep_interval = Some(std::time::Duration::from_secs(1));
        s.http = Some(format!("127.0.0.1:{port}"));
    }));
    eventually("the listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;
    let row = env
        .client()
        .await
        .query_one("SELECT id FROM pgfresh.listeners", &[])
        .await
        .unwrap();
    (listener, port, row.get(0))
}

/// Waits for a sweep of product_card recorded after row `after` that `wanted` accepts; returns it.
async fn next_sweep(
    env: &TestEnv,
    what: &str,
    after: i64,
    wanted: impl Fn(&Sweep) -> bool,
) -> Sweep {
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        if let Some(found) = sweeps_after(env, after).await.into_iter().find(&wanted) {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            sweeps_after(env, 0).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn add_review(env: &TestEnv, product: i64) {
    env.client()
        .await
        .execute(
            "INSERT INTO reviews (product_id, author, rating, body) VALUES ($1, 'Ann', 5, 'Unwatched')",
            &[&product],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_periodic_sweep_that_repairs_what_no_watch_reported_is_a_finding() {
    let env = TestEnv::shop(5).await;
    env.sweep().await;
    env.client()
        .await
        .batch_execute("SELECT pgfresh.unwatch('reviews', 'product')")
        .await
        .unwrap();
    // A review added while no listener runs: the first listener's sweeps repair it, and that is
    // no finding, whichever of its sweeps does: its changes could have been missed while it was
    // down.
    add_review(&env, 2).await;
    let (listener, _, first) = sweeping_listener(&env).await;
    let repair = next_sweep(&env, "the first listener's repair", 0, |s| {
        s.1 == first && s.2 == "periodic" && s.3 > 0
    })
    .await;
    assert_eq!((repair.3, repair.4), (1, false), "{repair:?}");
    env.wait_fresh(2).await;
    let report = pgfresh::testing::doctor(&env.db, env.sink.clone(), &env.fragments())
        .await
        .unwrap();
    assert!(!report.contains("no watch reported"), "{report}");
    listener.stop().await;

    // The next listener has run through a whole sweep interval when the review of product 1
    // arrives: its periodic sweep repairs the card, and nothing explains that but a missing watch.
    let (listener, port, second) = sweeping_listener(&env).await;
    let swept = next_sweep(&env, "a sweep by the second listener", repair.0, |s| {
        s.1 == second && s.2 == "periodic"
    })
    .await;
    assert_eq!((swept.3, swept.4), (0, false), "{swept:?}");
    let (_, metrics) = http_get(port, "/metrics").await;
    let series = r#"pgfresh_sweep_unwatched_repairs_total{fragment="product_card"}"#;
    assert_eq!(metric(&metrics, series), 0.0, "{metrics}");
    assert!(metrics.contains(series), "registered at 0: {metrics}");
    let (_, page) = http_get(port, "/").await;
    assert!(!page.contains("no watch reported"), "{page}");

    add_review(&env, 1).await;
    let finding = next_sweep(&env, "the finding", swept.0, |s| s.1 == second && s.3 > 0).await;
    assert_eq!((finding.3, finding.4), (1, true), "{finding:?}");
    env.wait_fresh(1).await;

    let (_, metrics) = http_get(port, "/metrics").await;
    assert_eq!(metric(&metrics, series), 1.0, "{metrics}");
    let (_, page) = http_get(port, "/").await;
    assert!(
        page.contains("product_card: a periodic sweep")
            && page.contains("repaired 1 keys that no watch reported"),
        "{page}"
    );
    let report = pgfresh::testing::doctor(&env.db, env.sink.clone(), &env.fragments())
        .await
        .unwrap();
    assert!(
        report.contains("PROBLEM  product_card: its periodic sweep")
            && report.contains("repaired 1 keys that no watch reported"),
        "{report}"
    );
    assert!(
        report.contains("its loader reads reviews, which no watch of its topics (product) covers"),
        "{report}"
    );

    // A later sweep with nothing to repair: doctor still names the finding while it is recorded.
    next_sweep(&env, "a sweep after the finding", finding.0, |s| {
        s.1 == second
    })
    .await;
    let report = pgfresh::testing::doctor(&env.db, env.sink.clone(), &env.fragments())
        .await
        .unwrap();
    assert!(
        report.contains("repaired 1 keys that no watch reported")
            && report.contains("ok       product_card: its last complete sweep (periodic sweep"),
        "{report}"
    );
    listener.stop().await;
    env.cleanup().await;
}

/// Only a periodic sweep's repairs can be a finding, so only it looks each repaired key up in the
/// queue (a read of the whole queue per page, which after an outage may hold a backlog). A sweep
/// after Redis lost its entries, with changes queued, records its repairs and looks none up.
#[tokio::test]
async fn a_sweep_after_an_outage_looks_no_repair_up_in_the_queue() {
    let env = TestEnv::shop(6).await;
    env.sweep().await;
    // Changes wait for products 1 to 3 (no listener runs), and Redis lost every card.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Renamed ' || id WHERE id <= 3")
        .await
        .unwrap();
    for key in env.keys().await {
        env.del(&key).await;
    }
    let report = env.sweep().await;
    assert_eq!(report.stats.written, 12, "{report}");
    assert_eq!(report.unexplained, 0, "{report}");
    let last = sweeps_after(&env, 0).await.pop().unwrap();
    assert_eq!((last.2.as_str(), last.3, last.4), ("one-off", 0, false));
    let doctor = pgfresh::testing::doctor(&env.db, env.sink.clone(), &env.fragments())
        .await
        .unwrap();
    assert!(
        doctor.contains("its last complete sweep (one-off sweep")
            && doctor
                .contains("repaired 12 entries, as expected: no listener ran all along before it"),
        "{doctor}"
    );
    assert_eq!(
        env.pending().await,
        3,
        "the queued changes wait for a listener"
    );
    env.cleanup().await;
}

/// A fragment whose marker is missing (Redis lost its data) while its periodic sweep is due too is
/// swept as `marker`: its repairs are what Redis lost, no finding, and need no look at the queue.
#[tokio::test]
async fn a_sweep_due_both_for_a_lost_marker_and_periodically_is_a_marker_sweep() {
    let env = TestEnv::shop(4).await;
    env.sweep().await;
    let last = sweeps_after(&env, 0).await.pop().unwrap();
    env.client()
        .await
        .batch_execute("UPDATE pgfresh.sweeps SET started_at = started_at - interval '1 hour'")
        .await
        .unwrap();
    for key in env.keys().await {
        env.del(&key).await;
    }
    env.del(&env.marker_key()).await;
    let listener = env.start_listener(tweak(test_settings(), |s| {
        s.sweep_interval = Some(std::time::Duration::from_secs(600));
    }));
    let swept = next_sweep(&env, "the listener's sweep", last.0, |_| true).await;
    assert_eq!((swept.2.as_str(), swept.3, swept.4), ("marker", 0, false));
    env.wait_fresh(4).await;
    listener.stop().await;
    env.cleanup().await;
}
