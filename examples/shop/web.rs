//! The demo's web shop: the consumer side, as a real site would do it. The product list is assembled
//! from the cards in Redis with one MGET ([`RedisStore::get_entries`]; any Redis client does the same,
//! and a Django site's `cache.get_many` too with `--cache-format django`); a card missing from Redis
//! is asked of the listener's `GET /fragments/{key}` (`listen --serve`), which renders and stores it,
//! so this site renders nothing itself. Each card says where it came from. A background writer changes a few prices and reviews every
//! second and watches Redis for the changed cards, so the page (which refreshes itself) highlights
//! each card changed in the last few seconds with how long its change took from commit to Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use pgfresh::Database;
use pgfresh::RedisStore;
use pgfresh::Shutdown;
use pgfresh::Storage;
use pgfresh::maud::{PreEscaped, html};

use crate::product_card::Card;

/// Products on the page.
const SHOWN: i64 = 12;

/// Where a card on the page came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from Redis.
    Cache,
    /// Missing from Redis: rendered on demand by pgfresh (`GET /fragments/{key}`), which stored it.
    OnDemand,
}

/// How long a changed card stays highlighted.
const HIGHLIGHT: Duration = Duration::from_secs(5);
/// How long the writer watches Redis for a changed card.
const WATCH_FOR: Duration = Duration::from_secs(5);

/// The cards the writer changed recently: by product id, when its change was committed and how long
/// after that its new card was in Redis.
#[derive(Default)]
pub struct Recent(Mutex<HashMap<i64, (Instant, Duration)>>);

impl Recent {
    /// How long the card of `id` took to reach Redis, if it changed within [`HIGHLIGHT`].
    pub fn fresh(&self, id: i64) -> Option<Duration> {
        let recent = self.0.lock().expect("recent changes lock");
        let (at, took) = recent.get(&id)?;
        (at.elapsed() < HIGHLIGHT).then_some(*took)
    }

    fn note(&self, id: i64, committed: Instant, took: Duration) {
        let mut recent = self.0.lock().expect("recent changes lock");
        recent.retain(|_, (at, _)| at.elapsed() < HIGHLIGHT);
        recent.insert(id, (committed, took));
    }
}

/// Where the demo's cards are: the database, Redis, their key prefix and how they are stored, and
/// the listener's `--serve` address that renders a missing one.
#[derive(Clone)]
pub struct Shop {
    pub db: Database,
    pub redis: RedisStore,
    pub serve: String,
    pub prefix: String,
    pub storage: Storage,
    pub recent: Arc<Recent>,
}

/// The compact cards of products 1..=`count`, from Redis (under `prefix`, stored as `storage`) where
/// present, else from pgfresh at `serve` (its `--serve` address), which renders them now. A card
/// neither has (its product is gone, or pgfresh cannot answer) is left out.
pub async fn cards(
    serve: &str,
    redis: &RedisStore,
    prefix: &str,
    storage: &Storage,
    count: i64,
) -> Result<Vec<(String, Source)>, Box<dyn std::error::Error + Send + Sync>> {
    let ids: Vec<i64> = (1..=count).collect();
    let plain = Storage::plain();
    let keys: Vec<String> = ids
        .iter()
        .map(|id| plain.entry_key(prefix, id, Card::Compact))
        .collect();
    let cached = redis.get_entries(storage, &keys).await?;
    let mut asked = tokio::task::JoinSet::new();
    for (index, key) in keys.iter().enumerate() {
        if cached[index].is_none() {
            let (serve, key) = (serve.to_string(), key.clone());
            asked.spawn(async move { (index, fragment_from_pgfresh(&serve, &key).await) });
        }
    }
    let mut cards: Vec<Option<(String, Source)>> = cached
        .into_iter()
        .map(|card| card.map(|html| (html, Source::Cache)))
        .collect();
    while let Some(answer) = asked.join_next().await {
        let (index, answer) = answer?;
        match answer {
            Ok(Some(html)) => cards[index] = Some((html, Source::OnDemand)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(key = %keys[index], %error, "pgfresh could not render a missing card")
            }
        }
    }
    Ok(cards.into_iter().flatten().collect())
}

