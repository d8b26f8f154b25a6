//! The blog: fragments that join shared rows stay equal to a fresh render whatever changes, in any
//! table: renames reach every fragment that shows the renamed row (through the fragments' queries),
//! moves refresh both sides, publishing and unpublishing create and delete entries, and a long random
//! run of changes to every table ends with every fragment fresh, the periodic sweep off. A through
//! query that fails fails only its changes, and one that cannot work stops the listener at start.

mod common;

#[allow(dead_code)]
#[path = "../examples/blog/fragments.rs"]
mod fragments;
#[allow(dead_code)]
#[path = "../examples/blog/setup.rs"]
mod setup;

use std::collections::BTreeMap;

use common::{PATIENCE, TestEnv, eventually, test_settings, tweak};
use fragments::{Author, Post, Tag, Teaser};
use pgfresh::{Fragments, Shutdown, SweepSettings};

/// A test's blog: its database, set up with `posts` posts, swept into Redis under the test's prefix.
async fn blog(posts: i64) -> (TestEnv, String) {
    let env = TestEnv::empty().await;
    setup::setup(&env.db, posts).await.expect("blog setup");
    let prefix = format!("{}:", env.name);
    sweep(&env, &prefix).await;
    (env, prefix)
}

async fn sweep(env: &TestEnv, prefix: &str) {
    let fragments = fragments::with_prefix(prefix);
    let settings = SweepSettings::default();
    pgfresh::sweep(&env.db, &env.sink, &fragments, &settings, &Shutdown::new())
        .await
        .expect("sweep");
}

/// Every blog entry under `prefix`, by key without the prefix.
async fn entries(env: &TestEnv, prefix: &str) -> BTreeMap<String, String> {
    let mut redis = env.sink.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}blog:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let values = env.sink.get_many(&keys).await.unwrap();
    keys.into_iter()
        .zip(values)
        .filter_map(|(key, value)| Some((key[prefix.len()..].to_string(), value?)))
        .collect()
}

/// What the blog's fragments render from the database now, by key: a sweep into a fresh prefix.
async fn fresh(env: &TestEnv) -> BTreeMap<String, String> {
    let prefix = format!("{}:fresh{}:", env.name, fastrand::u32(..));
    sweep(env, &prefix).await;
    entries(env, &prefix).await
}

