-- pgfresh migration 0008: a partitioned table with a foreign partition can be watched.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- Since 0006, watch() puts the TRUNCATE trigger on a partitioned table and on each of its partitions.
-- A foreign table takes no TRUNCATE trigger ("Foreign tables cannot have TRUNCATE triggers"), so
-- watching a table with a foreign partition failed as a whole. From this version a foreign partition
-- is passed over: a TRUNCATE of the table fires the table's own trigger, as before, and the row
-- trigger PostgreSQL clones to every partition, foreign ones included, still sees each row written
-- through this database. What changes where a foreign table's rows live (another server, a file),
-- and a TRUNCATE of the foreign partition itself, fire nothing here: only a sweep brings the
-- fragments up to date with them, which doctor notes for every fragment that reads such a table.
-- Nothing installed changes. (A watched table can have a foreign partition from before: added
-- after the watch, or present when versions 1 to 5 watched it, which put the TRUNCATE trigger on
-- the table alone. An upgrade from before version 7 would rebuild that watch, and fail, before
-- this file runs: prepare.sql refuses that upgrade first.)

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
        CONTINUE WHEN (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = part) = 'f';
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfresh.capture_truncate(%L)',
            pg_catalog.format('pgfresh_%s:truncate', topic), part, topic);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgfresh.watch_truncate(regclass, text) FROM PUBLIC;

INSERT INTO pgfresh.migrations (version, name) VALUES (8, '0008_foreign_partitions');
