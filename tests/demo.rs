//! The demo shop (`shop demo`): its page is assembled from the cards in Redis, asks the listener's
//! `GET /fragments` for a missing one (pgfresh renders and stores it), says which is which, and its
//! writer's changes reach the page, highlighted with how long they took from commit to Redis.

mod common;

// The web module refers to `crate::product_card`, as in the shop binary.
use common::product_card;
#[path = "../examples/shop/web.rs"]
mod web;

use common::servers::free_port;
use common::{TestEnv, eventually, test_settings, tweak};
use pgfresh::{Shutdown, Storage};

/// The shop page's body, if it is served.
async fn get_page(port: u16) -> Option<String> {
    let (status, body) = common::servers::http_get(port, "/").await;
    (status == 200).then_some(body)
}

#[tokio::test]
async fn the_shop_page_reads_cards_from_redis_and_asks_pgfresh_for_a_missing_one() {
    let env = TestEnv::shop(12).await;
    env.sweep().await;
    let serve_port = free_port();
    let serve = format!("127.0.0.1:{serve_port}");
    let listener = env.start_listener(tweak(test_settings(), |s| s.serve = Some(serve.clone())));
    let first = format!("/fragments/{}", env.key(1, "compact"));
    eventually("the listener to serve /fragments", || async {
        common::servers::http_get(serve_port, &first).await.0 == 200
    })
    .await;
    env.del(&env.key(5, "compact")).await;

    let cards = web::cards(&serve, &env.sink, &env.prefix, &Storage::plain(), 12)
        .await
        .unwrap();
    assert_eq!(cards.len(), 12);
    assert_eq!(
        cards
            .iter()
            .filter(|(_, s)| *s == web::Source::OnDemand)
            .count(),
        1
    );
    let card = env.fresh_render(5, "compact").await.unwrap();
    assert_eq!(cards[4].0, card, "pgfresh's render of the missing card");
    assert_eq!(
        env.get(&env.key(5, "compact")).await,
        Some(card),
        "and pgfresh stored it"
    );

    env.del(&env.key(5, "compact")).await;
    let port = free_port();
    let shutdown = Shutdown::new();
    let shop = web::Shop {
        db: env.db.clone(),
        redis: env.sink.clone(),
        serve,
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
        page.matches(
            r#"<span class="source on-demand">rendered on demand by pgfresh (was not in Redis)</span>"#
        )
        .count(),
        1
    );

    // The demo writer changes prices and adds reviews; with the listener running, the page follows.
    let before = page;
    tokio::spawn(web::writer(shop, shutdown.clone()));
    // A card that was in Redis, still is, and changed: only the listener can have done that.
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

    // Nothing listens at this address: a card missing from Redis would be left out.
    let nobody = format!("127.0.0.1:{}", free_port());
    let cards = web::cards(&nobody, &env.sink, &env.prefix, &django, 12)
        .await
        .unwrap();
    for (index, (card, source)) in cards.iter().enumerate() {
        assert_eq!(*source, web::Source::Cache, "card {index} read from Redis");
        let id = index as i64 + 1;
        assert_eq!(Some(card), env.fresh_render(id, "compact").await.as_ref());
    }
    assert_eq!(cards.len(), 12);
    // Read as plain, the same keys are not there, and with no pgfresh to ask the page has no card.
    let plain = web::cards(&nobody, &env.sink, &env.prefix, &Storage::plain(), 12)
        .await
        .unwrap();
    assert!(plain.is_empty(), "{plain:?}");
    env.cleanup().await;
}
