-- Certificate onboarding: builder requests, bots bound to host types, revocations.
CREATE TABLE bot_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hostname TEXT NOT NULL,
    csr_pem TEXT NOT NULL,
    contact TEXT NOT NULL,
    notes TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    host_type TEXT NOT NULL DEFAULT '',
    cert_pem TEXT NOT NULL DEFAULT '',
    serial TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    decided_at INTEGER
);

CREATE TABLE bots (
    hostname TEXT PRIMARY KEY,
    host_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    approved_at INTEGER NOT NULL
);

CREATE TABLE revoked (
    serial TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    at INTEGER NOT NULL,
    reason TEXT NOT NULL
);
