//! The dependency nobody declared: every table a fragment's code reads must be watched under one of
//! the fragment's topics, or a change there leaves the fragment stale until the next sweep, and
//! nothing says so.
//!
//! `doctor` runs each fragment's loader on a few real keys, and each of its through queries on a few
//! keys of its topic, each in a read-only transaction of its own, and asks PostgreSQL which tables
//! that transaction locked (`pg::dependencies`): views show as the tables behind them, partitions
//! with the tables they belong to. A table read that no watch of the fragment's topics covers is a
//! problem, with the watch that would cover it when a foreign key says which column leads to the
//! fragment's key. A materialized view or a foreign table read is a note: no trigger sees its rows
//! change, so only sweeps bring the fragment up to date with it.

use std::collections::BTreeSet;

use super::Report;
use crate::Error;
use crate::fragment::UserClient;
use crate::fragment::{DynFragment, Fragments, Mapping};
use crate::pg::dependencies::{self, Reads, TableRead, Unwatchable};
use crate::pg::{Database, fan_out, schema};

/// Keys a loader or a through query is tried on.
const SAMPLE: i64 = 5;

/// Checks what every fragment's code reads against the watches.
pub(super) async fn check_reads(
    report: &mut Report,
    db: &Database,
    fragments: &Fragments,
    watches: &[schema::Watch],
) -> Result<(), Error> {
    let pinned = db.pinned().await?;
    for fragment in fragments.iter() {
        let mut reads: Vec<(TableRead, String)> = Vec::new();
        let mut unwatchable: Vec<(u32, Unwatchable, String)> = Vec::new();
        let mut add = |found: Reads, by: String| {
            reads.extend(found.tables.into_iter().map(|t| (t, by.clone())));
            unwatchable.extend(
                found
                    .unwatchable
                    .into_iter()
                    .map(|(r, k)| (r, k, by.clone())),
            );
        };
        let Some(found) = loader_reads(db, &pinned, fragment.as_ref()).await? else {
            report.ok(format!(
                "{}: no keys yet, what its loader reads not checked",
                fragment.name()
            ));
            continue;
        };
        add(found, "its loader".to_string());
        for topic in fragment.topics() {
            let Mapping::Through(query) = &topic.mapping else {
                continue;
            };
            let found = query_reads(db, &pinned, &topic.name, query, watches).await?;
            add(found, format!("its query for topic {}", topic.name));
        }
        judge(report, db, &pinned, fragment.as_ref(), watches, reads).await?;
        note_unwatchable(report, db, fragment.as_ref(), unwatchable).await?;
    }
    Ok(())
}

/// Reports each table of `reads` that no watch of `fragment`'s topics covers, or that all are.
async fn judge(
    report: &mut Report,
    db: &Database,
    pinned: &tokio_postgres::Client,
    fragment: &dyn DynFragment,
    watches: &[schema::Watch],
    reads: Vec<(TableRead, String)>,
) -> Result<(), Error> {
    let topics: Vec<&str> = fragment.topics().iter().map(|t| t.name.as_str()).collect();
    let covered = |read: &TableRead| {
        watches
            .iter()
            .any(|w| read.contains(&w.table_oid) && topics.contains(&w.topic.as_str()))
    };
    let mut reported = BTreeSet::new();
    let mut tables = BTreeSet::new();
    for (read, by) in &reads {
        // Named as the table a watch would name: the root of its partition tree.
        let table = *read.last().expect("a table read names at least itself");
        tables.insert(table);
        if covered(read) || !reported.insert(table) {
            continue;
        }
        let users = db.get().await?;
        let name = dependencies::name_in_session(&users, table).await?;
        report.problem(
            format!(
                "{}: {by} reads {name}, which no watch of its topics ({}) covers: a change there leaves it stale until the next sweep",
                fragment.name(),
                topics.join(", ")
            ),
            fix(pinned, fragment, table, &name).await?,
        );
    }
    if reported.is_empty() {
        let tables = match tables.len() {
            // Only materialized views or foreign tables, noted apart.
            0 => return Ok(()),
            1 => "the table its loader and queries read is".to_string(),
            n => format!("the {n} tables its loader and queries read are"),
        };
        report.ok(format!(
            "{}: {tables} watched under its topics",
            fragment.name()
        ));
    }
    Ok(())
}

