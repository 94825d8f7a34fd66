//! Where the store lives and how it is opened: a SQLite file (WAL, the
//! default) or a PostgreSQL database, both through sqlx's `Any` driver
//! (connections: `conns.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, Connection, Executor};

use super::conns::Conns;

use super::leader::Fence;
use super::{Result, StoreError};

/// The engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// Where a store is: what `--database-url` and `[store] url` name.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// `sqlite:PATH` (or a bare path).
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/database?options`.
    Postgres(String),
}

impl Location {
    /// Parses a store URL: `postgres://…`/`postgresql://…`, `sqlite:PATH`
    /// or `sqlite://PATH`. Anything else is refused with the forms accepted.
    pub fn parse(s: &str) -> std::result::Result<Location, String> {
        let s = s.trim();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let url = url::Url::parse(s)
                .map_err(|e| format!("the store URL {:?} is not a URL: {e}", redact(s)))?;
            // A Unix socket is named by `?host=/run/postgresql`.
            let socket = url.query_pairs().any(|(k, _)| k == "host");
            if url.host_str().is_none_or(str::is_empty) && !socket {
                return Err(format!(
                    "the store URL {:?} names no host (postgres://USER:PASSWORD@HOST:PORT/DATABASE, or postgres:///DATABASE?host=/run/postgresql for a local socket)",
                    redact(s)
                ));
            }
            let named = url.query_pairs().any(|(k, _)| k == "dbname");
            if url.path().trim_start_matches('/').is_empty() && !named {
                return Err(format!(
                    "the store URL {:?} names no database (postgres://USER:PASSWORD@HOST:PORT/DATABASE)",
                    redact(s)
                ));
            }
            return Ok(Location::Postgres(s.to_string()));
        }
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err("the store URL sqlite: names no file (sqlite:PATH)".into());
            }
            if path.contains('?') {
                return Err(format!(
                    "the store URL {s:?}: options after '?' are not taken for SQLite; give only the file (sqlite:PATH)"
                ));
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        Err(format!(
            "unknown store URL {:?}: use postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:PATH",
            redact(s)
        ))
    }

    pub fn engine(&self) -> Engine {
        match self {
            Location::Sqlite(_) => Engine::Sqlite,
            Location::Postgres(_) => Engine::Postgres,
        }
    }
}

/// Shown without the password: locations end up in logs and errors.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "SQLite database {}", p.display()),
            Location::Postgres(u) => write!(f, "PostgreSQL database {}", redact(u)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A URL with its password (`user:PASSWORD@`, or `?password=`) replaced
/// by `***`.
pub fn redact(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "(not a URL)".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Connections per coordinator for reading. A PostgreSQL server is shared
/// with a standby and the operator's tools.
const SQLITE_READERS: u32 = 4;
const POSTGRES_CONNECTIONS: u32 = 8;

/// How long a statement waits for a free connection (a write: for SQLite's
/// one writer), as long as SQLite's busy timeout lets it wait for the file
/// lock held by another process.
const SQLITE_WAIT: Duration = Duration::from_secs(10);

/// The store's connections: `read` for queries, `write` for everything
/// that changes rows.
///
/// SQLite lets one connection write at a time. With writes spread over
/// several connections, the losers of each race for the lock wait in
/// SQLite's busy handler, which sleeps 1, 2, 5, 10 ms and on: under a
/// stream of builds, a thousand sleeps per three seconds, each a write
/// late by a millisecond or more. One connection for writes queues them
/// for it instead, where a write starts the moment the previous one
/// ends; readers never wait for it (WAL). PostgreSQL locks rows, not the
/// database: both are the same pool there.
pub(super) struct Pools {
    pub read: Conns,
    pub write: Conns,
}

pub(super) async fn connect(location: &Location, fence: &Fence) -> Result<Pools> {
    sqlx::any::install_default_drivers();
    match location {
        Location::Sqlite(path) => sqlite(path).await,
        Location::Postgres(url) => {
            let pool = postgres(url, location, fence.clone()).await?;
            Ok(Pools {
                read: Conns::Pool(pool.clone()),
                write: Conns::Pool(pool),
            })
        }
    }
}

async fn sqlite(path: &Path) -> Result<Pools> {
    let named = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        let hint = if text.contains("locked") || text.contains("busy") {
            " (another process holds a lock on it: is another farmer running on this data dir?)"
        } else {
            ""
        };
        StoreError::Open(format!("SQLite database {}: {text}{hint}", path.display()))
    };
    let abs = std::path::absolute(path).map_err(|e| named(&e))?;
    let Some(text) = abs.to_str() else {
        return Err(named(&"the path is not UTF-8"));
    };
    let url = format!("sqlite://{}?mode=rwc", encode_path(text));
    let opts: AnyConnectOptions = url.parse().map_err(|e| named(&e))?;
    let pragmas = |busy: Duration| {
        format!(
            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            busy.as_millis()
        )
    };
    {
        // Migrate over one connection that waits at most a second (not a
        // pool: a pool retries a locked database until its own timeout).
        let mut quick = AnyConnection::connect_with(&opts)
            .await
            .map_err(|e| named(&e))?;
        quick
            .execute(pragmas(Duration::from_secs(1)).as_str())
            .await
            .map_err(|e| named(&e))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut quick)
            .await
            .map_err(|e| named(&e))?;
        let _ = quick.close().await;
    }
    let pragmas = pragmas(SQLITE_WAIT);
    // Readers are `query_only`: a write put on them by mistake fails at
    // once instead of quietly bringing back the race for the lock.
    let read = Conns::own(
        opts.clone(),
        format!("{pragmas} PRAGMA query_only = ON;"),
        SQLITE_READERS,
        SQLITE_WAIT,
    )
    .await
    .map_err(|e| named(&e))?;
    let write = Conns::own(opts, pragmas, 1, SQLITE_WAIT)
        .await
        .map_err(|e| named(&e))?;
    Ok(Pools { read, write })
}

