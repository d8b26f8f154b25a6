//! The shop's card with a gate in its loader, for tests that need a render held in flight: a test
//! arms the gate, the next load takes its snapshot (a REPEATABLE READ transaction, so it reads the
//! rows as they were then), says it has, and waits until the test opens the gate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pgfresh::tokio_postgres::{Client, Error};
use pgfresh::{Fragment, Loaded, Topics};
use tokio::sync::Semaphore;

use super::product_card::{Card, Product, ProductCard};

pub struct Gate {
    armed: AtomicBool,
    reached: Semaphore,
    open: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            armed: AtomicBool::new(false),
            reached: Semaphore::new(0),
            open: Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Holds the next load at the gate.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a load has taken its snapshot and waits at the gate.
    pub async fn reached(&self) {
        self.reached.acquire().await.unwrap().forget();
    }

    /// Lets the load held at the gate go on.
    pub fn open(&self) {
        self.open.add_permits(1);
    }
}

#[derive(Clone, Default)]
pub struct GatedCard {
    pub gate: Arc<Gate>,
}

impl Fragment for GatedCard {
    type Key = i64;
    type Row = Product;
    type Variant = Card;
    type Error = Error;

    fn name(&self) -> &str {
        ProductCard.name()
    }

    fn topics(&self) -> Topics {
        ProductCard.topics()
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Loaded<Self> {
        if !self.gate.armed.swap(false, Ordering::SeqCst) {
            return ProductCard.load(db, ids).await;
        }
        db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM products")
            .await?;
        self.gate.reached.add_permits(1);
        self.gate.open.acquire().await.unwrap().forget();
        let rows = ProductCard.load(db, ids).await;
        db.batch_execute("COMMIT").await?;
        rows
    }

    fn render(&self, id: &i64, product: &Product, variant: Card) -> maud::Markup {
        ProductCard.render(id, product, variant)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}
