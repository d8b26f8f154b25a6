//! How a fragment's entries are stored in Redis: under which key, as which bytes, for how long.
//!
//! `plain` (the default) stores the HTML as it is, at the fragment key (`shop:product_card:42:full`).
//! `django` stores it the way a Django site's own cache would, so that `cache.get(key)` in the site
//! returns it: at Django's default key, `<KEY_PREFIX>:<VERSION>:<key>` (`:1:shop:product_card:42:full`
//! with Django's defaults), as a pickled `SafeString` (what `render_to_string` returns, and what
//! Django's `cache.set` of it stores), which both `django.core.cache.backends.redis.RedisCache` and
//! `django_redis.cache.RedisCache` unpickle.
//!
//! Why `SafeString` and not a plain `str`: a template tag that returns what `cache.get` gave it is
//! escaped by Django unless that value is marked safe. Django's own `cache.set` of a rendered template
//! stores a `SafeString`, so a site's tag works unchanged only with one.

use std::fmt;
use std::time::Duration;

/// How a fragment's entries are kept in Redis: [`Storage::plain`] (the default) or
/// [`Storage::django`], each optionally with a TTL.
///
/// ```
/// use pgfresh::Storage;
/// let django = Storage::django("", 1);
/// assert_eq!(django.redis_key("shop:product_card:42:full"), ":1:shop:product_card:42:full");
/// let stored = django.encode("<p>Tea</p>".to_string());
/// assert_eq!(django.decode(&stored).as_deref(), Some("<p>Tea</p>"));
/// assert_eq!(Storage::plain().encode("<p>Tea</p>".into()), b"<p>Tea</p>");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Storage {
    format: Format,
    ttl: Option<Duration>,
}

/// The formats a [`Storage`] writes. Made with [`Storage::plain`] and [`Storage::django`]; more may
/// come.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// The HTML as UTF-8 at the fragment key itself.
    #[default]
    Plain,
    /// As Django's cache with its default key function: at `<key_prefix>:<version>:<fragment key>`, a
    /// pickled `django.utils.safestring.SafeString`.
    #[non_exhaustive]
    Django {
        /// Django's `KEY_PREFIX` setting of the cache (Django's default: empty).
        key_prefix: String,
        /// Django's `VERSION` setting of the cache (Django's default: 1).
        version: i64,
    },
}

/// The pickle (protocol 2) of `SafeString(html)`: the class, then the text as a one-element tuple
/// passed to `SafeString.__new__`.
const PICKLE_HEAD: &[u8] = b"\x80\x02cdjango.utils.safestring\nSafeString\nX";
/// After the text: TUPLE1, NEWOBJ, STOP.
const PICKLE_TAIL: &[u8] = b"\x85\x81.";

impl Storage {
    /// The HTML as it is, at the fragment key.
    pub fn plain() -> Self {
        Self::default()
    }

    /// Django's cache format, for a cache whose `KEY_PREFIX` and `VERSION` are these (Django's
    /// defaults are `""` and `1`).
    pub fn django(key_prefix: impl Into<String>, version: i64) -> Self {
        Self {
            format: Format::Django {
                key_prefix: key_prefix.into(),
                version,
            },
            ttl: None,
        }
    }

    /// The longest TTL: 366 days.
    pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

