//! The `serve` scenario: what `GET /fragments/{key}` (`listen --serve`) costs a site. A listener
//! in this process serves the shop's 20,000 products; the benchmark times, one request at a time
//! over a new connection each (as the Django client does), misses (both variants of a product
//! deleted from Redis first: a load, two renders and the checked write) and hits (Redis's entry),
//! and then 100 concurrent requests for one missing key.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgfresh::{ListenSettings, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::scenarios::{Bench, PRODUCTS, fragments, ms, percentile};

const PREFIX: &str = "bench:product_card:";
const MISSES: i64 = 500;
const HITS: i64 = 2000;

/// One `GET` over a new connection: the status code.
async fn get(port: u16, path: &str) -> Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let head = String::from_utf8_lossy(&response[..response.len().min(20)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .context("an HTTP answer")
}

pub(crate) async fn serve(bench: &Bench) -> Result<()> {
    let (db, _) = bench.shop(PRODUCTS).await?;
    let (sink, mut redis) = bench.redis().await?;
    pgfresh::testing::set_fragment_marker(&sink, PREFIX, 1).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let shutdown = Shutdown::new();
    let mut settings = ListenSettings::default();
    settings.sweep_interval = None;
    settings.serve = Some(format!("127.0.0.1:{port}"));
    let listener = tokio::spawn(pgfresh::listen(
        db,
        sink,
        fragments(),
        settings,
        shutdown.clone(),
    ));
    let path = |id: i64| format!("/fragments/{PREFIX}{id}:full");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, &path(1)).await.ok() != Some(200) {
        if Instant::now() > deadline {
            bail!("the listener did not serve /fragments within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut misses = Vec::new();
    for n in 0..MISSES {
        let id = 1 + (n * 37) % PRODUCTS;
        let _: () = redis::cmd("DEL")
            .arg(format!("{PREFIX}{id}:full"))
            .arg(format!("{PREFIX}{id}:compact"))
            .query_async(&mut redis)
            .await?;
        let started = Instant::now();
        let status = get(port, &path(id)).await?;
        misses.push(started.elapsed());
        if status != 200 {
            bail!("a miss was answered {status}");
        }
    }
    let mut hits = Vec::new();
    for n in 0..HITS {
        let id = 1 + (n * 37) % PRODUCTS.min(MISSES * 37);
        let started = Instant::now();
        let status = get(port, &path(1 + (id - 1) % PRODUCTS)).await?;
        hits.push(started.elapsed());
        if status != 200 {
            bail!("a request was answered {status}");
        }
    }
    // A stampede: 100 concurrent misses of one key.
    let _: () = redis::cmd("DEL")
        .arg(format!("{PREFIX}7:full"))
        .arg(format!("{PREFIX}7:compact"))
        .query_async(&mut redis)
        .await?;
    let started = Instant::now();
    let mut stampede = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let path = path(7);
        stampede.spawn(async move { get(port, &path).await });
    }
    while let Some(answer) = stampede.join_next().await {
        if answer?? != 200 {
            bail!("a stampeding request was not answered 200");
        }
    }
    let stampede_took = started.elapsed();
    shutdown.cancel();
    listener.await??;

    misses.sort();
    hits.sort();
    println!(
        "serve: {MISSES} misses rendered on demand p50 {}, p99 {}; {HITS} hits p50 {}, p99 {} (a new connection each); 100 concurrent misses of one key answered in {}",
        ms(percentile(&misses, 0.50)),
        ms(percentile(&misses, 0.99)),
        ms(percentile(&hits, 0.50)),
        ms(percentile(&hits, 0.99)),
        ms(stampede_took),
    );
    Ok(())
}
