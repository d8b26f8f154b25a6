//! `setup`: the blog's schema, sample data, pgfresh and every watch its three fragments need, all
//! idempotent.

use pgfresh::Database;
use pgfresh::tokio_postgres::Client;

/// The blog schema, exactly as documented (plus the indexes its queries use); created only where
/// missing.
pub const SCHEMA_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS authors  (id bigint PRIMARY KEY, name text NOT NULL, bio text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS posts    (id bigint PRIMARY KEY, author_id bigint NOT NULL REFERENCES authors(id),
                       title text NOT NULL, body text NOT NULL, published_at timestamptz);
CREATE TABLE IF NOT EXISTS tags     (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS post_tags (post_id bigint NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
                        tag_id  bigint NOT NULL REFERENCES tags(id)  ON DELETE CASCADE,
                        PRIMARY KEY (post_id, tag_id));
CREATE TABLE IF NOT EXISTS comments (id bigserial PRIMARY KEY, post_id bigint NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
                       author_name text NOT NULL, body text NOT NULL,
                       approved boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS posts_author_id ON posts (author_id);
CREATE INDEX IF NOT EXISTS post_tags_tag_id ON post_tags (tag_id);
CREATE INDEX IF NOT EXISTS comments_post_id ON comments (post_id);
"#;

/// The watches the three fragments need. Tables that hold a relationship are watched by the column
/// that leads to a fragment's key (both sides of a moved relationship are then queued); tables of
/// shared rows by their own key, which the fragments map with their through queries.
pub const WATCHES_SQL: &str = "
SELECT pgfresh.watch('authors', 'id', 'author');
SELECT pgfresh.watch('posts', 'id', 'post');
SELECT pgfresh.watch('posts', 'author_id', 'post_author');
SELECT pgfresh.watch('tags', 'id', 'tag');
SELECT pgfresh.watch('post_tags', 'post_id', 'post_tag_post');
SELECT pgfresh.watch('post_tags', 'tag_id', 'post_tag_tag');
SELECT pgfresh.watch('comments', 'post_id', 'comment');
";

/// What `setup` did.
pub struct SetupReport {
    /// Posts loaded now (0 when the table already had rows).
    pub loaded: i64,
    /// Posts in the table.
    pub posts: i64,
}

/// Creates the schema if missing, loads `posts` posts with their authors, tags and comments when
/// `posts` is empty, installs pgfresh and the watches.
///
/// Data is loaded before the watches exist, so a first setup does not queue a change per row: run a
/// sweep afterwards to fill Redis.
pub async fn setup(db: &Database, posts: i64) -> Result<SetupReport, pgfresh::Error> {
    let mut client = db.get().await?;
    let txn = client.transaction().await?;
    txn.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    txn.batch_execute(SCHEMA_SQL).await?;
    // One setup at a time, so two concurrent runs cannot both see an empty table.
    txn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgfresh blog setup'))",
        &[],
    )
    .await?;
    let existing: i64 = txn
        .query_one("SELECT count(*) FROM posts", &[])
        .await?
        .get(0);
    let loaded = if existing == 0 && posts > 0 {
        load_sample_data(txn.client(), posts).await?
    } else {
        0
    };
    txn.commit().await?;
    drop(client);

    pgfresh::install(db).await?;
    db.get().await?.batch_execute(WATCHES_SQL).await?;
    Ok(SetupReport {
        loaded,
        posts: existing + loaded,
    })
}

/// Tag names, mixed in case so that code-point order (`COLLATE "C"`) shows: `Zig` before `ada`.
const TAGS: [&str; 40] = [
    "rust", "postgres", "redis", "tokio", "maud", "html", "css", "http", "sql", "caching", "Zig",
    "ada", "Go", "elixir", "OCaml", "haskell", "C", "lisp", "Prolog", "forth", "web", "ops",
    "testing", "design", "Async", "memory", "latency", "queues", "triggers", "indexes", "backups",
    "security", "tls", "deploys", "metrics", "logs", "cron", "django", "python", "unix",
];

/// Inserts `n` posts over n/20 authors (at least one), 40 tags, 0-4 tags and 0-5 comments per post,
/// about one post in ten a draft, in set-based statements.
async fn load_sample_data(db: &Client, n: i64) -> Result<i64, pgfresh::Error> {
    let authors = (n / 20).max(1);
    db.execute(
        "INSERT INTO authors (id, name, bio)
         SELECT i, (ARRAY['Ada', 'Grace', 'Linus', 'Barbara', 'Ken', 'Edsger'])[1 + i % 6] || ' ' || i,
                CASE WHEN i % 3 = 0 THEN '' ELSE 'Writes about systems & <markup>, author ' || i || '.' END
         FROM generate_series(1, $1::bigint) AS i",
        &[&authors],
    )
    .await?;
    let tags: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    db.execute(
        "INSERT INTO tags (id, name) SELECT i, name FROM unnest($1::text[]) WITH ORDINALITY AS t(name, i)",
        &[&tags],
    )
    .await?;
    let inserted = db
        .execute(
            "INSERT INTO posts (id, author_id, title, body, published_at)
             SELECT i, 1 + (i * 7) % $2::bigint,
                    'Post ' || i || ': ' || (ARRAY['Caching', 'Queues', 'Triggers', 'Fresh HTML', 'Joins'])[1 + i % 5],
                    'The body of post ' || i || ', with <tags> & ampersands.',
                    CASE WHEN i % 10 = 0 THEN NULL
                         ELSE timestamptz '2026-01-01 00:00:00+00' + make_interval(hours => (i * 37 % 5000)::int) END
             FROM generate_series(1, $1::bigint) AS i",
            &[&n, &authors],
        )
        .await?;
    db.execute(
        "INSERT INTO post_tags (post_id, tag_id)
         SELECT p, 1 + (p * 3 + k * 7) % 40
         FROM generate_series(1, $1::bigint) AS p, generate_series(0, 3) AS k
         WHERE k < p % 5",
        &[&n],
    )
    .await?;
    db.execute(
        "INSERT INTO comments (post_id, author_name, body, approved, created_at)
         SELECT p, 'Reader ' || c, 'Comment ' || c || ' on post ' || p, c % 4 <> 0,
                timestamptz '2026-02-01 00:00:00+00' + make_interval(mins => (p * 6 + c)::int)
         FROM generate_series(1, $1::bigint) AS p, generate_series(1, 5) AS c
         WHERE c <= (p * 7) % 6",
        &[&n],
    )
    .await?;
    Ok(inserted as i64)
}
