//! Where each (topic, key) a batch renders goes: to the fragments whose own key it is (rendered in
//! this batch), or, for a topic of shared rows, through the fragment's query into the queue as that
//! fragment's keys (`pg::fan_out`, rendered by later batches). Routing is pure; the fan-outs run in the
//! claiming transaction, each in a savepoint so that a failing query fails only its changes.

use std::collections::HashMap;
use std::sync::Arc;

use super::shared::Shared;
use crate::Error;
use crate::fragment::{DynFragment, Fragments, Mapping};
use crate::pg::fan_out::{self, FanOutError};
use crate::pg::transaction::Pipelined;

/// A claimed change's identity: (topic, key).
pub(crate) type ChangeKey<'a> = (&'a str, &'a str);

/// One fragment's part of a batch.
pub(crate) struct Renders<'a> {
    pub(crate) fragment: &'a Arc<dyn DynFragment>,
    /// Each key to render, with the changes (topic, key) that lead to it.
    pub(crate) keys: HashMap<&'a str, Vec<ChangeKey<'a>>>,
}

/// Keys of one through topic that one fragment maps to its own keys.
pub(crate) struct FanOut<'a> {
    pub(crate) fragment: &'a Arc<dyn DynFragment>,
    pub(crate) topic: &'a str,
    pub(crate) query: &'a str,
    pub(crate) keys: Vec<&'a str>,
}

/// Where a batch's changes go.
#[derive(Default)]
pub(crate) struct Routes<'a> {
    pub(crate) renders: Vec<Renders<'a>>,
    pub(crate) fan_outs: Vec<FanOut<'a>>,
    /// Changes no fragment here subscribes to.
    pub(crate) unrouted: Vec<ChangeKey<'a>>,
}

/// Routes each (topic, key) to the fragments it reaches, in the fragments' order.
pub(crate) fn route<'a>(
    fragments: &'a Fragments,
    changes: impl Iterator<Item = ChangeKey<'a>> + Clone,
) -> Routes<'a> {
    let mut routes = Routes::default();
    for change in changes.clone() {
        if fragments.for_topic(change.0).next().is_none() {
            routes.unrouted.push(change);
        }
    }
    for fragment in fragments.iter() {
        let mut renders: HashMap<&str, Vec<ChangeKey<'a>>> = HashMap::new();
        let mut fan_outs: Vec<FanOut<'a>> = Vec::new();
        for (topic, key) in changes.clone() {
            match fragment.mapping(topic) {
                None => {}
                Some(Mapping::Direct) => renders.entry(key).or_default().push((topic, key)),
                Some(Mapping::Through(query)) => {
                    match fan_outs.iter_mut().find(|f| f.topic == topic) {
                        Some(fan_out) => fan_out.keys.push(key),
                        None => fan_outs.push(FanOut {
                            fragment,
                            topic,
                            query,
                            keys: vec![key],
                        }),
                    }
                }
            }
        }
        if !renders.is_empty() {
            routes.renders.push(Renders {
                fragment,
                keys: renders,
            });
        }
        routes.fan_outs.extend(fan_outs);
    }
    routes
}

/// What the fan-outs of a batch did.
#[derive(Default)]
pub(crate) struct FannedOut<'a> {
    /// Fragment keys queued.
    pub(crate) queued: u64,
    /// Changes whose fan-out failed, with why.
    pub(crate) failed: Vec<(ChangeKey<'a>, String)>,
}

