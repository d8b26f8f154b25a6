//! Typed settings for the listener and the sweep, and URL redaction for anything that is displayed.
//!
//! The CLI layer builds these once from flags and the environment; the library never reads either.

use std::time::Duration;

/// How a listener works through the queue.
#[derive(Clone, Debug)]
pub struct ListenSettings {
    /// Most changes claimed in one batch.
    pub batch_size: i64,
    /// Batches processed at the same time; each holds one pooled connection while it runs.
    pub workers: usize,
    /// How often the queue is checked when no NOTIFY arrives: the fallback for lost wake-ups.
    pub poll_interval: Duration,
    /// How often one listener (of all running) does a full sweep; `None` never.
    pub sweep_interval: Option<Duration>,
    /// Failed attempts after which a change is parked in `pgfresh.failed`.
    pub max_attempts: i32,
    /// How the periodic sweep works.
    pub sweep: SweepSettings,
    /// Where to serve the status page, `/metrics`, `/healthz` and `/readyz` (`host:port`, the host a
    /// name or an address); `None` serves nothing.
    pub http: Option<String>,
}

/// The shortest poll interval: a shorter one would only spin.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The longest interval between periodic sweeps: a longer one is almost certainly a typo.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

impl ListenSettings {
    /// Fails with one line saying which setting is out of range, and what the range is.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let invalid = |text: String| Err(crate::Error::InvalidSetting(text));
        if self.poll_interval < MIN_POLL_INTERVAL {
            return invalid(format!(
                "poll interval {:?} is too short: at least {MIN_POLL_INTERVAL:?}",
                self.poll_interval
            ));
        }
        if self
            .sweep_interval
            .is_some_and(|every| every > MAX_SWEEP_INTERVAL)
        {
            return invalid(
                "sweep interval is too long: at most 366 days (0 disables the periodic sweep)"
                    .into(),
            );
        }
        if self.batch_size < 1 || self.workers < 1 || self.max_attempts < 1 {
            return invalid("batch size, workers and max attempts must each be at least 1".into());
        }
        if self.sweep.page_size < 1 || self.sweep.concurrency < 1 {
            return invalid("sweep page size and concurrency must each be at least 1".into());
        }
        Ok(())
    }
}

impl Default for ListenSettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            workers: 2,
            poll_interval: Duration::from_secs(1),
            sweep_interval: Some(Duration::from_secs(3600)),
            max_attempts: 10,
            sweep: SweepSettings::default(),
            http: None,
        }
    }
}

/// How a sweep walks every key.
#[derive(Clone, Debug)]
pub struct SweepSettings {
    /// Keys loaded, rendered and written per page.
    pub page_size: i64,
    /// Pages in flight at the same time.
    pub concurrency: usize,
    /// Sweep only the fragment with this name.
    pub only: Option<String>,
}

impl Default for SweepSettings {
    fn default() -> Self {
        Self {
            page_size: 500,
            concurrency: 4,
            only: None,
        }
    }
}

/// What libpq would consult for the settings a PostgreSQL connection string leaves out: its `PG*`
/// environment variables (`PGHOST`, `PGUSER`, `PGPASSWORD`, `PGSSLMODE`, ...) and the password file
/// (`PGPASSFILE`, else `~/.pgpass`). The library never reads the process environment itself: a
/// binary passes [`Environment::from_process`], a test or an embedding program what it chooses.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    vars: std::collections::HashMap<String, String>,
    home: Option<std::path::PathBuf>,
}

impl Environment {
    /// Nothing from outside: the connection string and pgfresh's defaults alone.
    pub fn none() -> Self {
        Self::default()
    }

    /// This process's `PG*` variables and home directory, as libpq reads them.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars()
                .filter(|(name, _)| name.starts_with("PG"))
                .collect(),
            home: std::env::var_os("HOME").map(std::path::PathBuf::from),
        }
    }

    /// With this variable set (for tests and embedding programs).
    pub fn with_var(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    /// With this home directory, where `.pgpass` and `.postgresql/root.crt` are looked for.
    pub fn with_home(mut self, home: impl Into<std::path::PathBuf>) -> Self {
        self.home = Some(home.into());
        self
    }

    pub(crate) fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    pub(crate) fn home(&self) -> Option<&std::path::Path> {
        self.home.as_deref()
    }
}

/// A Redis URL as it is safe to print: built from the parsed URL, without the password; for a URL
/// that does not parse, the text with everything that could be a password replaced by `***`.
pub(crate) fn shown_redis_url(url: &str) -> String {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.into_connection_info() else {
        return redact_unparsed_url(url);
    };
    let settings = info.redis_settings();
    let user = settings
        .username()
        .map(|user| format!("{user}@"))
        .unwrap_or_default();
    let db = match settings.db() {
        0 => String::new(),
        db => format!("/{db}"),
    };
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("redis://{user}{host}:{port}{db}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{user}{host}:{port}{db}"),
        ConnectionAddr::Unix(path) => format!("redis+unix://{user}{}{db}", path.display()),
        other => format!("{other}{db}"),
    }
}

/// A URL that did not parse, with everything between `://` and its last `@`, and any `password=`
/// value, replaced by `***`: whatever the password holds (`/`, `?`, `@`), none of it survives.
pub(crate) fn redact_unparsed_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return "(not shown: it does not parse as a URL)".into();
    };
    let mut shown = match url.rfind('@').filter(|&at| at >= scheme_end) {
        Some(at) => format!("{}***{}", &url[..scheme_end], &url[at..]),
        None => url.to_string(),
    };
    if let Some(at) = shown.find("password=") {
        let end = shown[at..].find('&').map_or(shown.len(), |end| at + end);
        shown.replace_range(at + "password=".len()..end, "***");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_shown_without_their_password() {
        assert_eq!(
            shown_redis_url("redis://:s3cret@cache:6379/2"),
            "redis://cache:6379/2"
        );
        assert_eq!(
            shown_redis_url("rediss://pgfresh:pa%2Fss@cache:6380"),
            "rediss://pgfresh@cache:6380"
        );
        assert_eq!(
            shown_redis_url("rediss://pgfresh:pa/ss@cache:6380"),
            "rediss://***@cache:6380",
            "a password that breaks the URL hides the user too"
        );
        for url in [
            "redis://:pa/ss@127.0.0.1:6379/0",
            "redis://user:pa?ss@host/1",
            "redis://user:p@ss@host:1/0",
            "redis://:x@y@z/0?password=pa/ss",
            "redis://user:pass word@host:notaport",
        ] {
            let shown = shown_redis_url(url);
            for secret in ["pa/ss", "pa?ss", "p@ss", "x@y", "pass word"] {
                assert!(!shown.contains(secret), "{url} -> {shown}");
            }
        }
    }
}
