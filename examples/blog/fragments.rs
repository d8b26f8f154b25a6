//! The blog's three fragments. Each joins rows that many fragments share: a teaser shows its author's
//! name and its tags' names, a tag page its posts' authors, an author box its latest post. Topics that
//! carry the fragment's own key are `direct`; topics of shared rows reach it `through` a query.

use pgfresh::maud::{Markup, html};
use pgfresh::tokio_postgres::types::Type;
use pgfresh::tokio_postgres::{Client, Error};
use pgfresh::{CachedStatements, Fragment, Loaded, Topics, Variant};

/// Where each fragment lives in Redis: `<prefix><id>:<variant>`.
pub const POST_TEASER: &str = "blog:post_teaser:";
pub const TAG_INDEX: &str = "blog:tag_index:";
pub const AUTHOR_BOX: &str = "blog:author_box:";

/// The three fragments under their usual prefixes.
pub fn all() -> pgfresh::Fragments {
    with_prefix("")
}

/// The three fragments, their usual prefixes preceded by `prefix` (tests use one each).
pub fn with_prefix(prefix: &str) -> pgfresh::Fragments {
    pgfresh::Fragments::new()
        .with(format!("{prefix}{POST_TEASER}"), PostTeaser)
        .with(format!("{prefix}{TAG_INDEX}"), TagIndex)
        .with(format!("{prefix}{AUTHOR_BOX}"), AuthorBox)
}

pgfresh::variants! {
    /// A teaser in a list of posts, or in full on the post's page.
    pub enum Teaser { List = "list", Full = "full" }
}

pgfresh::variants! {
    /// A fragment with one variant.
    pub enum Page { Page = "page" }
}

