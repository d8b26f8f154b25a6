//! A PostgreSQL connection string read exactly the way libpq reads it, into keyword/value pairs.
//!
//! Cutting the string up with ad-hoc searches leaked passwords into logs, turned TLS off for
//! `sslmode = require` and ignored libpq's environment variables and `~/.pgpass`. Everything that
//! shows, secures or hands on the connection settings now reads them from one [`ConnInfo`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// libpq's keywords (`requiressl` is translated on the way in, as libpq does).
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslkeylogfile",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

/// The environment variables libpq falls back on, keyword first.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("load_balance_hosts", "PGLOADBALANCEHOSTS"),
    ("sslnegotiation", "PGSSLNEGOTIATION"),
];

const URL_PREFIXES: &[&str] = &["postgresql://", "postgres://"];

const KEYWORDS_DOC: &str =
    "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS";

/// Given instead of any detail whenever a URL's user name or password cannot be told apart from
/// the rest, because then any detail could be a piece of the password.
const ENCODE_HINT: &str = "the URL's user name or password seems to contain \"/\", \"?\", \"#\" \
    or \"@\": write them percent-encoded as %2F, %3F, %23 and %40 (and any later \"@\" as %40)";

/// Connection settings as keyword/value pairs, in the order first given.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnInfo {
    params: Vec<(String, String)>,
}

/// Only the password-free form, so that `{:?}` in a log line cannot leak it.
impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnInfo").field(&self.shown()).finish()
    }
}

impl ConnInfo {
    /// Reads a `postgres://` URL or a libpq keyword/value string.
    pub(crate) fn parse(text: &str) -> Result<ConnInfo, String> {
        match URL_PREFIXES.iter().find(|prefix| text.starts_with(*prefix)) {
            Some(prefix) => parse_url(&text[prefix.len()..]),
            None => parse_keyword_values(text),
        }
    }

    /// The value of `keyword`, if given.
    pub(crate) fn get(&self, keyword: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `keyword`, replacing an earlier value in its place.
    pub(crate) fn set(&mut self, keyword: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == keyword) {
            Some((_, old)) => *old = value.to_string(),
            None => self.params.push((keyword.to_string(), value.to_string())),
        }
    }

    /// The keywords given, in order.
    pub(crate) fn keywords(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(keyword, _)| keyword.as_str())
    }

    /// Fills keywords the string left out from libpq's environment variables; `var` looks one up,
    /// so that the library never reads the process environment itself.
    pub(crate) fn with_environment(mut self, var: impl Fn(&str) -> Option<String>) -> ConnInfo {
        for (keyword, name) in ENVIRONMENT {
            if self.get(keyword).is_none()
                && let Some(value) = var(name).filter(|value| !value.is_empty())
            {
                self.set(keyword, &value);
            }
        }
        self
    }

    /// pgfresh's documented defaults. An empty value counts as absent, as libpq treats it at
    /// connect time.
    pub(crate) fn with_defaults(mut self) -> ConnInfo {
        // With only `hostaddr` libpq connects there; a default host would add a second server.
        if self.get("hostaddr").is_none_or(str::is_empty) {
            self.set_if_absent("host", "127.0.0.1");
        }
        self.set_if_absent("port", "5432");
        self.set_if_absent("user", "postgres");
        let user = self.get("user").unwrap_or_default().to_string();
        self.set_if_absent("dbname", &user);
        self
    }

    fn set_if_absent(&mut self, keyword: &str, value: &str) {
        if self.get(keyword).is_none_or(str::is_empty) {
            self.set(keyword, value);
        }
    }

    /// The password `passfile` (or `<home>/.pgpass`) holds for the first host, as libpq finds it.
    /// `Err` means the file exists but is ignored; the caller warns and goes on without it.
    pub(crate) fn password_from_file(&self, home: Option<&Path>) -> Result<Option<String>, String> {
        let path = match (self.get("passfile").filter(|p| !p.is_empty()), home) {
            (Some(passfile), _) => PathBuf::from(passfile),
            (None, Some(home)) => home.join(".pgpass"),
            (None, None) => return Ok(None),
        };
        let Some(text) = read_private_file(&path)? else {
            return Ok(None);
        };
        let key = self.pass_file_key();
        let found = text
            .lines()
            .map(|line| line.trim_end_matches(['\r', '\n']))
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .find_map(|line| password_in_line(line, &key));
        // libpq stops at the first matching line even when its password is empty.
        Ok(found.filter(|password| !password.is_empty()))
    }

    fn pass_file_key(&self) -> PassFileKey<'_> {
        let first = |keyword| self.get(keyword).and_then(|v| v.split(',').next());
        let host = first("host")
            .filter(|h| !h.is_empty())
            .or_else(|| first("hostaddr").filter(|h| !h.is_empty()))
            .unwrap_or("localhost");
        let mut hosts = vec![host];
        // libpq only knows its compiled-in socket directory; any directory is the local server.
        if host.starts_with(['/', '@']) {
            hosts.push("localhost");
        }
        let user = self.get("user").unwrap_or_default();
        PassFileKey {
            hosts,
            port: first("port").filter(|p| !p.is_empty()).unwrap_or("5432"),
            dbname: self.get("dbname").filter(|d| !d.is_empty()).unwrap_or(user),
            user,
        }
    }

    /// A URL safe to print: user, hosts, ports, database and `sslmode`, never the password.
    pub(crate) fn shown(&self) -> String {
        let mut shown = String::from("postgres://");
        if let Some(user) = self.get("user").filter(|u| !u.is_empty()) {
            shown.push_str(&percent_encode(user, ""));
            shown.push('@');
        }
        shown.push_str(&self.shown_hosts());
        if let Some(dbname) = self.get("dbname").filter(|d| !d.is_empty()) {
            shown.push('/');
            shown.push_str(&percent_encode(dbname, ""));
        }
        if let Some(mode) = self.get("sslmode") {
            shown.push_str("?sslmode=");
            shown.push_str(&percent_encode(mode, ""));
        }
        shown
    }

    fn shown_hosts(&self) -> String {
        let hosts = self.get("host").or(self.get("hostaddr")).unwrap_or("");
        let ports: Vec<&str> = self.get("port").unwrap_or("").split(',').collect();
        let shown: Vec<String> = hosts
            .split(',')
            .enumerate()
            .map(|(i, host)| {
                // One port applies to every host, as in libpq.
                let port = if ports.len() == 1 {
                    ports[0]
                } else {
                    ports.get(i).copied().unwrap_or("")
                };
                let mut shown = shown_host(host);
                if !port.is_empty() {
                    shown.push(':');
                    shown.push_str(&percent_encode(port, ""));
                }
                shown
            })
            .collect();
        shown.join(",")
    }

    /// The pairs as a keyword/value string for `tokio_postgres::Config::from_str`, leaving out
    /// `skip` (settings the caller applies itself). Every value is quoted, so none can end early.
    pub(crate) fn to_tokio_postgres(&self, skip: &[&str]) -> String {
        let pairs: Vec<String> = self
            .params
            .iter()
            .filter(|(keyword, _)| !skip.contains(&keyword.as_str()))
            .map(|(keyword, value)| {
                format!("{}='{}'", tokio_postgres_keyword(keyword), quote(value))
            })
            .collect();
        pairs.join(" ")
    }

    /// Stores a pair if libpq knows the keyword.
    fn store(&mut self, keyword: &str, value: &str) -> bool {
        if keyword == "requiressl" {
            let mode = if value.starts_with('1') {
                "require"
            } else {
                "prefer"
            };
            self.set("sslmode", mode);
            return true;
        }
        if !KEYWORDS.contains(&keyword) {
            return false;
        }
        self.set(keyword, value);
        true
    }

    /// `name_ports` is false when a bad port could be a password typed without `@host`.
    fn check_ports(&self, name_ports: bool) -> Result<(), String> {
        let ports = self.get("port").unwrap_or_default();
        let bad = ports
            .split(',')
            .find(|port| !port.is_empty() && !is_port(port));
        match bad {
            None => Ok(()),
            Some(port) if name_ports => Err(format!(
                "invalid port {}; a port is a number from 1 to 65535",
                quoted(port)
            )),
            Some(_) => Err(
                "invalid port in the URL; a port is a number from 1 to 65535 \
                (if what comes before it is user:password, add @host after it)"
                    .to_string(),
            ),
        }
    }
}

