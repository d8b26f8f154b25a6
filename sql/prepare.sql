-- pgfresh: what every install runs first, before any migration.
--
-- Idempotent. It serialises concurrent installs with a transaction-scoped advisory lock, creates the
-- pgfresh schema and the table that records which numbered migrations this database has applied.
-- install.sql (psql) and `pgfresh install` (the binary) both run this file unchanged.

DO $$ BEGIN PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgfresh install')); END $$;

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
