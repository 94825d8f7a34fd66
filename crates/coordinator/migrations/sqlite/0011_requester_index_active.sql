-- The per-user cap counts a user's builds in flight only, so the index
-- holds those only. Indexing every build's status made each status change
-- of every build rewrite two more pages of this index, and the index grew
-- with the farm's history though no query reads a finished build through it.
DROP INDEX builds_by_requester;
CREATE INDEX builds_by_requester ON builds (requested_by) WHERE status IN ('queued', 'running');