/// tokio-postgres spells libpq's `keepalives_count` differently.
fn tokio_postgres_keyword(keyword: &str) -> &str {
    match keyword {
        "keepalives_count" => "keepalives_retries",
        other => other,
    }
}

fn quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

fn is_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.escape_debug())
}

fn shown_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{}]", percent_encode(host, ":"))
    } else {
        percent_encode(host, "")
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `keep`.
fn percent_encode(text: &str, keep: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric()
            || b"-._~".contains(&byte)
            || keep.as_bytes().contains(&byte)
        {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

// ---------------------------------------------------------------------------------------------
// URL form, after libpq's conninfo_uri_parse_options.

fn parse_url(rest: &str) -> Result<ConnInfo, String> {
    // libpq ends the user info only at "/"; RFC 3986 and pgfresh also end it at "?".
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hostspec) = match authority.split_once('@') {
        Some((userinfo, hostspec)) => (Some(userinfo), hostspec),
        None => (None, authority),
    };
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    // Any "@" but the one ending the user info means a password may have been cut short, and
    // then every other part may hold a piece of it.
    let bare_ats = rest.matches('@').count();
    if bare_ats > 1 || (bare_ats == 1 && userinfo.is_none()) {
        return Err(ENCODE_HINT.to_string());
    }
    let mut info = ConnInfo::default();
    if let Some(userinfo) = userinfo {
        info.parse_userinfo(userinfo)?;
    }
    info.parse_hostspec(hostspec)?;
    info.check_ports(userinfo.is_some())?;
    if let Some(dbname) = path.strip_prefix('/').filter(|d| !d.is_empty()) {
        let dbname =
            decode(dbname).map_err(|e| e.in_part(&format!("database name {}", quoted(dbname))))?;
        info.set("dbname", &dbname);
    }
    if let Some(query) = query {
        info.parse_query(query)?;
        // A port from the query is a value of its own, so it can be named.
        info.check_ports(true)?;
    }
    Ok(info)
}

impl ConnInfo {
    fn parse_userinfo(&mut self, userinfo: &str) -> Result<(), String> {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        let secret = |e: DecodeError| e.in_part("user name or password");
        if !user.is_empty() {
            self.set("user", &decode(user).map_err(secret)?);
        }
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            self.set("password", &decode(password).map_err(secret)?);
        }
        Ok(())
    }

    /// `host[:port]` entries separated by commas; hosts and ports are joined into comma-separated
    /// lists and decoded as a whole, as libpq does, empty entries included.
    fn parse_hostspec(&mut self, hostspec: &str) -> Result<(), String> {
        let (mut hosts, mut ports) = (String::new(), String::new());
        let mut rest = hostspec;
        loop {
            let (host, after) = split_host(rest)?;
            hosts.push_str(host);
            let after = match after.strip_prefix(':') {
                Some(port) => {
                    let end = port.find(',').unwrap_or(port.len());
                    ports.push_str(&port[..end]);
                    &port[end..]
                }
                None => after,
            };
            match after.strip_prefix(',') {
                Some(next) => {
                    hosts.push(',');
                    ports.push(',');
                    rest = next;
                }
                None => break,
            }
        }
        if !hosts.is_empty() {
            let decoded =
                decode(&hosts).map_err(|e| e.in_part(&format!("host list {}", quoted(&hosts))))?;
            self.set("host", &decoded);
        }
        if !ports.is_empty() {
            self.set("port", &decode(&ports).map_err(|e| e.in_part("port list"))?);
        }
        Ok(())
    }

    fn parse_query(&mut self, query: &str) -> Result<(), String> {
        let segments: Vec<&str> = query.split('&').collect();
        let mut after_password = false;
        for (i, segment) in segments.iter().enumerate() {
            // A trailing "&" ends the list, as in libpq; an empty pair elsewhere is an error.
            if segment.is_empty() && i + 1 == segments.len() {
                break;
            }
            let (key, value) = segment.split_once('=').ok_or(
                "a query parameter in the URL has no \"=\"; write key=value pairs separated by &, \
                 and an & inside a value as %26",
            )?;
            let name = describe_keyword(key, after_password);
            if value.contains('=') {
                return Err(format!(
                    "query parameter {name} in the URL has a second \"=\"; write = inside a value as %3D"
                ));
            }
            let key = decode(key).map_err(|e| e.in_part("query parameter name"))?;
            let value = decode(value).map_err(|e| e.in_part(&format!("value of {name}")))?;
            let (key, value) = match (key.as_str(), value.as_str()) {
                // libpq's concession to JDBC URLs.
                ("ssl", "true") => ("sslmode".to_string(), "require".to_string()),
                _ => (key, value),
            };
            if !self.store(&key, &value) {
                return Err(unknown_option(&key, after_password));
            }
            after_password = is_secret(&key);
        }
        Ok(())
    }
}

/// The next host of a host list (an IPv6 literal without its brackets) and what follows it.
fn split_host(rest: &str) -> Result<(&str, &str), String> {
    let Some(bracketed) = rest.strip_prefix('[') else {
        return Ok(rest.split_at(rest.find([':', ',']).unwrap_or(rest.len())));
    };
    let close = bracketed.find(']').ok_or(
        "the URL has a \"[\" without a matching \"]\"; write an IPv6 address as [::1] or [::1]:5432",
    )?;
    if close == 0 {
        return Err(
            "the URL has an empty IPv6 address \"[]\"; put an address between the brackets"
                .to_string(),
        );
    }
    let (host, after) = (&bracketed[..close], &bracketed[close + 1..]);
    if !after.is_empty() && !after.starts_with([':', ',']) {
        return Err(format!(
            "unexpected text after the IPv6 address {} in the URL; follow it with :port, a comma, \
             / or ?",
            quoted(host)
        ));
    }
    Ok((host, after))
}

enum DecodeError {
    BadEscape,
    Zero,
    Spaces,
    NotUtf8,
}

impl DecodeError {
    /// `part` names what is wrong; it quotes the text only where that cannot hold a password.
    fn in_part(self, part: &str) -> String {
        let problem = match self {
            DecodeError::BadEscape => "a malformed percent-escape; write a % as %25",
            DecodeError::Zero => "%00, which is not allowed",
            DecodeError::Spaces => "a space; write it as %20",
            DecodeError::NotUtf8 => "percent-escapes that are not UTF-8",
        };
        format!("the {part} in the URL has {problem}")
    }
}

/// libpq's conninfo_uri_decode: surrounding spaces are dropped, inner ones are an error.
fn decode(text: &str) -> Result<String, DecodeError> {
    let trimmed = text.trim_matches(' ');
    if trimmed.contains(' ') {
        return Err(DecodeError::Spaces);
    }
    let bytes = trimmed.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let byte = hex_byte(bytes.get(i + 1..i + 3)).ok_or(DecodeError::BadEscape)?;
        if byte == 0 {
            return Err(DecodeError::Zero);
        }
        decoded.push(byte);
        i += 3;
    }
    String::from_utf8(decoded).map_err(|_| DecodeError::NotUtf8)
}

