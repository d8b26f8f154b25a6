//! `doctor`: checks a deployment the way an operator would, and says for each problem what to do.
//! Run with the listener's own connection settings, it sees what the listener sees: the schema's
//! version, the watches against the fragments' topics, whether watched key values parse as the
//! fragments' keys, whether each fragment's loader works for this role (on a sample key, in a
//! read-only transaction), Redis's memory policy, live listeners, the queue and PostgreSQL's NOTIFY
//! queue. Its report is plain text an operator can paste into a ticket.

mod coverage;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::Error;
use crate::fragment::UserClient;
use crate::fragment::{Fragments, KeyOutcome, Mapping};
use crate::ops::one_line;
use crate::pg::{Database, queue, registry, schema};
use crate::store::{Eviction, RedisStore};

/// How many values of a watched key column are tried.
const KEY_SAMPLE: i64 = 100;
/// A change older than this still in the queue is a problem.
const STALE_CHANGE_SECONDS: f64 = 60.0;
/// NOTIFY queue usage above this is a problem.
const NOTIFY_USAGE_LIMIT: f64 = 0.5;

/// One thing checked.
#[derive(Debug)]
struct Finding {
    what: String,
    /// What to do, for a problem; `None` when all is well.
    fix: Option<String>,
    /// Worth knowing, though not a problem.
    note: bool,
}

/// Everything `doctor` found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, what: impl Into<String>) {
        self.findings.push(Finding {
            what: what.into(),
            fix: None,
            note: false,
        });
    }

    fn note(&mut self, what: impl Into<String>) {
        self.findings.push(Finding {
            what: what.into(),
            fix: None,
            note: true,
        });
    }

    fn problem(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.findings.push(Finding {
            what: what.into(),
            fix: Some(fix.into()),
            note: false,
        });
    }

    /// How many problems were found.
    pub(crate) fn problems(&self) -> usize {
        self.findings.iter().filter(|f| f.fix.is_some()).count()
    }

    /// The findings as JSON lines, one object each: `level` (`ok`, `note` or `problem`), `what`,
    /// and `fix` for a problem.
    pub(crate) fn json_lines(&self) -> String {
        let mut lines = String::new();
        for finding in &self.findings {
            let line = match (&finding.fix, finding.note) {
                (Some(fix), _) => {
                    serde_json::json!({"level": "problem", "what": finding.what, "fix": fix})
                }
                (None, true) => serde_json::json!({"level": "note", "what": finding.what}),
                (None, false) => serde_json::json!({"level": "ok", "what": finding.what}),
            };
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        lines
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Table, column and key names come from the database: one line each, whatever they hold.
        for finding in &self.findings {
            let what = one_line(&finding.what);
            match &finding.fix {
                None if finding.note => writeln!(f, "note     {what}")?,
                None => writeln!(f, "ok       {what}")?,
                Some(fix) => {
                    writeln!(f, "PROBLEM  {what}")?;
                    writeln!(f, "         fix: {}", one_line(fix))?;
                }
            }
        }
        match self.problems() {
            0 => write!(f, "no problems found"),
            1 => write!(f, "1 problem found"),
            n => write!(f, "{n} problems found"),
        }
    }
}

/// Checks the hot standby given for loads (`--replica-url`), if any: reachable, in recovery, of
/// this cluster, replaying.
async fn check_standby(db: &Database, primary: &tokio_postgres::Client, report: &mut Report) {
    let Some(standby) = db.standby() else {
        return;
    };
    let url = standby.url();
    match standby.examine(primary).await {
        Err(reason) => report.problem(
            format!("the standby at {url} cannot serve loads: {reason}"),
            "point --replica-url (PGFRESH_REPLICA_URL) at a streaming standby of this database, or leave it out: loads then all go to the primary",
        ),
        Ok(found) if found.paused => report.problem(
            format!("the standby at {url} has its WAL replay paused: every load goes to the primary"),
            "run SELECT pg_wal_replay_resume() on the standby",
        ),
        Ok(found) => report.ok(format!(
            "standby at {url}: in recovery, of this cluster, {} bytes of WAL behind; loads go there once it has replayed a batch's changes",
            found.behind_bytes
        )),
    }
}