async fn postgres(url: &str, location: &Location, fence: Fence) -> Result<AnyPool> {
    let named = |e: &dyn std::fmt::Display| StoreError::Open(format!("{location}: {e}"));
    let opts: AnyConnectOptions = url.parse().map_err(|e| named(&e))?;
    let pool = AnyPoolOptions::new()
        .max_connections(POSTGRES_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(10))
        // Every connection is named after this process (a new leader
        // ends the old one's), and a leader's new connection first checks
        // that it still leads (see `leader.rs`).
        .after_connect(move |conn, _| {
            let fence = fence.clone();
            Box::pin(async move { fence.on_connect(conn).await })
        })
        .connect_with(opts)
        .await
        .map_err(|e| named(&e))?;
    // sqlx takes an advisory lock while it migrates: two coordinators
    // starting together migrate once.
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .map_err(|e| named(&e))?;
    Ok(pool)
}

/// Percent-encodes a path for a `sqlite://` URL: sqlx decodes it again, so
/// `%`, `?` and `#` in a directory name survive.
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_accepted() {
        assert_eq!(
            Location::parse("sqlite:/var/lib/farmer/farmer.db").unwrap(),
            Location::Sqlite("/var/lib/farmer/farmer.db".into())
        );
        assert_eq!(
            Location::parse("sqlite:///tmp/a.db").unwrap(),
            Location::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            Location::parse("postgres://farmer:pw@db:5432/farm").unwrap(),
            Location::Postgres("postgres://farmer:pw@db:5432/farm".into())
        );
        let e = Location::parse("mysql://x/y").unwrap_err();
        assert!(e.contains("postgres://") && e.contains("sqlite:"), "{e}");
        let e = Location::parse("postgres://farmer:secret@db:5432").unwrap_err();
        assert!(e.contains("no database") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn a_location_never_shows_its_password() {
        for url in [
            "postgres://farmer:hunter22@db/farm",
            "postgres://farmer@db/farm?sslmode=require&password=hunter22",
        ] {
            let l = Location::parse(url).unwrap();
            let shown = format!("{l} {l:?}");
            assert!(
                !shown.contains("hunter22") && shown.contains("***"),
                "{shown}"
            );
        }
        let e = Location::parse("postgres://farmer:hunter22@/?sslmode=require").unwrap_err();
        assert!(!e.contains("hunter22"), "{e}");
    }

    #[test]
    fn a_local_socket_and_sqlite_options() {
        assert!(Location::parse("postgres:///farm?host=/run/postgresql").is_ok());
        let e = Location::parse("sqlite:/x.db?mode=ro").unwrap_err();
        assert!(e.contains("only the file"), "{e}");
    }

    #[test]
    fn paths_survive_the_url() {
        assert_eq!(encode_path("/a b/%?#/x.db"), "/a%20b/%25%3F%23/x.db");
    }
}
