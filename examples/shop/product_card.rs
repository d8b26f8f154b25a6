//! The shop's one fragment: a product card, in a `compact` and a `full` variant, built from a product
//! and its reviews.

use maud::{Markup, html};
use pgfresh::Fragment;
use pgfresh::tokio_postgres::{Client, Error};

/// Where product cards live in Redis: `shop:product_card:{id}:{variant}`.
pub const KEY_PREFIX: &str = "shop:product_card:";

/// The `product_card` fragment.
pub struct ProductCard {
    key_prefix: String,
}

/// One review as shown on the card.
pub struct Review {
    pub author: String,
    pub rating: i16,
    pub body: String,
}

/// Everything a card shows, loaded for a whole batch in one query.
pub struct Product {
    pub name: String,
    pub description: String,
    pub price_cents: i32,
    pub review_count: i64,
    /// Average rating rounded half up to one decimal, formatted by PostgreSQL (`4.0`).
    pub average_rating: Option<String>,
    /// The latest three reviews, newest first.
    pub latest_reviews: Vec<Review>,
}

impl ProductCard {
    /// Cards under the shop's usual prefix.
    pub fn new() -> Self {
        Self::with_key_prefix(KEY_PREFIX)
    }

    /// Cards under another prefix (tests use one each, to share one Redis).
    pub fn with_key_prefix(key_prefix: impl Into<String>) -> Self {
        Self {
            key_prefix: key_prefix.into(),
        }
    }
}

impl Default for ProductCard {
    fn default() -> Self {
        Self::new()
    }
}

/// The load query: one row per existing product among `$1`, with its review count, average and latest
/// three reviews as parallel arrays.
const LOAD_PRODUCTS: &str = "
    SELECT p.id, p.name, p.description, p.price_cents,
           stats.review_count, stats.average_rating::text,
           coalesce(latest.authors, '{}'), coalesce(latest.ratings, '{}'), coalesce(latest.bodies, '{}')
    FROM products p
    CROSS JOIN LATERAL (
        SELECT count(*) AS review_count, round(avg(r.rating), 1) AS average_rating
        FROM reviews r WHERE r.product_id = p.id
    ) stats
    CROSS JOIN LATERAL (
        SELECT array_agg(l.author ORDER BY l.created_at DESC, l.id DESC) AS authors,
               array_agg(l.rating ORDER BY l.created_at DESC, l.id DESC) AS ratings,
               array_agg(l.body ORDER BY l.created_at DESC, l.id DESC) AS bodies
        FROM (SELECT r.id, r.author, r.rating, r.body, r.created_at
              FROM reviews r WHERE r.product_id = p.id
              ORDER BY r.created_at DESC, r.id DESC LIMIT 3) l
    ) latest
    WHERE p.id = ANY($1)";

impl Fragment for ProductCard {
    type Key = i64;
    type Row = Product;

    fn name(&self) -> &str {
        "product_card"
    }

    fn topics(&self) -> &[&str] {
        &["product"]
    }

    fn variants(&self) -> &[&str] {
        &["compact", "full"]
    }

    fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Result<Vec<(i64, Product)>, Error> {
        let rows = db.query(LOAD_PRODUCTS, &[&ids]).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let authors: Vec<String> = row.get(6);
                let ratings: Vec<i16> = row.get(7);
                let bodies: Vec<String> = row.get(8);
                let latest_reviews = authors
                    .into_iter()
                    .zip(ratings)
                    .zip(bodies)
                    .map(|((author, rating), body)| Review {
                        author,
                        rating,
                        body,
                    })
                    .collect();
                let product = Product {
                    name: row.get(1),
                    description: row.get(2),
                    price_cents: row.get(3),
                    review_count: row.get(4),
                    average_rating: row.get(5),
                    latest_reviews,
                };
                (row.get(0), product)
            })
            .collect())
    }

    fn render(&self, id: &i64, product: &Product, variant: &str) -> Markup {
        product_card(*id, product, variant == "full", variant)
    }

    async fn count_keys(&self, db: &Client) -> Result<Option<i64>, Error> {
        Ok(Some(
            db.query_one("SELECT count(*) FROM products", &[])
                .await?
                .get(0),
        ))
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        let rows = db
            .query(
                "SELECT id FROM products WHERE id > coalesce($1, -9223372036854775808) ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// The card's markup. Every piece of row data is spliced, so maud escapes it.
pub fn product_card(id: i64, product: &Product, full: bool, variant: &str) -> Markup {
    html! {
        article class={ "product-card " (variant) } id={ "product-" (id) } {
            h2 { (product.name) }
            p class="price" { (price(product.price_cents)) }
            @if full {
                p class="description" { (product.description) }
            }
            p class="rating" {
                (product.review_count) " review" @if product.review_count != 1 { "s" }
                @if let (true, Some(average)) = (product.review_count > 0, &product.average_rating) {
                    ", average " (average)
                }
            }
            @if full && !product.latest_reviews.is_empty() {
                ul class="reviews" {
                    @for review in &product.latest_reviews {
                        li { b { (review.author) } " (" (review.rating) "/5): " (review.body) }
                    }
                }
            }
        }
    }
}

/// `$12.05` from 1205 cents (`$-0.50` for a negative price).
pub fn price(cents: i32) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("${sign}{}.{:02}", cents / 100, cents % 100)
}
