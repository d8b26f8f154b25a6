//! A PostgreSQL connection string read exactly the way libpq reads it, into keyword/value pairs.
//!
//! Cutting the string up with ad-hoc searches leaked passwords into logs, turned TLS off for
//! `sslmode = require` and ignored libpq's environment variables and `~/.pgpass`. Everything that
//! shows, secures or hands on the connection settings now reads them from one [`ConnInfo`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

mod keywords;
mod passfile;
mod redact;
#[cfg(test)]
mod tests;
mod url;

use keywords::parse_keyword_values;
pub(crate) use redact::redact_unparsed;
use url::parse_url;

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
            .filter(|(keyword, value)| !system_default(keyword, value))
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

/// Whether the pair asks for the operating system's own keepalive setting, as libpq reads a zero:
/// tokio-postgres would set the socket option to 0, which Linux refuses, failing every connection.
fn system_default(keyword: &str, value: &str) -> bool {
    let keepalive = ["keepalives_idle", "keepalives_interval", "keepalives_count"];
    keepalive.contains(&keyword) && value.trim().parse::<i64>() == Ok(0)
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
