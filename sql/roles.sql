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

DO $$
BEGIN
    CREATE ROLE pgfresh_listener NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL; -- already there (possibly created by a concurrent run)
END
$$;
COMMENT ON ROLE pgfresh_listener IS
    'pgfresh listener: works the pgfresh queue; reads only the tables granted to it for fragments';

GRANT USAGE ON SCHEMA pgfresh TO pgfresh_listener;
-- Claim (SELECT ... FOR UPDATE), defer and record failures (UPDATE), settle (DELETE).
GRANT SELECT, UPDATE, DELETE ON pgfresh.changes TO pgfresh_listener;
-- Park changes that keep failing; count them for status.
GRANT SELECT, INSERT ON pgfresh.failed TO pgfresh_listener;
-- Register, heartbeat, say idle or busy, deregister.
GRANT SELECT, INSERT, UPDATE, DELETE ON pgfresh.listeners TO pgfresh_listener;
-- Check the installed version; show watches in status.
GRANT SELECT ON pgfresh.migrations, pgfresh.watches TO pgfresh_listener;
-- Find truncated topics to sweep, and settle them once swept.
GRANT SELECT, DELETE ON pgfresh.truncations TO pgfresh_listener;
-- Take render tickets.
GRANT USAGE ON SEQUENCE pgfresh.render_tickets TO pgfresh_listener;

COMMIT;
