//! The demo's web shop: the consumer side, as a real site would do it. The product list is assembled
//! from the cards in Redis with one MGET ([`RedisStore::get_entries`]; any Redis client does the same,
//! and a Django site's `cache.get_many` too with `--cache-format django`), falling back to a live
//! render for any card that is missing,
//! and each card says where it came from. A background writer changes a few prices and reviews every
//! second, so the page (which refreshes itself) shows pgfresh keeping up.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use maud::{PreEscaped, html};
use pgfresh::Database;
use pgfresh::RedisStore;
use pgfresh::Shutdown;
use pgfresh::{Fragment, Storage, Variant};

use crate::product_card::{Card, ProductCard};

/// Products on the page.
const SHOWN: i64 = 12;

/// Where a card on the page came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from Redis.
    Cache,
    /// Missing from Redis: rendered from the database for this request.
    Fallback,
}

struct Shop {
    db: Database,
    redis: RedisStore,
    /// The cards' key prefix, and how they are stored.
    prefix: String,
    storage: Storage,
}

/// The compact cards of products 1..=`count`, from Redis (under `prefix`, stored as `storage`) where
/// present, else rendered live.
pub async fn cards(
    db: &Database,
    redis: &RedisStore,
    prefix: &str,
    storage: &Storage,
    count: i64,
) -> Result<Vec<(String, Source)>, Box<dyn std::error::Error + Send + Sync>> {
    let ids: Vec<i64> = (1..=count).collect();
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{prefix}{id}:{}", Card::Compact.name()))
        .collect();
    let cached = redis.get_entries(storage, &keys).await?;
    let missing: Vec<i64> = ids
        .iter()
        .zip(&cached)
        .filter(|(_, c)| c.is_none())
        .map(|(id, _)| *id)
        .collect();
    let mut live = std::collections::HashMap::new();
    if !missing.is_empty() {
        let client = db.get().await?;
        for (id, row) in ProductCard.load(&client, &missing).await? {
            live.insert(
                id,
                ProductCard.render(&id, &row, Card::Compact).into_string(),
            );
        }
    }
    Ok(ids
        .iter()
        .zip(cached)
        .filter_map(|(id, cached)| match cached {
            Some(html) => Some((html, Source::Cache)),
            None => live.remove(id).map(|html| (html, Source::Fallback)),
        })
        .collect())
}

async fn product_list(State(shop): State<Arc<Shop>>) -> Html<String> {
    let body = match cards(&shop.db, &shop.redis, &shop.prefix, &shop.storage, SHOWN).await {
        Ok(cards) => html! {
            div class="grid" {
                @for (card, source) in &cards {
                    div class="slot" {
                        // The card is HTML that pgfresh rendered (and escaped) already.
                        (PreEscaped(card))
                        @match source {
                            Source::Cache => span class="source cache" { "from Redis" },
                            Source::Fallback => span class="source fallback" { "rendered live (not in Redis)" },
                        }
                    }
                }
            }
        },
        Err(error) => html! { p { "cannot load the shop: " (error.to_string()) } },
    };
    let page = html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="1";
                title { "pgfresh demo shop" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "pgfresh demo shop" }
                p { "Cards come from Redis in one MGET. A writer changes a few prices and reviews every second; "
                    "pgfresh re-renders just those cards within milliseconds. This page refreshes every second." }
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
    db: Database,
    redis: RedisStore,
    prefix: &str,
    storage: Storage,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()> + use<>, String> {
    let prefix = prefix.to_string();
    let shop = Arc::new(Shop {
        db,
        redis,
        prefix,
        storage,
    });
    let app = Router::new().route("/", get(product_list)).with_state(shop);
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

/// Every second, changes the price of two shown products and adds a review to one, until shutdown.
pub async fn writer(db: Database, shutdown: Shutdown) {
    let mut round: i64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        round += 1;
        let Ok(client) = db.get().await else { continue };
        let changed = client
            .batch_execute(&format!(
                "UPDATE products SET price_cents = 100 + (price_cents * 7 + {round}) % 9900
                 WHERE id IN ({a}, {b});
                 INSERT INTO reviews (product_id, author, rating, body)
                 VALUES ({a}, 'Demo writer', {rating}, 'Review number {round}');",
                a = 1 + round % SHOWN,
                b = 1 + (round * 5) % SHOWN,
                rating = 1 + round % 5,
            ))
            .await;
        if let Err(error) = changed {
            tracing::warn!(%error, "demo writer could not change the shop");
        }
    }
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(16em,1fr));gap:1em}\
.slot{border:1px solid #ddd;border-radius:6px;padding:.8em}.product-card h2{font-size:1.1em;margin:0}\
.source{font-size:.8em;padding:.1em .4em;border-radius:3px}.cache{background:#e3f4e3}\
.fallback{background:#fbe3e3}";
