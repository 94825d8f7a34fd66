-- One pending message per key. Two pushes of the same key at once (on
-- PostgreSQL, in read committed, neither sees the other's new row) keep the
-- newer payload instead of both being sent.
CREATE UNIQUE INDEX outbox_pending_once ON outbox (dedupe) WHERE state = 'pending';
