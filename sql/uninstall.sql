-- pgfresh: remove every pgfresh object, in one transaction.
--
--     psql -v ON_ERROR_STOP=1 -f sql/uninstall.sql "$DATABASE_URL"
--
-- Drops the pgfresh triggers from every watched table, then the pgfresh schema with its queue, parked
-- failures and functions. Your tables and their data are untouched, and so is everything else of
-- yours: if a view, function or constraint of yours depends on pgfresh's objects, it stops, naming
-- them, and changes nothing. Pending changes are lost, so run a
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

-- Nothing of the DBA's goes with the schema: a view, a function or a constraint outside it that
-- depends on pgfresh's objects (a monitoring view over pgfresh.changes, say) would be dropped by the
-- CASCADE below without a word. Such objects stop the uninstall instead, each named.
DO $$
DECLARE
    theirs text;
BEGIN
    IF pg_catalog.to_regnamespace('pgfresh') IS NULL THEN
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(DISTINCT CASE d.classid
               -- A view depends through its rule: named as the view.
               WHEN 'pg_catalog.pg_rewrite'::pg_catalog.regclass THEN
                   (SELECT pg_catalog.pg_describe_object('pg_catalog.pg_class'::pg_catalog.regclass, r.ev_class, 0)
                    FROM pg_catalog.pg_rewrite r WHERE r.oid = d.objid)
               ELSE pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
           END, '; ')
    INTO theirs
    FROM pg_catalog.pg_depend d
    WHERE d.deptype OPERATOR(pg_catalog.=) ANY (ARRAY['n', 'a']::"char"[])
      AND CASE d.refclassid
              WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN
                  (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = d.refobjid)
              WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
                  (SELECT p.pronamespace FROM pg_catalog.pg_proc p WHERE p.oid = d.refobjid)
              WHEN 'pg_catalog.pg_type'::pg_catalog.regclass THEN
                  (SELECT t.typnamespace FROM pg_catalog.pg_type t WHERE t.oid = d.refobjid)
          END OPERATOR(pg_catalog.=) 'pgfresh'::pg_catalog.regnamespace
      -- Where the dependent object lives: its own schema, or its table's.
      AND coalesce(CASE d.classid
              WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN
                  (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = d.objid)
              WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
                  (SELECT p.pronamespace FROM pg_catalog.pg_proc p WHERE p.oid = d.objid)
              WHEN 'pg_catalog.pg_type'::pg_catalog.regclass THEN
                  (SELECT t.typnamespace FROM pg_catalog.pg_type t WHERE t.oid = d.objid)
              WHEN 'pg_catalog.pg_rewrite'::pg_catalog.regclass THEN
                  (SELECT c.relnamespace FROM pg_catalog.pg_rewrite r
                   JOIN pg_catalog.pg_class c ON c.oid = r.ev_class WHERE r.oid = d.objid)
              WHEN 'pg_catalog.pg_attrdef'::pg_catalog.regclass THEN
                  (SELECT c.relnamespace FROM pg_catalog.pg_attrdef a
                   JOIN pg_catalog.pg_class c ON c.oid = a.adrelid WHERE a.oid = d.objid)
              WHEN 'pg_catalog.pg_trigger'::pg_catalog.regclass THEN
                  (SELECT c.relnamespace FROM pg_catalog.pg_trigger t
                   JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid WHERE t.oid = d.objid)
              WHEN 'pg_catalog.pg_constraint'::pg_catalog.regclass THEN
                  (SELECT k.connamespace FROM pg_catalog.pg_constraint k WHERE k.oid = d.objid)
          END, 0) OPERATOR(pg_catalog.<>) 'pgfresh'::pg_catalog.regnamespace;
    IF theirs IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh uninstall: objects outside schema pgfresh depend on it and would be dropped with it: %', theirs
            USING HINT = 'Drop them (or change them to depend on nothing of pgfresh''s), then uninstall again: nothing was changed.';
    END IF;
END
$$;

DROP SCHEMA IF EXISTS pgfresh CASCADE;

COMMIT;
