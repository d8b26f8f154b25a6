-- pgfresh: what every install runs first, before any migration.
--
-- Idempotent. It serialises concurrent installs with a transaction-scoped advisory lock, refuses a
-- pgfresh schema or role that someone else prepared, creates the role pgfresh_capture that owns the
-- capture code, the pgfresh schema and the table that records which numbered migrations this database
-- has applied. install.sql (psql) and `pgfresh install` (the binary) both run this file unchanged.

-- Names resolve in pg_catalog, whatever search_path the database or the installing role sets: a
-- database owner could otherwise have the install call their own `=` or now(), as the installer, or
-- bind pgfresh's column defaults to them. Every later file of the install runs with this too.
SET LOCAL search_path = pg_catalog, pg_temp;

-- One install at a time. Once pgfresh is installed, an install locks pgfresh.migrations, which only
-- pgfresh's owner (or a superuser) may lock this way; before that, it takes an advisory lock, which
-- anyone who can connect could hold too, but there is nothing to protect yet. Every lock the install
-- takes (on watched tables too, where writers would queue behind it) is waited for at most 30 s.
SET LOCAL lock_timeout = '30s';
DO $$
BEGIN
    IF pg_catalog.to_regclass('pgfresh.migrations') IS NOT NULL THEN
        LOCK TABLE pgfresh.migrations IN EXCLUSIVE MODE;
    ELSE
        PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgfresh install'));
    END IF;
EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'pgfresh install: another install (or uninstall) has held pgfresh''s install lock for 30 s'
        USING HINT = 'Wait for it, or end it (pg_stat_activity lists its session), then install again.';
END
$$;

-- Refuse to adopt a pgfresh schema that pgfresh did not create. Whoever owns the schema, or may create
-- objects in it, can replace pgfresh's tables and functions (a schema owner may even drop objects it
-- does not own), and the triggers and the DBA would then run their code. So the schema must belong to
-- the installing role or to a superuser, nobody else may CREATE in it, and everything in it must belong
-- to its owner, a superuser, or pgfresh_capture (the capture functions).
DO $$
DECLARE
    schema_oid   oid;
    schema_owner oid;
    stranger     text;
BEGIN
    SELECT n.oid, n.nspowner INTO schema_oid, schema_owner
    FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgfresh';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF schema_owner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
       AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = schema_owner) THEN
        RAISE EXCEPTION 'pgfresh install: schema pgfresh belongs to role %, neither you (%) nor a superuser, so pgfresh did not create it and will not adopt it',
            schema_owner::regrole, current_user
            USING HINT = 'Inspect it, then drop or rename it; or, if that role is your DBA role, run install as it.';
    END IF;

    SELECT pg_catalog.format('role %s may create objects in schema pgfresh',
                             CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
    INTO stranger
    FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
    WHERE n.oid = schema_oid AND a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner
    LIMIT 1;
    IF stranger IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: %, and could replace pgfresh''s objects', stranger
            USING HINT = 'REVOKE CREATE ON SCHEMA pgfresh FROM that role, then install again.';
    END IF;

    SELECT pg_catalog.format('%s %s belongs to role %s', kind, name, owner::regrole)
    INTO stranger
    FROM (
        SELECT 'relation' AS kind, c.relname::text AS name, c.relowner AS owner
        FROM pg_catalog.pg_class c WHERE c.relnamespace = schema_oid
        UNION ALL
        SELECT 'function', p.oid::regprocedure::text, p.proowner
        FROM pg_catalog.pg_proc p WHERE p.pronamespace = schema_oid
        UNION ALL
        SELECT 'type', t.typname::text, t.typowner
        FROM pg_catalog.pg_type t WHERE t.typnamespace = schema_oid
        UNION ALL
        SELECT 'operator', o.oid::regoperator::text, o.oprowner
        FROM pg_catalog.pg_operator o WHERE o.oprnamespace = schema_oid
    ) AS object
    WHERE owner <> schema_owner
      AND owner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
      AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = owner)
      AND NOT (kind = 'function'
               AND owner = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgfresh_capture'))
    LIMIT 1;
    IF stranger IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: in schema pgfresh, %, so pgfresh did not create it', stranger
            USING HINT = 'Inspect the schema; drop what pgfresh did not create, or drop the schema, then install again.';
    END IF;

    -- Nor may pgfresh's tables or functions use functions, operators or types from anywhere but
    -- pg_catalog and pgfresh (column defaults bound to a stranger's now(), for instance).
    SELECT pg_catalog.format('%s uses %s',
                             pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid),
                             pg_catalog.pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid))
    INTO stranger
    FROM pg_catalog.pg_depend d
    WHERE d.deptype = 'n'
      AND CASE d.classid
              WHEN 'pg_catalog.pg_attrdef'::regclass THEN EXISTS (
                  SELECT FROM pg_catalog.pg_attrdef a JOIN pg_catalog.pg_class c ON c.oid = a.adrelid
                  WHERE a.oid = d.objid AND c.relnamespace = schema_oid)
              WHEN 'pg_catalog.pg_class'::regclass THEN EXISTS (
                  SELECT FROM pg_catalog.pg_class c WHERE c.oid = d.objid AND c.relnamespace = schema_oid)
              WHEN 'pg_catalog.pg_proc'::regclass THEN EXISTS (
                  SELECT FROM pg_catalog.pg_proc p WHERE p.oid = d.objid AND p.pronamespace = schema_oid)
              ELSE false
          END
      AND CASE d.refclassid
              WHEN 'pg_catalog.pg_proc'::regclass THEN (
                  SELECT p.pronamespace FROM pg_catalog.pg_proc p WHERE p.oid = d.refobjid)
              WHEN 'pg_catalog.pg_operator'::regclass THEN (
                  SELECT o.oprnamespace FROM pg_catalog.pg_operator o WHERE o.oid = d.refobjid)
              WHEN 'pg_catalog.pg_type'::regclass THEN (
                  SELECT t.typnamespace FROM pg_catalog.pg_type t WHERE t.oid = d.refobjid)
          END NOT IN ('pg_catalog'::regnamespace, schema_oid)
    LIMIT 1;
    IF stranger IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: in schema pgfresh, %, which pgfresh never does', stranger
            USING HINT = 'An earlier install ran with another role''s search_path: uninstall (back up pgfresh.failed first) and install again.';
    END IF;
