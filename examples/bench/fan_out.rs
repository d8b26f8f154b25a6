//! The `fan-out` scenario: the blog, one author of 10,000 (then 100,000) published posts, renamed in
//! one commit. Every teaser of theirs (two variants each), the tag pages listing them and their box
//! must be correct soon after, and the listener must not hold the fan-out in memory.
//!
//! Each size runs in a fresh process (`fan-out-once`), so that the resident set measured is the
//! listener's own: idle (listening, Redis filled) against the peak while it fans out and renders.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgfresh::{Database, Fragment, ListenSettings, RedisStore, Shutdown, SweepSettings};

use crate::blog_fragments::{self, TagIndex};
use crate::scenarios::Bench;

/// Where the benchmark's blog fragments live in Redis.
const PREFIX: &str = "bench:";

/// Published posts of the renamed author, per run.
const SIZES: [i64; 2] = [10_000, 100_000];

impl Bench {
    /// Runs `fan-out-once` for each size in a child process and prints its line.
    pub async fn fan_out(&self) -> Result<()> {
        for posts in SIZES {
            let child = tokio::process::Command::new(std::env::current_exe()?)
                .args(["--database-url", self.admin_url()])
                .args(["--redis-url", self.redis_url()])
                .args(["--products", &posts.to_string(), "fan-out-once"])
                .output()
                .await?;
            if !child.status.success() {
                bail!(
                    "fan-out child failed: {}",
                    String::from_utf8_lossy(&child.stderr)
                );
            }
            print!("{}", String::from_utf8_lossy(&child.stdout));
        }
        Ok(())
    }

    /// Child process: a blog whose author 1 has `posts` published posts, swept into Redis, a listener
    /// here; renames author 1 and prints how long until every affected fragment was written, and the
    /// resident set before and at the peak.
    pub async fn fan_out_once(&self, posts: i64) -> Result<()> {
        let db = self.blog(posts).await?;
        let (store, _) = self.redis().await?;
        let fragments = blog_fragments::with_prefix(PREFIX);
        let report = pgfresh::sweep(
            &db,
            &store,
            &fragments,
            &SweepSettings::default(),
            &Shutdown::new(),
        )
        .await?;
        if !report.succeeded() {
            bail!("{report}");
        }
        let shutdown = Shutdown::new();
        let mut settings = ListenSettings::default();
        settings.sweep_interval = None;
        let listener = tokio::spawn(pgfresh::listen(
            db.clone(),
            store.clone(),
            fragments,
            settings,
            shutdown.clone(),
        ));
        let client = db.get().await?;
        wait_until(Duration::from_secs(30), || async {
            let idle = "SELECT EXISTS (SELECT FROM pgfresh.listeners WHERE idle)";
            Ok(client.query_one(idle, &[]).await?.get(0))
        })
        .await
        .context("waiting for the listener to be idle")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        reset_peak_rss();
        let idle_rss = rss_mib("VmRSS");

        let name = format!("Renamed {}", fastrand::u32(..));
        let before = crate::cost::CpuSample::now(self.redis_url()).await?;
        client
            .execute("UPDATE authors SET name = $1 WHERE id = 1", &[&name])
            .await?;
        let committed = Instant::now();
        wait_until(Duration::from_secs(300), || async {
            let empty = "SELECT NOT EXISTS (SELECT FROM pgfresh.changes)";
            Ok(client.query_one(empty, &[]).await?.get(0))
        })
        .await
        .context("waiting for the queue to drain")?;
        let settled = committed.elapsed();
        let cost = crate::cost::CpuSample::now(self.redis_url())
            .await?
            .since(before);
        let peak_rss = rss_mib("VmHWM");
        shutdown.cancel();
        listener.await??;

        let stale = stale(&db, &store, &name).await?;
        println!(
            "fan-out: renaming an author of {posts} posts ({} teasers, their tag pages, 1 author box): all written {:.2} s after the commit; RSS idle {idle_rss:.1} MiB, peak {peak_rss:.1} MiB ({:.2}x); {stale} stale; {}",
            posts * 2,
            settled.as_secs_f64(),
            peak_rss / idle_rss,
            cost.per_thousand((posts * 2) as f64, "teasers")
        );
        Ok(())
    }

    /// A blog whose author 1 has `posts` published posts (and others have some), set up once and kept
    /// for later runs; its queue emptied and stale listener rows removed.
    async fn blog(&self, posts: i64) -> Result<Database> {
        let name = format!("pgfresh_bench_blog_{posts}");
        let db = self.database(&name).await?;
        let total = posts + posts / 5;
        crate::blog_setup::setup(&db, total).await?;
        db.get()
            .await?
            .batch_execute(&format!(
                "UPDATE posts SET author_id = 1, published_at = coalesce(published_at, now())
                 WHERE id <= {posts} AND (author_id <> 1 OR published_at IS NULL);
                 TRUNCATE pgfresh.changes, pgfresh.failed; DELETE FROM pgfresh.listeners;
                 ANALYZE;"
            ))
            .await?;
        Ok(db)
    }
}

/// How many of author 1's teasers do not show `name`, plus the tag pages that differ from a render of
/// the database now.
async fn stale(db: &Database, store: &RedisStore, name: &str) -> Result<usize> {
    let client = db.get().await?;
    let ids: Vec<i64> = client
        .query(
            "SELECT id FROM posts WHERE author_id = 1 AND published_at IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut stale = 0;
    let byline = format!("by {name} on");
    for chunk in ids.chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .flat_map(|id| {
                let prefix = format!("{PREFIX}{}", blog_fragments::POST_TEASER);
                <blog_fragments::Teaser as pgfresh::Variant>::ALL
                    .iter()
                    .map(move |v| pgfresh::Storage::plain().entry_key(&prefix, id, *v))
            })
            .collect();
        let stored = store.get_many(&keys).await?;
        stale += stored
            .iter()
            .filter(|html| !html.as_deref().is_some_and(|h| h.contains(&byline)))
            .count();
    }
    let tags: Vec<i64> = (1..=40).collect();
    for (id, tag) in TagIndex.load(&client, &tags).await? {
        let prefix = format!("{PREFIX}{}", blog_fragments::TAG_INDEX);
        let key = pgfresh::Storage::plain().entry_key(&prefix, id, blog_fragments::Page::Page);
        let stored = store.get_many(&[key]).await?.remove(0);
        if stored != Some(blog_fragments::tag_index(id, &tag).into_string()) {
            stale += 1;
        }
    }
    Ok(stale)
}

async fn wait_until<F, Fut>(patience: Duration, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + patience;
    while !done().await? {
        if Instant::now() > deadline {
            bail!("gave up after {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A figure of `/proc/self/status` in MiB (`VmRSS` now, `VmHWM` the peak since the last reset).
fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Makes `VmHWM` start again from the current resident set (Linux: `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