fn hex_byte(digits: Option<&[u8]>) -> Option<u8> {
    let digits = std::str::from_utf8(digits?).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(digits, 16).ok()
}

/// Decodes what can be decoded and keeps the rest, for redaction, which must not fail.
fn decode_leniently(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex_byte(bytes.get(i + 1..i + 3))) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Keyword/value form, after libpq's conninfo_parse.

fn parse_keyword_values(text: &str) -> Result<ConnInfo, String> {
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

fn unknown_option(keyword: &str, after_password: bool) -> String {
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
fn describe_keyword(keyword: &str, after_password: bool) -> String {
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

struct Token<'a> {
    keyword: &'a str,
    /// Byte offset of the keyword.
    start: usize,
    kind: TokenKind,
}

enum TokenKind {
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
struct Tokens<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a str) -> Tokens<'a> {
        Tokens { text, pos: 0 }
    }

    fn skip_spaces(&self, mut pos: usize) -> usize {
        let bytes = self.text.as_bytes();
        while pos < bytes.len() && is_space(bytes[pos]) {
            pos += 1;
        }
        pos
    }

    /// An unquoted value ends at whitespace; a backslash takes the next byte as it is.
    fn unquoted(&self, start: usize) -> (TokenKind, usize) {
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

    fn quoted(&self, start: usize) -> (TokenKind, usize) {
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

// ---------------------------------------------------------------------------------------------
// Redacting text that did not parse.

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
fn is_secret(keyword: &str) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Password file, after libpq's passwordFromFile.

struct PassFileKey<'a> {
    /// The first host, and `localhost` as well when it is a socket directory.
    hosts: Vec<&'a str>,
    port: &'a str,
    dbname: &'a str,
    user: &'a str,
}

/// The file's text, `None` when it does not exist; `Err` when libpq would ignore it.
fn read_private_file(path: &Path) -> Result<Option<String>, String> {
    let shown = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read password file {shown}: {e}; it is ignored"
            ));
        }
    };
    if !metadata.is_file() {
        return Err(format!(
            "password file {shown} is not a plain file, so it is ignored; point passfile or PGPASSFILE at a file"
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "password file {shown} is ignored because group or others can access it; run chmod 0600 {shown}"
            ));
        }
    }
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| format!("cannot read password file {shown}: {e}; it is ignored"))
}

