-- pgfresh migration 0008: a capture function that evaluates less per row, for the same promises.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- Measured here (8 pgbench clients, one-row UPDATEs; BENCHMARKS.md "Where a change's CPU goes"), the
-- PL/pgSQL around 0007's INSERT cost writers about 14 us per row, more than running as
-- pgfresh_capture (5-10 us) or the idle-listener test (10 us): each row evaluated nine expressions
-- (which operation, whether each key is NULL, each key's type, whether the key changed), each with
-- PL/pgSQL's per-expression overhead. The function now computes both keys in its declarations, one
-- expression each (NULL where the row is absent: NEW in a DELETE, OLD in an INSERT), and decides
-- with two tests on them: five expressions for an UPDATE that keeps its key. What it queues is
-- unchanged: the new key; the old key when it differs in text or the new one is NULL; every name
-- qualified, so nothing resolves through the writer's search_path (hence no IS DISTINCT FROM, which
-- finds its = there); a key of a type not created by initdb, or whose column changed type since the
-- watch, taken from its output function (never a cast another role may define). The rest stays as
-- 0007 chose it: SECURITY DEFINER as pgfresh_capture, a role that may only insert a topic and a key,
-- is the least privilege pgfresh promises, at 5-10 us a row. Every existing watch is rebuilt this
-- way, in this transaction, so no change goes uncaptured.

-- The expression giving a watched column's text, NULL when the column is: 0007's statement
-- (key_to_text) as one expression. Of a built-in type, the type's cast to text while the column still
-- has the type it had when watched; otherwise (a type some role created, or the column's type was
-- changed since) the output function, through format(), which would give '' for a NULL.
CREATE FUNCTION pgfresh.key_text(ref text, key_type oid, base_type oid) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN base_type < 16384  -- FirstNormalObjectId: below it, the types initdb created
        THEN pg_catalog.format(
            'CASE WHEN pg_catalog.pg_typeof(%1$s)::pg_catalog.oid OPERATOR(pg_catalog.=) %2$s '
            'THEN %1$s::pg_catalog.text '
            'WHEN pg_catalog.num_nulls(%1$s) OPERATOR(pg_catalog.=) 0 THEN pg_catalog.format(%3$L, %1$s) END',
            ref, key_type, '%s')
        ELSE pg_catalog.format(
            'CASE WHEN pg_catalog.num_nulls(%1$s) OPERATOR(pg_catalog.=) 0 THEN pg_catalog.format(%2$L, %1$s) END',
            ref, '%s')
    END
$$;

