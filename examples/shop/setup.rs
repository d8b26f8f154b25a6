//! `setup`: the shop's schema, sample data, pgfresh and its two watches, all idempotent.

use pgfresh::Database;
use pgfresh::tokio_postgres::Client;

/// The shop schema, exactly as documented; created only where missing.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS products (id bigint PRIMARY KEY, name text NOT NULL, description text NOT NULL,
  price_cents integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS reviews (id bigserial PRIMARY KEY,
  product_id bigint NOT NULL REFERENCES products(id) ON DELETE CASCADE,
  author text NOT NULL, rating smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
  body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS reviews_product_id ON reviews(product_id);
";

/// What `setup` did.
pub struct SetupReport {
    /// Products loaded now (0 when the table already had rows).
    pub loaded: i64,
    /// Products in the table.
    pub products: i64,
}

/// Creates the schema if missing, loads `products` products with 3 reviews each when the table is
/// empty, installs pgfresh and watches `products.id` and `reviews.product_id` as topic `product`.
///
/// Data is loaded before the watches exist, so a first setup does not queue a change per row: run a
/// sweep afterwards to fill Redis (the demo does).
pub async fn setup(db: &Database, products: i64) -> Result<SetupReport, pgfresh::Error> {
    let mut client = db.get().await?;
    let txn = client.transaction().await?;
    txn.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    txn.batch_execute(SCHEMA_SQL).await?;
    // One setup at a time, so two concurrent runs cannot both see an empty table.
    txn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgfresh shop setup'))",
        &[],
    )
    .await?;
    let existing: i64 = txn
        .query_one("SELECT count(*) FROM products", &[])
        .await?
        .get(0);
    let loaded = if existing == 0 {
        load_sample_data(txn.client(), products).await?
    } else {
        0
    };
    txn.commit().await?;
    drop(client);

    pgfresh::install(db).await?;
    let client = db.get().await?;
    client
        .batch_execute(
            "SELECT pgfresh.watch('products', 'id', 'product');
             SELECT pgfresh.watch('reviews', 'product_id', 'product');",
        )
        .await?;
    Ok(SetupReport {
        loaded,
        products: existing + loaded,
    })
}

/// Inserts products 1..=n with three reviews each, in two set-based statements.
async fn load_sample_data(db: &Client, n: i64) -> Result<i64, pgfresh::Error> {
    let inserted = db
        .execute(
            "INSERT INTO products (id, name, description, price_cents)
             SELECT i,
                    'Product ' || i,
                    'A fine ' || (ARRAY['teapot', 'lamp', 'chair', 'kettle', 'rug'])[1 + i % 5]
                        || ' for every home, model ' || i || '.',
                    99 + (i * 7919) % 20000
             FROM generate_series(1, $1::bigint) AS i",
            &[&n],
        )
        .await?;
    db.execute(
        "INSERT INTO reviews (product_id, author, rating, body, created_at)
         SELECT p, (ARRAY['Ada', 'Grace', 'Linus', 'Barbara', 'Ken'])[1 + (p + r) % 5],
                1 + (p * 3 + r) % 5,
                (ARRAY['Works as described.', 'Would buy again.', 'Not bad & not great.'])[r],
                now() - make_interval(days => r)
         FROM generate_series(1, $1::bigint) AS p, generate_series(1, 3) AS r",
        &[&n],
    )
    .await?;
    Ok(inserted as i64)
}