END
$$;

-- Nor may anything of someone else's be attached to pgfresh's tables: a trigger or a rule runs as
-- whoever writes the table (the DBA in pgfresh.watch(), the listener), a policy decides what they
-- see, and a foreign key from another table can make the listener's DELETEs fail. pgfresh creates
-- none. A right that let a role attach one (TRIGGER, REFERENCES) or empty a table (TRUNCATE) is
-- refused too, as a reason to look: finish.sql takes every other right a stranger holds away (the
-- installing role's default privileges give some). All of them are named at once.
DO $$
DECLARE
    found text;
BEGIN
    IF pg_catalog.to_regnamespace('pgfresh') IS NULL THEN
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('%s %s on %s', kind, name, tbl::regclass), '; ')
    INTO found
    FROM (
        SELECT 'trigger' AS kind, pg_catalog.quote_ident(t.tgname) AS name, t.tgrelid AS tbl
        FROM pg_catalog.pg_trigger t
        WHERE NOT t.tgisinternal
        UNION ALL
        SELECT 'rule', pg_catalog.quote_ident(w.rulename), w.ev_class
        FROM pg_catalog.pg_rewrite w WHERE w.rulename OPERATOR(pg_catalog.<>) '_RETURN'
        UNION ALL
        SELECT 'policy', pg_catalog.quote_ident(p.polname), p.polrelid FROM pg_catalog.pg_policy p
        UNION ALL
        SELECT pg_catalog.format('foreign key (from %s)', c.conrelid::regclass),
               pg_catalog.quote_ident(c.conname), c.confrelid
        FROM pg_catalog.pg_constraint c
        WHERE c.contype = 'f' AND c.conrelid NOT IN (
            SELECT o.oid FROM pg_catalog.pg_class o WHERE o.relnamespace = 'pgfresh'::regnamespace)
    ) AS attached
    JOIN pg_catalog.pg_class c ON c.oid = attached.tbl
    WHERE c.relnamespace = 'pgfresh'::regnamespace;
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: pgfresh never creates: %', found
            USING HINT = 'Inspect each (it may have run as whoever wrote that table), drop it, then install again.';
    END IF;

    SELECT pg_catalog.string_agg(pg_catalog.format('REVOKE %s%s ON TABLE %s FROM %s;',
                                                   a.privilege_type, object.columns, object.name, g.name), ' ')
    INTO found
    FROM (
        SELECT c.oid::regclass::text AS name, '' AS columns, c.relacl AS acl, c.relowner AS owner
        FROM pg_catalog.pg_class c WHERE c.relnamespace = 'pgfresh'::regnamespace
        UNION ALL
        SELECT c.oid::regclass::text, pg_catalog.format(' (%I)', a.attname), a.attacl, c.relowner
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
        WHERE c.relnamespace = 'pgfresh'::regnamespace AND a.attacl IS NOT NULL
    ) AS object, pg_catalog.aclexplode(object.acl) a
    LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee,
    LATERAL (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END) AS g(name)
    WHERE a.grantee <> object.owner AND a.privilege_type IN ('TRIGGER', 'REFERENCES', 'TRUNCATE')
      AND NOT coalesce(r.rolsuper, false)
      AND coalesce(r.rolname NOT IN ('pgfresh_listener', 'pgfresh_capture'), true);
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: roles hold rights on pgfresh''s tables that let them attach code or empty them: %', found
            USING HINT = 'Check what those roles did with them (triggers, rules, foreign keys, emptied tables), run the REVOKEs, then install again.';
    END IF;
