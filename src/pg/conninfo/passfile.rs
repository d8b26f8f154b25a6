//! The password file, after libpq's `passwordFromFile`.

use super::*;

impl ConnInfo {
    /// The password `passfile` (or `<home>/.pgpass`) holds for the connection's hosts, as libpq
    /// finds it for each. libpq looks it up host by host; pgfresh sends one password to whichever
    /// host it reaches, so it takes one only when the file gives every host that same password: a
    /// password meant for one host is never sent to another. `Err` means the file is ignored (or
    /// its passwords are, for this URL); the caller warns and goes on without them.
    pub(crate) fn password_from_file(&self, home: Option<&Path>) -> Result<Option<String>, String> {
        let path = match (self.get("passfile").filter(|p| !p.is_empty()), home) {
            (Some(passfile), _) => PathBuf::from(passfile),
            (None, Some(home)) => home.join(".pgpass"),
            (None, None) => return Ok(None),
        };
        let Some(text) = read_private_file(&path)? else {
            return Ok(None);
        };
        let lookup = |key: &PassFileKey| {
            let found = text
                .lines()
                .map(|line| line.trim_end_matches(['\r', '\n']))
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .find_map(|line| password_in_line(line, key));
            // libpq stops at the first matching line even when its password is empty.
            found.filter(|password| !password.is_empty())
        };
        let found: Vec<Option<String>> = self.pass_file_keys().iter().map(lookup).collect();
        match found.as_slice() {
            [] => Ok(None),
            [first, rest @ ..] if rest.iter().all(|other| other == first) => Ok(first.clone()),
            _ => Err(format!(
                "password file {} gives the hosts of this connection different passwords (or some none); pgfresh sends one password to whichever host answers, so it uses none of them: put the password in the connection string or PGPASSWORD",
                path.display()
            )),
        }
    }

    /// One key per host of the connection, each with its port (one port for all, or one each).
    fn pass_file_keys(&self) -> Vec<PassFileKey<'_>> {
        let list = |keyword| -> Vec<&str> {
            self.get(keyword)
                .filter(|v| !v.is_empty())
                .map_or_else(Vec::new, |v| v.split(',').collect())
        };
        let hosts = match list("host") {
            hosts if !hosts.is_empty() => hosts,
            _ => list("hostaddr"),
        };
        let hosts = if hosts.is_empty() { vec![""] } else { hosts };
        let ports = list("port");
        let user = self.get("user").unwrap_or_default();
        let dbname = self.get("dbname").filter(|d| !d.is_empty()).unwrap_or(user);
        hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let host = if host.is_empty() { "localhost" } else { host };
                let mut hosts = vec![host];
                // libpq only knows its compiled-in socket directory; any directory is the local
                // server.
                if host.starts_with(['/', '@']) {
                    hosts.push("localhost");
                }
                let port = match ports.as_slice() {
                    [one] => one,
                    many => many.get(index).copied().unwrap_or("5432"),
                };
                PassFileKey {
                    hosts,
                    port: if port.is_empty() { "5432" } else { port },
                    dbname,
                    user,
                }
            })
            .collect()
    }
}

struct PassFileKey<'a> {
    /// The host, and `localhost` as well when it is a socket directory.
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
