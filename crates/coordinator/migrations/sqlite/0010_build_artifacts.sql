-- Files a build kept (`artifacts = [...]` of a step): the bytes are in the
-- artifact store under their SHA-256, the rows say whose they are.
CREATE TABLE build_artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL REFERENCES builds (id),
    attempt_id INTEGER NOT NULL REFERENCES attempts (id),
    step_id INTEGER NOT NULL REFERENCES steps (id),
    -- The file's path relative to the step's directory.
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX build_artifacts_build ON build_artifacts (build_id, name, id);
