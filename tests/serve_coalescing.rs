//! `listen --serve` under a stampede: 100 concurrent requests for one missing key cause exactly
//! one render, as the metrics say. Alone in its binary, so that the process's metrics are its own.

mod common;

use common::TestEnv;
use common::servers::{free_port, http_get, http_get_with, metric};
use common::{AlteredCard, SharedFragment, eventually, test_settings, tweak};
use pgfresh::Fragments;

#[tokio::test]
async fn a_hundred_concurrent_misses_of_one_key_cause_one_render() {
    let env = TestEnv::shop(3).await;
    // The render is held after reading its rows until every request waits for it.
    let (card, open) = AlteredCard::stalling();
    let (serve, http) = (free_port(), free_port());
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, SharedFragment(card.clone())),
        tweak(test_settings(), |s| {
            s.serve = Some(format!("127.0.0.1:{serve}"));
            s.http = Some(format!("127.0.0.1:{http}"));
        }),
    );
    eventually("the listener to be ready", || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;
    let path = format!("/fragments/{}", env.key(2, "full"));
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let path = path.clone();
        requests.spawn(async move { http_get_with(serve, &path, &[]).await });
    }
    eventually("the render to have read its rows", || async {
        card.gate_taken()
    })
    .await;
    eventually("99 requests to wait for the render in flight", || async {
        metric(
            &http_get(http, "/metrics").await.1,
            "pgfresh_serve_coalesced_total",
        ) == 99.0
    })
    .await;
    open.send(()).unwrap();
    let expected = env.fresh_render(2, "full").await.unwrap();
    while let Some(answer) = requests.join_next().await {
        let (status, _, body) = answer.unwrap();
        assert_eq!((status, body.as_str()), (200, expected.as_str()));
    }
    let scrape = http_get(http, "/metrics").await.1;
    assert_eq!(
        metric(&scrape, "pgfresh_serve_renders_total"),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "pgfresh_serve_requests_total{status=\"200\"}"),
        100.0,
        "{scrape}"
    );
    assert!(
        scrape.contains("pgfresh_serve_request_seconds_count 100"),
        "{scrape}"
    );
    listener.stop().await;
    env.cleanup().await;
}
