-- pgfresh: the least-privilege role a listener runs as. Run after install.sql, in each database where
-- pgfresh is installed (roles are cluster-wide, grants are per database):
--
--     psql -v ON_ERROR_STOP=1 -f sql/roles.sql "$DATABASE_URL"
--
-- Then give a login role membership, and read access to the tables your fragments load:
--
--     CREATE ROLE shop_listener LOGIN PASSWORD '...' IN ROLE pgfresh_listener;
--     GRANT SELECT ON products, reviews TO pgfresh_listener;
--
-- Writers to watched tables need nothing from pgfresh: the trigger functions are SECURITY DEFINER.
-- Running it again is a no-op.

BEGIN;
SET LOCAL client_min_messages = warning;
-- Names resolve in pg_catalog, whatever search_path the database or this role sets.
SET LOCAL search_path = pg_catalog, pg_temp;

-- The role may exist already: from another database of this cluster, or prepared by someone else.
-- Its members are meant to be your listeners' login roles, so they are yours to review (\du); but a
-- role that can log in itself, or holds a special attribute, is not one pgfresh made: refuse it.
DO $$
DECLARE
    listener pg_catalog.pg_roles;
BEGIN
    SELECT * INTO listener FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgfresh_listener';
    IF NOT FOUND THEN
        BEGIN
            CREATE ROLE pgfresh_listener NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created meanwhile by a concurrent run
        END;
    ELSIF listener.rolcanlogin OR listener.rolsuper OR listener.rolcreaterole OR listener.rolcreatedb
          OR listener.rolreplication OR listener.rolbypassrls THEN
        RAISE EXCEPTION 'pgfresh roles.sql: role pgfresh_listener exists and may log in or holds a special attribute; pgfresh did not create it that way'
            USING HINT = 'ALTER ROLE pgfresh_listener NOLOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS, or drop it, then run roles.sql again.';
    END IF;
END
$$;
COMMENT ON ROLE pgfresh_listener IS
    'pgfresh listener: works the pgfresh queue; reads only the tables granted to it for fragments';

GRANT USAGE ON SCHEMA pgfresh TO pgfresh_listener;
-- Earlier versions granted UPDATE on every column of the queue; only these are the listener's business.
REVOKE UPDATE ON pgfresh.changes FROM pgfresh_listener;
-- Claim (SELECT ... FOR UPDATE) and settle (DELETE); defer and record failures (UPDATE of these
-- columns only, so a listener cannot rewrite what changed); queue a key once more when Redis lost
-- its render ticket, or when a sweep could not refresh it (INSERT, with its failure).
GRANT SELECT, DELETE ON pgfresh.changes TO pgfresh_listener;
GRANT UPDATE (attempts, retry_at, last_error) ON pgfresh.changes TO pgfresh_listener;
GRANT INSERT (topic, key, attempts, retry_at, last_error) ON pgfresh.changes TO pgfresh_listener;
-- Park changes that keep failing; count them for status.
GRANT SELECT, INSERT ON pgfresh.failed TO pgfresh_listener;
-- Register, heartbeat, say idle or busy, deregister.
GRANT SELECT, INSERT, UPDATE, DELETE ON pgfresh.listeners TO pgfresh_listener;
-- Check the installed version; show watches in status.
GRANT SELECT ON pgfresh.migrations, pgfresh.watches TO pgfresh_listener;
-- Find truncated topics to sweep, and settle them once swept.
GRANT SELECT, DELETE ON pgfresh.truncations TO pgfresh_listener;
-- Take render tickets; after PostgreSQL restarted, move them ahead (setval), past any a crash lost.
GRANT USAGE, UPDATE ON SEQUENCE pgfresh.render_tickets TO pgfresh_listener;
-- Take, renew and release the sweep lease (schema version 6); record complete sweeps and keep the
-- last few.
GRANT SELECT, UPDATE ON pgfresh.sweep_lease TO pgfresh_listener;
GRANT SELECT, INSERT, DELETE ON pgfresh.sweeps TO pgfresh_listener;
-- Note a crash or a failover (the unlogged row is gone), once, with the ticket jump.
GRANT SELECT, INSERT ON pgfresh.server_epoch TO pgfresh_listener;
-- Tell the triggers until when a listener waits for a NOTIFY (schema version 7).
GRANT SELECT, UPDATE ON SEQUENCE pgfresh.notify_until TO pgfresh_listener;

COMMIT;
