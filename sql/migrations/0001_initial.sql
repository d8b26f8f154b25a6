-- pgfresh migration 0001: the change queue, parked failures, listener registry, watch/unwatch.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.

-- The durable queue. Triggers only ever INSERT here: ids come from an identity sequence, so two
-- transactions writing the same product never wait for each other on a pgfresh row. The listener claims
-- rows with FOR UPDATE SKIP LOCKED and deletes them once Redis has the new render.
CREATE TABLE pgfresh.changes (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    attempts    integer     NOT NULL DEFAULT 0,
    retry_at    timestamptz NOT NULL DEFAULT '-infinity',
    last_error  text,
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id()
);
COMMENT ON TABLE pgfresh.changes IS
    'pgfresh queue: one row per committed change to a watched key, deleted once its fragments are in Redis';
COMMENT ON COLUMN pgfresh.changes.topic IS 'topic given to pgfresh.watch(); fragments subscribe to topics';
COMMENT ON COLUMN pgfresh.changes.key IS 'text form of the watched key column (old and new value on a key change)';
COMMENT ON COLUMN pgfresh.changes.attempts IS 'failed attempts so far; parked in pgfresh.failed at the limit';
COMMENT ON COLUMN pgfresh.changes.retry_at IS 'not claimed before this time (backoff after a failure)';
COMMENT ON COLUMN pgfresh.changes.last_error IS 'error of the last failed attempt, for status';
COMMENT ON COLUMN pgfresh.changes.xid IS
    'transaction that made the change: a listener settles it without rendering when a render it made already saw that transaction';

-- Changes that failed too often. Nothing is dropped silently: `retry-failed` puts them back in the queue.
CREATE TABLE pgfresh.failed (
    change_id   bigint      PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    enqueued_at timestamptz NOT NULL,
    attempts    integer     NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    error       text        NOT NULL
);
COMMENT ON TABLE pgfresh.failed IS
    'pgfresh changes parked after repeated failures, with the last error; requeue with `retry-failed`';

-- Render tickets order renders of the same Redis key: a ticket is taken before the rows are read, and
-- Redis refuses a write whose ticket is lower than the one already stored beside the fragment.
CREATE SEQUENCE pgfresh.render_tickets AS bigint;
COMMENT ON SEQUENCE pgfresh.render_tickets IS
    'pgfresh render tickets: taken before reading rows, compared atomically in Redis so an older render never wins';

-- Running listeners. Unlogged: it is rebuilt by the listeners themselves and needs no crash safety.
-- Triggers NOTIFY only while some live listener says it is idle: a NOTIFY makes every committing
-- transaction take a cluster-wide lock, so under load the listener keeps draining and nobody notifies.
CREATE UNLOGGED TABLE pgfresh.listeners (
    id             text        PRIMARY KEY,
    idle           boolean     NOT NULL DEFAULT false,
    started_at     timestamptz NOT NULL DEFAULT now(),
    seen_at        timestamptz NOT NULL DEFAULT now(),
    changes_done   bigint      NOT NULL DEFAULT 0,
    refused_writes bigint      NOT NULL DEFAULT 0
);
COMMENT ON TABLE pgfresh.listeners IS
    'pgfresh listeners alive now (seen_at refreshed every few seconds); idle ones want a NOTIFY on new changes';
COMMENT ON COLUMN pgfresh.listeners.changes_done IS 'changes this listener applied since it started';
COMMENT ON COLUMN pgfresh.listeners.refused_writes IS
    'renders this listener dropped because Redis already held a newer one (a lost race, not an error)';

-- The watch registry: which table feeds which topic through which key column.
CREATE TABLE pgfresh.watches (
    table_oid  oid         NOT NULL,
    topic      text        NOT NULL,
    key_column name        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, topic)
);
COMMENT ON TABLE pgfresh.watches IS 'pgfresh watches: tables whose committed changes are queued, by topic';

-- watch() generates one small trigger function per (table, topic) so the key column is read with static
-- field access (NEW.col): no dynamic SQL, no row-to-JSON conversion, and plans cached per session.
-- It is SECURITY DEFINER with a fixed search_path so that writers need no grant on schema pgfresh and
-- cannot redirect what it calls. After queueing, it NOTIFYs only if a live listener is idle; the
-- payload is empty because a NOTIFY is a wake-up and the queue is the truth (identical payloads fold
-- into one notification per transaction).
CREATE FUNCTION pgfresh.watch(tbl regclass, key_column name, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $watch$
DECLARE
    fn text := pg_catalog.format('capture_%s_%s', tbl::oid, topic);
    trg text := pg_catalog.format('pgfresh_%s', topic);
BEGIN
    IF topic IS NULL OR topic !~ '^[a-z][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'pgfresh.watch: topic % is not a valid topic name', pg_catalog.quote_literal(topic)
            USING HINT = 'Use 1 to 40 lower-case letters, digits and underscores, starting with a letter.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid = tbl AND relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION 'pgfresh.watch: % is not a table', tbl;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                   WHERE attrelid = tbl AND attname = key_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'pgfresh.watch: table % has no column %', tbl, pg_catalog.quote_ident(key_column);
    END IF;

    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION pgfresh.%1$I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            IF TG_OP <> 'DELETE' AND NEW.%2$I IS NOT NULL THEN
                INSERT INTO pgfresh.changes (topic, key) VALUES (%3$L, NEW.%2$I::text);
            END IF;
            IF TG_OP <> 'INSERT' AND OLD.%2$I IS NOT NULL
               AND (TG_OP = 'DELETE' OR OLD.%2$I IS DISTINCT FROM NEW.%2$I) THEN
                INSERT INTO pgfresh.changes (topic, key) VALUES (%3$L, OLD.%2$I::text);
            END IF;
            IF EXISTS (SELECT FROM pgfresh.listeners
                       WHERE idle AND seen_at > now() - interval '1 minute') THEN
                PERFORM pg_notify('pgfresh', '');
            END IF;
            RETURN NULL;
        END
        $body$$f$, fn, key_column, topic);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION pgfresh.%I() FROM PUBLIC', fn);
    EXECUTE pg_catalog.format('COMMENT ON FUNCTION pgfresh.%I() IS %L', fn,
        pg_catalog.format('pgfresh: queues topic %s, key %s.%I, on every row change', topic, tbl, key_column));

    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', trg, tbl);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION pgfresh.%I()',
        trg, tbl, fn);

    INSERT INTO pgfresh.watches (table_oid, topic, key_column)
    VALUES (tbl, topic, key_column)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE SET key_column = EXCLUDED.key_column;
END
$watch$;
COMMENT ON FUNCTION pgfresh.watch(regclass, name, text) IS
    'pgfresh: queue (topic, key_column value) for every committed INSERT, UPDATE and DELETE on tbl; idempotent';

CREATE FUNCTION pgfresh.unwatch(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', pg_catalog.format('pgfresh_%s', topic), tbl);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS pgfresh.%I()',
        pg_catalog.format('capture_%s_%s', tbl::oid, topic));
    DELETE FROM pgfresh.watches w WHERE w.table_oid = tbl AND w.topic = unwatch.topic;
END
$$;
COMMENT ON FUNCTION pgfresh.unwatch(regclass, text) IS
    'pgfresh: stop queueing changes of tbl for topic (drops its trigger); idempotent';

REVOKE ALL ON FUNCTION pgfresh.watch(regclass, name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.unwatch(regclass, text) FROM PUBLIC;

INSERT INTO pgfresh.migrations (version, name) VALUES (1, '0001_initial');