/// Checks the deployment of `fragments` in `db` and `redis` (or why Redis could not be reached).
pub(crate) async fn examine(
    db: &Database,
    redis: Result<RedisStore, Error>,
    fragments: &Fragments,
) -> Result<Report, Error> {
    let mut report = Report::default();
    let client = db.pinned().await?;
    let pooled = db.behind_pooler().await?;
    if pooled {
        report.note(match db.has_session_url() {
            true => "reached through a connection pooler: the listener LISTENs on the direct --session-url, runs loaders in transactions of their own, and keeps no session state between transactions",
            false => "reached through a connection pooler with no --session-url: a listener has no LISTEN session there and polls every --poll-interval (give it a direct connection for LISTEN to apply changes within milliseconds)",
        });
    }
    check_standby(db, &client, &mut report).await;
    if let Some(privileges) = schema::excess_privileges(&client).await? {
        report.note(format!(
            "running as {privileges}: the listener needs only pgfresh_listener's rights (sql/roles.sql), and doctor sees what the listener sees when run as the listener's role"
        ));
        if pooled {
            report.problem(
                format!("running as {privileges} through a connection pooler, where pgfresh cannot pin its sessions' search_path: a function or operator that a database owner puts on the role's default path would run with those rights"),
                "connect as a role with pgfresh_listener's rights (sql/roles.sql) and SELECT on what the loaders read, or connect directly",
            );
        }
    }
    let required = schema::required_version();
    let Some(version) = schema::version_on(&client).await? else {
        report.problem(
            format!("pgfresh is not installed in database {}", db.name()),
            "run `install` as the DBA (or psql -f sql/install.sql), then `sweep`",
        );
        check_redis(&mut report, redis);
        return Ok(report);
    };
    match version.cmp(&required) {
        std::cmp::Ordering::Less => report.problem(
            format!("schema version {version} is older than this binary's {required}"),
            "run `install` as the DBA to apply the newer migrations (it upgrades in place), then restart the listeners",
        ),
        std::cmp::Ordering::Greater => report.problem(
            format!("schema version {version} is newer than this binary's {required}"),
            "deploy the newer binary: this one does not know the schema it would run on",
        ),
        std::cmp::Ordering::Equal => {
            report.ok(format!("schema version {version}, as this binary needs"))
        }
    }

    // The tables it checks are those of this binary's schema version.
    let missing = match version >= required {
        true => schema::missing_listener_grants(&client).await?,
        false => Vec::new(),
    };
    if !missing.is_empty() {
        report.problem(
            format!(
                "this role lacks rights a listener needs on pgfresh's tables: {}",
                missing.join(", ")
            ),
            "run sql/roles.sql as the DBA (after every install or upgrade), and make the listener's role a member of pgfresh_listener",
        );
    }
    for gap in schema::capture_gaps(&client).await? {
        report.problem(
            format!("{}: changes there are not captured", gap.what),
            gap.fix,
        );
    }
    let watches = schema::watches(&client).await?;
    check_topics(&mut report, fragments, &watches);
    check_keys(&mut report, db, fragments, &watches).await?;
    check_loaders(&mut report, db, fragments).await?;
    coverage::check_reads(&mut report, db, fragments, &watches).await?;
    if version >= required {
        check_sweeps(&mut report, &client, fragments).await?;
    }
    check_redis(&mut report, redis);

    let listeners = registry::live_listeners(&client, version).await?;
    if listeners.is_empty() {
        report.problem(
            "no live listener: changes are queued but nothing applies them",
            "start `listen` (with --http for its status page and metrics)",
        );
    } else {
        report.ok(format!("{} live listener(s)", listeners.len()));
    }

    let stats = queue::stats(&client, i64::MIN).await?;
    match stats.lag {
        Some(lag) if lag.as_secs_f64() > STALE_CHANGE_SECONDS => report.problem(
            format!(
                "the oldest queued change was committed {:.0} s ago: its fragment is that stale",
                lag.as_secs_f64()
            ),
            "check that a listener runs and is not standing aside, and read the queue's last errors with `status`",
        ),
        _ => report.ok(format!(
            "queue: {} pending, oldest {}",
            stats.pending,
            stats
                .lag
                .map_or("none".into(), |lag| format!("{:.1} s", lag.as_secs_f64()))
        )),
    }
    if stats.parked > 0 {
        report.problem(
            format!("{} changes are parked in pgfresh.failed", stats.parked),
            "read their errors (SELECT * FROM pgfresh.failed), fix the cause, then run `retry-failed`",
        );
    }
    check_notify(&mut report, queue::notification_queue_usage(&client).await?);
    if !queue::tickets_in_order(&client).await? {
        report.problem(
            "the sequence pgfresh.render_tickets has a cache or does not count up: renders on different sessions take tickets out of order, and Redis keeps an older render over a newer one",
            "ALTER SEQUENCE pgfresh.render_tickets CACHE 1 INCREMENT BY 1, then restart the listeners",
        );
    }
    if !queue::ids_in_order(&client).await? {
        report.problem(
            "the identity of pgfresh.changes has a cache or does not count up: listeners cannot tell which changes are settled, so while a session holds an old snapshot every claim reads every change applied since",
            "ALTER TABLE pgfresh.changes ALTER COLUMN id SET CACHE 1 (and INCREMENT BY 1), then restart the listeners",
        );
    }
    Ok(report)
}