/// How long a missing card may take to come back from pgfresh.
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /fragments/{key}` of the listener at `serve`: the fragment's HTML, `None` when its row does
/// not exist (404), or why pgfresh could not answer. HTTP/1.1 in a few lines, as the demo needs no
/// more (a site would use its HTTP client).
async fn fragment_from_pgfresh(
    serve: &str,
    key: &str,
) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(serve).await?;
        let request =
            format!("GET /fragments/{key} HTTP/1.1\r\nHost: {serve}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(ON_DEMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {serve} within {ON_DEMAND_TIMEOUT:?}"))??;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("a truncated answer")?;
    match head.split_whitespace().nth(1) {
        Some("200") => Ok(Some(body.to_string())),
        Some("404") => Ok(None),
        status => Err(format!("{} {}", status.unwrap_or("no status"), body.trim()).into()),
    }
}

async fn product_list(State(shop): State<Arc<Shop>>) -> Html<String> {
    let body = match cards(&shop.serve, &shop.redis, &shop.prefix, &shop.storage, SHOWN).await {
        Ok(cards) => html! {
            div class="grid" {
                @for (id, (card, source)) in (1..).zip(&cards) {
                    @let fresh = shop.recent.fresh(id);
                    div class=(if fresh.is_some() { "slot fresh" } else { "slot" }) {
                        // The card is HTML that pgfresh rendered (and escaped) already.
                        (PreEscaped(card))
                        @match source {
                            Source::Cache => span class="source cache" { "from Redis" },
                            Source::OnDemand => span class="source on-demand" { "rendered on demand by pgfresh (was not in Redis)" },
                        }
                        @if let Some(took) = fresh {
                            span class="took" {
                                "just changed: in Redis " (format!("{:.1}", took.as_secs_f64() * 1e3)) " ms after its commit"
                            }
                        }
                    }
                }
            }
        },
        Err(error) => html! { p { "cannot load the shop: " (error.to_string()) } },
    };
    let page = html! {
        (pgfresh::maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="1";
                title { "pgfresh demo shop" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "pgfresh demo shop" }
                p { "Cards come from Redis in one MGET; a card missing there is rendered on demand by pgfresh's listener (GET /fragments). A writer changes a few prices and reviews every second; "
                    "pgfresh re-renders just those cards within milliseconds. A highlighted card changed in the "
                    "last few seconds, and says how long its new version took from the commit to Redis. "
                    "This page refreshes every second." }
                (body)
            }
        }
    };
    Html(page.into_string())
}

/// Binds the shop to `address` now (so a taken port fails at once) and returns the server, which
/// runs until shutdown.
pub async fn bind(
    address: &str,
    shop: Shop,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()> + use<>, String> {
    let app = Router::new()
        .route("/", get(product_list))
        .with_state(Arc::new(shop));
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
        format!("cannot serve the demo shop on {address}: {e}; pass another --web address")
    })?;
    Ok(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "demo shop stopped");
        }
    })
}

/// Every second, changes the price of two shown products and adds a review to one, and watches
/// Redis until their cards change, noting how long that took after the commit; until shutdown.
pub async fn writer(shop: Shop, shutdown: Shutdown) {
    let mut round: i64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        round += 1;
        let Ok(client) = shop.db.get().await else {
            continue;
        };
        let (a, b) = (1 + round % SHOWN, 1 + (round * 5) % SHOWN);
        let ids = if a == b { vec![a] } else { vec![a, b] };
        let keys: Vec<String> = ids
            .iter()
            .map(|id| Storage::plain().entry_key(&shop.prefix, id, Card::Compact))
            .collect();
        let Ok(before) = shop.redis.get_entries(&shop.storage, &keys).await else {
            continue;
        };
        let changed = client
            .batch_execute(&format!(
                "UPDATE products SET price_cents = 100 + (price_cents * 7 + {round}) % 9900
                 WHERE id IN ({a}, {b});
                 INSERT INTO reviews (product_id, author, rating, body)
                 VALUES ({a}, 'Demo writer', {rating}, 'Review number {round}');",
                rating = 1 + round % 5,
            ))
            .await;
        let committed = Instant::now();
        if let Err(error) = changed {
            tracing::warn!(%error, "demo writer could not change the shop");
            continue;
        }
        // Watched on the side, so that a listener that is down does not slow the writer.
        let shop = shop.clone();
        tokio::spawn(async move { watch_cards(&shop, &ids, &keys, before, committed).await });
    }
}

/// Reads the cards until each differs from `before`, noting when it did.
async fn watch_cards(
    shop: &Shop,
    ids: &[i64],
    keys: &[String],
    before: Vec<Option<String>>,
    committed: Instant,
) {
    let mut waiting: Vec<usize> = (0..ids.len()).collect();
    while !waiting.is_empty() && committed.elapsed() < WATCH_FOR {
        let Ok(now) = shop.redis.get_entries(&shop.storage, keys).await else {
            return;
        };
        let took = committed.elapsed();
        waiting.retain(|&i| {
            let changed = now[i].is_some() && now[i] != before[i];
            if changed {
                shop.recent.note(ids[i], committed, took);
            }
            !changed
        });
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(16em,1fr));gap:1em}\
.slot{border:1px solid #ddd;border-radius:6px;padding:.8em}.product-card h2{font-size:1.1em;margin:0}\
.source{font-size:.8em;padding:.1em .4em;border-radius:3px}.cache{background:#e3f4e3}\
.on-demand{background:#fbe3e3}.fresh{border-color:#e0a800;background:#fff8db}\
.took{display:block;margin-top:.4em;font-size:.85em;font-weight:600;color:#7a5c00}";
