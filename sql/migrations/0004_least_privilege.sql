-- pgfresh migration 0004: capture code runs with the least rights and runs no code a table owner
-- controls; trigger names cannot collide; NOTIFY can be turned off for two-phase commit.
--
-- Runs inside install.sql's transaction after prepare.sql, which has created (or checked) the role
-- pgfresh_capture; never edit it once released: later changes go into a new numbered file.
--
-- Until now the capture functions that watch() generates were SECURITY DEFINER and owned by whoever
-- called watch(), in practice a superuser, and they evaluated NEW.col::text and IS DISTINCT FROM,
-- whose casts and operators PostgreSQL looks up when the function runs. A table owner who changed the
-- watched column to a type of their own, with a cast of their own, had that cast run as the superuser.
-- From this version:
--   * every capture function belongs to pgfresh_capture, which may only INSERT a (topic, key) into
--     pgfresh.changes, INSERT into pgfresh.truncations and read the listeners' idle flag; a role that
--     is not a superuser is lent what handing a function over takes only within its transaction;
--   * a key's text comes from ::text only while the column still has the built-in type it had when
--     watched; any other type is turned into text by its output function (format('%s')), which for
--     every type a role other than a superuser can create is PostgreSQL's own code; old and new keys
--     are compared as text, so no operator is looked up at all; a composite key with a NULL field is
--     a key like any other; dates, times, floats and bytes are written in fixed settings, so their
--     text does not depend on the writer's session;
--   * the TRUNCATE trigger of topic x is named "pgfresh_x:truncate" (it was pgfresh_x_truncate, the
--     name of topic x_truncate's row trigger); topics cannot contain ':';
--   * a session, role or database with pgfresh.notify = off never NOTIFYs, so its transactions can
--     PREPARE TRANSACTION (a transaction that ran NOTIFY cannot); its changes are found by the
--     listener's poll instead.
-- Every existing watch is rebuilt this way, in this transaction, so no change goes uncaptured.

GRANT USAGE ON SCHEMA pgfresh TO pgfresh_capture;
GRANT INSERT (topic, key) ON pgfresh.changes TO pgfresh_capture;
GRANT SELECT (idle, seen_at) ON pgfresh.listeners TO pgfresh_capture;
GRANT INSERT (topic, table_oid) ON pgfresh.truncations TO pgfresh_capture;

-- The listeners' idle flag is read by every write to a watched table: keep that a short index scan
-- however many rows the registry holds.
CREATE INDEX listeners_idle_seen_at ON pgfresh.listeners (seen_at) WHERE idle;

-- Lends a role that is not a superuser what handing a function to pgfresh_capture takes, for the
-- length of the calling transaction only: membership in pgfresh_capture (to replace or give away a
-- function it owns; granted by the caller's CREATEROLE) and, to pgfresh_capture, CREATE on schema
-- pgfresh (a new owner must hold it). Taken back with lend = false before the transaction ends, so
-- nobody ever sees them held, and no installer keeps power over the capture code of other databases.
CREATE FUNCTION pgfresh.lend_capture_role(lend boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RETURN;
    END IF;
    IF lend THEN
        EXECUTE pg_catalog.format('GRANT pgfresh_capture TO %I', current_user);
        GRANT CREATE ON SCHEMA pgfresh TO pgfresh_capture;
    ELSE
        REVOKE CREATE ON SCHEMA pgfresh FROM pgfresh_capture;
        EXECUTE pg_catalog.format('REVOKE pgfresh_capture FROM %I', current_user);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pgfresh.lend_capture_role(boolean) FROM PUBLIC;
COMMENT ON FUNCTION pgfresh.lend_capture_role(boolean) IS
    'pgfresh internal: lends, within one transaction, what handing a function to pgfresh_capture takes';

-- Hands a function in schema pgfresh to pgfresh_capture; the caller has lent what it takes.
CREATE FUNCTION pgfresh.give_to_capture_role(fn regprocedure) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO pgfresh_capture', fn);
END
$$;
REVOKE ALL ON FUNCTION pgfresh.give_to_capture_role(regprocedure) FROM PUBLIC;
COMMENT ON FUNCTION pgfresh.give_to_capture_role(regprocedure) IS
    'pgfresh internal: makes pgfresh_capture the owner of a capture function';

-- The statement that puts a watched column's text into a variable, for watch_rows(). A built-in
-- type (or a domain over one) keeps the text ::text gives, which nobody but a superuser can
-- redefine, while the column still has that type (checked on every row); any other type, or one the
-- table's owner changed it to, is turned into text by its output function, which for every type a
-- role other than a superuser can create is PostgreSQL's own code.
CREATE FUNCTION pgfresh.key_to_text(ref text, variable text, key_type oid, base_type oid) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN base_type < 16384  -- FirstNormalObjectId: below it, the types initdb created
        THEN pg_catalog.format(
            'IF pg_catalog.pg_typeof(%1$s)::pg_catalog.oid = %2$s THEN %3$s := %1$s::text; '
            'ELSE %3$s := pg_catalog.format(%4$L, %1$s); END IF;',
            ref, key_type, variable, '%s')
        ELSE pg_catalog.format('%1$s := pg_catalog.format(%2$L, %3$s);', variable, '%s', ref)
    END
$$;
REVOKE ALL ON FUNCTION pgfresh.key_to_text(text, text, oid, oid) FROM PUBLIC;
COMMENT ON FUNCTION pgfresh.key_to_text(text, text, oid, oid) IS
    'pgfresh internal: how a capture function turns its key column into text';

-- The row trigger half of watch(), as 0001 wrote it but for the points above. The generated body is
-- handed to CREATE FUNCTION as a quoted literal, so no column name can end it early.
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

    body := pg_catalog.format($body$
        DECLARE
            new_key text;
            old_key text;
        BEGIN
            IF TG_OP <> 'DELETE' AND pg_catalog.num_nulls(%1$s) = 0 THEN
                %3$s
                INSERT INTO pgfresh.changes (topic, key) VALUES (%5$L, new_key);
            END IF;
            IF TG_OP <> 'INSERT' AND pg_catalog.num_nulls(%2$s) = 0 THEN
                %4$s
                IF TG_OP = 'DELETE' OR old_key IS DISTINCT FROM new_key THEN
                    INSERT INTO pgfresh.changes (topic, key) VALUES (%5$L, old_key);
                END IF;
            END IF;
            IF coalesce(pg_catalog.lower(pg_catalog.current_setting('pgfresh.notify', true)), 'on')
                   <> ALL (ARRAY['off', 'false', 'no', '0'])
               AND EXISTS (SELECT FROM pgfresh.listeners
                           WHERE idle AND seen_at > pg_catalog.now() - interval '1 minute') THEN
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
        'CREATE OR REPLACE FUNCTION pgfresh.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path = pg_catalog, pg_temp %s AS %L',
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

CREATE OR REPLACE FUNCTION pgfresh.watch_truncate(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
        pg_catalog.format('pgfresh_%s:truncate', topic), tbl);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfresh.capture_truncate(%L)',
        pg_catalog.format('pgfresh_%s:truncate', topic), tbl, topic);
END
$$;

CREATE OR REPLACE FUNCTION pgfresh.unwatch(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
        pg_catalog.format('pgfresh_%s:truncate', topic), tbl);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', pg_catalog.format('pgfresh_%s', topic), tbl);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS pgfresh.%I()',
        pg_catalog.format('capture_%s_%s', tbl::oid, topic));
    DELETE FROM pgfresh.watches w WHERE w.table_oid = tbl AND w.topic = unwatch.topic;
END
$$;

-- watch() as 0002 defined it, but lending what its halves take (creating a trigger on a function
-- takes EXECUTE on it, which only its owner, pgfresh_capture, has) for the length of the call.
CREATE OR REPLACE FUNCTION pgfresh.watch(tbl regclass, key_column name, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    PERFORM pgfresh.lend_capture_role(true);
    PERFORM pgfresh.watch_rows(tbl, key_column, topic);  -- validates its arguments first
    PERFORM pgfresh.watch_truncate(tbl, topic);
    PERFORM pgfresh.lend_capture_role(false);
END
$$;

REVOKE ALL ON FUNCTION pgfresh.watch(regclass, name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.watch_rows(regclass, name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.watch_truncate(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.unwatch(regclass, text) FROM PUBLIC;

-- The TRUNCATE capture runs no code of anyone's, but it too needs no more than pgfresh_capture's rights.
DO $$
BEGIN
    PERFORM pgfresh.lend_capture_role(true);
    PERFORM pgfresh.give_to_capture_role('pgfresh.capture_truncate()'::regprocedure);
    PERFORM pgfresh.lend_capture_role(false);
END
$$;

-- Rebuild every watch: drop every trigger calling into pgfresh (found from the catalog, so triggers
-- whose names collided are found too), forget watches of tables dropped since and their capture
-- functions, and watch again.
DO $$
DECLARE
    trg     record;
    watched record;
    orphan  regprocedure;
BEGIN
    FOR trg IN
        SELECT t.tgname, t.tgrelid::regclass AS tbl
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'pgfresh' AND NOT t.tgisinternal AND t.tgparentid = 0
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trg.tgname, trg.tbl);
    END LOOP;
    DELETE FROM pgfresh.watches w
    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = w.table_oid);
    FOR watched IN
        SELECT table_oid::regclass AS tbl, key_column, topic FROM pgfresh.watches ORDER BY created_at
    LOOP
        PERFORM pgfresh.watch(watched.tbl, watched.key_column, watched.topic);
    END LOOP;
    FOR orphan IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pgfresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND p.proname <> 'capture_truncate'
          AND NOT EXISTS (SELECT FROM pgfresh.watches w
                          WHERE p.proname = pg_catalog.format('capture_%s_%s', w.table_oid, w.topic))
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', orphan);
    END LOOP;
END
$$;

INSERT INTO pgfresh.migrations (version, name) VALUES (4, '0004_least_privilege');
