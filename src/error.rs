//! The library's error type: one enum callers can match, whose messages say what failed and what to do.
//!
//! Connection URLs in messages are always shown without their password, built from the parsed
//! settings (see `pg::conninfo`).

/// Everything that can go wrong in pgfresh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// PostgreSQL could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL at {url}: {reason}; {}", postgres_advice(.reason))]
    PostgresConnect {
        /// The URL, password removed.
        url: String,
        /// Why, in one line.
        reason: String,
    },
    /// PostgreSQL's certificate failed the check `sslmode=verify-ca`/`verify-full` asked for.
    #[error(
        "refusing PostgreSQL at {url}: {reason}; check sslrootcert and the host name in the URL, or use sslmode=require to encrypt without verifying"
    )]
    PostgresCertificate {
        /// The URL, password removed.
        url: String,
        /// Why, in one line.
        reason: String,
    },
    /// Redis could not be reached or refused the connection.
    #[error("cannot connect to Redis at {url}: {reason}; {}", redis_advice(.reason))]
    RedisConnect {
        /// The URL, password removed.
        url: String,
        /// Why, in one line.
        reason: String,
    },
    /// A connection URL that does not parse.
    #[error(
        "invalid {what} URL `{url}`: {reason}; expected e.g. {}",
        example_url(what)
    )]
    InvalidUrl {
        /// "PostgreSQL" or "Redis".
        what: &'static str,
        /// The URL, password removed.
        url: String,
        /// Why, in one line.
        reason: String,
    },
    /// The pgfresh schema is missing from the database.
    #[error(
        "pgfresh is not installed in database {database}; run the `install` command (or psql -f sql/install.sql) first"
    )]
    NotInstalled {
        /// The database name.
        database: String,
    },
    /// The installed schema is older than this binary needs.
    #[error(
        "pgfresh schema version {installed} is installed in database {database} but this binary needs {required}; run the `install` command to upgrade"
    )]
    OutdatedSchema {
        /// The database name.
        database: String,
        /// Highest migration applied.
        installed: i32,
        /// Highest migration this binary knows.
        required: i32,
    },
    /// A query failed.
    #[error("PostgreSQL: {}", describe_postgres(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No pooled PostgreSQL connection could be had.
    #[error("PostgreSQL connection pool: {}", describe_pool(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A Redis command failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis refused writes for a reason of its own, not of a key (out of memory, a read-only
    /// replica, writes stopped after a failed save): the changes wait until it takes them.
    #[error("Redis refused writes: {reason}; {}", refusal_advice(.reason))]
    RedisRefused {
        /// Redis's error, as it gave it.
        reason: String,
    },
    /// A fragment is misdefined or misbehaved, or a name given on the command line matches none.
    #[error("{0}")]
    Fragment(String),
    /// A setting is out of its range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// An address to serve HTTP on cannot be used.
    #[error("cannot serve HTTP on {address}: {reason}; choose another --http address")]
    Http {
        /// The address asked for.
        address: String,
        /// Why, in one line.
        reason: String,
    },
    /// A task of pgfresh's own stopped unexpectedly (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
    /// The session's role lacks rights a listener needs on pgfresh's tables.
    #[error(
        "role {role} lacks rights a listener needs on pgfresh's tables ({missing}): after every install or upgrade, run sql/roles.sql as the DBA (psql -f sql/roles.sql) and make this role a member of pgfresh_listener"
    )]
    MissingGrants {
        /// The role.
        role: String,
        /// What it lacks, as `table: privilege`, comma separated.
        missing: String,
    },
    /// Another live listener stores another fragment under a key prefix that overlaps one of this
    /// listener's.
    #[error(
        "listener {listener} stores fragment {theirs} under {their_prefix:?}, which overlaps {mine}'s {my_prefix:?}: each one's sweep would delete the other's entries as orphans; give one of them another key prefix (or --cache-key-prefix)"
    )]
    PrefixConflict {
        /// The other listener's id.
        listener: String,
        /// Its fragment.
        theirs: String,
        /// Where it stores it.
        their_prefix: String,
        /// This listener's fragment.
        mine: String,
        /// Where this one would store it.
        my_prefix: String,
    },
    /// Another live listener stores one of this listener's fragments elsewhere in Redis.
    #[error(
        "listener {listener} stores fragment {fragment} at {theirs}, and this one would store it at {mine}: two listeners storing one fragment differently would each miss the changes the other applies; stop that listener first, or give this one the same --cache-* flags"
    )]
    StorageConflict {
        /// The other listener's id.
        listener: String,
        /// The fragment they share.
        fragment: String,
        /// Where the other listener stores it.
        theirs: String,
        /// Where this one would.
        mine: String,
    },
}

/// What to do about a failed PostgreSQL connection, from the server's or the driver's reason: the
/// server may well be running (a wrong password, a missing database), and "start it" would mislead.
fn postgres_advice(reason: &str) -> &'static str {
    let reason = reason.to_lowercase();
    if reason.contains("password") || reason.contains("authentication") {
        "check the user and password (in the URL, PGPASSWORD or ~/.pgpass)"
    } else if reason.contains("does not exist") {
        "create it, or name another in the URL (or PGUSER / PGDATABASE)"
    } else if reason.contains("too many clients") || reason.contains("remaining connection slots") {
        "the server has no free connection slot: raise max_connections, or lower --workers"
    } else if reason.contains("unsupported startup parameter") {
        "a connection pooler (PgBouncer) refuses that startup parameter: remove it from the URL and from PGOPTIONS (pgfresh sends its own settings only where the pooler takes them)"
    } else {
        "start it, or point --database-url / DATABASE_URL at it"
    }
}

/// What to do about a failed Redis connection, likewise.
fn redis_advice(reason: &str) -> &'static str {
    let reason = reason.to_lowercase();
    if reason.contains("wrongpass") || reason.contains("noauth") || reason.contains("password") {
        "check the user and password in --redis-url / REDIS_URL"
    } else if reason.contains("db index is out of range") {
        "this server has fewer databases (its `databases` setting, 16 by default): choose one that exists in the URL's /N"
    } else if reason.contains("noperm") || reason.contains("no permissions") {
        "the Redis user lacks a command or key pgfresh needs: see README, \"Least privilege\", for the ACL"
    } else if reason.contains("--redis-cluster") {
        "see README, \"Redis Cluster\""
    } else {
        "start it, or point --redis-url / REDIS_URL at it"
    }
}

/// What to do about a refusal of Redis's own (see [`Error::RedisRefused`]).
fn refusal_advice(reason: &str) -> &'static str {
    if reason.starts_with("OOM") {
        "Redis is full under maxmemory-policy noeviction: raise maxmemory, or let it evict (see README, \"Redis memory policies\")"
    } else if reason.starts_with("READONLY") {
        "this Redis is a read-only replica: point --redis-url / REDIS_URL at its primary"
    } else {
        "Redis stopped taking writes after a failed save: check its disk and its log"
    }
}

/// What a URL of this kind looks like.
fn example_url(what: &str) -> &'static str {
    if what == "Redis" {
        "redis://127.0.0.1:6379/0"
    } else {
        "postgres://user@127.0.0.1:5432/database"
    }
}

/// One line for a PostgreSQL error: the server's own message (with its hint) when there is one.
pub(crate) fn describe_postgres(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return match db.hint() {
            Some(hint) => format!("{} ({hint})", db.message()),
            None => db.message().to_string(),
        };
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn describe_pool(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => describe_postgres(e),
        other => other.to_string(),
    }
}