-- The row trigger half of watch(), as 0007 wrote it but for the capture's body.
CREATE OR REPLACE FUNCTION pgfresh.watch_rows(tbl regclass, key_column name, topic text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning SET check_function_bodies = on
AS $watch$
DECLARE
    fn        text := pg_catalog.format('capture_%s_%s', tbl::oid, topic);
    key_type  oid;
    base_type oid;
    settings  text := '';
    body      text;
BEGIN
    IF topic IS NULL OR topic !~ '^[a-z][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'pgfresh.watch: topic % is not a valid topic name', pg_catalog.quote_literal(topic)
            USING HINT = 'Use 1 to 40 lower-case letters, digits and underscores, starting with a letter.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid = tbl AND relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION 'pgfresh.watch: % is not a table', tbl;
    END IF;
    SELECT a.atttypid INTO key_type FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgfresh.watch: table % has no column %', tbl, pg_catalog.quote_ident(key_column);
    END IF;

    base_type := key_type;
    WHILE (SELECT t.typtype FROM pg_catalog.pg_type t WHERE t.oid = base_type) = 'd' LOOP
        base_type := (SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = base_type);
    END LOOP;
    -- The text of a date, time, number or bytes depends on the writer's session settings: fix them,
    -- so that one key always queues as one text, whoever writes.
    IF (SELECT coalesce(nullif(t.typelem, 0), t.oid) FROM pg_catalog.pg_type t WHERE t.oid = base_type)
       IN ('date'::regtype, 'time'::regtype, 'timetz'::regtype, 'timestamp'::regtype,
           'timestamptz'::regtype, 'interval'::regtype, 'float4'::regtype, 'float8'::regtype,
           'money'::regtype, 'bytea'::regtype) THEN
        settings := $s$SET DateStyle = 'ISO, YMD' SET IntervalStyle = postgres SET TimeZone = 'UTC' $s$
                 || $s$SET extra_float_digits = 1 SET bytea_output = hex SET lc_monetary = 'C'$s$;
    END IF;

    -- Every name below is qualified: the function runs under the writer's search_path. NEW is
    -- NULL in a DELETE and OLD in an INSERT, so each key is NULL where its row is absent.
    body := pg_catalog.format($body$
        DECLARE
            new_key pg_catalog.text := %1$s;
            old_key pg_catalog.text := %2$s;
        BEGIN
            IF new_key IS NOT NULL THEN
                INSERT INTO pgfresh.changes (topic, key) VALUES (%3$L, new_key);
            END IF;
            IF old_key IS NOT NULL
               AND (new_key IS NULL OR old_key OPERATOR(pg_catalog.<>) new_key) THEN
                INSERT INTO pgfresh.changes (topic, key) VALUES (%3$L, old_key);
            END IF;
            IF pg_catalog.pg_sequence_last_value('pgfresh.notify_until'::pg_catalog.regclass)
                   OPERATOR(pg_catalog.>) pg_catalog.date_part('epoch', pg_catalog.now())
               AND coalesce(pg_catalog.lower(pg_catalog.current_setting('pgfresh.notify', true)), 'on')
                   OPERATOR(pg_catalog.<>) ALL (ARRAY['off', 'false', 'no', '0']) THEN
                PERFORM pg_catalog.pg_notify('pgfresh', '');
            END IF;
            RETURN NULL;
        END
        $body$,
        pgfresh.key_text(pg_catalog.format('NEW.%I', key_column), key_type, base_type),
        pgfresh.key_text(pg_catalog.format('OLD.%I', key_column), key_type, base_type),
        topic);

    -- The caller (watch()) has lent what replacing and handing over the function takes.
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE FUNCTION pgfresh.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER %s AS %L',
        fn, settings, body);
    EXECUTE pg_catalog.format('COMMENT ON FUNCTION pgfresh.%I() IS %L', fn,
        pg_catalog.format('pgfresh: queues topic %s, key %s.%I, on every row change', topic, tbl, key_column));
    PERFORM pgfresh.give_to_capture_role(pg_catalog.format('pgfresh.%I()', fn)::regprocedure);

    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', pg_catalog.format('pgfresh_%s', topic), tbl);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION pgfresh.%I()',
        pg_catalog.format('pgfresh_%s', topic), tbl, fn);

    INSERT INTO pgfresh.watches (table_oid, topic, key_column)
    VALUES (tbl, topic, key_column)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE SET key_column = EXCLUDED.key_column;
END
$watch$;
REVOKE ALL ON FUNCTION pgfresh.watch_rows(regclass, name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.key_text(text, oid, oid) FROM PUBLIC;
DROP FUNCTION pgfresh.key_to_text(text, text, oid, oid);

-- Rebuild every watch of a table that still exists with the new capture function.
DO $$
DECLARE
    watched record;
BEGIN
    FOR watched IN
        SELECT w.table_oid::regclass AS tbl, w.key_column, w.topic FROM pgfresh.watches w
        WHERE EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = w.table_oid)
        ORDER BY w.created_at
    LOOP
        PERFORM pgfresh.watch(watched.tbl, watched.key_column, watched.topic);
    END LOOP;
END
$$;

INSERT INTO pgfresh.migrations (version, name) VALUES (8, '0008_leaner_capture');
