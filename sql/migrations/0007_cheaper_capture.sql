-- pgfresh migration 0007: capture that costs writers less, for the same promises.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- Every write to a watched table runs its capture function. Measured here (8 pgbench clients, one-row
-- UPDATEs, BENCHMARKS.md "The cost of a change"), two parts of 0004's function cost writers more than
-- the queue row itself:
--   * SET search_path = pg_catalog, pg_temp on the function: PostgreSQL saves, sets and restores the
--     setting on every call, and the new path invalidates its cached name lookups. The generated
--     function now names everything with its schema instead (every operator as
--     OPERATOR(pg_catalog.=), every type as pg_catalog.text), so that it resolves nothing through the
--     writer's search_path: the promise 0004 made, kept without the setting. (Functions of keys of
--     dates, times, numbers and bytes still SET the settings that fix their text.)
--   * Whether a listener waits for a NOTIFY was an index scan of pgfresh.listeners on every row. It
--     is now one read of the sequence pgfresh.notify_until, which listeners set to the time until
--     which some listener is idle (one minute past its last heartbeat, as before): a sequence's last
--     value is read without a snapshot or an index, and pgfresh_capture no longer reads the registry.
-- Every existing watch is rebuilt this way, in this transaction, so no change goes uncaptured.

CREATE SEQUENCE pgfresh.notify_until MINVALUE 0;
SELECT pg_catalog.setval('pgfresh.notify_until', 0);
COMMENT ON SEQUENCE pgfresh.notify_until IS
    'pgfresh: until when (seconds since the Unix epoch) some listener waits for a NOTIFY; set by listeners, read by every capture';
GRANT SELECT ON SEQUENCE pgfresh.notify_until TO pgfresh_capture;
REVOKE SELECT (idle, seen_at) ON pgfresh.listeners FROM pgfresh_capture;
DROP INDEX pgfresh.listeners_idle_seen_at;

-- The statement that puts a watched column's text into a variable, as 0004's, with every name
-- qualified: the generated function has no search_path of its own.
CREATE OR REPLACE FUNCTION pgfresh.key_to_text(ref text, variable text, key_type oid, base_type oid) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN base_type < 16384  -- FirstNormalObjectId: below it, the types initdb created
        THEN pg_catalog.format(
            'IF pg_catalog.pg_typeof(%1$s)::pg_catalog.oid OPERATOR(pg_catalog.=) %2$s THEN '
            '%3$s := %1$s::pg_catalog.text; '
            'ELSE %3$s := pg_catalog.format(%4$L, %1$s); END IF;',
            ref, key_type, variable, '%s')
        ELSE pg_catalog.format('%1$s := pg_catalog.format(%2$L, %3$s);', variable, '%s', ref)
    END
$$;

-- The row trigger half of watch(), as 0004 wrote it but for the points above.
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

    -- Every name below is qualified: the function runs under the writer's search_path.
    body := pg_catalog.format($body$
        DECLARE
            new_key pg_catalog.text;
            old_key pg_catalog.text;
        BEGIN
            IF TG_OP OPERATOR(pg_catalog.<>) 'DELETE'
               AND pg_catalog.num_nulls(%1$s) OPERATOR(pg_catalog.=) 0 THEN
                %3$s
                INSERT INTO pgfresh.changes (topic, key) VALUES (%5$L, new_key);
            END IF;
            IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT'
               AND pg_catalog.num_nulls(%2$s) OPERATOR(pg_catalog.=) 0 THEN
                %4$s
                IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' OR new_key IS NULL
                   OR old_key OPERATOR(pg_catalog.<>) new_key THEN
                    INSERT INTO pgfresh.changes (topic, key) VALUES (%5$L, old_key);
                END IF;
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
        pg_catalog.format('NEW.%I', key_column),
        pg_catalog.format('OLD.%I', key_column),
        pgfresh.key_to_text(pg_catalog.format('NEW.%I', key_column), 'new_key', key_type, base_type),
        pgfresh.key_to_text(pg_catalog.format('OLD.%I', key_column), 'old_key', key_type, base_type),
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
REVOKE ALL ON FUNCTION pgfresh.key_to_text(text, text, oid, oid) FROM PUBLIC;

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

INSERT INTO pgfresh.migrations (version, name) VALUES (7, '0007_cheaper_capture');
