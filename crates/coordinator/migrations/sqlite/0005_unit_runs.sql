-- Every run of a unit of a sharded step: where it ran, when, for how
-- long, and how it ended. The history behind the expected durations
-- (medians per builder, step and unit) and the build page's timelines.
CREATE TABLE unit_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id    INTEGER NOT NULL REFERENCES builds (id),
    step_id     INTEGER NOT NULL REFERENCES steps (id),
    builder     TEXT NOT NULL,
    step        TEXT NOT NULL,
    unit        TEXT NOT NULL,
    machine     TEXT NOT NULL,
    -- milliseconds since the epoch
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    -- passed | failed | lost (its machine broke; run again elsewhere) | cancelled
    result      TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX unit_runs_build ON unit_runs (build_id, id);
CREATE INDEX unit_runs_history ON unit_runs (builder, step, id);
