//! The password file, after libpq's `passwordFromFile`.

use super::*;

impl ConnInfo {
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
}

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
