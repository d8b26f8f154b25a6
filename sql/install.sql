-- pgfresh: install or upgrade, in one transaction.
--
--     psql -v ON_ERROR_STOP=1 -f sql/install.sql "$DATABASE_URL"
--
-- Running it again is a no-op: each numbered file in migrations/ runs once, and records itself in
-- pgfresh.migrations. `pgfresh install` applies exactly these files, embedded at compile time, in the same
-- order and the same way. Read every file before you run it; nothing here touches your tables until you
-- call pgfresh.watch().

\set ON_ERROR_STOP 1
BEGIN;
SET LOCAL client_min_messages = warning;

\ir prepare.sql

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 1) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0001_initial.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 2) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0002_truncate.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 3) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0003_fragment_versions.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 4) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0004_least_privilege.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 5) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0005_fragment_storage.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 6) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0006_sweep_lease.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 7) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0007_cheaper_capture.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 8) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0008_foreign_partitions.sql
\endif

SELECT NOT EXISTS (SELECT FROM pgfresh.migrations WHERE version = 9) AS pgfresh_apply \gset
\if :pgfresh_apply
\ir migrations/0009_watch_beside_readers.sql
\endif

\ir finish.sql

COMMIT;
