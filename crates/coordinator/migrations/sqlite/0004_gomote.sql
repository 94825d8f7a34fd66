-- gomote: the people who lease machines interactively, their SSH keys,
-- their instances (kept after they end, so a call on an ended one can say
-- when and why it ended) and their groups.
CREATE TABLE users (
    name         TEXT PRIMARY KEY,
    -- Hex SHA-256 of the bearer token; the token itself is shown once.
    token_sha256 TEXT NOT NULL UNIQUE,
    admin        INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
);

CREATE TABLE user_keys (
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    -- OpenSSH SHA256 fingerprint (SHA256:base64), what the SSH server compares.
    fingerprint TEXT NOT NULL,
    key_line    TEXT NOT NULL,
    added_at    INTEGER NOT NULL,
    PRIMARY KEY (user, fingerprint)
);

CREATE TABLE gomote_instances (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    builder    TEXT NOT NULL,
    host_type  TEXT NOT NULL,
    -- The machine, once leased; NULL while the instance waits in the queue.
    hostname   TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at   INTEGER,
    end_reason TEXT
);
CREATE INDEX gomote_instances_active ON gomote_instances (ended_at);

CREATE TABLE gomote_groups (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE gomote_group_members (
    grp      TEXT NOT NULL REFERENCES gomote_groups(name) ON DELETE CASCADE,
    instance TEXT NOT NULL,
    PRIMARY KEY (grp, instance)
);
