//! The store's connections: sqlx's pool on PostgreSQL, a set of its own
//! on SQLite.
//!
//! sqlx's pool checks a connection with a round trip ("ping") when it
//! hands it out and again when it takes it back, the latter in a task of
//! its own. On SQLite a round trip is a hop to the connection's worker
//! thread and back: through the pool a statement cost three hops and a
//! task instead of one hop, about 30 thread switches per build. A SQLite
//! connection is a file handle and a thread of this process, not a socket
//! that a server restart or a network drop can break, so on SQLite the
//! store keeps its connections itself: a fixed number, handed out in turn,
//! never pinged. A connection whose worker thread died is closed instead of
//! handed out again. PostgreSQL keeps the pool: its pings are what notice
//! a dead server connection.
//!
//! [`Conns`] is an [`Executor`], as the pool was: a statement takes a
//! connection for itself (`.execute(self.writer())`). A transaction holds one
//! for its whole length ([`Conns::acquire`], then `begin`). A short
//! transaction whose statements need nothing from the caller between them
//! is a [`Conns::batch`]: on SQLite one trip to the worker thread, not one
//! per statement plus two for `BEGIN` and `COMMIT`.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::any::{AnyConnectOptions, AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Describe, Either, Execute, Executor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where a store's statements get a connection (cheap to clone: both
/// kinds are shared handles).
#[derive(Clone)]
pub(super) enum Conns {
    /// sqlx's pool (PostgreSQL).
    Pool(AnyPool),
    /// Connections kept by the store (SQLite).
    Own(Arc<Own>),
}

/// A fixed number of connections, opened when first needed.
pub(super) struct Own {
    /// Connections not in use.
    idle: Mutex<Vec<AnyConnection>>,
    /// One permit per connection that may be in use.
    permits: Arc<Semaphore>,
    size: u32,
    opts: AnyConnectOptions,
    /// Statements run on every new connection (its pragmas).
    setup: String,
    /// How long a statement waits for a connection.
    wait: Duration,
}

impl Conns {
    /// `size` connections to `opts`, each set up with `setup` when opened;
    /// the first is opened now, so a bad location fails here.
    pub(super) async fn own(
        opts: AnyConnectOptions,
        setup: String,
        size: u32,
        wait: Duration,
    ) -> Result<Conns, sqlx::Error> {
        let own = Arc::new(Own {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
            opts,
            setup,
            wait,
        });
        let first = own.open().await?;
        own.idle_list().push(first);
        Ok(Conns::Own(own))
    }

    /// How many connections there may be at once.
    #[cfg(test)]
    pub(super) fn size(&self) -> u32 {
        match self {
            Conns::Pool(p) => p.options().get_max_connections(),
            Conns::Own(o) => o.size,
        }
    }

    /// A connection for several statements (a transaction): others wait
    /// for it until it is dropped.
    pub(super) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        match self {
            Conns::Pool(p) => Ok(Conn::Pool(p.acquire().await?)),
            Conns::Own(o) => Ok(Conn::Own(o.clone().acquire().await?)),
        }
    }
}

impl Own {
    fn idle_list(&self) -> std::sync::MutexGuard<'_, Vec<AnyConnection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn open(&self) -> Result<AnyConnection, sqlx::Error> {
        let mut conn = AnyConnection::connect_with(&self.opts).await?;
        conn.execute(self.setup.as_str()).await?;
        Ok(conn)
    }

    async fn acquire(self: Arc<Self>) -> Result<OwnConn, sqlx::Error> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle_list().pop();
        let conn = match idle {
            Some(c) => c,
            None => self.open().await?,
        };
        Ok(OwnConn {
            conn: Some(conn),
            home: self,
            _permit: permit,
            broken: false,
        })
    }
}

/// A value bound to a batch's statement.
pub(super) enum Arg {
    Int(i64),
    Text(String),
    /// A blob, or `NULL`.
    Bytes(Option<Vec<u8>>),
}

/// One statement of a [`Conns::batch`]: its SQL numbers its parameters
/// `$1`, `$2`, … on its own (no `$` elsewhere in it).
pub(super) struct Stmt {
    sql: &'static str,
    args: Vec<Arg>,
}

impl Stmt {
    pub(super) fn new(sql: &'static str, args: Vec<Arg>) -> Stmt {
        Stmt { sql, args }
    }
}

/// `sql` with its parameters `$N` renumbered to `$(N + by)`.
fn shift_params(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Int(v) => q.bind(*v),
            Arg::Text(v) => q.bind(v.as_str()),
            Arg::Bytes(v) => q.bind(v.as_deref()),
        };
    }
    q
}