/// Notes each materialized view and foreign table of `reads` once: no watch can cover them.
async fn note_unwatchable(
    report: &mut Report,
    db: &Database,
    fragment: &dyn DynFragment,
    reads: Vec<(u32, Unwatchable, String)>,
) -> Result<(), Error> {
    if reads.is_empty() {
        return Ok(());
    }
    let users = db.get().await?;
    let mut noted = BTreeSet::new();
    for (relation, kind, by) in reads {
        if !noted.insert(relation) {
            continue;
        }
        let name = dependencies::name_in_session(&users, relation).await?;
        let fragment = fragment.name();
        report.note(match kind {
            Unwatchable::MaterializedView => format!(
                "{fragment}: {by} reads materialized view {name}, which no trigger can watch: after each REFRESH MATERIALIZED VIEW {name}, its entries stay as they were until the next periodic sweep; run `sweep` after refreshing it, or read the tables behind it"
            ),
            Unwatchable::ForeignTable => format!(
                "{fragment}: {by} reads foreign table {name}, whose rows change elsewhere, where no trigger here sees them: its entries follow those changes only at the periodic sweep"
            ),
        });
    }
    Ok(())
}

/// The watch that covers `table` for `fragment`, when a foreign key says which column leads to its
/// key; else what to add.
async fn fix(
    pinned: &tokio_postgres::Client,
    fragment: &dyn DynFragment,
    table: u32,
    name: &str,
) -> Result<String, Error> {
    let direct: Vec<&str> = fragment
        .topics()
        .iter()
        .filter(|t| t.mapping == Mapping::Direct)
        .map(|t| t.name.as_str())
        .collect();
    let quoted = |text: &str| format!("'{}'", text.replace('\'', "''"));
    Ok(
        match dependencies::watch_by_foreign_key(pinned, table, &direct).await? {
            Some((column, topic)) => format!(
                "SELECT pgfresh.watch({}, {}, {});",
                quoted(name),
                quoted(&column),
                quoted(&topic)
            ),
            None => format!(
                "no foreign key says which of {name}'s columns leads to {}'s key: watch {name} by its own key under a topic of its own, and give {} a through query from that topic's keys to its own (README, \"Dependencies\")",
                fragment.name(),
                fragment.name()
            ),
        },
    )
}

/// What `fragment`'s loader reads, run on a few of its keys; `None` when it has no keys yet.
async fn loader_reads(
    db: &Database,
    pinned: &tokio_postgres::Client,
    fragment: &dyn DynFragment,
) -> Result<Option<Reads>, Error> {
    let mut users = db.get().await?;
    let keys = {
        let txn = users.build_transaction().read_only(true).start().await?;
        match fragment
            .keys_after(UserClient::in_transaction(txn.client()), None, SAMPLE)
            .await
        {
            Ok(keys) => keys,
            // The loaders' own check reports why.
            Err(_) => return Ok(None),
        }
    };
    if keys.is_empty() {
        return Ok(None);
    }
    let txn = users.build_transaction().read_only(true).start().await?;
    let pid = dependencies::backend_pid(txn.client()).await?;
    // Whether it rendered or failed, what it read is locked.
    let _ = fragment
        .render_keys(UserClient::in_transaction(txn.client()), &keys)
        .await;
    let reads = dependencies::locked_by(pinned, pid).await?;
    drop(txn);
    Ok(Some(reads))
}

/// What the through query for `topic` reads, run on a few keys of a table watched under it.
async fn query_reads(
    db: &Database,
    pinned: &tokio_postgres::Client,
    topic: &str,
    query: &str,
    watches: &[schema::Watch],
) -> Result<Reads, Error> {
    // Without a watch for the topic, `doctor`'s topic check says so; nothing to try it on here.
    let Some(watch) = watches.iter().find(|w| w.topic == topic) else {
        return Ok(Reads::default());
    };
    let (key, column) = schema::key_as_text(pinned, watch).await?;
    let sample = format!(
        "SELECT {key} FROM {} WHERE {column} IS NOT NULL LIMIT {SAMPLE}",
        watch.table
    );
    let keys: Vec<String> = match pinned.query_typed(&sample, &[]).await {
        Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
        Err(_) => return Ok(Reads::default()),
    };
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut users = db.get().await?;
    let txn = users.build_transaction().read_only(true).start().await?;
    let pid = dependencies::backend_pid(txn.client()).await?;
    let _ = fan_out::try_query(txn.client(), query, &keys).await;
    let reads = dependencies::locked_by(pinned, pid).await?;
    drop(txn);
    Ok(reads)
}
