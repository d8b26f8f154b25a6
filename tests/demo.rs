//! The demo shop (`shop demo`): its page is assembled from the cards in Redis, falls back to a live
//! render for a missing one, says which is which, and its writer's changes reach the page,
//! highlighted with how long they took from commit to Redis.

mod common;

// The web module refers to `crate::product_card`, as in the shop binary.
use common::product_card;
#[path = "../examples/shop/web.rs"]
mod web;

use common::servers::free_port;
use common::{TestEnv, eventually, test_settings};
use pgfresh::{Shutdown, Storage};

/// The shop page's body, if it is served.
async fn get_page(port: u16) -> Option<String> {
    let (status, body) = common::servers::http_get(port, "/").await;
    (status == 200).then_some(body)
}

#[tokio::test]
async fn the_shop_page_reads_cards_from_redis_and_falls_back_to_a_live_render() {
    let env = TestEnv::shop(12).await;
    env.sweep().await;
    env.del(&env.key(5, "compact")).await;

    let cards = web::cards(&env.db, &env.sink, &env.prefix, &Storage::plain(), 12)
        .await
        .unwrap();
    assert_eq!(cards.len(), 12);
    assert_eq!(
        cards
            .iter()
            .filter(|(_, s)| *s == web::Source::Fallback)
            .count(),
        1
    );
    assert_eq!(
        cards[4].0,
        env.fresh_render(5, "compact").await.unwrap(),
        "the fallback is the same card"
    );

    let port = free_port();
    let shutdown = Shutdown::new();
    let shop = web::Shop {
        db: env.db.clone(),
        redis: env.sink.clone(),
        prefix: env.prefix.clone(),
        storage: Storage::plain(),
        recent: Default::default(),
    };
    let server = web::bind(&format!("127.0.0.1:{port}"), shop.clone(), shutdown.clone())
        .await
        .unwrap();
    let server = tokio::spawn(server);
    let page = get_page(port).await.expect("the shop page");
    assert_eq!(
        page.matches(r#"<article class="product-card compact""#)
            .count(),
        12
    );
    assert_eq!(
        page.matches(r#"<span class="source cache">from Redis</span>"#)
            .count(),
        11
    );
    assert_eq!(
        page.matches(r#"<span class="source fallback">rendered live (not in Redis)</span>"#)
            .count(),
        1
    );

    // The demo writer changes prices and adds reviews; with a listener running, the page follows.
    let listener = env.start_listener(test_settings());
    let before = page;
    tokio::spawn(web::writer(shop, shutdown.clone()));
    // A card that was in Redis, still is, and changed: only the listener can have done that (product
    // 5's card, which is rendered live, would change without one).
    let cached_before = cached_cards(&before);
    eventually(
        "a written change to reach a card read from Redis",
        || async {
            get_page(port).await.is_some_and(|now| {
                cached_cards(&now).iter().any(|(id, card)| {
                    cached_before
                        .iter()
                        .any(|(old_id, old)| old_id == id && old != card)
                })
            })
        },
    )
    .await;
    // The writer saw its change reach Redis and the page highlights that card with the time it took.
    eventually(
        "a changed card to be highlighted with its freshness",
        || async {
            get_page(port).await.is_some_and(|now| {
                now.contains(r#"<div class="slot fresh">"#)
                    && now.contains("just changed: in Redis ")
                    && now.contains(" ms after its commit")
            })
        },
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(common::PATIENCE, server)
        .await
        .expect("the shop server stops")
        .unwrap();
    listener.stop().await;
    env.cleanup().await;
}

/// The cards the page says came from Redis, by product id.
fn cached_cards(page: &str) -> Vec<(String, String)> {
    page.split(r#"<div class="slot"#)
        .skip(1)
        .filter(|slot| slot.contains(r#"<span class="source cache">from Redis</span>"#))
        .filter_map(|slot| {
            let id = slot.split(r#"id="product-"#).nth(1)?.split('"').next()?;
            let card = slot.split("<span").next()?;
            Some((id.to_string(), card.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn the_shop_page_reads_cards_in_djangos_format() {
    let env = TestEnv::shop(12).await;
    let django = Storage::django("", 1);
    let fragments = pgfresh::Fragments::new().with_storage(
        &env.prefix,
        product_card::ProductCard,
        django.clone(),
    );
    pgfresh::sweep(
        &env.db,
        &env.sink,
        &fragments,
        &Default::default(),
        &Shutdown::new(),
    )
    .await
    .unwrap();

    let cards = web::cards(&env.db, &env.sink, &env.prefix, &django, 12)
        .await
        .unwrap();
    for (index, (card, source)) in cards.iter().enumerate() {
        assert_eq!(*source, web::Source::Cache, "card {index} read from Redis");
        let id = index as i64 + 1;
        assert_eq!(Some(card), env.fresh_render(id, "compact").await.as_ref());
    }
    // Read as plain, the same keys are not there: the page would render every card live.
    let plain = web::cards(&env.db, &env.sink, &env.prefix, &Storage::plain(), 12)
        .await
        .unwrap();
    assert!(plain.iter().all(|(_, s)| *s == web::Source::Fallback));
    env.cleanup().await;
}
