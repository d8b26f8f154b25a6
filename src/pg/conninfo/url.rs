//! The URL form of a connection string, after libpq's `conninfo_uri_parse_options`.

use super::keywords::{describe_keyword, unknown_option};
use super::redact::is_secret;
use super::*;

pub(super) fn parse_url(rest: &str) -> Result<ConnInfo, String> {
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
pub(super) fn decode_leniently(text: &str) -> String {
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
