-- The whole log of each attempt as the live log showed it (headers,
-- source push, every step), stored when the attempt ends. Step logs stay
-- in `steps` for the per-step views.
CREATE TABLE attempt_logs (
    attempt_id INTEGER PRIMARY KEY REFERENCES attempts (id),
    build_id   INTEGER NOT NULL REFERENCES builds (id),
    log_gz     BLOB NOT NULL,
    log_size   INTEGER NOT NULL
);
CREATE INDEX attempt_logs_build ON attempt_logs (build_id);

-- One row per test per step run: what the step printed or its result
-- files said.
CREATE TABLE test_results (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id    INTEGER NOT NULL REFERENCES builds (id),
    attempt_id  INTEGER NOT NULL REFERENCES attempts (id),
    step_id     INTEGER NOT NULL REFERENCES steps (id),
    builder     TEXT NOT NULL,
    repo        TEXT NOT NULL,
    commit_hash TEXT NOT NULL,
    commit_time INTEGER NOT NULL,
    name        TEXT NOT NULL,
    -- pass | fail | skip | flaky (failed, then passed when run again)
    outcome     TEXT NOT NULL,
    duration_ms INTEGER,
    failure     TEXT NOT NULL DEFAULT '',
    -- 1-based line of the step's log where the failure is printed
    log_line    INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE INDEX test_results_build ON test_results (build_id, outcome);
CREATE INDEX test_results_name ON test_results (name, commit_time);
CREATE INDEX test_results_builder ON test_results (builder, build_id);
CREATE INDEX test_results_step ON test_results (step_id, name);

-- Passed, but only after re-running tests that failed first.
ALTER TABLE builds ADD COLUMN flaky INTEGER NOT NULL DEFAULT 0;