impl Conns {
    /// Runs `stmts` in one transaction: all of them or none. Returns each
    /// statement's rows (`RETURNING`), in order.
    ///
    /// On SQLite the statements go to the worker thread as one text,
    /// `BEGIN; …; COMMIT`. A statement that fails ends the batch; the
    /// transaction is rolled back before the connection is used again. A
    /// batch dropped half-way leaves its connection closed (SQLite rolls
    /// back what it did not commit), never handed out inside a
    /// transaction. On PostgreSQL, which takes one statement with
    /// parameters at a time, it is an ordinary transaction.
    pub(super) async fn batch(&self, stmts: &[Stmt]) -> Result<Vec<Vec<AnyRow>>, sqlx::Error> {
        match self {
            Conns::Pool(p) => {
                let mut tx = p.begin().await?;
                let mut out = Vec::with_capacity(stmts.len());
                for s in stmts {
                    out.push(
                        bind(sqlx::query(s.sql), &s.args)
                            .fetch_all(&mut *tx)
                            .await?,
                    );
                }
                tx.commit().await?;
                Ok(out)
            }
            Conns::Own(o) => {
                let mut sql = String::from("BEGIN; ");
                let mut n = 0;
                for s in stmts {
                    sql.push_str(&shift_params(s.sql, n));
                    sql.push_str("; ");
                    n += s.args.len();
                }
                sql.push_str("COMMIT;");
                let mut q = sqlx::query(&sql);
                for s in stmts {
                    q = bind(q, &s.args);
                }
                let mut c = o.clone().acquire().await?;
                // Until the batch has ended one way or the other.
                c.broken = true;
                let r = c.conn().fetch_many(q).try_collect::<Vec<_>>().await;
                c.broken = match &r {
                    Ok(_) => false,
                    Err(e) if breaks(e) => true,
                    // Fails harmlessly (and the connection is fine) when
                    // BEGIN itself failed.
                    Err(_) => c
                        .conn()
                        .execute("ROLLBACK")
                        .await
                        .is_err_and(|e| breaks(&e)),
                };
                per_statement(r?, stmts.len())
            }
        }
    }
}

/// Whether an error says the connection itself is gone.
fn breaks(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::WorkerCrashed | sqlx::Error::Io(_))
}

/// A batch's answers split into each statement's rows: every statement
/// gives its rows, then its result; `BEGIN`'s come first, `COMMIT`'s last.
fn per_statement(
    items: Vec<Either<AnyQueryResult, AnyRow>>,
    n: usize,
) -> Result<Vec<Vec<AnyRow>>, sqlx::Error> {
    let mut out = Vec::with_capacity(n + 2);
    let mut rows = Vec::new();
    for item in items {
        match item {
            Either::Left(_) => out.push(std::mem::take(&mut rows)),
            Either::Right(row) => rows.push(row),
        }
    }
    if out.len() != n + 2 {
        return Err(sqlx::Error::Protocol(format!(
            "a batch of {} statements answered {} results",
            n + 2,
            out.len()
        )));
    }
    out.pop();
    out.remove(0);
    Ok(out)
}

/// A connection taken for a while; back to its set when dropped.
pub(super) enum Conn {
    Pool(PoolConnection<Any>),
    Own(OwnConn),
}

impl Conn {
    /// A transaction on this connection, rolled back if dropped uncommitted.
    pub(super) async fn begin(&mut self) -> Result<sqlx::Transaction<'_, Any>, sqlx::Error> {
        Connection::begin(&mut **self).await
    }
}

pub(super) struct OwnConn {
    conn: Option<AnyConnection>,
    home: Arc<Own>,
    /// Released after the connection is back (field order).
    _permit: OwnedSemaphorePermit,
    /// Its worker thread died: closed, not handed out again.
    broken: bool,
}

impl OwnConn {
    fn conn(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("taken only on drop")
    }

    /// Notes an error of a statement run on this connection.
    fn saw<T>(&mut self, r: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if r.as_ref().is_err_and(breaks) {
            self.broken = true;
        }
        r
    }
}

impl Drop for OwnConn {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.broken
        {
            self.home.idle_list().push(c);
        }
    }
}

impl Deref for Conn {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match self {
            Conn::Pool(c) => c,
            Conn::Own(c) => c.conn.as_ref().expect("taken only on drop"),
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Conn::Pool(c) => c,
            Conn::Own(c) => c.conn(),
        }
    }
}