/// `1 comment`, `0 comments`, `2 posts`.
fn count(n: i64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// Keyset pagination of `SELECT id FROM <from> ... ORDER BY id`, for the sweep.
async fn ids_after(
    db: &Client,
    from: &str,
    after: Option<&i64>,
    limit: i64,
) -> Result<Vec<i64>, Error> {
    let sql = format!(
        "SELECT id FROM {from} AND id > coalesce($1, -9223372036854775808) ORDER BY id LIMIT $2"
    );
    let rows = db
        .query_typed_cached(&sql, &[(&after, Type::INT8), (&limit, Type::INT8)])
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

// ------------------------------------------------------------------------------------------------

/// `post_teaser`: one per published post, in `list` and `full`.
pub struct PostTeaser;

/// What a teaser shows.
pub struct Post {
    pub title: String,
    pub body: String,
    pub author: String,
    /// `published_at` in UTC, `YYYY-MM-DD`.
    pub date: String,
    /// Tag names, in code-point order, then by tag id.
    pub tags: Vec<String>,
    /// Approved comments.
    pub comments: i64,
}

impl Fragment for PostTeaser {
    type Key = i64;
    type Row = Post;
    type Variant = Teaser;
    type Error = Error;

    fn name(&self) -> &str {
        "post_teaser"
    }

    fn topics(&self) -> Topics {
        Topics::new()
            .direct("post")
            .direct("comment")
            .direct("post_tag_post")
            .through(
                "author",
                "SELECT id FROM posts WHERE author_id = ANY($1) AND published_at IS NOT NULL",
            )
            .through(
                "tag",
                "SELECT post_id FROM post_tags WHERE tag_id = ANY($1)",
            )
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Loaded<Self> {
        let rows = db
            .query_typed_cached(
                r#"SELECT p.id, p.title, p.body, a.name,
                          to_char(p.published_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                          ARRAY(SELECT t.name FROM post_tags pt JOIN tags t ON t.id = pt.tag_id
                                WHERE pt.post_id = p.id ORDER BY t.name COLLATE "C", t.id),
                          (SELECT count(*) FROM comments c WHERE c.post_id = p.id AND c.approved)
                   FROM posts p JOIN authors a ON a.id = p.author_id
                   WHERE p.id = ANY($1) AND p.published_at IS NOT NULL"#,
                &[(&ids, Type::INT8_ARRAY)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let post = Post {
                    title: row.get(1),
                    body: row.get(2),
                    author: row.get(3),
                    date: row.get(4),
                    tags: row.get(5),
                    comments: row.get(6),
                };
                (row.get(0), post)
            })
            .collect())
    }

    fn render(&self, id: &i64, post: &Post, variant: Teaser) -> Markup {
        post_teaser(*id, post, variant)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        ids_after(db, "posts WHERE published_at IS NOT NULL", after, limit).await
    }

    async fn count_keys(&self, db: &Client) -> Result<Option<i64>, Error> {
        let sql = "SELECT count(*) FROM posts WHERE published_at IS NOT NULL";
        Ok(Some(db.query_one(sql, &[]).await?.get(0)))
    }
}

/// The teaser's markup.
pub fn post_teaser(id: i64, post: &Post, variant: Teaser) -> Markup {
    html! {
        article class={ "teaser " (variant.name()) } id={ "post-" (id) } {
            h2 { a href={ "/posts/" (id) } { (post.title) } }
            p class="byline" { "by " (post.author) " on " (post.date) }
            @if variant == Teaser::Full {
                div class="body" { (post.body) }
            }
            @if !post.tags.is_empty() {
                ul class="tags" { @for tag in &post.tags { li { (tag) } } }
            }
            p class="comments" { (count(post.comments, "comment")) }
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// `tag_index`: one per tag, listing its five latest published posts.
pub struct TagIndex;

/// What a tag page shows.
pub struct Tag {
    pub name: String,
    /// Published posts with this tag.
    pub posts: i64,
    /// The latest five: (post id, title, author name).
    pub latest: Vec<(i64, String, String)>,
}

impl Fragment for TagIndex {
    type Key = i64;
    type Row = Tag;
    type Variant = Page;
    type Error = Error;

    fn name(&self) -> &str {
        "tag_index"
    }

    fn topics(&self) -> Topics {
        Topics::new()
            .direct("tag")
            .direct("post_tag_tag")
            .through(
                "post",
                "SELECT tag_id FROM post_tags WHERE post_id = ANY($1)",
            )
            .through(
                "author",
                "SELECT pt.tag_id FROM post_tags pt JOIN posts p ON p.id = pt.post_id
                 WHERE p.author_id = ANY($1) AND p.published_at IS NOT NULL",
            )
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Loaded<Self> {
        let rows = db
            .query_typed_cached(
                "SELECT t.id, t.name,
                        (SELECT count(*) FROM post_tags pt JOIN posts p ON p.id = pt.post_id
                         WHERE pt.tag_id = t.id AND p.published_at IS NOT NULL),
                        coalesce(latest.ids, '{}'), coalesce(latest.titles, '{}'),
                        coalesce(latest.authors, '{}')
                 FROM tags t
                 CROSS JOIN LATERAL (
                     SELECT array_agg(l.id ORDER BY l.published_at DESC, l.id DESC) AS ids,
                            array_agg(l.title ORDER BY l.published_at DESC, l.id DESC) AS titles,
                            array_agg(l.author ORDER BY l.published_at DESC, l.id DESC) AS authors
                     FROM (SELECT p.id, p.title, a.name AS author, p.published_at
                           FROM post_tags pt JOIN posts p ON p.id = pt.post_id
                           JOIN authors a ON a.id = p.author_id
                           WHERE pt.tag_id = t.id AND p.published_at IS NOT NULL
                           ORDER BY p.published_at DESC, p.id DESC LIMIT 5) l
                 ) latest
                 WHERE t.id = ANY($1)",
                &[(&ids, Type::INT8_ARRAY)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let ids: Vec<i64> = row.get(3);
                let titles: Vec<String> = row.get(4);
                let authors: Vec<String> = row.get(5);
                let latest = ids
                    .into_iter()
                    .zip(titles)
                    .zip(authors)
                    .map(|((id, title), author)| (id, title, author))
                    .collect();
                let tag = Tag {
                    name: row.get(1),
                    posts: row.get(2),
                    latest,
                };
                (row.get(0), tag)
            })
            .collect())
    }

    fn render(&self, id: &i64, tag: &Tag, _: Page) -> Markup {
        tag_index(*id, tag)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        ids_after(db, "tags WHERE true", after, limit).await
    }
}

/// The tag page's markup.
pub fn tag_index(id: i64, tag: &Tag) -> Markup {
    html! {
        section class="tag-index" id={ "tag-" (id) } {
            h2 { (tag.name) }
            p class="count" { (count(tag.posts, "post")) }
            @if tag.posts > 0 {
                ol {
                    @for (post, title, author) in &tag.latest {
                        li { a href={ "/posts/" (post) } { (title) } " by " (author) }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// `author_box`: one per author, with their published posts' count and latest post.
pub struct AuthorBox;

/// What an author box shows.
pub struct Author {
    pub name: String,
    pub bio: String,
    /// Published posts.
    pub posts: i64,
    /// The latest: (post id, title).
    pub latest: Option<(i64, String)>,
}

impl Fragment for AuthorBox {
    type Key = i64;
    type Row = Author;
    type Variant = Page;
    type Error = Error;

    fn name(&self) -> &str {
        "author_box"
    }

    fn topics(&self) -> Topics {
        Topics::new().direct("author").direct("post_author")
    }

    async fn load(&self, db: &Client, ids: &[i64]) -> Loaded<Self> {
        let rows = db
            .query_typed_cached(
                "SELECT a.id, a.name, a.bio,
                        (SELECT count(*) FROM posts p
                         WHERE p.author_id = a.id AND p.published_at IS NOT NULL),
                        latest.id, latest.title
                 FROM authors a
                 LEFT JOIN LATERAL (
                     SELECT p.id, p.title FROM posts p
                     WHERE p.author_id = a.id AND p.published_at IS NOT NULL
                     ORDER BY p.published_at DESC, p.id DESC LIMIT 1
                 ) latest ON true
                 WHERE a.id = ANY($1)",
                &[(&ids, Type::INT8_ARRAY)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let latest_id: Option<i64> = row.get(4);
                let author = Author {
                    name: row.get(1),
                    bio: row.get(2),
                    posts: row.get(3),
                    latest: latest_id.map(|id| (id, row.get(5))),
                };
                (row.get(0), author)
            })
            .collect())
    }

    fn render(&self, id: &i64, author: &Author, _: Page) -> Markup {
        author_box(*id, author)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Error> {
        ids_after(db, "authors WHERE true", after, limit).await
    }
}

/// The author box's markup.
pub fn author_box(id: i64, author: &Author) -> Markup {
    html! {
        aside class="author" id={ "author-" (id) } {
            h3 { (author.name) }
            @if !author.bio.is_empty() {
                p class="bio" { (author.bio) }
            }
            p class="posts" {
                (count(author.posts, "post"))
                @if let (true, Some((post, title))) = (author.posts > 0, &author.latest) {
                    ", latest " a href={ "/posts/" (post) } { (title) }
                }
            }
        }
    }
}
