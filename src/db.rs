//! PostgreSQL connections: the pool that serves claims, loads and sweeps, and the dedicated connections
//! that LISTEN (a pool would swallow notifications) and hold advisory locks.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::Error;
use crate::config::redact_url;
use crate::tls::PostgresTls;

/// How long a connection attempt may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL database: its parsed configuration and a pool of connections to it.
#[derive(Clone)]
pub struct Database {
    config: Config,
    url: String,
    pool: Pool,
    connector: MakeRustlsConnect,
}

impl Database {
    /// Parses the URL and builds a pool of at most `pool_size` connections. Connects lazily: call
    /// [`Database::check`] to fail early with a clear message.
    pub fn new(url: &str, pool_size: usize) -> Result<Self, Error> {
        let shown = redact_url(url);
        let invalid = |reason: String| Error::InvalidUrl {
            what: "PostgreSQL",
            url: shown.clone(),
            reason,
        };
        let tls = PostgresTls::from_url(url).map_err(invalid)?;
        let mut config: Config = tls
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| invalid(crate::error::describe_postgres(&e)))?;
        // TLS only when the URL asks for it (see `tls`).
        if !tls.asks_for_tls {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("pgfresh");
        }
        // The listener's own writes (deleting done changes, its idle flag) need no fsync: losing them in
        // a crash only means a change is rendered again. And its queries are short lookups by key, for
        // which JIT compilation never pays: with misleading statistics it was seen to add 180 ms to a
        // 20 ms load.
        let mut pooled = config.clone();
        pooled.options("-c synchronous_commit=off -c jit=off");
        let connector = tls.connector();
        let manager = Manager::from_config(
            pooled,
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .expect("a pool with a runtime and a size always builds");
        Ok(Self {
            config,
            url: shown,
            pool,
            connector,
        })
    }

    /// The URL with its password removed, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name, for messages.
    pub fn name(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A pooled connection, or an error saying PostgreSQL is unreachable.
    pub async fn get(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) if e.as_db_error().is_none() => {
                self.connect_error(&e)
            }
            other => Error::Pool(other),
        })
    }

    /// Opens a connection outside the pool, driven by a spawned task until the client is dropped.
    /// For the advisory lock that elects the sweeping listener, which must outlive any pooled use.
    pub async fn connect_dedicated(&self, application_name: &str) -> Result<Client, Error> {
        let (client, connection) = self.connect_raw(application_name).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "dedicated PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// Opens a connection outside the pool and hands back its connection half, for the caller to drive
    /// (the LISTEN connection reads notifications from it).
    pub async fn connect_raw(
        &self,
        application_name: &str,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, crate::tls::TlsStream>,
        ),
        Error,
    > {
        let mut config = self.config.clone();
        config.application_name(application_name);
        config
            .connect(self.connector.clone())
            .await
            .map_err(|e| self.connect_error(&e))
    }

    /// Fails with a clear message unless PostgreSQL answers.
    pub async fn check(&self) -> Result<(), Error> {
        self.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn connect_error(&self, error: &tokio_postgres::Error) -> Error {
        let url = self.url.clone();
        let reason = crate::error::describe_postgres(error);
        if reason.contains("invalid peer certificate") {
            Error::PostgresCertificate { url, reason }
        } else {
            Error::PostgresConnect { url, reason }
        }
    }
}
