//! The keyword/value form of a connection string, after libpq's `conninfo_parse`.

use super::redact::is_secret;
use super::*;

pub(super) fn parse_keyword_values(text: &str) -> Result<ConnInfo, String> {
    let mut info = ConnInfo::default();
    let mut after_password = false;
    for token in Tokens::new(text) {
        let name = describe_keyword(token.keyword, after_password);
        let value = match token.kind {
            TokenKind::Pair { value, .. } => value,
            TokenKind::MissingEquals => return Err(missing_equals(&name, after_password)),
            TokenKind::Unterminated { .. } => {
                return Err(format!(
                    "unterminated quoted value for {name} in the connection string; end it with ' \
                     and write ' and \\ inside it as \\' and \\\\"
                ));
            }
        };
        if token.keyword.is_empty() {
            return Err(
                "a \"=\" without a keyword before it in the connection string; write keyword=value"
                    .to_string(),
            );
        }
        if !info.store(token.keyword, &value) {
            return Err(unknown_option(token.keyword, after_password));
        }
        after_password = is_secret(token.keyword);
    }
    info.check_ports(true)?;
    Ok(info)
}

fn missing_equals(name: &str, after_password: bool) -> String {
    if after_password {
        return format!(
            "missing \"=\" after {name} in the connection string; quote a password that contains \
             spaces: password='...'"
        );
    }
    format!(
        "missing \"=\" after {name} in the connection string; write keyword=value pairs separated \
         by spaces, or a postgres:// URL"
    )
}

pub(super) fn unknown_option(keyword: &str, after_password: bool) -> String {
    if after_password {
        return format!(
            "unknown connection option {}; quote a password that contains spaces (password='...'), \
             or in a URL write & in it as %26",
            describe_keyword(keyword, true)
        );
    }
    format!(
        "unknown connection option {}; see {KEYWORDS_DOC}",
        describe_keyword(keyword, false)
    )
}

/// How an error names a keyword: quoted only when it cannot be a piece of a password, that is
/// when it looks like a keyword and does not directly follow a password value.
pub(super) fn describe_keyword(keyword: &str, after_password: bool) -> String {
    if after_password {
        return "the word after the password".to_string();
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !keyword.is_empty() && keyword.chars().all(plain) {
        quoted(keyword)
    } else {
        "a word that is not a keyword".to_string()
    }
}

fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// One `keyword = value` of the text, or how it went wrong.
pub(super) struct Token<'a> {
    pub(super) keyword: &'a str,
    /// Byte offset of the keyword.
    pub(super) start: usize,
    pub(super) kind: TokenKind,
}

/// What follows a keyword.
pub(super) enum TokenKind {
    /// `value` unescaped; `span` covers the value as written, quotes included.
    Pair {
        value: String,
        span: Range<usize>,
    },
    MissingEquals,
    /// An opening quote at `value_start` that never closes; it runs to the end of the text.
    Unterminated {
        value_start: usize,
    },
}

/// libpq's tokenizer, which also carries on past a missing "=" so that redaction can see the rest.
pub(super) struct Tokens<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Tokens<'a> {
    pub(super) fn new(text: &'a str) -> Tokens<'a> {
        Tokens { text, pos: 0 }
    }

    pub(super) fn skip_spaces(&self, mut pos: usize) -> usize {
        let bytes = self.text.as_bytes();
        while pos < bytes.len() && is_space(bytes[pos]) {
            pos += 1;
        }
        pos
    }

    /// An unquoted value ends at whitespace; a backslash takes the next byte as it is.
    pub(super) fn unquoted(&self, start: usize) -> (TokenKind, usize) {
        let bytes = self.text.as_bytes();
        let (mut value, mut pos) = (Vec::new(), start);
        while pos < bytes.len() && !is_space(bytes[pos]) {
            if bytes[pos] == b'\\' {
                pos += 1;
            }
            if let Some(&byte) = bytes.get(pos) {
                value.push(byte);
                pos += 1;
            }
        }
        let next = if pos < bytes.len() { pos + 1 } else { pos };
        (pair(value, start..pos), next)
    }

    pub(super) fn quoted(&self, start: usize) -> (TokenKind, usize) {
        let bytes = self.text.as_bytes();
        let (mut value, mut pos) = (Vec::new(), start + 1);
        loop {
            match bytes.get(pos) {
                Some(b'\'') => return (pair(value, start..pos + 1), pos + 1),
                Some(b'\\') if pos + 1 < bytes.len() => {
                    value.push(bytes[pos + 1]);
                    pos += 2;
                }
                Some(&byte) if byte != b'\\' => {
                    value.push(byte);
                    pos += 1;
                }
                _ => return (TokenKind::Unterminated { value_start: start }, bytes.len()),
            }
        }
    }
}

fn pair(value: Vec<u8>, span: Range<usize>) -> TokenKind {
    // Only ASCII backslashes and quotes were dropped, so the bytes are still UTF-8.
    let value = String::from_utf8_lossy(&value).into_owned();
    TokenKind::Pair { value, span }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let bytes = self.text.as_bytes();
        let start = self.skip_spaces(self.pos);
        if start >= bytes.len() {
            self.pos = start;
            return None;
        }
        let mut end = start;
        while end < bytes.len() && bytes[end] != b'=' && !is_space(bytes[end]) {
            end += 1;
        }
        let keyword = &self.text[start..end];
        let equals = self.skip_spaces(end);
        if bytes.get(equals) != Some(&b'=') {
            self.pos = equals;
            return Some(Token {
                keyword,
                start,
                kind: TokenKind::MissingEquals,
            });
        }
        let value_start = self.skip_spaces(equals + 1);
        let (kind, next) = if bytes.get(value_start) == Some(&b'\'') {
            self.quoted(value_start)
        } else {
            self.unquoted(value_start)
        };
        self.pos = next;
        Some(Token {
            keyword,
            start,
            kind,
        })
    }
}
