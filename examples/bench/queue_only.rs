//! A fragment that reads nothing: each product's card is its id, in the shop's two variants. With
//! it the listener does all of its own work for a change (claim, plan, render, the ticket-checked
//! Redis write, settle) and none of a loader's, so `write-overhead` can tell what pgfresh costs
//! writers from what the shop's card loads cost them.

use maud::{Markup, html};
use pgfresh::Topics;
use pgfresh::tokio_postgres::Client;

use crate::product_card::{Card, ProductCard};

/// Keys of the queue-only fragment, apart from the card's.
pub(crate) const PREFIX: &str = "bench:queue_only:";

/// The fragment: subscribes to the shop's `product` topic, loads no row.
pub(crate) struct QueueOnly;

impl pgfresh::Fragment for QueueOnly {
    type Key = i64;
    type Row = ();
    type Variant = Card;
    type Error = pgfresh::tokio_postgres::Error;

    fn name(&self) -> &str {
        "queue_only"
    }

    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }

    /// Every key has a row: no query.
    async fn load(&self, _db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        Ok(ids.iter().map(|&id| (id, ())).collect())
    }

    fn render(&self, id: &i64, _row: &(), variant: Card) -> Markup {
        html! { p class=(pgfresh::Variant::name(variant)) { (id) } }
    }

    /// The shop's products, as the card pages them.
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        pgfresh::Fragment::keys_after(&ProductCard, db, after, limit).await
    }
}
