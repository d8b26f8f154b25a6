-- pgfresh migration 0006: the sweeping listener holds a lease only listeners can take, and every
-- complete sweep is recorded.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- Until now the listener that sweeps was the one holding a session advisory lock with a fixed key.
-- Anyone who can connect can take any advisory lock: a role with no right at all held it, and no
-- listener swept again (Redis emptied stayed empty). And a listener that found the lock taken counted
-- the sweep it wanted as done by another, though nobody may ever have completed it. From this version:
--   * the sweeping listener holds a lease, one row that only pgfresh_listener may update (roles.sql),
--     renewed while it sweeps and released when it is done; one that stops renewing loses it when it
--     expires;
--   * every complete sweep of a fragment is recorded in pgfresh.sweeps, by whoever ran it (a listener,
--     the sweep command, a program of its own): when it started, why, and what it had to repair. A
--     periodic sweep is due when a fragment's last complete sweep is an interval old;
--   * a crash (crash recovery, with or without a new postmaster) or a failover to a replica may have
--     lost commits that were rendered, and render tickets handed out: it empties the unlogged
--     pgfresh.server_epoch, and whoever finds it empty (a listener, a sweep) moves the tickets ahead
--     and notes when, in the same statement; every fragment whose last complete sweep started before
--     then is swept, whoever sweeps it. (Listeners used to compare pg_postmaster_start_time(), which
--     neither crash recovery within a running postmaster nor a promotion changes.)
--   * a capture function handed to pgfresh_capture keeps no right anyone but its owner was given (the
--     installing role's default privileges on functions): only pgfresh_capture could take it back;
--   * a TRUNCATE of one partition of a watched partitioned table is recorded too: the TRUNCATE
--     trigger is on the table and on each of its partitions (row triggers were already cloned to
--     them), and every existing watch gets them now.

CREATE TABLE pgfresh.sweep_lease (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO pgfresh.sweep_lease DEFAULT VALUES;
COMMENT ON TABLE pgfresh.sweep_lease IS
    'pgfresh: the one listener that sweeps now (holder, a listener id), until expires_at unless it renews';

CREATE TABLE pgfresh.sweeps (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fragment    text        NOT NULL,
    reason      text        NOT NULL,
    swept_by    text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    rewritten   bigint      NOT NULL,
    deleted     bigint      NOT NULL,
    unexplained bigint      NOT NULL DEFAULT 0,
    unwatched   boolean     NOT NULL DEFAULT false
);
CREATE INDEX sweeps_fragment_started_at ON pgfresh.sweeps (fragment, started_at DESC);
COMMENT ON TABLE pgfresh.sweeps IS
    'pgfresh: the last complete sweeps of each fragment (a few kept), and what each had to repair';
COMMENT ON COLUMN pgfresh.sweeps.reason IS
    'why it ran: periodic, marker (missing or outdated in Redis), restart (PostgreSQL restarted), truncate, one-off';
COMMENT ON COLUMN pgfresh.sweeps.swept_by IS 'the listener id, or one-off for a sweep no listener ran';
COMMENT ON COLUMN pgfresh.sweeps.rewritten IS 'entries it wrote because Redis held something else, or nothing';
COMMENT ON COLUMN pgfresh.sweeps.deleted IS 'entries it deleted because their row is gone';
COMMENT ON COLUMN pgfresh.sweeps.unexplained IS
    'keys it repaired with no change of theirs waiting in the queue, and orphans it deleted';
COMMENT ON COLUMN pgfresh.sweeps.unwatched IS
    'a finding: a periodic sweep by a listener that ran since the previous one, no crash between, repaired what no watch reported';

CREATE OR REPLACE FUNCTION pgfresh.give_to_capture_role(fn regprocedure) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE p.oid = fn AND a.grantee <> p.proowner
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %s CASCADE', fn, grantee);
    END LOOP;
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO pgfresh_capture', fn);
END
$$;

CREATE OR REPLACE FUNCTION pgfresh.watch_truncate(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT tbl UNION SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
            pg_catalog.format('pgfresh_%s:truncate', topic), part);
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfresh.capture_truncate(%L)',
            pg_catalog.format('pgfresh_%s:truncate', topic), part, topic);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgfresh.unwatch(tbl regclass, topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT tbl UNION SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s',
            pg_catalog.format('pgfresh_%s:truncate', topic), part);
    END LOOP;
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', pg_catalog.format('pgfresh_%s', topic), tbl);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS pgfresh.%I()',
        pg_catalog.format('capture_%s_%s', tbl::oid, topic));
    DELETE FROM pgfresh.watches w WHERE w.table_oid = tbl AND w.topic = unwatch.topic;
END
$$;
REVOKE ALL ON FUNCTION pgfresh.watch_truncate(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.unwatch(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfresh.give_to_capture_role(regprocedure) FROM PUBLIC;

-- Every existing watch of a table that still exists gets its TRUNCATE triggers on its partitions.
DO $$
DECLARE
    watched record;
BEGIN
    PERFORM pgfresh.lend_capture_role(true);
    FOR watched IN
        SELECT w.table_oid::regclass AS tbl, w.topic FROM pgfresh.watches w
        WHERE EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = w.table_oid)
    LOOP
        PERFORM pgfresh.watch_truncate(watched.tbl, watched.topic);
    END LOOP;
    PERFORM pgfresh.lend_capture_role(false);
END
$$;

CREATE UNLOGGED TABLE pgfresh.server_epoch (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    noticed_at  timestamptz NOT NULL DEFAULT now(),
    after_crash boolean     NOT NULL
);
-- Noted now: this install is no crash.
INSERT INTO pgfresh.server_epoch (after_crash) VALUES (false);
COMMENT ON TABLE pgfresh.server_epoch IS
    'pgfresh: since when PostgreSQL has kept every commit; unlogged, so a crash or a failover empties it, and whoever finds it empty moves render tickets ahead and has every fragment swept';

INSERT INTO pgfresh.migrations (version, name) VALUES (6, '0006_sweep_lease');
