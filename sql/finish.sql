-- pgfresh: what every install runs last, after the migrations.
--
-- Idempotent. Nobody but pgfresh's owner, pgfresh_listener (sql/roles.sql) and pgfresh_capture holds
-- any right in schema pgfresh: not PUBLIC, and not a role that the installing role's default
-- privileges (ALTER DEFAULT PRIVILEGES ... GRANT ... TO app) named, or an earlier install left, or a
-- DBA granted by hand (a monitoring role reads the queue through a view of the DBA's own instead). A
-- role with a right there could read what changed, or queue and delete changes. What is taken away
-- is named in a warning. install.sql (psql) and `pgfresh install` (the binary) both run this file
-- unchanged.

-- Only pgfresh's owner (or a superuser) can take rights away; anyone else running install finds the
-- schema up to date and has nothing to do here.
DO $$
DECLARE
    grant_  record;
    revoked text := '';
BEGIN
    IF NOT pg_catalog.pg_has_role(current_user,
               (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh'), 'USAGE') THEN
        RETURN;
    END IF;
    -- Rights on the capture functions are pgfresh_capture's to take back: lend its membership for this.
    PERFORM pgfresh.lend_capture_role(true);
    REVOKE ALL ON SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfresh FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgfresh FROM PUBLIC;
    FOR grant_ IN
        SELECT DISTINCT object.kind, object.name, object.columns,
               CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END AS grantee
        FROM (
            SELECT 'SCHEMA' AS kind, 'pgfresh' AS name, '' AS columns, n.nspacl AS acl, n.nspowner AS owner
            FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh'
            UNION ALL
            SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.oid::regclass::text, '',
                   c.relacl, c.relowner
            FROM pg_catalog.pg_class c
            WHERE c.relnamespace = 'pgfresh'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
            UNION ALL
            SELECT 'TABLE', c.oid::regclass::text, pg_catalog.format(' (%I)', a.attname), a.attacl, c.relowner
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
            WHERE c.relnamespace = 'pgfresh'::regnamespace AND a.attacl IS NOT NULL
            UNION ALL
            SELECT 'FUNCTION', p.oid::regprocedure::text, '', p.proacl, p.proowner
            FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pgfresh'::regnamespace
        ) AS object, pg_catalog.aclexplode(object.acl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE a.grantee <> object.owner
          AND (r.rolname IS NULL OR r.rolname NOT IN ('pgfresh_listener', 'pgfresh_capture'))
    LOOP
        IF grant_.columns = '' THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM %s CASCADE',
                                      grant_.kind, grant_.name, grant_.grantee);
        ELSE
            -- Column rights: every kind a column can hold.
            EXECUTE pg_catalog.format('REVOKE SELECT%2$s, INSERT%2$s, UPDATE%2$s, REFERENCES%2$s ON %1$s FROM %3$s CASCADE',
                                      grant_.name, grant_.columns, grant_.grantee);
        END IF;
        revoked := revoked || pg_catalog.format('%s%s %s from %s; ', grant_.kind, grant_.columns,
                                                grant_.name, grant_.grantee);
    END LOOP;
    PERFORM pgfresh.lend_capture_role(false);
    IF revoked <> '' THEN
        RAISE WARNING 'pgfresh install: took away rights that only pgfresh''s owner, pgfresh_listener and pgfresh_capture may hold: %', revoked;
    END IF;
END
$$;
