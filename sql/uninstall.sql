-- pgfresh: remove every pgfresh object, in one transaction.
--
--     psql -v ON_ERROR_STOP=1 -f sql/uninstall.sql "$DATABASE_URL"
--
-- Drops the pgfresh triggers from every watched table, then the pgfresh schema with its queue, parked
-- failures and functions. Your tables and their data are untouched. Pending changes are lost, so run a
-- sweep after installing again. `pgfresh uninstall` runs this same file. Running it twice is a no-op.

BEGIN;
SET LOCAL client_min_messages = warning;
-- Names resolve in pg_catalog, whatever search_path the database or this role sets.
SET LOCAL search_path = pg_catalog, pg_temp;

-- Not while an install runs (see prepare.sql), and no lock waited for longer than 30 s.
SET LOCAL lock_timeout = '30s';
DO $$
BEGIN
    IF pg_catalog.to_regclass('pgfresh.migrations') IS NOT NULL THEN
        LOCK TABLE pgfresh.migrations IN EXCLUSIVE MODE;
    END IF;
END
$$;

-- Triggers live on user tables, outside the schema: drop each one whose function is in schema pgfresh,
-- found from the catalog rather than pgfresh.watches so that nothing survives a damaged registry.
DO $$
DECLARE
    trg record;
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
END
$$;

DROP SCHEMA IF EXISTS pgfresh CASCADE;

COMMIT;
