-- pgfresh migration 0005: listeners say where they store each fragment.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- A fragment can be stored plain or in Django's cache format, under a prefix of its own choosing.
-- Two live listeners storing one fragment differently would split the queue between them, each change
-- reaching only one of the two places, so a listener refuses to start while another stores one of its
-- fragments elsewhere.

ALTER TABLE pgfresh.listeners ADD COLUMN stored text[];
COMMENT ON COLUMN pgfresh.listeners.stored IS
    'where each fragment''s entries are kept in Redis (its stored key prefix and format), in the same order as fragments; NULL for listeners older than this migration';

INSERT INTO pgfresh.migrations (version, name) VALUES (5, '0005_fragment_storage');
