-- pgfresh migration 0003: listeners say which fragment versions they render.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- During a rolling deploy old and new listeners run side by side. Without this, an old listener kept
-- applying changes with its old markup after the new version had swept, and those entries stayed old
-- until they changed again. Now a listener that sees a live listener with a newer version of one of its
-- fragments stands aside: it finishes its batch, records `superseded`, and claims nothing more until
-- that listener is gone. The new listener waits for the old ones to stand aside before it sweeps.

ALTER TABLE pgfresh.listeners
    ADD COLUMN fragments  text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN versions   bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN superseded boolean  NOT NULL DEFAULT false;
COMMENT ON COLUMN pgfresh.listeners.fragments IS 'names of the fragments this listener renders';
COMMENT ON COLUMN pgfresh.listeners.versions IS 'their versions, in the same order as fragments';
COMMENT ON COLUMN pgfresh.listeners.superseded IS
    'a live listener renders a newer version of one of these fragments, so this one has stopped applying changes';

INSERT INTO pgfresh.migrations (version, name) VALUES (3, '0003_fragment_versions');
