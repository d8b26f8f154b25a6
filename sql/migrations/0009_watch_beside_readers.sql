-- pgfresh migration 0009: watch() waits for no reader of the table it watches.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- watch() put its triggers in place with DROP TRIGGER IF EXISTS and CREATE TRIGGER. Where the trigger
-- existed (watching a table again: a changed key column, a rebuild), DROP TRIGGER took ACCESS
-- EXCLUSIVE on the table and each partition, so watch() waited for every transaction that had read
-- them (a report, a forgotten BEGIN), and every query of them queued behind it meanwhile: on a busy
-- site an outage of the table for as long as the longest reader. From PostgreSQL 14 on, CREATE OR
-- REPLACE TRIGGER puts a trigger in place, new or replaced, under SHARE ROW EXCLUSIVE, the lock
-- CREATE TRIGGER takes: writers of the table wait for watch() as before, readers no longer do. On
-- PostgreSQL 13 watch() drops and creates as before. The triggers themselves do not change, nor
-- does what they queue: nothing installed is rebuilt. A trigger enabled ALWAYS or REPLICA (on a
-- logical replication subscriber) stays so through watch(): it was made anew, firing on the origin
-- only, and the apply worker's writes went uncaptured until the DBA enabled it again.
--
-- One case where replacing differs from dropping: a partition watched on its own under the same
-- topic before it was attached carries a trigger of that name that is not a copy of the table's.
-- CREATE TRIGGER on the table failed on it ("already exists"); CREATE OR REPLACE would silently
-- turn it into a copy, queueing the table's key column instead of the partition's. watch() refuses
-- that case by name first.

-- Puts trigger `trigger_name` on `tbl`, as `events` ... ON tbl `action`, in place of any of that name. A
-- trigger put in place fires on the origin only, but one that was enabled ALWAYS or REPLICA (on a
-- logical replication subscriber, so that the apply worker's writes are captured) is again after,
-- on the table and on each partition, as it was; a disabled one is enabled: watch() captures.
CREATE OR REPLACE FUNCTION pgfresh.put_trigger(tbl regclass, trigger_name text, events text, action text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    members regclass[];
    states  text[];
BEGIN
    SELECT pg_catalog.array_agg(t.tgrelid::regclass ORDER BY member.level, member.relid),
           pg_catalog.array_agg(t.tgenabled::text ORDER BY member.level, member.relid)
    INTO members, states
    FROM (SELECT tbl::oid AS relid, 0 AS level
          UNION SELECT p.relid, p.level FROM pg_catalog.pg_partition_tree(tbl) p) member
    JOIN pg_catalog.pg_trigger t ON t.tgrelid = member.relid
    WHERE t.tgname = trigger_name AND t.tgenabled IN ('A', 'R');
    IF pg_catalog.current_setting('server_version_num')::integer < 140000 THEN
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', trigger_name, tbl);
        EXECUTE pg_catalog.format('CREATE TRIGGER %I %s ON %s %s', trigger_name, events, tbl, action);
    ELSE
        EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER %I %s ON %s %s', trigger_name, events, tbl, action);
    END IF;
    -- The table first: enabling a trigger on a partitioned table may reach its partitions' copies.
    FOR i IN 1 .. coalesce(pg_catalog.array_length(members, 1), 0) LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE %s TRIGGER %I', members[i],
            CASE states[i] WHEN 'A' THEN 'ALWAYS' ELSE 'REPLICA' END, trigger_name);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgfresh.put_trigger(regclass, text, text, text) IS
    'pgfresh: puts a trigger in place, replacing one of the same name (part of watch)';
REVOKE ALL ON FUNCTION pgfresh.put_trigger(regclass, text, text, text) FROM PUBLIC;

-- The row trigger half of watch(), as 0007 wrote it but for how it puts the trigger in place.
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
    own       text;
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

    -- A partition's own watch of this topic (made before it was attached) is not replaced silently.
    SELECT pg_catalog.string_agg(t.tgrelid::regclass::text, ', ' ORDER BY t.tgrelid) INTO own
    FROM pg_catalog.pg_partition_tree(tbl) p
    JOIN pg_catalog.pg_trigger t ON t.tgrelid = p.relid
    WHERE p.relid <> tbl AND t.tgparentid = 0 AND t.tgname = pg_catalog.format('pgfresh_%s', topic);
    IF own IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh.watch: partition % of % has a watch of its own for topic %', own, tbl, topic
            USING HINT = 'Unwatch each such partition for this topic (pgfresh.unwatch), then watch the table: its watch covers every partition.';
    END IF;
    -- Nor is a partition watched apart from the table whose watch of this topic covers it.
    SELECT pg_catalog.string_agg(parent.tgrelid::regclass::text, ', ') INTO own
    FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_trigger parent ON parent.oid = t.tgparentid
    WHERE t.tgrelid = tbl AND t.tgname = pg_catalog.format('pgfresh_%s', topic);
    IF own IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh.watch: % is a partition of %, whose watch of topic % covers it', tbl, own, topic
            USING HINT = 'Watch it under a topic of its own, or unwatch the table first.';
    END IF;

    PERFORM pgfresh.put_trigger(tbl, pg_catalog.format('pgfresh_%s', topic), 'AFTER INSERT OR UPDATE OR DELETE',
        pg_catalog.format('FOR EACH ROW EXECUTE FUNCTION pgfresh.%I()', fn));

    INSERT INTO pgfresh.watches (table_oid, topic, key_column)
    VALUES (tbl, topic, key_column)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE SET key_column = EXCLUDED.key_column;
END
$watch$;
REVOKE ALL ON FUNCTION pgfresh.watch_rows(regclass, name, text) FROM PUBLIC;

-- The TRUNCATE half, as 0008 wrote it but for the same, on the table and each partition.
CREATE OR REPLACE FUNCTION pgfresh.watch_truncate(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT tbl UNION SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t
    LOOP
        -- A foreign table cannot have a TRUNCATE trigger, so it has none to replace.
        CONTINUE WHEN (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = part) = 'f';
        PERFORM pgfresh.put_trigger(part, pg_catalog.format('pgfresh_%s:truncate', topic), 'AFTER TRUNCATE',
            pg_catalog.format('FOR EACH STATEMENT EXECUTE FUNCTION pgfresh.capture_truncate(%L)', topic));
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgfresh.watch_truncate(regclass, text) FROM PUBLIC;

INSERT INTO pgfresh.migrations (version, name) VALUES (9, '0009_watch_beside_readers');
