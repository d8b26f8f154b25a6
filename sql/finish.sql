-- pgfresh: what every install runs last, after the migrations.
--
-- Idempotent. PUBLIC has nothing in schema pgfresh: no USAGE, and no right on any table, sequence or
-- function in it, whatever default privileges (ALTER DEFAULT PRIVILEGES) the installing role has.
-- install.sql (psql) and `pgfresh install` (the binary) both run this file unchanged.

-- Only pgfresh's owner (or a superuser) can take rights away; anyone else running install finds the
-- schema up to date and has nothing to do here.
DO $$
DECLARE
    fn regprocedure;
BEGIN
    IF NOT pg_catalog.pg_has_role(current_user,
               (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh'), 'USAGE') THEN
        RETURN;
    END IF;
    REVOKE ALL ON SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfresh FROM PUBLIC;
    -- Functions owned by pgfresh_capture had PUBLIC's right revoked before they were handed over.
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pgfresh'::regnamespace
          AND p.proowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgfresh_capture')
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
END
$$;
