//! The shop's product card markup, against exact strings (no services needed).

// The fragment type and its loader are exercised by the service tests; here only the markup.
#[allow(dead_code)]
#[path = "../examples/shop/product_card.rs"]
mod product_card;

use product_card::{Card, Product, Review, price, product_card};

fn product(reviews: Vec<Review>, count: i64, average: Option<&str>) -> Product {
    Product {
        name: "Teapot".into(),
        description: "Holds tea".into(),
        price_cents: 1205,
        review_count: count,
        average_rating: average.map(Into::into),
        latest_reviews: reviews,
    }
}

fn review(author: &str, rating: i16, body: &str) -> Review {
    Review {
        author: author.into(),
        rating,
        body: body.into(),
    }
}

#[test]
fn a_product_without_reviews_renders_both_variants_exactly() {
    let p = product(vec![], 0, None);
    assert_eq!(
        product_card(7, &p, Card::Compact).into_string(),
        r#"<article class="product-card compact" id="product-7"><h2>Teapot</h2><p class="price">$12.05</p><p class="rating">0 reviews</p></article>"#
    );
    assert_eq!(
        product_card(7, &p, Card::Full).into_string(),
        r#"<article class="product-card full" id="product-7"><h2>Teapot</h2><p class="price">$12.05</p><p class="description">Holds tea</p><p class="rating">0 reviews</p></article>"#
    );
}

#[test]
fn one_review_is_singular_and_the_full_card_lists_the_latest_reviews() {
    let p = product(vec![review("Ada", 4, "Good")], 1, Some("4.0"));
    assert_eq!(
        product_card(1, &p, Card::Full).into_string(),
        r#"<article class="product-card full" id="product-1"><h2>Teapot</h2><p class="price">$12.05</p><p class="description">Holds tea</p><p class="rating">1 review, average 4.0</p><ul class="reviews"><li><b>Ada</b> (4/5): Good</li></ul></article>"#
    );
    let p = product(
        vec![
            review("A", 5, "x"),
            review("B", 4, "y"),
            review("C", 4, "z"),
        ],
        5,
        Some("4.4"),
    );
    assert!(
        product_card(1, &p, Card::Compact)
            .into_string()
            .contains(r#"<p class="rating">5 reviews, average 4.4</p></article>"#)
    );
}

#[test]
fn prices_always_show_two_cent_digits() {
    assert_eq!(price(0), "$0.00");
    assert_eq!(price(5), "$0.05");
    assert_eq!(price(100), "$1.00");
    assert_eq!(price(123456), "$1234.56");
    assert_eq!(price(-50), "$-0.50");
}