/// Runs `$call` on a connection of `$own` taken for it, as a boxed future.
macro_rules! on_own {
    ($own:expr, $conn:ident => $call:expr) => {{
        let own = $own.clone();
        Box::pin(async move {
            let mut c = own.acquire().await?;
            let $conn = c.conn();
            let r = $call.await;
            c.saw(r)
        })
    }};
}

impl fmt::Debug for Conns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conns::Pool(p) => p.fmt(f),
            Conns::Own(o) => write!(f, "Conns::Own(size {})", o.size),
        }
    }
}

/// One statement on a connection of its own, as sqlx's pool does it.
impl<'c> Executor<'c> for &'c Conns {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self {
            Conns::Pool(p) => p.fetch_many(query),
            // The rows are collected first (the connection goes back
            // before the caller reads them): every query of the store is
            // bounded, and none streams.
            Conns::Own(o) => {
                let all: BoxFuture<'e, Result<Vec<_>, sqlx::Error>> =
                    on_own!(o, conn => conn.fetch_many(query).try_collect::<Vec<_>>());
                futures_util::stream::once(all)
                    .map_ok(|v| futures_util::stream::iter(v.into_iter().map(Ok)))
                    .try_flatten()
                    .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self {
            Conns::Pool(p) => p.fetch_optional(query),
            Conns::Own(o) => on_own!(o, conn => conn.fetch_optional(query)),
        }
    }

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<AnyQueryResult, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self {
            Conns::Pool(p) => p.execute(query),
            Conns::Own(o) => on_own!(o, conn => conn.execute(query)),
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        match self {
            Conns::Pool(p) => p.prepare_with(sql, parameters),
            Conns::Own(o) => on_own!(o, conn => conn.prepare_with(sql, parameters)),
        }
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match self {
            Conns::Pool(p) => p.describe(sql),
            Conns::Own(o) => on_own!(o, conn => conn.describe(sql)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    async fn own(dir: &std::path::Path, size: u32, wait: Duration) -> Conns {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let opts: AnyConnectOptions = url.parse().unwrap();
        let conns = Conns::own(opts, "PRAGMA journal_mode = WAL;".into(), size, wait)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER)")
            .execute(&conns)
            .await
            .unwrap();
        conns
    }

    async fn insert(conns: &Conns, n: i64) {
        sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(n)
            .execute(conns)
            .await
            .unwrap();
    }

    /// What another connection to the file sees committed, sorted.
    async fn committed(dir: &std::path::Path) -> Vec<i64> {
        let other = own_reader(dir).await;
        let mut n: Vec<i64> = sqlx::query_scalar("SELECT n FROM t")
            .fetch_all(&other)
            .await
            .unwrap();
        n.sort();
        n
    }

    fn idle(c: &Conns) -> usize {
        match c {
            Conns::Own(o) => o.idle_list().len(),
            Conns::Pool(_) => unreachable!(),
        }
    }

    /// A statement waits for a connection held by a transaction, up to
    /// the wait, and then fails as the pool's did; it goes on as soon as
    /// the connection is back.
    #[tokio::test]
    async fn a_held_connection_makes_others_wait_then_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 1, Duration::from_millis(100)).await;
        let held = conns.acquire().await.unwrap();
        let e = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&conns)
            .await
            .unwrap_err();
        assert!(matches!(e, sqlx::Error::PoolTimedOut), "{e}");
        drop(held);
        insert(&conns, 2).await;
        let n: Vec<i64> = sqlx::query_scalar("SELECT n FROM t")
            .fetch_all(&conns)
            .await
            .unwrap();
        assert_eq!(n, vec![2]);
        // One connection, reused: never more than the set's size open.
        assert_eq!(idle(&conns), 1);
    }

    /// A transaction dropped before its commit is rolled back before the
    /// connection's next user runs anything: that user sees none of it
    /// and is not inside it.
    #[tokio::test]
    async fn a_dropped_transaction_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 1, Duration::from_secs(5)).await;
        {
            let mut c = conns.acquire().await.unwrap();
            let mut tx = c.begin().await.unwrap();
            sqlx::query("INSERT INTO t VALUES (1)")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        insert(&conns, 2).await;
        // Another connection to the file sees the second row committed.
        let n = committed(dir.path()).await;
        assert_eq!(n, vec![2]);
    }

    async fn own_reader(dir: &std::path::Path) -> Conns {
        let url = format!("sqlite://{}?mode=rw", dir.join("t.db").display());
        Conns::own(
            url.parse().unwrap(),
            "PRAGMA query_only = ON;".into(),
            1,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }

    /// A connection whose worker thread died is closed, not handed out
    /// again; the next statement opens a new one, set up like the first.
    #[tokio::test]
    async fn a_broken_connection_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own_reader_with_table(dir.path()).await;
        assert_eq!(idle(&conns), 1);
        {
            let Conn::Own(mut c) = conns.acquire().await.unwrap() else {
                unreachable!()
            };
            let _ = c.saw::<()>(Err(sqlx::Error::WorkerCrashed));
        }
        assert_eq!(idle(&conns), 0, "a broken connection went back");
        // The new one has the set's setup: it refuses to write.
        let e = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&conns)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("readonly"), "{e}");
        assert_eq!(idle(&conns), 1);
    }

    async fn own_reader_with_table(dir: &std::path::Path) -> Conns {
        drop(own(dir, 1, Duration::from_secs(5)).await);
        own_reader(dir).await
    }

    /// Several connections serve statements at once, up to the set's size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_share_the_set_up_to_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 3, Duration::from_millis(200)).await;
        let a = conns.acquire().await.unwrap();
        let b = conns.acquire().await.unwrap();
        let c = conns.acquire().await.unwrap();
        assert!(matches!(
            conns.acquire().await.map(drop).unwrap_err(),
            sqlx::Error::PoolTimedOut
        ));
        drop((a, b, c));
        assert_eq!(idle(&conns), 3);
    }

    #[test]
    fn parameters_are_renumbered_past_the_earlier_statements() {
        assert_eq!(
            shift_params("UPDATE t SET a = $1, b = $12 WHERE id = $2", 3),
            "UPDATE t SET a = $4, b = $15 WHERE id = $5"
        );
        assert_eq!(shift_params("SELECT 1", 5), "SELECT 1");
    }

    /// One trip: each statement's rows come back in order, and all of it
    /// is committed.
    #[tokio::test]
    async fn a_batch_returns_each_statements_rows_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 1, Duration::from_secs(5)).await;
        let out = conns
            .batch(&[
                Stmt::new("INSERT INTO t VALUES ($1)", vec![Arg::Int(7)]),
                Stmt::new(
                    "INSERT INTO t VALUES ($1), ($2) RETURNING n",
                    vec![Arg::Int(8), Arg::Int(9)],
                ),
                Stmt::new(
                    "UPDATE t SET n = n + $1 WHERE n = $2",
                    vec![Arg::Int(100), Arg::Int(7)],
                ),
            ])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].is_empty() && out[2].is_empty());
        let got: Vec<i64> = out[1].iter().map(|r| r.get::<i64, _>("n")).collect();
        assert_eq!(got, vec![8, 9]);
        assert_eq!(committed(dir.path()).await, vec![8, 9, 107]);
    }

    /// A failing statement undoes the batch's earlier ones, and the
    /// connection's next user is not left inside its transaction.
    #[tokio::test]
    async fn a_failing_batch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 1, Duration::from_secs(5)).await;
        let Err(e) = conns
            .batch(&[
                Stmt::new("INSERT INTO t VALUES ($1)", vec![Arg::Int(1)]),
                Stmt::new("INSERT INTO no_such_table VALUES ($1)", vec![Arg::Int(2)]),
            ])
            .await
        else {
            panic!("a batch with a missing table succeeded");
        };
        assert!(e.to_string().contains("no_such_table"), "{e}");
        assert_eq!(idle(&conns), 1, "the connection is fine after a rollback");
        insert(&conns, 3).await;
        assert_eq!(
            committed(dir.path()).await,
            vec![3],
            "the first insert was rolled back, the later one committed"
        );
    }

    /// A batch dropped before it ended takes its connection with it: the
    /// next statement gets a fresh one and sees all of the batch or none.
    #[tokio::test]
    async fn a_dropped_batch_closes_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let conns = own(dir.path(), 1, Duration::from_secs(5)).await;
        let stmts = [
            Stmt::new("INSERT INTO t VALUES ($1)", vec![Arg::Int(1)]),
            Stmt::new("INSERT INTO t VALUES ($1)", vec![Arg::Int(2)]),
        ];
        let mut fut = Box::pin(conns.batch(&stmts));
        // Polled until it has sent its text, then dropped.
        assert!(futures_util::poll!(fut.as_mut()).is_pending());
        drop(fut);
        assert_eq!(idle(&conns), 0, "a connection mid-batch went back");
        insert(&conns, 3).await;
        let mut n: Vec<i64> = sqlx::query_scalar("SELECT n FROM t")
            .fetch_all(&conns)
            .await
            .unwrap();
        n.sort();
        assert!(n == vec![3] || n == vec![1, 2, 3], "{n:?}");
    }
}
