-- Indexes added after 0007 had shipped (a shipped migration is never
-- edited: sqlx refuses a database whose applied checksum differs).

-- A repo's accepted and refused deliveries are kept and listed apart.
DROP INDEX hook_deliveries_by_repo;
CREATE INDEX hook_deliveries_by_repo ON hook_deliveries (repo, accepted, id);

-- A user's builds in flight (the per-user cap on queued builds).
CREATE INDEX builds_by_requester ON builds (requested_by, status);
