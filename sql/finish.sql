-- pgfresh: what every install runs last, after the migrations.
--
-- Idempotent. Nobody but pgfresh's owner, pgfresh_listener (sql/roles.sql) and pgfresh_capture holds
-- any right in schema pgfresh: not PUBLIC, and not a role that the installing role's default
-- privileges (ALTER DEFAULT PRIVILEGES ... GRANT ... TO app) named. A role with TRIGGER on a pgfresh
-- table could otherwise attach a trigger that runs as the DBA at their next pgfresh.watch().
-- install.sql (psql) and `pgfresh install` (the binary) both run this file unchanged.

-- Only pgfresh's owner (or a superuser) can take rights away; anyone else running install finds the
-- schema up to date and has nothing to do here.
DO $$
DECLARE
    grant_ record;
BEGIN
    IF NOT pg_catalog.pg_has_role(current_user,
               (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh'), 'USAGE') THEN
        RETURN;
    END IF;
    REVOKE ALL ON SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfresh FROM PUBLIC;
    FOR grant_ IN
        SELECT DISTINCT object.kind, object.name,
               CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END AS grantee
        FROM (
            SELECT 'SCHEMA' AS kind, 'pgfresh' AS name, n.nspacl AS acl, n.nspowner AS owner
            FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh'
            UNION ALL
            SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.oid::regclass::text,
                   c.relacl, c.relowner
            FROM pg_catalog.pg_class c
            WHERE c.relnamespace = 'pgfresh'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
            UNION ALL
            SELECT 'FUNCTION', p.oid::regprocedure::text, p.proacl, p.proowner
            FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pgfresh'::regnamespace
        ) AS object, pg_catalog.aclexplode(object.acl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE a.grantee <> object.owner
          AND (r.rolname IS NULL OR r.rolname NOT IN ('pgfresh_listener', 'pgfresh_capture'))
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM %s CASCADE',
                                  grant_.kind, grant_.name, grant_.grantee);
    END LOOP;
END
$$;
