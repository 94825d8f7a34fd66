-- Machines an exec source created, so that a restarted coordinator
-- destroys what the previous run left instead of leaking it.
CREATE TABLE exec_instances (
    hostname   TEXT PRIMARY KEY,
    host_type  TEXT NOT NULL,
    -- creating | registered | destroying | failed
    state      TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
