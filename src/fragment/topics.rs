//! Which topics reach a fragment, and how their keys lead to the fragment's keys.
//!
//! A topic either carries the fragment's own key (`products.id`, `reviews.product_id` for a product
//! card): a change to key 42 renders card 42. Or it carries the key of a shared row that many of the
//! fragment's keys show (an author, a tag): a query the fragment gives maps a batch of those keys to
//! the fragment's keys, on current data, after the commit. The listener runs that query inside the
//! claiming transaction as one `INSERT ... SELECT` into the queue, under the fragment's own topic, so
//! a fan-out to 100,000 keys is never held in memory, is rendered in ordinary batches, and is queued
//! durably before the change that caused it is settled.

/// How a topic's keys become a fragment's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// The topic's keys are the fragment's keys.
    Direct,
    /// A query maps the topic's keys (`$1`, an array) to the fragment's keys (its first column).
    Through(String),
}

/// One topic that reaches a fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) mapping: Mapping,
}

/// The topics that reach a fragment, as its [`Fragment::topics`](super::Fragment::topics) returns
/// them:
///
/// ```
/// use pgfresh::Topics;
///
/// // A post's teaser shows the post, its comments and tags, and its author's name.
/// let topics = Topics::new()
///     .direct("post")            // pgfresh.watch('posts', 'id', 'post')
///     .direct("comment")         // pgfresh.watch('comments', 'post_id', 'comment')
///     .direct("post_tag_post")   // pgfresh.watch('post_tags', 'post_id', 'post_tag_post')
///     .through("author", "SELECT id FROM posts WHERE author_id = ANY($1)")
///     .through("tag", "SELECT post_id FROM post_tags WHERE tag_id = ANY($1)");
/// ```
///
/// The rule that makes this complete: watch a table that holds a relationship (a post's author, a
/// post's tags) by the column that leads to the fragment's key, so that both the old and the new side
/// of a moved relationship are queued; watch a table of shared rows (authors, tags) by its own key,
/// and map it with [`Topics::through`]. A through query runs on current data, after the commit: it
/// finds where a shared row is used now, and the relationship's own watch covers where it was used
/// before.
#[derive(Clone, Debug, Default)]
pub struct Topics {
    list: Vec<Topic>,
}

impl Topics {
    /// No topics yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A topic whose keys are this fragment's keys: its table is watched by the column holding them.
    pub fn direct(mut self, topic: &str) -> Self {
        self.list.push(Topic {
            name: topic.to_string(),
            mapping: Mapping::Direct,
        });
        self
    }

    /// A topic of shared rows, whose keys `query` maps to this fragment's keys: it receives a batch
    /// of the topic's keys as `$1` (an array of `bigint`, `integer`, `smallint` or `text`, as the
    /// query uses it) and returns the fragment's keys in its first column, e.g.
    /// `SELECT id FROM posts WHERE author_id = ANY($1)`. Any number of joins away; duplicates and
    /// NULLs are dropped. The listener's role needs `SELECT` on what it reads.
    pub fn through(mut self, topic: &str, query: &str) -> Self {
        self.list.push(Topic {
            name: topic.to_string(),
            mapping: Mapping::Through(query.trim().trim_end_matches(';').trim().to_string()),
        });
        self
    }

    pub(crate) fn into_list(self) -> Vec<Topic> {
        self.list
    }
}

/// The topic pgfresh queues a fragment's own keys under (fanned-out keys, keys to render again). A
/// colon cannot appear in a watched topic, so no table's changes can land there.
pub(crate) fn own_topic(fragment: &str) -> String {
    format!("fragment:{fragment}")
}

/// Refuses topics that no watch could produce, given twice, or through queries that cannot work.
pub(crate) fn check(topics: &[Topic]) -> Result<(), String> {
    for (index, topic) in topics.iter().enumerate() {
        let name = &topic.name;
        let valid = name.len() <= 40
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(format!(
                "topic {name:?} is not one pgfresh.watch accepts (a lowercase letter, then up to 39 lowercase letters, digits or _)"
            ));
        }
        if topics[..index].iter().any(|t| &t.name == name) {
            return Err(format!("topic {name:?} is given twice"));
        }
        if let Mapping::Through(query) = &topic.mapping
            && (!query.contains("$1") || query.contains("$2"))
        {
            return Err(format!(
                "the query for topic {name:?} must take the topic's keys as $1, and nothing else"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_keep_their_order_and_through_queries_lose_a_trailing_semicolon() {
        let list = Topics::new()
            .direct("post")
            .through(
                "author",
                " SELECT id FROM posts WHERE author_id = ANY($1); ",
            )
            .into_list();
        assert_eq!(list[0].mapping, Mapping::Direct);
        assert_eq!(
            list[1].mapping,
            Mapping::Through("SELECT id FROM posts WHERE author_id = ANY($1)".into())
        );
        assert!(check(&list).is_ok());
    }

    #[test]
    fn topics_no_watch_could_produce_and_broken_through_queries_are_refused() {
        for (topics, expected) in [
            (
                Topics::new().direct("Post"),
                "not one pgfresh.watch accepts",
            ),
            (
                Topics::new().direct(&"t".repeat(41)),
                "not one pgfresh.watch",
            ),
            (Topics::new().direct("a").direct("a"), "given twice"),
            (
                Topics::new().through("author", "SELECT id FROM posts"),
                "as $1",
            ),
            (
                Topics::new().through("author", "SELECT $2 FROM posts WHERE a = ANY($1)"),
                "nothing else",
            ),
        ] {
            let error = check(&topics.into_list()).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn a_fragments_own_topic_cannot_be_watched() {
        let own = own_topic("post_teaser");
        let error = check(&Topics::new().direct(&own).into_list()).unwrap_err();
        assert!(error.contains("not one pgfresh.watch accepts"), "{error}");
    }
}