/// PostgreSQL's NOTIFY queue (`usage` from 0 to 1) is not filling up.
fn check_notify(report: &mut Report, usage: f64) {
    if usage > NOTIFY_USAGE_LIMIT {
        report.problem(
            format!("PostgreSQL's NOTIFY queue is {:.0}% full", usage * 100.0),
            "end the session that LISTENs in a long-open transaction (pg_stat_activity, state 'idle in transaction'); when the queue is full, writes that NOTIFY fail",
        );
    } else {
        report.ok(format!("NOTIFY queue {:.1}% full", usage * 100.0));
    }
}

/// Every topic a fragment listens to is watched, and every watched topic reaches a fragment.
fn check_topics(report: &mut Report, fragments: &Fragments, watches: &[schema::Watch]) {
    let watched: BTreeSet<&str> = watches.iter().map(|w| w.topic.as_str()).collect();
    let mut handled: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for fragment in fragments.iter() {
        for topic in fragment.topics() {
            handled
                .entry(topic.name.as_str())
                .or_default()
                .push(fragment.name());
        }
    }
    for (topic, names) in &handled {
        if watched.contains(topic) {
            report.ok(format!("topic {topic} is watched ({})", names.join(", ")));
        } else {
            report.problem(
                format!(
                    "{} listen(s) to topic {topic}, but no table is watched for it: its changes are never queued",
                    names.join(", ")
                ),
                format!("SELECT pgfresh.watch('<table>', '<key column>', '{topic}');"),
            );
        }
    }
    if fragments.is_empty() {
        return;
    }
    for watch in watches {
        if !handled.contains_key(watch.topic.as_str()) {
            report.problem(
                format!(
                    "{}.{} is watched for topic {}, which no fragment of this binary handles: its changes fail and are parked",
                    watch.table, watch.key_column, watch.topic
                ),
                format!(
                    "add a fragment for topic {} (or run the binary that has one), or SELECT pgfresh.unwatch('{}', '{}');",
                    watch.topic,
                    watch.table.replace('\'', "''"),
                    watch.topic
                ),
            );
        }
    }
}

