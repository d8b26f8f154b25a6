//! Typed settings for the listener and the sweep, and the [`Environment`] a PostgreSQL connection
//! string is completed from.
//!
//! The CLI layer builds these once from flags and the environment; the library never reads either.

use std::time::Duration;

/// How a listener works through the queue.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// Where to serve `GET /fragments/{key}`, which answers from Redis or renders on demand
    /// (`host:port`); `None` serves nothing. A non-loopback address needs [`Self::serve_token`].
    pub serve: Option<String>,
    /// The bearer token `GET /fragments/{key}` requires, when set.
    pub serve_token: Option<String>,
    /// Most on-demand renders in flight at once; a request that would start one more is answered
    /// 429.
    pub serve_max_pending: usize,
    /// How long a request of `GET /fragments/{key}` waits for its render before it is answered
    /// 503; the render goes on and stores the entry. More than zero, at most 50 s.
    pub serve_wait: Duration,
    /// How often claims start from the queue's first id again (`listener::floor`), for the
    /// crate's own tests: set long, a change only the floor's own account brings back is seen
    /// to be brought back by it.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub walk_from_start: Duration,
    /// How long a pooled session may go without being handed out before the listener closes it,
    /// for the crate's own tests: set short, the sessions a peak opened are seen to close.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub idle_session_lifetime: Duration,
}

/// The longest [`ListenSettings::serve_wait`]: a connection that has lived its minute still answers
/// its request in flight, for at most a minute more (`ops::http::REQUEST_GRACE`).
pub(crate) const MAX_SERVE_WAIT: Duration = Duration::from_secs(50);

/// The shortest poll interval: a shorter one would only spin.
pub(crate) const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The longest interval between periodic sweeps: a longer one is almost certainly a typo.
pub(crate) const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

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
        if let Some(address) = &self.serve {
            if self.serve_max_pending < 1 {
                return invalid("--serve-max-pending must be at least 1".into());
            }
            if self.serve_wait.is_zero() || self.serve_wait > MAX_SERVE_WAIT {
                return invalid(format!(
                    "--serve-wait {:?} is out of range: more than 0 and at most {MAX_SERVE_WAIT:?}",
                    self.serve_wait
                ));
            }
            if self.serve_token.as_deref().is_none_or(str::is_empty) && !loopback_only(address) {
                return invalid(format!(
                    "--serve {address} is reachable from other machines: give --serve-token (PGFRESH_SERVE_TOKEN) for clients to send as a bearer token, or bind a loopback address such as 127.0.0.1"
                ));
            }
        }
        self.sweep.validate()
    }
}

/// Whether every address `address` resolves to is a loopback one (an address that does not resolve
/// is not: binding it fails later with its own message).
fn loopback_only(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    match address.to_socket_addrs() {
        Ok(addresses) => {
            let addresses: Vec<_> = addresses.collect();
            !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

impl SweepSettings {
    /// Fails with one line unless the page size and concurrency are at least 1.
    pub fn validate(&self) -> Result<(), crate::Error> {
        if self.page_size < 1 || self.concurrency < 1 {
            return Err(crate::Error::InvalidSetting(
                "sweep page size and concurrency must each be at least 1".into(),
            ));
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
            serve: None,
            serve_token: None,
            serve_max_pending: 256,
            serve_wait: Duration::from_secs(30),
            #[cfg(feature = "testing")]
            walk_from_start: crate::listener::floor::WALK_FROM_START,
            #[cfg(feature = "testing")]
            idle_session_lifetime: crate::listener::IDLE_SESSION_LIFETIME,
        }
    }
}

/// How a sweep walks every key.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SweepSettings {
    /// Keys loaded, rendered and written per page.
    pub page_size: i64,
    /// Pages in flight at the same time.
    pub concurrency: usize,
}

impl Default for SweepSettings {
    fn default() -> Self {
        Self {
            page_size: 500,
            concurrency: 4,
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
