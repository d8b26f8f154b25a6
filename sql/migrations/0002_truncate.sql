-- pgfresh migration 0002: capture TRUNCATE of watched tables.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- A TRUNCATE names no rows, so it cannot be queued key by key. Each one is recorded as a row in
-- pgfresh.truncations instead, and a listener sweeps every fragment of the truncated topic: that
-- re-renders what is left (a card whose reviews were truncated) and deletes what is gone (every card,
-- when products was truncated).

CREATE TABLE pgfresh.truncations (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    table_oid    oid         NOT NULL,
    truncated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgfresh.truncations IS
    'pgfresh: committed TRUNCATEs of watched tables, deleted once a listener has swept their topic';

-- One function for every watch: the topic comes as the trigger's argument. SECURITY DEFINER with a
-- fixed search_path, like the row triggers, so whoever may truncate needs no grant on pgfresh.
CREATE FUNCTION pgfresh.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgfresh.truncations (topic, table_oid) VALUES (TG_ARGV[0], TG_RELID);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgfresh.capture_truncate() FROM PUBLIC;
COMMENT ON FUNCTION pgfresh.capture_truncate() IS
    'pgfresh: records a TRUNCATE of a watched table for the topic given as trigger argument';

-- watch() keeps its name and signature; 0001's body lives on as its row-trigger half (it never names
-- itself, so the rename is safe).
ALTER FUNCTION pgfresh.watch(regclass, name, text) RENAME TO watch_rows;
COMMENT ON FUNCTION pgfresh.watch_rows(regclass, name, text) IS
    'pgfresh internal: the row trigger half of pgfresh.watch(); call watch() instead';

CREATE FUNCTION pgfresh.watch_truncate(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
        pg_catalog.format('pgfresh_%s_truncate', topic), tbl);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfresh.capture_truncate(%L)',
        pg_catalog.format('pgfresh_%s_truncate', topic), tbl, topic);
END
$$;
COMMENT ON FUNCTION pgfresh.watch_truncate(regclass, text) IS
    'pgfresh internal: the TRUNCATE trigger half of pgfresh.watch(); call watch() instead';

CREATE FUNCTION pgfresh.watch(tbl regclass, key_column name, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    PERFORM pgfresh.watch_rows(tbl, key_column, topic);  -- validates its arguments first
    PERFORM pgfresh.watch_truncate(tbl, topic);
END
$$;
COMMENT ON FUNCTION pgfresh.watch(regclass, name, text) IS
    'pgfresh: queue (topic, key_column value) for every committed INSERT, UPDATE and DELETE on tbl, and record every TRUNCATE; idempotent';

-- unwatch() names itself in its body (unwatch.topic), so it cannot be renamed: it is replaced whole,
-- 0001's statements plus the TRUNCATE trigger.
CREATE OR REPLACE FUNCTION pgfresh.unwatch(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
        pg_catalog.format('pgfresh_%s_truncate', topic), tbl);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', pg_catalog.format('pgfresh_%s', topic), tbl);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS pgfresh.%I()',
        pg_catalog.format('capture_%s_%s', tbl::oid, topic));
    DELETE FROM pgfresh.watches w WHERE w.table_oid = tbl AND w.topic = unwatch.topic;
END
$$;
COMMENT ON FUNCTION pgfresh.unwatch(regclass, text) IS
    'pgfresh: stop queueing changes of tbl for topic (drops its triggers); idempotent';

REVOKE ALL ON FUNCTION pgfresh.watch_truncate(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.watch(regclass, name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.unwatch(regclass, text) FROM PUBLIC;

-- Tables watched before this migration get their TRUNCATE trigger now.
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT table_oid::regclass AS tbl, topic FROM pgfresh.watches LOOP
        PERFORM pgfresh.watch_truncate(w.tbl, w.topic);
    END LOOP;
END
$$;

INSERT INTO pgfresh.migrations (version, name) VALUES (2, '0002_truncate');
