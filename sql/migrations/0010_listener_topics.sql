-- pgfresh migration 0010: listeners say which topics they handle.
--
-- Runs inside install.sql's transaction after prepare.sql; never edit it once released: later changes
-- go into a new numbered file.
--
-- Two binaries with fragments of their own can listen on one database (their key prefixes apart).
-- Each listener claimed every change, whatever its topic: a change of the other binary's topic that
-- it claimed failed here ("no fragment subscribes"), counted an attempt and waited its backoff, and
-- with bad luck enough times in a row was parked, its fragment stale. A listener now records the
-- topics it handles, and leaves the changes of topics only other live listeners handle to them.
-- Listeners of earlier releases record none, and are not counted: changes of their topics are
-- claimed by everyone, as before.

ALTER TABLE pgfresh.listeners ADD COLUMN topics text[];
COMMENT ON COLUMN pgfresh.listeners.topics IS
    'pgfresh: the topics the listener handles (its fragments'' topics and own topics); NULL before version 10';

INSERT INTO pgfresh.migrations (version, name) VALUES (10, '0010_listener_topics');