/// Waits until the live entries equal a fresh render; on a timeout, says which keys differ.
async fn wait_fresh(env: &TestEnv, prefix: &str, after: &str) {
    let expected = fresh(env).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let live = entries(env, prefix).await;
        if live == expected {
            return;
        }
        if std::time::Instant::now() > deadline {
            let differ: Vec<&String> = expected
                .keys()
                .chain(live.keys())
                .filter(|key| expected.get(*key) != live.get(*key))
                .take(10)
                .collect();
            panic!("after {after}, these entries are not fresh: {differ:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn no_sweeps() -> pgfresh::ListenSettings {
    tweak(test_settings(), |s| s.sweep_interval = None)
}

#[test]
fn the_markup_is_exactly_what_the_blog_specifies() {
    let post = Post {
        title: "Caching <fast>".into(),
        body: "Body & more".into(),
        author: "Ada".into(),
        date: "2026-01-02".into(),
        tags: vec!["Zig".into(), "ada".into()],
        comments: 1,
    };
    assert_eq!(
        fragments::post_teaser(7, &post, Teaser::List).into_string(),
        r#"<article class="teaser list" id="post-7"><h2><a href="/posts/7">Caching &lt;fast&gt;</a></h2><p class="byline">by Ada on 2026-01-02</p><ul class="tags"><li>Zig</li><li>ada</li></ul><p class="comments">1 comment</p></article>"#
    );
    let untagged = Post {
        tags: vec![],
        comments: 0,
        ..post
    };
    assert_eq!(
        fragments::post_teaser(7, &untagged, Teaser::Full).into_string(),
        r#"<article class="teaser full" id="post-7"><h2><a href="/posts/7">Caching &lt;fast&gt;</a></h2><p class="byline">by Ada on 2026-01-02</p><div class="body">Body &amp; more</div><p class="comments">0 comments</p></article>"#
    );

    let empty = Tag {
        name: "rust".into(),
        posts: 0,
        latest: vec![],
    };
    assert_eq!(
        fragments::tag_index(3, &empty).into_string(),
        r#"<section class="tag-index" id="tag-3"><h2>rust</h2><p class="count">0 posts</p></section>"#
    );
    let tag = Tag {
        name: "r&d".into(),
        posts: 1,
        latest: vec![(9, "One".into(), "Grace".into())],
    };
    assert_eq!(
        fragments::tag_index(3, &tag).into_string(),
        r#"<section class="tag-index" id="tag-3"><h2>r&amp;d</h2><p class="count">1 post</p><ol><li><a href="/posts/9">One</a> by Grace</li></ol></section>"#
    );

    let author = Author {
        name: "Ken".into(),
        bio: "Unix".into(),
        posts: 2,
        latest: Some((5, "Pipes".into())),
    };
    assert_eq!(
        fragments::author_box(4, &author).into_string(),
        r#"<aside class="author" id="author-4"><h3>Ken</h3><p class="bio">Unix</p><p class="posts">2 posts, latest <a href="/posts/5">Pipes</a></p></aside>"#
    );
    let quiet = Author {
        bio: String::new(),
        posts: 0,
        latest: None,
        ..author
    };
    assert_eq!(
        fragments::author_box(4, &quiet).into_string(),
        r#"<aside class="author" id="author-4"><h3>Ken</h3><p class="posts">0 posts</p></aside>"#
    );
}

#[tokio::test]
async fn each_kind_of_change_refreshes_every_fragment_it_affects() {
    let (env, prefix) = blog(60).await;
    let listener = env.start_listener_with(fragments::with_prefix(&prefix), no_sweeps());
    let db = env.client().await;
    let teaser = |id: i64| format!("blog:post_teaser:{id}:list");
    let before = entries(&env, &prefix).await;
    assert!(before.contains_key(&teaser(1)) && !before.contains_key(&teaser(10)));

    for (what, sql) in [
        (
            "renaming an author",
            "UPDATE authors SET name = 'Renamed <A>' WHERE id = 1",
        ),
        (
            "renaming a tag",
            "UPDATE tags SET name = 'renamed-tag' WHERE id = 5",
        ),
        (
            "a new approved comment",
            "INSERT INTO comments (post_id, author_name, body) VALUES (3, 'x', 'y')",
        ),
        (
            "unapproving comments",
            "UPDATE comments SET approved = false WHERE post_id = 4",
        ),
        (
            "moving a post to another author",
            "UPDATE posts SET author_id = 2 WHERE id = 8",
        ),
        (
            "publishing a draft",
            "UPDATE posts SET published_at = '2027-01-01' WHERE id = 10",
        ),
        (
            "unpublishing a post",
            "UPDATE posts SET published_at = NULL WHERE id = 11",
        ),
        (
            "tagging a post",
            "INSERT INTO post_tags VALUES (12, 7) ON CONFLICT DO NOTHING",
        ),
        (
            "untagging a post",
            "DELETE FROM post_tags WHERE post_id = 13",
        ),
        ("deleting a post", "DELETE FROM posts WHERE id = 14"),
        ("deleting a tag", "DELETE FROM tags WHERE id = 6"),
        (
            "a new author and post",
            "INSERT INTO authors (id, name) VALUES (99, 'New');
          INSERT INTO posts VALUES (999, 99, 'New post', 'b', now())",
        ),
        ("changing a bio", "UPDATE authors SET bio = '' WHERE id = 2"),
    ] {
        db.batch_execute(sql).await.unwrap();
        wait_fresh(&env, &prefix, what).await;
    }
    let after = entries(&env, &prefix).await;
    let of_author_1: i64 = db
        .query_one(
            "SELECT min(id) FROM posts WHERE author_id = 1 AND published_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(after[&teaser(of_author_1)].contains("by Renamed &lt;A&gt; on"));
    assert!(
        after.contains_key(&teaser(10)),
        "a published draft has a teaser"
    );
    assert!(
        !after.contains_key(&teaser(11)),
        "an unpublished post has none"
    );
    assert!(
        !after.contains_key("blog:tag_index:6:page"),
        "a deleted tag has no page"
    );
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn renaming_an_author_reaches_every_teaser_and_tag_page_that_shows_them() {
    let (env, prefix) = blog(200).await;
    let listener = env.start_listener_with(fragments::with_prefix(&prefix), no_sweeps());
    let db = env.client().await;
    db.batch_execute("UPDATE authors SET name = 'Fresh Name' WHERE id = 3")
        .await
        .unwrap();
    let shown: Vec<i64> = db
        .query(
            "SELECT id FROM posts WHERE author_id = 3 AND published_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(shown.len() > 5, "author 3 has posts: {shown:?}");
    eventually("every teaser of author 3 to show the new name", || async {
        let live = entries(&env, &prefix).await;
        shown.iter().all(|id| {
            live.get(&format!("blog:post_teaser:{id}:full"))
                .is_some_and(|html| html.contains("by Fresh Name on"))
        })
    })
    .await;
    wait_fresh(&env, &prefix, "renaming author 3").await;
    // The fan-out went through the queue: the fragment's own topic, nothing left behind.
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    assert_eq!(env.parked().await, 0);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn random_changes_to_every_table_end_with_every_fragment_fresh() {
    let (env, prefix) = blog(120).await;
    let listener = env.start_listener_with(fragments::with_prefix(&prefix), no_sweeps());
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let db = env.client().await;
    for round in 0..60 {
        let mut sql = String::new();
        for _ in 0..rng.usize(1..5) {
            let (post, author, tag) = (rng.i64(1..=125), rng.i64(1..=7), rng.i64(1..=42));
            sql.push_str(&match rng.u8(0..12) {
                0 => format!("UPDATE authors SET name = 'A{round}' WHERE id = {author};"),
                1 => format!("UPDATE tags SET name = 'T{round}' WHERE id = {tag};"),
                2 => format!("UPDATE posts SET title = 'P{round}' WHERE id = {post};"),
                3 => format!(
                    "UPDATE posts SET author_id = {author} WHERE id = {post} AND EXISTS (SELECT FROM authors WHERE id = {author});"
                ),
                4 => format!(
                    "UPDATE posts SET published_at = CASE WHEN published_at IS NULL THEN now() END WHERE id = {post};"
                ),
                5 => format!("INSERT INTO post_tags SELECT {post}, {tag} WHERE EXISTS (SELECT FROM posts WHERE id = {post}) AND EXISTS (SELECT FROM tags WHERE id = {tag}) ON CONFLICT DO NOTHING;"),
                6 => format!("DELETE FROM post_tags WHERE post_id = {post} AND tag_id % 3 = {};", tag % 3),
                7 => format!("INSERT INTO comments (post_id, author_name, body, approved) SELECT {post}, 'r', 'c', {} WHERE EXISTS (SELECT FROM posts WHERE id = {post});", rng.bool()),
                8 => format!("UPDATE comments SET approved = NOT approved WHERE post_id = {post};"),
                9 => format!("DELETE FROM posts WHERE id = {post};"),
                10 => format!("DELETE FROM tags WHERE id = {tag} AND {tag} > 35;"),
                _ => format!(
                    "INSERT INTO posts SELECT {post}, {author}, 'New {round}', 'b', now() WHERE EXISTS (SELECT FROM authors WHERE id = {author}) ON CONFLICT (id) DO UPDATE SET body = 'again {round}';"
                ),
            });
        }
        db.batch_execute(&format!("BEGIN; {sql} COMMIT;"))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}, round {round}: {e}: {sql}"));
    }
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    wait_fresh(&env, &prefix, &format!("random changes (seed {seed})")).await;
    assert_eq!(env.parked().await, 0, "seed {seed}");
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_failing_through_query_fails_only_its_changes_and_queues_nothing() {
    let (env, prefix) = blog(40).await;
    let db = env.client().await;
    // The teaser's author query divides by the rows of `gate`: with none, it fails.
    db.batch_execute("CREATE TABLE gate (x int)").await.unwrap();
    let fragments =
        Fragments::new().with(
            format!("{prefix}{}", fragments::POST_TEASER),
            AlteredTeaser {
                author_query: Some(
                    "SELECT id FROM posts WHERE author_id = ANY($1) AND 1 / (SELECT count(*) FROM gate) = 1",
                ),
                ..AlteredTeaser::default()
            },
        );
    let listener = env.start_listener_with(fragments, no_sweeps());
    db.batch_execute(
        "UPDATE authors SET name = 'Gated' WHERE id = 1;
         UPDATE posts SET title = 'Direct' WHERE id = 2;",
    )
    .await
    .unwrap();
    eventually("the author change to fail with its reason", || async {
        db.query_one(
            "SELECT count(*) FROM pgfresh.changes
             WHERE topic = 'author' AND attempts > 0 AND last_error LIKE '%division by zero%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    let queued: i64 = db
        .query_one(
            "SELECT count(*) FROM pgfresh.changes WHERE topic = 'fragment:post_teaser'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0, "a failed fan-out queues nothing");
    eventually(
        "the direct change in the same batch to be applied",
        || async {
            entries(&env, &prefix)
                .await
                .get("blog:post_teaser:2:list")
                .is_some_and(|html| html.contains(">Direct<"))
        },
    )
    .await;
    // Once the query works, the retried change fans out and the teasers catch up.
    db.batch_execute("INSERT INTO gate VALUES (1)")
        .await
        .unwrap();
    eventually("author 1's teasers to show the new name", || async {
        let live = entries(&env, &prefix).await;
        let teasers: Vec<&String> = live
            .iter()
            .filter(|(key, _)| key.starts_with("blog:post_teaser:"))
            .map(|(_, html)| html)
            .collect();
        teasers.iter().any(|html| html.contains("by Gated on"))
            && !teasers.iter().any(|html| html.contains("by Ada 1 on"))
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_through_query_that_cannot_work_stops_the_listener_with_one_clear_line() {
    let (env, prefix) = blog(5).await;
    for (query, expected) in [
        (
            "SELECT id FROM postz WHERE author_id = ANY($1)",
            "relation \"postz\" does not exist",
        ),
        (
            "SELECT id FROM posts WHERE author_id = $1",
            "it takes $1 as int8",
        ),
    ] {
        let broken = AlteredTeaser {
            name: "broken",
            author_query: Some(query),
            ..AlteredTeaser::default()
        };
        let fragments = Fragments::new().with(&prefix, broken);
        let error = pgfresh::listen(
            env.db.clone(),
            env.sink.clone(),
            fragments,
            no_sweeps(),
            Shutdown::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("fragment \"broken\": the query for topic \"author\" does not work"),
            "{error}"
        );
        assert!(error.contains(expected), "{error}");
        assert_eq!(error.lines().count(), 1, "{error}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_listener_killed_in_the_middle_of_a_fan_out_loses_nothing_and_does_not_map_again() {
    let (env, prefix) = blog(400).await;
    let db = env.client().await;
    let fans: i64 = db
        .query_one(
            "SELECT count(*) FROM posts WHERE author_id = 5 AND published_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fans >= 15, "author 5 has posts to fan out to: {fans}");
    // Small batches of slow renders, so that the fan-out's keys take a while to work through.
    let slow = tweak(no_sweeps(), |s| {
        s.batch_size = 2;
        s.workers = 1;
    });
    // The blog's own fragments, with the teaser slowed down.
    let slowed = Fragments::new()
        .with(
            format!("{prefix}{}", fragments::POST_TEASER),
            AlteredTeaser {
                load_delay: std::time::Duration::from_millis(100),
                ..AlteredTeaser::default()
            },
        )
        .with(
            format!("{prefix}{}", fragments::TAG_INDEX),
            fragments::TagIndex,
        )
        .with(
            format!("{prefix}{}", fragments::AUTHOR_BOX),
            fragments::AuthorBox,
        );
    let first = env.start_listener_with(slowed, slow);
    db.batch_execute("UPDATE authors SET name = 'Killed Midway' WHERE id = 5")
        .await
        .unwrap();
    let queued = |topic: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM pgfresh.changes WHERE topic = $1",
                &[&topic],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    eventually("the fan-out to be queued and partly rendered", || async {
        let left = queued("fragment:post_teaser").await;
        queued("author").await == 0 && left > 0 && left < fans
    })
    .await;
    first.task.abort();
    let _ = first.task.await;
    let left = queued("fragment:post_teaser").await;
    assert!(left > 0, "the killed listener left keys to render");
    assert_eq!(
        queued("author").await,
        0,
        "the change that fanned out is settled"
    );

    let second = env.start_listener_with(fragments::with_prefix(&prefix), no_sweeps());
    wait_fresh(
        &env,
        &prefix,
        "a listener killed in the middle of a fan-out",
    )
    .await;
    assert_eq!(env.parked().await, 0);
    second.stop().await;
    env.cleanup().await;
}

/// The blog's teaser as user code with a twist: another name, its authors reached through a query
/// the test gives (failing, or not working at all), or a slow load.
struct AlteredTeaser {
    name: &'static str,
    author_query: Option<&'static str>,
    load_delay: std::time::Duration,
}

impl Default for AlteredTeaser {
    fn default() -> Self {
        AlteredTeaser {
            name: "post_teaser",
            author_query: None,
            load_delay: std::time::Duration::ZERO,
        }
    }
}

impl pgfresh::Fragment for AlteredTeaser {
    type Key = i64;
    type Row = Post;
    type Variant = Teaser;
    type Error = pgfresh::tokio_postgres::Error;

    fn name(&self) -> &str {
        self.name
    }
    fn topics(&self) -> pgfresh::Topics {
        match self.author_query {
            Some(query) => pgfresh::Topics::new()
                .direct("post")
                .through("author", query),
            None => fragments::PostTeaser.topics(),
        }
    }
    async fn load(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        ids: &[i64],
    ) -> pgfresh::Loaded<Self> {
        tokio::time::sleep(self.load_delay).await;
        fragments::PostTeaser.load(db, ids).await
    }
    fn render(&self, id: &i64, post: &Post, variant: Teaser) -> maud::Markup {
        fragments::post_teaser(*id, post, variant)
    }
    async fn keys_after(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        fragments::PostTeaser.keys_after(db, after, limit).await
    }
}