/// A sample of each watched key column parses as the key of the fragments it reaches directly.
async fn check_keys(
    report: &mut Report,
    db: &Database,
    fragments: &Fragments,
    watches: &[schema::Watch],
) -> Result<(), Error> {
    let mut client = db.pinned().await?;
    for watch in watches {
        let direct: Vec<_> = fragments
            .iter()
            .filter(|f| {
                f.topics()
                    .iter()
                    .any(|t| t.name == watch.topic && t.mapping == Mapping::Direct)
            })
            .collect();
        if direct.is_empty() {
            continue;
        }
        let (key, column) = schema::key_as_text(&client, watch).await?;
        let sql = format!(
            "SELECT {key} FROM {} WHERE {column} IS NOT NULL LIMIT {KEY_SAMPLE}",
            watch.table
        );
        // In the settings the capture triggers fix, so that dates, times and floats read as they
        // are queued, whatever this session's TimeZone or DateStyle.
        let txn = client.transaction().await?;
        txn.batch_execute(schema::KEY_TEXT_SETTINGS).await?;
        let sampled = txn.query_typed(&sql, &[]).await;
        drop(txn);
        let values: Vec<String> = match sampled {
            Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
            Err(error) => {
                report.problem(
                    format!(
                        "cannot read {}.{}: {}",
                        watch.table,
                        watch.key_column,
                        Error::from(error)
                    ),
                    "grant this role SELECT on the table (the listener's loaders need it too)",
                );
                continue;
            }
        };
        for fragment in direct {
            let bad: Vec<&String> = values
                .iter()
                .filter(|v| fragment.redis_keys(v).is_none())
                .collect();
            match bad.first() {
                None => report.ok(format!(
                    "{} sampled values of {}.{} parse as {}'s key",
                    values.len(),
                    watch.table,
                    watch.key_column,
                    fragment.name()
                )),
                Some(example) => report.problem(
                    format!(
                        "{} of {} sampled values of {}.{} (e.g. {example:?}) do not parse as {}'s key: their changes fail",
                        bad.len(),
                        values.len(),
                        watch.table,
                        watch.key_column,
                        fragment.name()
                    ),
                    format!(
                        "watch the column that holds {}'s keys (SELECT pgfresh.watch('{}', '<column>', '{}');), or change the fragment's Key type",
                        fragment.name(),
                        watch.table.replace('\'', "''"),
                        watch.topic
                    ),
                ),
            }
        }
    }
    Ok(())
}

/// Each fragment's last complete sweep, what it repaired, and the last of its recorded sweeps whose
/// repairs are a finding.
async fn check_sweeps(
    report: &mut Report,
    client: &tokio_postgres::Client,
    fragments: &Fragments,
) -> Result<(), Error> {
    let names: Vec<&str> = fragments.iter().map(|f| f.name()).collect();
    let mut seen = BTreeSet::new();
    for sweep in crate::pg::sweeps::last_of_each(client, &names).await? {
        let last = seen.insert(sweep.fragment.clone());
        let when = format!("{} sweep {:.0} s ago", sweep.reason, sweep.age);
        if sweep.unwatched {
            report.problem(
                format!(
                    "{}: its {when} repaired {} keys that no watch reported, although its listener ran all along: a change reached it that nothing captured",
                    sweep.fragment, sweep.unexplained
                ),
                "watch what its loader reads (the dependency check above names any table not watched), and look for writers that bypass the triggers (a disabled trigger, session_replication_role = replica)",
            );
        } else if last {
            report.ok(format!(
                "{}: its last complete sweep ({when}) {}",
                sweep.fragment,
                expected_repairs(&sweep)
            ));
        }
    }
    Ok(())
}

