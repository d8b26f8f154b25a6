//! The trigger study: what each part of pgfresh's capture trigger costs a write. Variants of the
//! trigger on `products`, from none to the one `pgfresh.watch` installs, each measured with pgbench
//! (8 clients) in rounds that interleave the variants (rotated each round, so drift on a noisy
//! machine hits them all alike); the report gives each variant's median TPS, its spread, the ratio
//! to no trigger, and PostgreSQL's CPU per transaction, so the trigger's own cost per row is the
//! difference from "none".
//!
//! `BENCH_TRIGGER_ROUNDS` (default 5) and `BENCH_TRIGGER_SECONDS` (default 30) set the rounds and
//! the length of each pgbench run; `BENCH_TRIGGER_ONLY` (comma-separated beginnings of variant
//! names, e.g. `none,shipped`) runs some of the variants, `BENCH_TRIGGER_ROWS` (1 or 10) those of
//! one workload.

use anyhow::Result;
use pgfresh::tokio_postgres;

use crate::cost::CpuSample;
use crate::scenarios::{Bench, PRODUCTS, connect, pgbench};

/// The statement each pgbench transaction runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `UPDATE` of one random product.
    OneRow,
    /// `UPDATE` of ten consecutive products in one statement.
    TenRows,
}

impl Workload {
    fn script(self) -> String {
        match self {
            Workload::OneRow => format!(
                "\\set id random(1, {PRODUCTS})\n\
                 UPDATE products SET price_cents = price_cents + 1 WHERE id = :id;\n"
            ),
            Workload::TenRows => format!(
                "\\set id random(1, {})\n\
                 UPDATE products SET price_cents = price_cents + 1 WHERE id BETWEEN :id AND :id + 9;\n",
                PRODUCTS - 9
            ),
        }
    }

    fn rows(self) -> f64 {
        match self {
            Workload::OneRow => 1.0,
            Workload::TenRows => 10.0,
        }
    }
}

/// One way of capturing changes to `products.id`: the SQL that installs it, after every earlier
/// variant was removed.
struct Variant {
    name: &'static str,
    workload: Workload,
    install: String,
}

/// Removes every variant: pgfresh's own watch and the study's trigger.
const REMOVE: &str = "SELECT pgfresh.unwatch('products', 'product');
    DROP TRIGGER IF EXISTS bench_variant ON products;";

/// The study's own functions, in a schema of their own, owned by the superuser running it. Bodies
/// copy what `pgfresh.watch` generates for a bigint key (migration 0004), less or more the part a
/// variant changes; "shipped" is what `pgfresh.watch` installs, owned by pgfresh_capture.
const FUNCTIONS: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgfresh_bench;
CREATE TABLE IF NOT EXISTS pgfresh_bench.changes_unindexed (
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    attempts    integer     NOT NULL DEFAULT 0,
    retry_at    timestamptz NOT NULL DEFAULT '-infinity',
    last_error  text,
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id()
);

