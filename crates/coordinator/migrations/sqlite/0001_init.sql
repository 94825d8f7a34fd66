-- farmer coordinator store, version 1.
CREATE TABLE commits (
    repo TEXT NOT NULL,
    hash TEXT NOT NULL,
    author TEXT NOT NULL,
    email TEXT NOT NULL,
    time INTEGER NOT NULL,
    subject TEXT NOT NULL,
    parents TEXT NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (repo, hash)
);

CREATE TABLE commit_branches (
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (repo, branch, hash)
);

CREATE TABLE builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    builder TEXT NOT NULL,
    host_type TEXT NOT NULL,
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    commit_hash TEXT NOT NULL,
    commit_time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    requested_by TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX builds_postsubmit_once ON builds (builder, repo, commit_hash) WHERE kind = 'post-submit' AND requested_by = '';
CREATE INDEX builds_status ON builds (status);
CREATE INDEX builds_commit ON builds (repo, commit_hash);

CREATE TABLE attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL REFERENCES builds (id),
    number INTEGER NOT NULL,
    machine TEXT NOT NULL,
    host_type TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    result TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX attempts_build ON attempts (build_id);
CREATE INDEX attempts_machine ON attempts (machine, id);

CREATE TABLE steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL REFERENCES builds (id),
    attempt_id INTEGER NOT NULL REFERENCES attempts (id),
    number INTEGER NOT NULL,
    name TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    result TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    log_gz BLOB,
    log_size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX steps_build ON steps (build_id, attempt_id, number);

CREATE TABLE machines (
    hostname TEXT PRIMARY KEY,
    host_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    build TEXT NOT NULL,
    addr TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