/// What a sweep that is no finding repaired, and why that was expected.
fn expected_repairs(sweep: &crate::pg::sweeps::SweepSummary) -> String {
    if sweep.repaired == 0 {
        return "found every entry fresh".to_string();
    }
    let periodic = sweep.reason == "periodic";
    if periodic && sweep.unexplained == 0 {
        return format!(
            "repaired {} entries, each for a change still in the queue",
            sweep.repaired
        );
    }
    // Repairs no change explains are expected when something was missed: the listener was down
    // before the sweep, PostgreSQL restarted, Redis lost data, a table was truncated.
    let expected = match sweep.reason.as_str() {
        "periodic" => "the first periodic sweep since a listener started or PostgreSQL restarted",
        "restart" => "PostgreSQL crashed or failed over",
        "marker" => "its marker was missing or of another version (Redis lost data, a deploy)",
        "truncate" => "a watched table was truncated",
        _ => "no listener ran all along before it",
    };
    // Only periodic sweeps look their repairs up in the queue (`sweep::page::LookUp`).
    if !periodic {
        return format!(
            "repaired {} entries, as expected: {expected}",
            sweep.repaired
        );
    }
    format!(
        "repaired {} entries, of {} keys no queued change explains, as expected: {expected}",
        sweep.repaired, sweep.unexplained
    )
}

/// Each fragment's loader works for this role on a sample key, in a read-only transaction.
async fn check_loaders(
    report: &mut Report,
    db: &Database,
    fragments: &Fragments,
) -> Result<(), Error> {
    for fragment in fragments.iter() {
        let mut client = db.get().await?;
        let txn = client.build_transaction().read_only(true).start().await?;
        let fix =
            "grant the listener's role SELECT on what the loader reads, or fix the loader's query";
        let keys = match fragment
            .keys_after(UserClient::in_transaction(txn.client()), None, 1)
            .await
        {
            Ok(keys) => keys,
            Err(error) => {
                report.problem(
                    format!("{}: listing its keys failed: {error}", fragment.name()),
                    fix,
                );
                continue;
            }
        };
        let Some(key) = keys.into_iter().next() else {
            report.ok(format!(
                "{}: no keys yet, loader not tried",
                fragment.name()
            ));
            continue;
        };
        let outcome = match fragment
            .render_keys(
                UserClient::in_transaction(txn.client()),
                std::slice::from_ref(&key),
            )
            .await
        {
            Ok(rendered) => rendered.outcomes.into_iter().next(),
            Err(error) => Some(KeyOutcome::Failed(Error::from(error).to_string())),
        };
        match outcome {
            Some(KeyOutcome::Failed(reason)) => report.problem(
                format!("{}: loading key {key} failed: {reason}", fragment.name()),
                fix,
            ),
            _ => report.ok(format!(
                "{}: loaded and rendered key {key} (read-only)",
                fragment.name()
            )),
        }
    }
    Ok(())
}

/// Redis answers, and cannot evict pgfresh's keys.
fn check_redis(report: &mut Report, redis: Result<RedisStore, Error>) {
    match redis {
        Err(error) => report.problem(
            format!("Redis: {error}"),
            "check --redis-url (or REDIS_URL) and that Redis runs",
        ),
        Ok(store) => match store.eviction() {
            (Eviction::Impossible, policy) => {
                report.ok(format!("Redis at {} evicts nothing ({policy})", store.url()))
            }
            (eviction, policy) => report.problem(
                format!("Redis maxmemory-policy {}", eviction.describe(&policy)),
                "CONFIG SET maxmemory-policy noeviction (and in redis.conf), or a volatile-* policy when fragments have no TTL",
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A NOTIFY queue over half full cannot be made in a test (it holds 8 GB on PostgreSQL 15), so
    // the check itself is tested here; tests/doctor.rs makes every other problem for real.
    #[test]
    fn a_notify_queue_over_half_full_is_a_problem_and_the_report_counts_problems() {
        let mut report = Report::default();
        check_notify(&mut report, 0.001);
        assert_eq!(report.problems(), 0);
        assert_eq!(
            report.to_string(),
            "ok       NOTIFY queue 0.1% full\nno problems found"
        );
        check_notify(&mut report, 0.62);
        assert_eq!(report.problems(), 1);
        let text = report.to_string();
        assert!(
            text.contains(
                "PROBLEM  PostgreSQL's NOTIFY queue is 62% full\n         fix: end the session"
            ),
            "{text}"
        );
        assert!(text.ends_with("1 problem found"), "{text}");
    }
}