END
$$;

-- The capture functions run as pgfresh_capture, a role that can only queue changes, record TRUNCATEs
-- and read the listeners' idle flag: never as whoever called watch(). Roles are cluster-wide, so the
-- role may exist already (pgfresh installed in another database, or someone preparing a trap): it is
-- accepted only if it cannot log in, holds no special attribute, belongs to no role, and has no
-- member but superusers (a member could alter or drop the capture functions of every database; an
-- installer that is not a superuser is lent membership only within its own transaction).
DO $$
DECLARE
    capture  pg_catalog.pg_roles;
    stranger text;
BEGIN
    SELECT * INTO capture FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgfresh_capture';
    IF NOT FOUND THEN
        BEGIN
            CREATE ROLE pgfresh_capture NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL; -- created meanwhile by an install in another database; checked below
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'pgfresh install: cannot create role pgfresh_capture, which owns the capture functions: %', SQLERRM
                    USING HINT = 'Install as a superuser or a role with CREATEROLE, or have one run: CREATE ROLE pgfresh_capture NOLOGIN';
        END;
        COMMENT ON ROLE pgfresh_capture IS
            'pgfresh: owns the capture functions; may only queue changes, record TRUNCATEs and read until when a listener is idle';
        SELECT * INTO capture FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgfresh_capture';
    END IF;
    IF capture.rolcanlogin OR capture.rolsuper OR capture.rolcreaterole OR capture.rolcreatedb
       OR capture.rolreplication OR capture.rolbypassrls THEN
        RAISE EXCEPTION 'pgfresh install: role pgfresh_capture exists and may log in or holds a special attribute; pgfresh did not create it that way'
            USING HINT = 'ALTER ROLE pgfresh_capture NOLOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS, or drop it, then install again.';
    END IF;
    SELECT pg_catalog.format('role pgfresh_capture is a member of role %s', m.roleid::regrole)
    INTO stranger
    FROM pg_catalog.pg_auth_members m WHERE m.member = capture.oid
    LIMIT 1;
    IF stranger IS NULL THEN
        SELECT pg_catalog.format('role %s is a member of pgfresh_capture', m.member::regrole)
        INTO stranger
        FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles r ON r.oid = m.member
        WHERE m.roleid = capture.oid AND NOT r.rolsuper
        LIMIT 1;
    END IF;
    IF stranger IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: %, which pgfresh did not arrange', stranger
            USING HINT = 'Only superusers may be members of pgfresh_capture, and it of no role: REVOKE that membership, then install again.';
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS pgfresh;
COMMENT ON SCHEMA pgfresh IS
    'pgfresh: change queue and triggers that keep pre-rendered HTML fragments in Redis fresh';

CREATE TABLE IF NOT EXISTS pgfresh.migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgfresh.migrations IS
    'pgfresh schema migrations applied to this database; the highest version is the installed version';

-- An upgrade from before version 7 rebuilds every watch (0006, 0007) with the TRUNCATE trigger on
-- each partition of a partitioned table, which a foreign table cannot have: 0008 passes foreign
-- partitions over, but runs after them. So any foreign partition of a watched table would fail
-- the install halfway through a migration, with PostgreSQL's words alone. Refused here first,
-- naming every one at once with the statement that detaches it.
DO $$
DECLARE
    found text;
