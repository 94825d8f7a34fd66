-- Living with a forge: webhook deliveries as received, the outbox of
-- messages to the outside (commit statuses, notifications), and each
-- builder's last known state per branch (red/green notifications).

CREATE TABLE hook_deliveries (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    forge TEXT NOT NULL,
    event TEXT NOT NULL,
    delivery TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX hook_deliveries_by_repo ON hook_deliveries (repo, id);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    -- 'status', 'webhook' or 'email'
    kind TEXT NOT NULL,
    repo TEXT NOT NULL,
    -- A newer message with the same key replaces an unsent older one
    -- (a commit's status for one builder: only the latest matters).
    dedupe TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    -- 'pending', 'sent', 'failed' (gave up) or 'superseded'
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT NOT NULL DEFAULT '',
    done_at INTEGER
);
CREATE INDEX outbox_due ON outbox (state, next_at);
CREATE INDEX outbox_by_key ON outbox (dedupe, state);
CREATE INDEX outbox_by_repo ON outbox (repo, id);

CREATE TABLE branch_states (
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    builder TEXT NOT NULL,
    -- 'passed' or 'failed'
    state TEXT NOT NULL,
    commit_hash TEXT NOT NULL,
    commit_time INTEGER NOT NULL,
    build_id INTEGER NOT NULL,
    PRIMARY KEY (repo, branch, builder)
);