/// The password of a `hostname:port:database:username:password` line that matches `key`.
fn password_in_line(line: &str, key: &PassFileKey) -> Option<String> {
    let fields = pass_file_fields(line);
    if fields.len() < 5 {
        return None;
    }
    let matches = |i: usize, wanted: &[&str]| {
        let (value, wildcard) = &fields[i];
        *wildcard || wanted.contains(&value.as_str())
    };
    let all = matches(0, &key.hosts)
        && matches(1, &[key.port])
        && matches(2, &[key.dbname])
        && matches(3, &[key.user]);
    all.then(|| fields[4].0.clone())
}

/// Fields split at unescaped colons, unescaped, each with whether it was a bare `*`.
fn pass_file_fields(line: &str) -> Vec<(String, bool)> {
    let mut fields = Vec::new();
    let (mut field, mut raw) = (String::new(), String::new());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' => {
                fields.push((std::mem::take(&mut field), raw == "*"));
                raw.clear();
            }
            '\\' => {
                raw.push(c);
                // A backslash at the end of the line stays, as in libpq.
                let escaped = chars.next().unwrap_or('\\');
                raw.push(escaped);
                field.push(escaped);
            }
            _ => {
                raw.push(c);
                field.push(c);
            }
        }
    }
    fields.push((field, raw == "*"));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::str::FromStr;

    fn parsed(text: &str) -> ConnInfo {
        ConnInfo::parse(text).unwrap_or_else(|e| panic!("{text:?} did not parse: {e}"))
    }

    fn error(text: &str) -> String {
        match ConnInfo::parse(text) {
            Ok(info) => panic!("{text:?} parsed as {:?}", info.params),
            Err(e) => e,
        }
    }

    fn pairs(info: &ConnInfo) -> Vec<(&str, &str)> {
        info.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn environment(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn a_full_url_yields_each_part() {
        let info = parsed("postgresql://bob:s3cret@db.example:6543/app?application_name=fresh");
        assert_eq!(
            pairs(&info),
            [
                ("user", "bob"),
                ("password", "s3cret"),
                ("host", "db.example"),
                ("port", "6543"),
                ("dbname", "app"),
                ("application_name", "fresh"),
            ]
        );
    }

    #[test]
    fn a_url_may_leave_out_every_part() {
        assert_eq!(pairs(&parsed("postgres://")), []);
        assert_eq!(pairs(&parsed("postgres://db")), [("host", "db")]);
        assert_eq!(pairs(&parsed("postgres://bob@")), [("user", "bob")]);
        assert_eq!(pairs(&parsed("postgres:///app")), [("dbname", "app")]);
        assert_eq!(
            pairs(&parsed("postgres://?sslmode=require")),
            [("sslmode", "require")]
        );
        assert_eq!(pairs(&parsed("postgres://db/?")), [("host", "db")]);
    }

    #[test]
    fn ipv6_hosts_are_written_in_brackets() {
        let info = parsed("postgres://[::1]:5433/app");
        assert_eq!(info.get("host"), Some("::1"));
        assert_eq!(info.get("port"), Some("5433"));
        let info = parsed("postgres://[fe80::1%25eth0],[::2]:6000");
        assert_eq!(info.get("host"), Some("fe80::1%eth0,::2"));
        assert_eq!(info.get("port"), Some(",6000"));
    }

    #[test]
    fn broken_ipv6_brackets_are_errors() {
        assert!(error("postgres://[::1/app").contains("without a matching"));
        assert!(error("postgres://[]:5432").contains("empty IPv6"));
        assert!(error("postgres://[::1]x/app").contains("after the IPv6 address"));
    }

    #[test]
    fn several_hosts_become_lists_with_empty_entries_kept() {
        let info = parsed("postgres://host1,host2:5433/app");
        assert_eq!(info.get("host"), Some("host1,host2"));
        assert_eq!(info.get("port"), Some(",5433"));
        let info = parsed("postgres://a:1,b:2,c:3");
        assert_eq!(info.get("host"), Some("a,b,c"));
        assert_eq!(info.get("port"), Some("1,2,3"));
        assert_eq!(parsed("postgres://a,b").get("port"), Some(","));
    }

    #[test]
    fn every_url_part_is_percent_decoded() {
        let info = parsed(
            "postgres://b%40b:p%2Fa%3Fs%23s%40@%2Fvar%2Frun%2Fpostgresql/my%20db?options=-c%20x%3Dy",
        );
        assert_eq!(info.get("user"), Some("b@b"));
        assert_eq!(info.get("password"), Some("p/a?s#s@"));
        assert_eq!(info.get("host"), Some("/var/run/postgresql"));
        assert_eq!(info.get("dbname"), Some("my db"));
        assert_eq!(info.get("options"), Some("-c x=y"));
    }

    #[test]
    fn a_malformed_percent_escape_is_an_error() {
        assert!(error("postgres://db/app%zz").contains("malformed percent-escape"));
        assert!(error("postgres://db/app%2").contains("malformed percent-escape"));
        assert!(error("postgres://db/app%00").contains("%00"));
        assert!(error("postgres://db?application_name=a%g1").contains("\"application_name\""));
    }

    #[test]
    fn a_malformed_escape_in_a_password_does_not_show_the_password() {
        let e = error("postgres://bob:s3cr%zzet@db/app");
        assert!(e.contains("user name or password"), "{e}");
        assert!(!e.contains("s3cr"), "{e}");
        let e = error("postgres://db/app?password=s3cr%zzet");
        assert!(!e.contains("s3cr"), "{e}");
    }

    #[test]
    fn spaces_around_url_parts_are_dropped_and_inside_them_refused() {
        assert_eq!(parsed("postgres://db/app ").get("dbname"), Some("app"));
        assert!(error("postgres://db/my app").contains("%20"));
    }

    #[test]
    fn query_parameters_are_read_and_checked() {
        let info =
            parsed("postgres://db/app?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5&");
        assert_eq!(info.get("sslmode"), Some("verify-full"));
        assert_eq!(info.get("sslrootcert"), Some("/ca.pem"));
        assert_eq!(info.get("connect_timeout"), Some("5"));
        assert!(error("postgres://db/app?sslmode").contains("no \"=\""));
        assert!(error("postgres://db/app?a=b=c").contains("second \"=\""));
        assert!(error("postgres://db/app?&sslmode=require").contains("no \"=\""));
    }

    #[test]
    fn ssl_true_in_a_url_means_sslmode_require() {
        assert_eq!(
            parsed("postgres://db/app?ssl=true").get("sslmode"),
            Some("require")
        );
        assert!(error("postgres://db/app?ssl=false").contains("unknown connection option \"ssl\""));
    }

    #[test]
    fn requiressl_becomes_sslmode_as_in_libpq() {
        assert_eq!(parsed("requiressl=1").get("sslmode"), Some("require"));
        assert_eq!(
            parsed("postgres://db?requiressl=0").get("sslmode"),
            Some("prefer")
        );
    }

    #[test]
    fn a_query_parameter_overrides_the_same_part_of_the_url() {
        let info = parsed("postgres://bob@db/app?user=alice&dbname=other");
        assert_eq!(
            pairs(&info),
            [("user", "alice"), ("host", "db"), ("dbname", "other")]
        );
    }

    #[test]
    fn an_unencoded_slash_in_a_password_asks_for_percent_encoding_without_quoting() {
        for text in [
            "postgres://u:Zq/9x@h/db",
            "postgres://u:Zq?9x@h/db",
            "postgres://u:Zq/9x@h",
            "postgresql://u:Zq?9x=1@h/db",
            "postgres://u:Zq@9x@h/db",
            "postgres://u:Zq/9x@h/db?sslmode=require",
            "postgres://u:Zq@9x/Zq@h/db",
        ] {
            let e = error(text);
            assert!(
                e.contains("%2F") && e.contains("%3F") && e.contains("%23"),
                "{e}"
            );
            assert!(!e.contains("Zq") && !e.contains("9x"), "{text}: {e}");
        }
    }

    #[test]
    fn a_bad_port_is_named_only_when_it_cannot_be_a_password() {
        assert!(error("postgres://bob@db:abc/app").contains("invalid port \"abc\""));
        assert!(error("postgres://bob@db:70000").contains("invalid port \"70000\""));
        let e = error("postgres://bob:Zq9x");
        assert!(e.contains("invalid port") && !e.contains("Zq9x"), "{e}");
        assert!(error("port=x").contains("invalid port \"x\""));
    }

    #[test]
    fn keyword_values_allow_spaces_around_the_equals_sign() {
        let info = parsed("host = db  port= 5433 sslmode =require\tuser\n=\nbob");
        assert_eq!(
            pairs(&info),
            [
                ("host", "db"),
                ("port", "5433"),
                ("sslmode", "require"),
                ("user", "bob")
            ]
        );
    }

    #[test]
    fn quoted_values_keep_spaces_and_escaped_quotes() {
        let info =
            parsed(r"password='it\'s a \\secret' options='-c search_path=a,b' application_name=''");
        assert_eq!(info.get("password"), Some(r"it's a \secret"));
        assert_eq!(info.get("options"), Some("-c search_path=a,b"));
        assert_eq!(info.get("application_name"), Some(""));
    }

    #[test]
    fn unquoted_values_take_backslash_escapes() {
        assert_eq!(
            parsed(r"password=a\ b\\c\'d").get("password"),
            Some(r"a b\c'd")
        );
    }

    #[test]
    fn a_value_containing_a_url_scheme_is_just_a_value() {
        let info = parsed("host=db application_name='x://y' sslmode=require");
        assert_eq!(info.get("sslmode"), Some("require"));
        assert_eq!(info.get("application_name"), Some("x://y"));
    }

    #[test]
    fn empty_or_blank_text_has_no_parameters() {
        assert_eq!(pairs(&parsed("")), []);
        assert_eq!(pairs(&parsed(" \t\n ")), []);
    }

    #[test]
    fn a_keyword_given_twice_keeps_the_last_value_once() {
        assert_eq!(
            pairs(&parsed("host=a port=1 host=b")),
            [("host", "b"), ("port", "1")]
        );
    }

    #[test]
    fn keyword_value_mistakes_name_the_keyword_but_never_the_value() {
        assert!(error("host db").contains("missing \"=\" after \"host\""));
        let e = error("host=db password='s3cret");
        assert!(
            e.contains("unterminated") && e.contains("\"password\"") && !e.contains("s3cret"),
            "{e}"
        );
        for text in [
            "password=Zq9 Xk7 host=db",
            "password=Zq9 Xk7=x",
            "password='Zq9'Xk7 host=db",
        ] {
            let e = error(text);
            assert!(!e.contains("Zq9") && !e.contains("Xk7"), "{text}: {e}");
        }
        let e = error("postgresql+psycopg://u:s3cret@db/app");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(error("=x").contains("without a keyword"));
    }

    #[test]
    fn unknown_keywords_are_errors() {
        assert!(error("host=db xyz=1").starts_with("unknown connection option \"xyz\""));
        assert!(error("postgres://db?xyz=1").starts_with("unknown connection option \"xyz\""));
        assert!(error("Host=db").contains("\"Host\""));
    }

    #[test]
    fn the_string_beats_the_environment() {
        let info = parsed("host=db user=''").with_environment(environment(&[
            ("PGHOST", "other"),
            ("PGUSER", "alice"),
            ("PGPASSWORD", "s3cret"),
            ("PGSSLMODE", "require"),
        ]));
        assert_eq!(info.get("host"), Some("db"));
        assert_eq!(info.get("user"), Some(""));
        assert_eq!(info.get("password"), Some("s3cret"));
        assert_eq!(info.get("sslmode"), Some("require"));
    }

    #[test]
    fn the_environment_beats_the_defaults_and_empty_variables_count_as_unset() {
        let info = parsed("")
            .with_environment(environment(&[
                ("PGHOST", "/run/pg"),
                ("PGPORT", ""),
                ("PGUSER", "alice"),
                ("PGDATABASE", ""),
            ]))
            .with_defaults();
        assert_eq!(
            pairs(&info),
            [
                ("host", "/run/pg"),
                ("user", "alice"),
                ("port", "5432"),
                ("dbname", "alice")
            ]
        );
    }

    #[test]
    fn defaults_fill_only_what_is_absent_or_empty() {
        let info = parsed("").with_defaults();
        assert_eq!(
            pairs(&info),
            [
                ("host", "127.0.0.1"),
                ("port", "5432"),
                ("user", "postgres"),
                ("dbname", "postgres")
            ]
        );
        let info = parsed("host='' user=bob dbname=app").with_defaults();
        assert_eq!(info.get("host"), Some("127.0.0.1"));
        assert_eq!(info.get("dbname"), Some("app"));
        assert_eq!(
            parsed("hostaddr=10.0.0.1").with_defaults().get("host"),
            None
        );
    }

    #[test]
    fn get_and_set_work_on_one_entry_per_keyword() {
        let mut info = parsed("host=a port=1");
        info.set("host", "b");
        info.set("dbname", "d");
        assert_eq!(
            pairs(&info),
            [("host", "b"), ("port", "1"), ("dbname", "d")]
        );
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("pgfresh-conninfo-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn pgpass(&self, text: &str, mode: u32) -> &Path {
            use std::os::unix::fs::PermissionsExt;
            let path = self.0.join(".pgpass");
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pgpass_password(conninfo: &str, file: &str) -> Option<String> {
        let dir = TempDir::new(&format!("{:x}", fastrand::u64(..)));
        let home = dir.pgpass(file, 0o600);
        parsed(conninfo)
            .with_defaults()
            .password_from_file(Some(home))
            .unwrap()
    }

    #[test]
    fn the_password_file_first_matching_line_wins() {
        let file = "# comment\n\nother:5432:*:*:no\n127.0.0.1:5432:app:bob:first\n*:*:*:*:second\n";
        assert_eq!(
            pgpass_password("user=bob dbname=app", file).as_deref(),
            Some("first")
        );
        assert_eq!(pgpass_password("user=eve", file).as_deref(), Some("second"));
    }

    #[test]
    fn the_password_file_unescapes_colons_and_backslashes() {
        let file = "*:*:my\\:db:*:pa\\:ss\\\\word:ignored\r\n";
        assert_eq!(
            pgpass_password("dbname=my:db", file).as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(pgpass_password("dbname=other", file), None);
    }

    #[test]
    fn the_password_file_matches_the_first_host_and_port() {
        let file = "a:6000:*:*:one\nb:*:*:*:two\n";
        assert_eq!(
            pgpass_password("host=a,b port=6000,7000", file).as_deref(),
            Some("one")
        );
        assert_eq!(
            pgpass_password("host=b,a port=6000", file).as_deref(),
            Some("two")
        );
        assert_eq!(pgpass_password("host=a port=,6000", file), None);
        assert_eq!(
            pgpass_password("host=a", "a:5432:*:*:default-port\n").as_deref(),
            Some("default-port")
        );
    }

    #[test]
    fn a_socket_directory_matches_localhost_in_the_password_file() {
        let file = "localhost:5432:*:*:local\n";
        assert_eq!(
            pgpass_password("host=/var/run/postgresql", file).as_deref(),
            Some("local")
        );
        assert_eq!(pgpass_password("host=127.0.0.1", file), None);
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        let dir = TempDir::new("open");
        let home = dir.pgpass("*:*:*:*:s3cret\n", 0o644);
        let e = parsed("")
            .with_defaults()
            .password_from_file(Some(home))
            .unwrap_err();
        assert!(e.contains("chmod 0600") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn a_missing_password_file_is_no_password() {
        let dir = TempDir::new("missing");
        let info = parsed("").with_defaults();
        assert_eq!(info.password_from_file(Some(&dir.0)), Ok(None));
        assert_eq!(info.password_from_file(None), Ok(None));
        let info = parsed("passfile=/nonexistent/pgpass").with_defaults();
        assert_eq!(info.password_from_file(Some(&dir.0)), Ok(None));
    }

    #[test]
    fn passfile_names_the_password_file() {
        let dir = TempDir::new("passfile");
        dir.pgpass("*:*:*:*:from-passfile\n", 0o600);
        let text = format!("passfile='{}'", dir.0.join(".pgpass").display());
        let info = parsed(&text).with_defaults();
        assert_eq!(
            info.password_from_file(None),
            Ok(Some("from-passfile".to_string()))
        );
    }

    #[test]
    fn shown_is_a_url_without_the_password() {
        assert_eq!(
            parsed("postgres://bob:s3cret@db/app?sslmode=require")
                .with_defaults()
                .shown(),
            "postgres://bob@db:5432/app?sslmode=require"
        );
        assert_eq!(
            parsed("host=/var/run/postgresql,::1,b port=1,2,3 user=bob dbname=app").shown(),
            "postgres://bob@%2Fvar%2Frun%2Fpostgresql:1,[::1]:2,b:3/app"
        );
        assert_eq!(parsed("").shown(), "postgres://");
        assert_eq!(
            format!("{:?}", parsed("password=s3cret host=db")),
            "ConnInfo(\"postgres://db\")"
        );
    }

    #[test]
    fn shown_parses_back_to_the_same_servers_user_and_database() {
        for text in [
            "postgres://b%40b:pw@[::1]:5433,db,/tmp%2Fsock:7/my%2Fdb?sslmode=verify-full",
            "host='/var/run/postgresql' user='o\\'neil' dbname='a b/c?d#e'",
            "host=h1,h2 port=,5433 user=bob",
        ] {
            let info = parsed(text);
            let back = parsed(&info.shown());
            for keyword in ["host", "port", "user", "dbname", "sslmode"] {
                assert_eq!(back.get(keyword), info.get(keyword), "{keyword} of {text}");
            }
        }
    }

    #[test]
    fn shown_never_contains_the_password() {
        for text in [
            "postgres://bob:Zq9%2Fx@db/app",
            "postgres://bob:Zq9x@db/app?password=Zq9x",
            "postgres://bob@db/app?password=Zq9x&sslmode=require",
            "password=Zq9x host=db",
            "password = 'Zq9x with spaces' host=db",
            "host=db user=bob password=Zq9x sslmode=require",
        ] {
            let shown = parsed(text).with_defaults().shown();
            assert!(!shown.contains("Zq9x"), "{text} shows {shown}");
        }
    }

    #[test]
    fn redact_unparsed_hides_url_passwords() {
        assert_eq!(
            redact_unparsed("postgres://u:pa/ss@h/db"),
            "postgres://***@h/db"
        );
        assert_eq!(
            redact_unparsed("postgres://h/db?password=x&sslmode=require"),
            "postgres://h/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact_unparsed("postgres://h/db?sslmode=bad"),
            "postgres://h/db?sslmode=bad"
        );
    }

    #[test]
    fn redact_unparsed_hides_keyword_value_passwords() {
        assert_eq!(
            redact_unparsed("host=db password = 'a b' port=1"),
            "host=db password = *** port=1"
        );
        assert_eq!(
            redact_unparsed("host=db password=a xyz=1"),
            "host=db password=***"
        );
        assert_eq!(
            redact_unparsed("host=db password=a b port=1"),
            "host=db password=***"
        );
        assert_eq!(
            redact_unparsed("host=db password='a b"),
            "host=db password=***"
        );
        assert_eq!(redact_unparsed("host=db junk"), "host=db junk");
    }

    #[test]
    fn redact_unparsed_never_returns_any_of_the_password() {
        let secrets = [
            "Zq/9", "Zq?9", "Zq@9", "Zq:9", "Zq 9", "Zq'9", "Zq#9", "Zq&9", "Zq=9", "Zq\\9",
        ];
        for secret in secrets {
            let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
            let texts = [
                format!("postgres://u:{secret}@h/db"),
                format!("postgresql://u:{secret}@h:5432/db?sslmode=require"),
                format!("postgres://u:{secret}@h1,h2/db?application_name=a@b"),
                format!("postgres://{secret}@h/db"),
                format!("postgres://h/db?password={secret}"),
                format!("postgres://h/db?password={secret}&sslmode=require"),
                format!("postgres://h/db?sslmode=require&password={secret}"),
                format!("  postgres://u:{secret}@h/db"),
                format!("POSTGRES://u:{secret}@h/db"),
                format!("host=h password={secret} port=1"),
                format!("host=h password = {secret}"),
                format!("host=h password='{quoted}' port=1"),
                format!("host=h password = '{quoted}"),
                format!("host=h password '{quoted}'"),
                format!("host=h PASSWORD={secret}"),
                format!("junk host=h password={secret} more junk"),
                format!("application_name='x://y' password={secret}"),
                format!("application_name='x password={secret}"),
                format!("host=h dbname=postgres://u:{secret}@h/db"),
                format!("host=h postgres://u:{secret}@h/db"),
            ];
            for text in texts {
                let shown = redact_unparsed(&text);
                assert!(!shown.contains("Zq"), "{text:?} shows {shown:?}");
                assert!(!shown.contains('9'), "{text:?} shows {shown:?}");
            }
        }
    }

    /// Passwords drawn from letters no template or message contains, and the characters that
    /// break URLs and keyword/value strings.
    #[test]
    fn random_nasty_passwords_never_show_in_errors_shown_urls_or_redactions() {
        let alphabet: Vec<char> = "ZJV/?@: '\\#&=%".chars().collect();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..3000 {
            let secret: String = (0..rng.usize(1..9))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
            let texts = [
                format!("postgres://u:{secret}@h/db"),
                format!("postgres://u:{secret}@h:5432/db?sslmode=require"),
                format!("postgres://u:{secret}@[::1],h2:6000/db?application_name=a@b"),
                format!("postgres://h/db?password={secret}"),
                format!("postgres://h/db?password={secret}&sslmode=require"),
                format!("postgres://h/db?sslmode=require&password={secret}"),
                format!("host=h password={secret} port=1"),
                format!("host=h password = {secret}"),
                format!("host=h password='{quoted}' port=1"),
                format!("host=h password = '{secret}"),
                format!("junk password={secret} x"),
            ];
            for text in texts {
                let outputs = [
                    redact_unparsed(&text),
                    match ConnInfo::parse(&text) {
                        Ok(info) => info.with_defaults().shown(),
                        Err(e) => e,
                    },
                ];
                for output in outputs {
                    assert!(
                        !output.contains(['Z', 'J', 'V']),
                        "{text:?} shows {output:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn redact_unparsed_hides_sslpassword_too() {
        assert_eq!(redact_unparsed("sslpassword=Zq9 x"), "sslpassword=***");
        assert_eq!(
            redact_unparsed("postgres://h?sslpassword=Zq9"),
            "postgres://h?sslpassword=***"
        );
    }

    #[test]
    fn redact_unparsed_keeps_what_is_not_secret() {
        let shown = redact_unparsed("postgres://bob:x@db:5432/app?sslmode=require");
        assert_eq!(shown, "postgres://***@db:5432/app?sslmode=require");
        assert_eq!(
            redact_unparsed("host=db sslmode=require"),
            "host=db sslmode=require"
        );
    }

    #[test]
    fn to_tokio_postgres_round_trips_through_its_parser() {
        let info = parsed(
            "postgres://b%27ob:p%5C'a%20ss@h1,[::1]:5433/d%27b?options=-c%20search_path%3D'a%20b'&application_name=",
        );
        let text = info.to_tokio_postgres(&[]);
        let config =
            tokio_postgres::Config::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(config.get_user(), Some("b'ob"));
        assert_eq!(config.get_password(), Some(&b"p\\'a ss"[..]));
        assert_eq!(config.get_dbname(), Some("d'b"));
        assert_eq!(
            config.get_hosts(),
            [
                tokio_postgres::config::Host::Tcp("h1".to_string()),
                tokio_postgres::config::Host::Tcp("::1".to_string())
            ]
        );
        assert_eq!(config.get_ports(), [5432, 5433]);
        assert_eq!(config.get_options(), Some("-c search_path='a b'"));
        assert_eq!(config.get_application_name(), Some(""));
    }

    #[test]
    fn to_tokio_postgres_leaves_out_what_the_caller_handles() {
        let info = parsed(
            "host=db sslmode=verify-full sslrootcert=/ca.pem passfile=/p keepalives_count=3",
        );
        assert_eq!(
            info.to_tokio_postgres(&["sslmode", "sslrootcert", "passfile"]),
            "host='db' keepalives_retries='3'"
        );
    }
}