BEGIN
    -- Nothing installed yet (pgfresh.watches comes with version 1), or version 7 is.
    IF NOT EXISTS (SELECT FROM pgfresh.migrations m WHERE m.version OPERATOR(pg_catalog.=) 1)
       OR EXISTS (SELECT FROM pgfresh.migrations m WHERE m.version OPERATOR(pg_catalog.=) 7) THEN
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format(
               '%s is a foreign partition of %s, watched for topic %s (ALTER TABLE %s DETACH PARTITION %s)',
               t.relid::regclass, t.parentrelid::regclass, w.topic, t.parentrelid::regclass, t.relid::regclass),
           '; ')
    INTO found
    FROM pgfresh.watches w, LATERAL pg_catalog.pg_partition_tree(w.table_oid) t
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
    WHERE c.relkind OPERATOR(pg_catalog.=) 'f';
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'pgfresh install: %; upgrading this schema rebuilds every watch with a TRUNCATE trigger on each partition, which a foreign table cannot have', found
            USING HINT = 'Detach each as shown, install, attach each again and call pgfresh.watch for its table again: from version 8 on, a watch passes foreign partitions over.';
    END IF;
END
$$;

-- An upgrade from before version 7 rebuilds every watch (0006, 0007), replacing the triggers on the
-- watched tables and their partitions, and 0007 first takes pgfresh.listeners, which the old capture
-- reads on every write: a writer holding a watched table and waiting for pgfresh.listeners, while
-- the install holding it waited for the writer's table, was a deadlock that failed the write or the
-- install. So the upgrade takes everything the migrations will lock first (each watched table and
-- each member of its partition tree, ONLY, in oid order, then pgfresh.listeners; ACCESS EXCLUSIVE,
-- as replacing a trigger and dropping an index do, held to the end either way), in rounds that
-- never deadlock with anyone: a round waits for each lock only until half of deadlock_timeout after
-- it started, so the install always gives up before any waiter's deadlock check could find it in
-- a cycle; a round that cannot finish releases what it took, waits (holding none of them) for the
-- one it could not take, releases that too, and starts again. Writers wait for the install (or,
-- between two rounds, write before it, with the old capture) and none fails. After 30 s it stops,
-- naming the relation it waited for.
DO $$
DECLARE
    deadline  timestamptz := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) interval '30 s';
    round_for interval := LEAST(
        pg_catalog.current_setting('deadlock_timeout')::interval OPERATOR(pg_catalog./) 2, interval '1 s');
    targets   regclass[];
    target    regclass;
    busy      regclass;
    ends      timestamptz;
BEGIN
    IF NOT EXISTS (SELECT FROM pgfresh.migrations m WHERE m.version OPERATOR(pg_catalog.=) 1)
       OR EXISTS (SELECT FROM pgfresh.migrations m WHERE m.version OPERATOR(pg_catalog.=) 7) THEN
        RETURN;
    END IF;
    targets := ARRAY(
        SELECT c.oid::regclass FROM pg_catalog.pg_class c
        WHERE c.oid IN (SELECT w.table_oid FROM pgfresh.watches w
                        UNION
                        SELECT t.relid FROM pgfresh.watches w, LATERAL pg_catalog.pg_partition_tree(w.table_oid) t)
        ORDER BY c.oid
    ) OPERATOR(pg_catalog.||) 'pgfresh.listeners'::regclass;
    LOOP
        BEGIN
            ends := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) round_for;
            FOREACH target IN ARRAY targets LOOP
                busy := target;
                PERFORM pg_catalog.set_config('lock_timeout', pg_catalog.format('%s ms', GREATEST(1,
                    (pg_catalog.date_part('epoch', ends OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp())
                     OPERATOR(pg_catalog.*) 1000)::integer)), true);
                EXECUTE pg_catalog.format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', target);
            END LOOP;
            PERFORM pg_catalog.set_config('lock_timeout', '30s', true);
            RETURN;
        EXCEPTION
            WHEN lock_not_available THEN
                NULL;  -- this round's locks are released with its block
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'pgfresh install: upgrading from schema version % replaces the triggers on %, which only its owner or a superuser may',
                    (SELECT pg_catalog.max(m.version) FROM pgfresh.migrations m), busy
                    USING HINT = 'Install as a superuser, or as the owner of every watched table.';
        END;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline THEN
            RAISE EXCEPTION 'pgfresh install: waited 30 s for % (another transaction holds it); upgrading from schema version % replaces its triggers',
                busy, (SELECT pg_catalog.max(m.version) FROM pgfresh.migrations m)
                USING HINT = 'Find the transaction in pg_locks and pg_stat_activity, let it end (or end it), then install again.';
        END IF;
        -- Wait for the one it could not take, holding nothing else, then let it go again.
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', pg_catalog.format('%s ms', GREATEST(1,
                (pg_catalog.date_part('epoch', deadline OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp())
                 OPERATOR(pg_catalog.*) 1000)::integer)), true);
            EXECUTE pg_catalog.format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', busy);
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available';
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
END
$$;