/// Runs every fan-out of the batch in the claiming transaction, each in a savepoint. A lost
/// connection fails the batch; anything else fails the changes of that fan-out alone.
pub(crate) async fn fan_out<'a>(
    shared: &Shared,
    txn: &mut Pipelined<'_>,
    fan_outs: &[FanOut<'a>],
) -> Result<FannedOut<'a>, Error> {
    let mut done = FannedOut::default();
    for job in fan_outs {
        let savepoint = txn.savepoint("pgfresh_fan_out").await?;
        // The query names the application's tables: it runs under the users' search_path, in the
        // savepoint (rolled back with it), and pgfresh's pinned path comes back after it.
        if let Some(path) = &shared.users_search_path {
            fan_out::use_users_search_path(savepoint.client(), path).await?;
        }
        let result = fan_out::fan_out(
            savepoint.client(),
            job.query,
            job.fragment.own_topic(),
            &job.keys,
        )
        .await;
        match result {
            Ok(fanned) => {
                if shared.users_search_path.is_some() {
                    fan_out::pin_search_path(savepoint.client()).await?;
                }
                savepoint.release().await?;
                done.queued += fanned.queued;
                let reason = |key: &str| {
                    format!(
                        "{}: key {key:?} of topic {} does not fit the type its query takes",
                        job.fragment.name(),
                        job.topic
                    )
                };
                let unfit = fanned.unfit.iter().map(|key| {
                    let key = job.keys.iter().find(|k| **k == key).expect("an input key");
                    ((job.topic, *key), reason(key))
                });
                done.failed.extend(unfit);
                tracing::debug!(
                    fragment = job.fragment.name(),
                    topic = job.topic,
                    keys = job.keys.len(),
                    queued = fanned.queued,
                    "fanned out"
                );
            }
            Err(FanOutError::Query(reason)) => {
                savepoint.rollback().await?;
                let reason = format!(
                    "{}: the query for topic {} failed: {reason}",
                    job.fragment.name(),
                    job.topic
                );
                done.failed.extend(
                    job.keys
                        .iter()
                        .map(|key| ((job.topic, *key), reason.clone())),
                );
            }
            Err(FanOutError::Connection(error)) => return Err(error.into()),
        }
    }
    if done.queued > 0 {
        // The queued keys are this listener's next work: no need to wait for a poll.
        shared.wake_by(std::time::Instant::now());
    }
    Ok(done)
}

/// Checks every through query against the database at start-up, so that a typo is one clear error
/// rather than changes failing one by one.
pub(crate) async fn check_queries(
    users: &mut deadpool_postgres::Object,
    fragments: &Fragments,
) -> Result<(), Error> {
    // In a transaction rolled back: behind a connection pooler, a statement prepared outside one
    // would stay behind on whichever server session the pooler gave it.
    let txn = users.transaction().await?;
    let client = txn.client();
    for fragment in fragments.iter() {
        for topic in fragment.topics() {
            let Mapping::Through(query) = &topic.mapping else {
                continue;
            };
            let problem = match fan_out::prepare(client, query).await {
                Ok(statement) => fan_out::check_statement(&statement).err(),
                Err(error) if error.as_db_error().is_some() => {
                    Some(crate::error::describe_postgres(&error))
                }
                Err(error) => return Err(error.into()),
            };
            if let Some(problem) = problem {
                return Err(Error::Fragment(format!(
                    "fragment {:?}: the query for topic {:?} does not work: {problem}",
                    fragment.name(),
                    topic.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::Topics;

    struct Teaser;

    impl crate::Fragment for Teaser {
        type Key = i64;
        type Row = ();
        type Variant = Page;
        type Error = tokio_postgres::Error;

        fn name(&self) -> &str {
            "teaser"
        }
        fn topics(&self) -> Topics {
            Topics::new()
                .direct("post")
                .through("author", "SELECT id FROM posts WHERE author_id = ANY($1)")
        }
        async fn load(&self, _: &tokio_postgres::Client, _: &[i64]) -> crate::Loaded<Self> {
            Ok(Vec::new())
        }
        fn render(&self, _: &i64, _: &(), _: Page) -> maud::Markup {
            maud::html! {}
        }
        async fn keys_after(
            &self,
            _: &tokio_postgres::Client,
            _: Option<&i64>,
            _: i64,
        ) -> Result<Vec<i64>, tokio_postgres::Error> {
            Ok(Vec::new())
        }
    }

    crate::variants! { enum Page { Page = "page" } }

    #[test]
    fn direct_keys_render_through_keys_fan_out_own_keys_render_and_the_rest_is_unrouted() {
        let fragments = Fragments::new().with("t:", Teaser);
        let changes = [
            ("post", "1"),
            ("author", "7"),
            ("author", "8"),
            ("fragment:teaser", "2"),
            ("review", "3"),
        ];
        let routes = route(&fragments, changes.iter().copied());
        assert_eq!(routes.unrouted, [("review", "3")]);
        assert_eq!(routes.renders.len(), 1);
        let renders = &routes.renders[0].keys;
        assert_eq!(renders.len(), 2);
        assert_eq!(renders["1"], [("post", "1")]);
        assert_eq!(renders["2"], [("fragment:teaser", "2")]);
        assert_eq!(routes.fan_outs.len(), 1);
        assert_eq!(routes.fan_outs[0].topic, "author");
        assert_eq!(routes.fan_outs[0].keys, ["7", "8"]);
    }
}
