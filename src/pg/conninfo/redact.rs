//! Redacting a connection string that did not parse: every reading of it hides what it takes for
//! a secret.

use super::keywords::{Token, TokenKind, Tokens};
use super::url::decode_leniently;
use super::*;

/// `text` with every password replaced by `***`, for an error about a string that did not parse.
/// Several readings each mark what they take for a secret, and everything any of them marks is
/// hidden: hiding too much is harmless here, showing a piece of a password is not.
pub(crate) fn redact_unparsed(text: &str) -> String {
    let mut hidden = Vec::new();
    if !URL_PREFIXES.iter().any(|prefix| text.starts_with(prefix)) {
        hidden.extend(keyword_value_secrets(text));
    }
    // Also inside keyword/value text: a mistyped scheme or a URL given as a value.
    for (scheme_end, _) in text.match_indices("://") {
        hidden.extend(url_secrets(text, scheme_end + 3));
    }
    hide(text, hidden)
}

fn is_keyword(keyword: &str) -> bool {
    KEYWORDS.contains(&keyword) || keyword == "requiressl"
}

/// libpq's `password`, and `sslpassword`, which unlocks the client key.
pub(super) fn is_secret(keyword: &str) -> bool {
    keyword.eq_ignore_ascii_case("password") || keyword.eq_ignore_ascii_case("sslpassword")
}

type Hidden = (Range<usize>, &'static str);

/// From after `://` to the last `@` (wherever a password with "/", "?" or "@" ends), and every
/// `password=` query value.
fn url_secrets(text: &str, body: usize) -> Vec<Hidden> {
    let mut hidden = Vec::new();
    if let Some(at) = text.rfind('@').filter(|&at| at > body) {
        hidden.push((body..at, "***"));
    }
    let separators = text[body..]
        .match_indices(['?', '&'])
        .map(|(i, _)| body + i + 1);
    for key_start in separators {
        let key_end = key_start
            + text[key_start..]
                .find(['=', '&'])
                .unwrap_or(text.len() - key_start);
        let key = decode_leniently(&text[key_start..key_end]);
        if text[key_end..].starts_with('=') && is_secret(key.trim()) {
            hidden.push((key_end + 1..query_value_end(text, key_end + 1), "***"));
        }
    }
    hidden
}

/// A query value runs to the next `&` that starts a known `keyword=`, so that an unencoded `&`
/// inside a password does not cut it short.
fn query_value_end(text: &str, start: usize) -> usize {
    let starts_known_pair = |amp: usize| {
        let next = &text[amp + 1..];
        let key_end = next.find(['=', '&']).unwrap_or(next.len());
        let key = decode_leniently(&next[..key_end]);
        let key = key.trim();
        next[key_end..].starts_with('=') && (is_keyword(key) || key == "ssl")
    };
    text[start..]
        .match_indices('&')
        .map(|(i, _)| start + i)
        .find(|&amp| starts_known_pair(amp))
        .unwrap_or(text.len())
}

/// Every value that follows the word "password" (in any case, even inside another value, where a
/// stray quote may have put it) as libpq would tokenize it. Once the text stops making sense at or
/// after such a word, everything from it on goes, since any of it may be the password.
fn keyword_value_secrets(text: &str) -> Vec<Hidden> {
    let tokens: Vec<Token> = Tokens::new(text).collect();
    let broken_after = |pos: usize| {
        tokens.iter().any(|token| match token.kind {
            // libpq rejects an unknown keyword, which may be a piece of the password.
            TokenKind::Pair { .. } => token.start >= pos && !is_keyword(token.keyword),
            TokenKind::MissingEquals => token.start >= pos,
            TokenKind::Unterminated { .. } => true,
        })
    };
    let mut hidden: Vec<Hidden> = tokens
        .iter()
        .filter_map(|token| match token.kind {
            // An unclosed quote may have swallowed a password.
            TokenKind::Unterminated { value_start } => Some((value_start..text.len(), "***")),
            _ => None,
        })
        .collect();
    for (pos, _) in text.to_ascii_lowercase().match_indices("password") {
        if broken_after(pos) {
            hidden.push((pos..text.len(), "password=***"));
            break;
        }
        hidden.push((value_after(text, pos + "password".len()), "***"));
    }
    hidden
}

/// Where the value after a keyword ending at `end` lies, `=` or not.
fn value_after(text: &str, end: usize) -> Range<usize> {
    let tokens = Tokens::new(text);
    let mut start = tokens.skip_spaces(end);
    if text[start..].starts_with('=') {
        start = tokens.skip_spaces(start + 1);
    }
    let (kind, _) = if text[start..].starts_with('\'') {
        tokens.quoted(start)
    } else {
        tokens.unquoted(start)
    };
    match kind {
        TokenKind::Pair { span, .. } => span,
        _ => start..text.len(),
    }
}

/// Replaces each range with its replacement; overlapping ranges merge into one `***`.
fn hide(text: &str, mut hidden: Vec<Hidden>) -> String {
    hidden.sort_by_key(|(range, _)| range.start);
    let mut merged: Vec<Hidden> = Vec::new();
    for (range, replacement) in hidden {
        match merged.last_mut() {
            Some((last, last_replacement)) if range.start <= last.end => {
                if range.end > last.end {
                    last.end = range.end;
                    *last_replacement = "***";
                }
            }
            _ => merged.push((range, replacement)),
        }
    }
    let mut shown = String::new();
    let mut copied = 0;
    for (range, replacement) in merged {
        shown.push_str(&text[copied..range.start]);
        shown.push_str(replacement);
        copied = range.end;
    }
    shown.push_str(&text[copied..]);
    shown
}
