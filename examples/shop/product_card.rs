//! The shop's one fragment: a product card, in a `compact` and a `full` variant, built from a product
//! and its reviews.

use pgfresh::maud::{Markup, html};
use pgfresh::tokio_postgres::types::Type;
use pgfresh::tokio_postgres::{Client, Error};
use pgfresh::{CachedStatements, Fragment, Topics, Variant};

/// Where product cards live in Redis: `shop:product_card:{id}:{variant}`.
pub const KEY_PREFIX: &str = "shop:product_card:";

pgfresh::variants! {
    /// How a card is shown: `compact` in lists, `full` on the product's page.
    pub enum Card { Compact = "compact", Full = "full" }
}

/// The `product_card` fragment.
pub struct ProductCard;

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

/// The load query: one row per existing product among `$1`, with its review count, average and latest
/// three reviews as parallel arrays. Each product's reviews are read once, numbered newest first, and
/// aggregated in one pass (a fifth less database CPU than looking them up twice per product). Per
/// product, through the index on `reviews.product_id`, so that the plan stays cheap whatever the
/// planner's statistics say.
const LOAD_PRODUCTS: &str = "
    SELECT p.id, p.name, p.description, p.price_cents,
           s.review_count, s.average_rating::text,
           coalesce(s.authors, '{}'), coalesce(s.ratings, '{}'), coalesce(s.bodies, '{}')
    FROM products p
    CROSS JOIN LATERAL (
        SELECT count(*) AS review_count, round(avg(r.rating), 1) AS average_rating,
               array_agg(r.author ORDER BY r.n) FILTER (WHERE r.n <= 3) AS authors,
               array_agg(r.rating ORDER BY r.n) FILTER (WHERE r.n <= 3) AS ratings,
               array_agg(r.body ORDER BY r.n) FILTER (WHERE r.n <= 3) AS bodies
        FROM (SELECT author, rating, body,
                     row_number() OVER (ORDER BY created_at DESC, id DESC) AS n
              FROM reviews WHERE product_id = p.id) r
    ) s
    WHERE p.id = ANY($1)";

impl Fragment for ProductCard {
    type Key = i64;
    type Row = Product;
    type Variant = Card;
    type Error = Error;

    fn name(&self) -> &str {
        "product_card"
    }

    /// Products are watched by `id` and reviews by `product_id`, both as topic `product`.
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Result<Vec<(i64, Product)>, Error> {
        // Typed, and prepared once per session: PostgreSQL parses and plans it once, not with
        // every batch (an untyped query would also cost a round trip to prepare it).
        let rows = db
            .query_typed_cached(LOAD_PRODUCTS, &[(&ids, Type::INT8_ARRAY)])
            .await?;
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

    fn render(&self, id: &i64, product: &Product, variant: Card) -> Markup {
        product_card(*id, product, variant)
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
            .query_typed_cached(
                "SELECT id FROM products WHERE id > coalesce($1, -9223372036854775808) ORDER BY id LIMIT $2",
                &[(&after, Type::INT8), (&limit, Type::INT8)],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// The card's markup. Every piece of row data is spliced, so maud escapes it.
pub fn product_card(id: i64, product: &Product, variant: Card) -> Markup {
    let full = variant == Card::Full;
    html! {
        article class={ "product-card " (variant.name()) } id={ "product-" (id) } {
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