    /// Entries expire this long after each write (at most [`Storage::MAX_TTL`], which a longer one
    /// is cut to). Only a guard: an expired entry is missing until its rows change or the next sweep.
    /// Sub-millisecond parts are dropped; zero means no TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = (ttl.as_millis() > 0).then_some(ttl.min(Self::MAX_TTL));
        self
    }

    /// The format.
    pub fn format(&self) -> &Format {
        &self.format
    }

    /// The TTL given with [`Storage::with_ttl`], if any.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Where the entry of `key` in `variant`, of a fragment registered under `key_prefix`, lives in
    /// Redis: `shop:product_card:42:full` in the plain format, `:1:shop:product_card:42:full` in
    /// Django's with its defaults. What a site reads, spelled the one way pgfresh writes it.
    ///
    /// ```
    /// # pgfresh::variants! { enum Card { Compact = "compact", Full = "full" } }
    /// use pgfresh::Storage;
    /// let plain = Storage::plain().entry_key("shop:product_card:", 42, Card::Full);
    /// assert_eq!(plain, "shop:product_card:42:full");
    /// let django = Storage::django("", 1).entry_key("shop:product_card:", 42, Card::Full);
    /// assert_eq!(django, ":1:shop:product_card:42:full");
    /// ```
    pub fn entry_key(
        &self,
        key_prefix: &str,
        key: impl std::fmt::Display,
        variant: impl crate::Variant,
    ) -> String {
        self.redis_key(&format!("{key_prefix}{key}:{}", variant.name()))
    }

    /// The Redis key of the entry with this fragment key (`<prefix><key>:<variant>`).
    pub fn redis_key(&self, key: &str) -> String {
        match &self.format {
            Format::Plain => key.to_string(),
            Format::Django {
                key_prefix,
                version,
            } => format!("{key_prefix}:{version}:{key}"),
        }
    }

    /// The bytes stored for this HTML.
    pub fn encode(&self, html: String) -> Vec<u8> {
        match self.format {
            Format::Plain => html.into_bytes(),
            Format::Django { .. } => {
                let text = html.as_bytes();
                let length = u32::try_from(text.len()).expect("a fragment under 4 GiB");
                let mut pickle =
                    Vec::with_capacity(PICKLE_HEAD.len() + 4 + text.len() + PICKLE_TAIL.len());
                pickle.extend_from_slice(PICKLE_HEAD);
                pickle.extend_from_slice(&length.to_le_bytes());
                pickle.extend_from_slice(text);
                pickle.extend_from_slice(PICKLE_TAIL);
                pickle
            }
        }
    }

    /// The HTML in bytes this storage wrote, or `None` if they are not in its format (in `django`,
    /// a pickled `SafeString` as [`Storage::encode`] writes it; not every pickle).
    pub fn decode(&self, stored: &[u8]) -> Option<String> {
        match self.format {
            Format::Plain => String::from_utf8(stored.to_vec()).ok(),
            Format::Django { .. } => {
                let body = stored.strip_prefix(PICKLE_HEAD)?;
                let (length, rest) = body.split_first_chunk::<4>()?;
                let text = rest.strip_suffix(PICKLE_TAIL)?;
                (text.len() == u32::from_le_bytes(*length) as usize)
                    .then(|| String::from_utf8(text.to_vec()).ok())
                    .flatten()
            }
        }
    }
}

/// `plain`, or `django (KEY_PREFIX "", VERSION 1)`, then `, TTL 1h 1m 40s` if there is one.
impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.format {
            Format::Plain => write!(f, "plain")?,
            Format::Django {
                key_prefix,
                version,
            } => write!(f, "django (KEY_PREFIX {key_prefix:?}, VERSION {version})")?,
        }
        if let Some(ttl) = self.ttl {
            write!(f, ", TTL {}", humantime::format_duration(ttl))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn django_keys_follow_djangos_default_key_function() {
        // django.core.cache.backends.base.default_key_func: "%s:%s:%s" % (key_prefix, version, key)
        assert_eq!(
            Storage::django("", 1).redis_key("shop:product_card:42:full"),
            ":1:shop:product_card:42:full"
        );
        assert_eq!(Storage::django("site", 7).redis_key("a:b"), "site:7:a:b");
        assert_eq!(Storage::plain().redis_key("a:b"), "a:b");
    }

    #[test]
    fn the_django_value_is_a_protocol_2_pickle_of_a_safestring() {
        // What Python prints for the same bytes: pickletools.dis shows PROTO 2, GLOBAL
        // 'django.utils.safestring SafeString', BINUNICODE 'é<', TUPLE1, NEWOBJ, STOP.
        let stored = Storage::django("", 1).encode("é<".into());
        let mut expected =
            b"\x80\x02cdjango.utils.safestring\nSafeString\nX\x03\x00\x00\x00".to_vec();
        expected.extend_from_slice("é<".as_bytes());
        expected.extend_from_slice(b"\x85\x81.");
        assert_eq!(stored, expected);
    }

    #[test]
    fn decode_reads_back_what_encode_wrote_and_nothing_else() {
        let django = Storage::django("", 1);
        for html in ["", "42", "<a href=\"x\">Tom & 'Jerry'</a>", "ünïcødé ✓"] {
            assert_eq!(
                django.decode(&django.encode(html.into())).as_deref(),
                Some(html)
            );
        }
        assert_eq!(django.decode(b"<p>plain</p>"), None);
        assert_eq!(
            django.decode(b"\x80\x02X\x09\x00\x00\x00hi."),
            None,
            "wrong length"
        );
        assert_eq!(
            Storage::plain().decode(b"<p>x</p>").as_deref(),
            Some("<p>x</p>")
        );
    }

    #[test]
    fn a_zero_ttl_is_no_ttl_and_the_storage_says_what_it_is() {
        assert_eq!(Storage::plain().with_ttl(Duration::ZERO).ttl(), None);
        let storage = Storage::django("", 1).with_ttl(Duration::from_secs(3700));
        assert_eq!(
            storage.to_string(),
            "django (KEY_PREFIX \"\", VERSION 1), TTL 1h 1m 40s"
        );
        assert_eq!(Storage::plain().to_string(), "plain");
    }
}
