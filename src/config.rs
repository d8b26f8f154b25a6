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
    /// Where to serve `/metrics`, `/healthz` and `/readyz`; `None` serves nothing.
    pub http: Option<std::net::SocketAddr>,
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

/// The URL with any password replaced by `***`, safe to print and log. Handles URLs
/// (`postgres://user:secret@host/db`, `redis://:secret@host`) and libpq key=value strings
/// (`host=x password=secret`).
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return redact_query_password(url);
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim() == "password" => "password=***".to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Redacts a `password=` query parameter, which libpq URLs also accept.
fn redact_query_password(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_string();
    };
    let query = url[query_start + 1..]
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***".to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{}?{query}", &url[..query_start])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://bob:s3cret@db:5432/app"),
            "postgres://bob:***@db:5432/app"
        );
        assert_eq!(
            redact_url("redis://:s3cret@cache:6379/2"),
            "redis://:***@cache:6379/2"
        );
        assert_eq!(
            redact_url("postgres://bob@db/app?password=s3cret&sslmode=require"),
            "postgres://bob@db/app?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("host=db user=bob password=s3cret"),
            "host=db user=bob password=***"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
    }
}