CREATE OR REPLACE FUNCTION pgfresh_bench.bare_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgfresh.changes (topic, key) VALUES ('product', NEW.id::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgfresh_bench.bare_insert_unindexed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgfresh_bench.changes_unindexed (topic, key) VALUES ('product', NEW.id::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgfresh_bench.definer() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $$
BEGIN
    INSERT INTO pgfresh.changes (topic, key) VALUES ('product', NEW.id::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgfresh_bench.definer_path() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgfresh.changes (topic, key) VALUES ('product', NEW.id::text);
    RETURN NULL;
END $$;

-- What `pgfresh.watch` installs for a bigint key (migration 0004's body), SET search_path included.
CREATE OR REPLACE FUNCTION pgfresh_bench.v5() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_key text;
    old_key text;
BEGIN
    IF TG_OP <> 'DELETE' AND pg_catalog.num_nulls(NEW.id) = 0 THEN
        IF pg_catalog.pg_typeof(NEW.id)::pg_catalog.oid = 20 THEN
            new_key := NEW.id::text;
        ELSE
            new_key := pg_catalog.format('%s', NEW.id);
        END IF;
        INSERT INTO pgfresh.changes (topic, key) VALUES ('product', new_key);
    END IF;
    IF TG_OP <> 'INSERT' AND pg_catalog.num_nulls(OLD.id) = 0 THEN
        IF pg_catalog.pg_typeof(OLD.id)::pg_catalog.oid = 20 THEN
            old_key := OLD.id::text;
        ELSE
            old_key := pg_catalog.format('%s', OLD.id);
        END IF;
        IF TG_OP = 'DELETE' OR old_key IS DISTINCT FROM new_key THEN
            INSERT INTO pgfresh.changes (topic, key) VALUES ('product', old_key);
        END IF;
    END IF;
    IF coalesce(pg_catalog.lower(pg_catalog.current_setting('pgfresh.notify', true)), 'on')
           <> ALL (ARRAY['off', 'false', 'no', '0'])
       AND EXISTS (SELECT FROM pgfresh.listeners
                   WHERE idle AND seen_at > pg_catalog.now() - interval '1 minute') THEN
        PERFORM pg_catalog.pg_notify('pgfresh', '');
    END IF;
    RETURN NULL;
END $$;

-- Schema 5's body with every function, operator and type qualified, and no SET search_path: the
-- variant migration 0006 would have shipped (see BENCHMARKS.md, "The trigger study").
CREATE OR REPLACE FUNCTION pgfresh_bench.qualified() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $$
DECLARE
    new_key pg_catalog.text;
    old_key pg_catalog.text;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.<>) 'DELETE'
       AND pg_catalog.num_nulls(NEW.id) OPERATOR(pg_catalog.=) 0 THEN
        IF pg_catalog.pg_typeof(NEW.id)::pg_catalog.oid OPERATOR(pg_catalog.=) 20 THEN
            new_key := NEW.id::pg_catalog.text;
        ELSE
            new_key := pg_catalog.format('%s', NEW.id);
        END IF;
        INSERT INTO pgfresh.changes (topic, key) VALUES ('product', new_key);
    END IF;
    IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT'
       AND pg_catalog.num_nulls(OLD.id) OPERATOR(pg_catalog.=) 0 THEN
        IF pg_catalog.pg_typeof(OLD.id)::pg_catalog.oid OPERATOR(pg_catalog.=) 20 THEN
            old_key := OLD.id::pg_catalog.text;
        ELSE
            old_key := pg_catalog.format('%s', OLD.id);
        END IF;
        IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' OR new_key IS NULL
           OR old_key OPERATOR(pg_catalog.<>) new_key THEN
            INSERT INTO pgfresh.changes (topic, key) VALUES ('product', old_key);
        END IF;
    END IF;
    IF coalesce(pg_catalog.lower(pg_catalog.current_setting('pgfresh.notify', true)), 'on')
           OPERATOR(pg_catalog.<>) ALL (ARRAY['off', 'false', 'no', '0']::pg_catalog.text[])
       AND EXISTS (SELECT FROM pgfresh.listeners
                   WHERE idle AND seen_at OPERATOR(pg_catalog.>)
                       (pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::pg_catalog.interval)) THEN
        PERFORM pg_catalog.pg_notify('pgfresh', '');
    END IF;
    RETURN NULL;
END $$;

-- One call per statement: every old and new key of the statement in one INSERT ... SELECT, the
-- registry read once.
CREATE OR REPLACE FUNCTION pgfresh_bench.statement() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgfresh.changes (topic, key)
    SELECT 'product', k.id::text FROM (SELECT id FROM new_rows UNION SELECT id FROM old_rows) k;
    IF coalesce(pg_catalog.lower(pg_catalog.current_setting('pgfresh.notify', true)), 'on')
           <> ALL (ARRAY['off', 'false', 'no', '0'])
       AND EXISTS (SELECT FROM pgfresh.listeners
                   WHERE idle AND seen_at > pg_catalog.now() - interval '1 minute') THEN
        PERFORM pg_catalog.pg_notify('pgfresh', '');
    END IF;
    RETURN NULL;
END $$;
"#;

/// Copies: one that differs only in its owner (pgfresh's capture functions belong to
/// pgfresh_capture, the study's own to the superuser running it, who skips every privilege check),
/// and v5 without its registry lookup.
const COPIES: &str = r#"
DO $$
DECLARE
    v5 text := (SELECT prosrc FROM pg_proc WHERE oid = 'pgfresh_bench.v5()'::regprocedure);
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION pgfresh_bench.qualified_capture() RETURNS trigger '
                   'LANGUAGE plpgsql SECURITY DEFINER AS %L',
                   (SELECT prosrc FROM pg_proc WHERE oid = 'pgfresh_bench.qualified()'::regprocedure));
    ALTER FUNCTION pgfresh_bench.qualified_capture() OWNER TO pgfresh_capture;
    -- Schema 6's capture (migration 0004's body) as pgfresh.watch installed it: owned by
    -- pgfresh_capture, which needs its read of the registry back for it (taken away in 0007; given
    -- back for the study's length, in this benchmark database only).
    EXECUTE format('CREATE OR REPLACE FUNCTION pgfresh_bench.v6_capture() RETURNS trigger '
                   'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L', v5);
    ALTER FUNCTION pgfresh_bench.v6_capture() OWNER TO pgfresh_capture;
    GRANT USAGE ON SCHEMA pgfresh_bench TO pgfresh_capture;
    GRANT SELECT (idle, seen_at) ON pgfresh.listeners TO pgfresh_capture;
    -- v5 without its registry lookup (it never notifies).
    EXECUTE format('CREATE OR REPLACE FUNCTION pgfresh_bench.v5_no_registry() RETURNS trigger '
                   'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L',
                   replace(v5, substring(v5 from '    IF coalesce\(.*pg_notify[^\n]*\n    END IF;\n'), ''));
END
$$;
"#;

fn row_trigger(function: &str) -> String {
    format!(
        "CREATE TRIGGER bench_variant AFTER INSERT OR UPDATE OR DELETE ON products \
         FOR EACH ROW EXECUTE FUNCTION pgfresh_bench.{function}()"
    )
}

fn variants() -> Vec<Variant> {
    let statement = "CREATE TRIGGER bench_variant AFTER UPDATE ON products \
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows \
        FOR EACH STATEMENT EXECUTE FUNCTION pgfresh_bench.statement()"
        .to_string();
    let shipped = "SELECT pgfresh.watch('products', 'id', 'product')".to_string();
    let one = |name, install| Variant {
        name,
        workload: Workload::OneRow,
        install,
    };
    let ten = |name, install| Variant {
        name,
        workload: Workload::TenRows,
        install,
    };
    vec![
        one("none", String::new()),
        one("bare INSERT", row_trigger("bare_insert")),
        one(
            "bare INSERT, queue without index",
            row_trigger("bare_insert_unindexed"),
        ),
        one("+ SECURITY DEFINER", row_trigger("definer")),
        one("+ SET search_path", row_trigger("definer_path")),
        one(
            "shipped (pgfresh.watch, owned by pgfresh_capture)",
            shipped.clone(),
        ),
        one(
            "schema 6's capture, owned by pgfresh_capture",
            row_trigger("v6_capture"),
        ),
        one("shipped body, owned by a superuser", row_trigger("v5")),
        one(
            "shipped body, owned by a superuser, no registry lookup",
            row_trigger("v5_no_registry"),
        ),
        one(
            "qualified, no SET, owned by pgfresh_capture",
            row_trigger("qualified_capture"),
        ),
        one(
            "qualified, no SET, owned by a superuser",
            row_trigger("qualified"),
        ),
        one("statement-level", statement.clone()),
        ten("none", String::new()),
        ten("shipped (pgfresh.watch, owned by pgfresh_capture)", shipped),
        ten("statement-level", statement),
    ]
}

/// One variant's runs.
#[derive(Default)]
struct Runs {
    tps: Vec<f64>,
    /// PostgreSQL CPU µs per transaction.
    cpu_us: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)))
}

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Bench {
    /// The trigger study (module header).
    pub async fn triggers(&self) -> Result<()> {
        let rounds = env_number("BENCH_TRIGGER_ROUNDS", 5);
        let seconds = env_number("BENCH_TRIGGER_SECONDS", 30);
        let (_, url) = self.shop(PRODUCTS).await?;
        let client = connect(&url).await?;
        client.batch_execute(FUNCTIONS).await?;
        client.batch_execute(COPIES).await?;
        // No listener during the study: a leftover idle one would make every variant NOTIFY.
        client
            .batch_execute("DELETE FROM pgfresh.listeners")
            .await?;
        let dir = std::env::temp_dir();
        let scripts = [Workload::OneRow, Workload::TenRows].map(|w| {
            let path = dir.join(format!("pgfresh-bench-triggers-{}.sql", w.rows()));
            std::fs::write(&path, w.script()).map(|()| (w, path))
        });
        let scripts: Vec<_> = scripts.into_iter().collect::<Result<_, _>>()?;
        let only = std::env::var("BENCH_TRIGGER_ONLY").unwrap_or_default();
        let rows = env_number("BENCH_TRIGGER_ROWS", 0);
        let variants: Vec<Variant> = variants()
            .into_iter()
            .filter(|v| {
                only.is_empty() || only.split(',').any(|name| v.name.starts_with(name.trim()))
            })
            .filter(|v| rows == 0 || v.workload.rows() == f64::from(rows))
            .collect();
        let mut runs: Vec<Runs> = variants.iter().map(|_| Runs::default()).collect();
        println!(
            "triggers: {rounds} rounds of {} variants, pgbench -c 8 -j 2 -T {seconds} each, interleaved",
            variants.len()
        );
        for round in 0..rounds as usize {
            for step in 0..variants.len() {
                let index = (step + round * 5) % variants.len();
                let variant = &variants[index];
                let script = &scripts
                    .iter()
                    .find(|(w, _)| *w == variant.workload)
                    .expect("a script per workload")
                    .1;
                let (tps, cpu_us) = self
                    .trigger_run(&client, &url, script, &variant.install, seconds)
                    .await?;
                runs[index].tps.push(tps);
                runs[index].cpu_us.push(cpu_us);
            }
            eprintln!("triggers: round {} of {rounds} done", round + 1);
        }
        client.batch_execute(REMOVE).await?;
        client
            .batch_execute(
                "SELECT pgfresh.watch('products', 'id', 'product');
                 TRUNCATE pgfresh.changes, pgfresh_bench.changes_unindexed;
                 REVOKE SELECT (idle, seen_at) ON pgfresh.listeners FROM pgfresh_capture;
                 REVOKE USAGE ON SCHEMA pgfresh_bench FROM pgfresh_capture;",
            )
            .await?;
        for workload in [Workload::OneRow, Workload::TenRows] {
            let baseline = variants
                .iter()
                .zip(&runs)
                .find(|(v, _)| v.workload == workload && v.name == "none")
                .map(|(_, r)| (median(&r.tps), median(&r.cpu_us)))
                .unwrap_or((f64::NAN, f64::NAN));
            for (variant, r) in variants.iter().zip(&runs) {
                if variant.workload != workload {
                    continue;
                }
                let (lo, hi) = spread(&r.tps);
                let cpu = median(&r.cpu_us);
                println!(
                    "triggers: {} row(s) per UPDATE, {}: median {:.0} TPS ({lo:.0}-{hi:.0}), ratio {:.2}; PostgreSQL CPU {cpu:.0} µs per transaction, trigger {:.1} µs per row",
                    workload.rows(),
                    variant.name,
                    median(&r.tps),
                    median(&r.tps) / baseline.0,
                    (cpu - baseline.1) / workload.rows(),
                );
            }
        }
        Ok(())
    }

    /// Installs one variant and runs pgbench once: TPS and PostgreSQL's CPU µs per transaction.
    async fn trigger_run(
        &self,
        client: &tokio_postgres::Client,
        url: &str,
        script: &std::path::Path,
        install: &str,
        seconds: u32,
    ) -> Result<(f64, f64)> {
        client.batch_execute(REMOVE).await?;
        client
            .batch_execute("TRUNCATE pgfresh.changes, pgfresh_bench.changes_unindexed; CHECKPOINT")
            .await?;
        if !install.is_empty() {
            client.batch_execute(install).await?;
        }
        let before = CpuSample::now(self.redis_url()).await?;
        let tps = pgbench(url, script, seconds).await?;
        let postgres = CpuSample::now(self.redis_url())
            .await?
            .since(before)
            .postgres();
        Ok((tps, postgres * 1e6 / (tps * f64::from(seconds))))
    }
}
