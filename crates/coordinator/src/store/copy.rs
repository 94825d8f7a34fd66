//! `farmer store migrate`: copies a farm's whole store (every table, ids
//! kept) from one store to a PostgreSQL one, then checks the counts.
//!
//! The source is read in one transaction (a consistent snapshot: SQLite's
//! read transaction, PostgreSQL's repeatable read) in primary-key order and
//! bounded batches. Rows are upserted, and rows the source no longer has
//! are deleted afterwards (children first): running the copy again, after
//! a cut or after the source changed, makes the destination equal to it.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Engine, Result, Store, StoreError};

/// Every table of the store, parents before children (foreign keys are
/// checked on PostgreSQL as each row arrives). A table the destination has
/// and this list lacks is an error: a new table must be added here.
pub const TABLES: &[&str] = &[
    "commits",
    "commit_branches",
    "builds",
    "attempts",
    "steps",
    "build_artifacts",
    "attempt_logs",
    "unit_runs",
    "test_results",
    "machines",
    "bot_requests",
    "bots",
    "revoked",
    "exec_instances",
    "users",
    "user_keys",
    "gomote_instances",
    "gomote_groups",
    "gomote_group_members",
    "hook_deliveries",
    "outbox",
    "branch_states",
];

/// Rows read per batch; tables with blobs (compressed logs, which can be
/// megabytes each) in smaller batches.
const BATCH: i64 = 500;
const BLOB_BATCH: i64 = 16;
/// Most bytes of values in one insert (a PostgreSQL message holds at most
/// 1 GiB; memory holds a batch twice).
const INSERT_BYTES: usize = 32 << 20;

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    pub table: &'static str,
    /// Rows in the source.
    pub source: i64,
    /// Rows in the destination before and after.
    pub before: i64,
    pub destination: i64,
    /// Rows deleted from the destination because the source has them no more.
    pub removed: u64,
    /// Finished logs the source's artifact store did not have (their rows
    /// were copied without them).
    pub missing_logs: u64,
}

impl TableCopy {
    /// Rows the destination did not have before.
    pub fn added(&self) -> i64 {
        self.destination - self.before + self.removed as i64
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Bytes,
}

struct Column {
    name: String,
    kind: Kind,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A value read from the source, as the destination's column wants it.
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

/// A value as the destination stores it (text without NUL, which
/// PostgreSQL refuses).
fn read(r: &AnyRow, i: usize, kind: Kind) -> Result<Value> {
    Ok(match read_raw(r, i, kind)? {
        Value::Text(t) => Value::Text(t.map(|t| super::text(&t))),
        v => v,
    })
}

/// A value exactly as the source has it (a key to page on).
fn read_raw(r: &AnyRow, i: usize, kind: Kind) -> Result<Value> {
    Ok(match kind {
        Kind::Int => Value::Int(r.try_get(i)?),
        Kind::Text => Value::Text(r.try_get(i)?),
        Kind::Bytes => Value::Bytes(r.try_get(i)?),
    })
}

impl Value {
    fn size(&self) -> usize {
        match self {
            Value::Int(_) => 8,
            Value::Text(t) => t.as_ref().map_or(0, String::len),
            Value::Bytes(b) => b.as_ref().map_or(0, Vec::len),
        }
    }
}

/// One table as the destination defines it.
struct Shape {
    table: &'static str,
    columns: Vec<Column>,
    keys: Vec<String>,
    /// Where each key column is among `columns`.
    key_idx: Vec<usize>,
}

impl Shape {
    fn names(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_list(&self) -> String {
        self.keys
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `SELECT cols FROM t [WHERE (keys) > (after)] ORDER BY keys LIMIT n`.
    fn page(&self, cols: &str, after: bool, limit: i64) -> String {
        let mut sql = format!("SELECT {cols} FROM {}", quote(self.table));
        if after {
            sql.push_str(&format!(
                " WHERE ({}) > ({})",
                self.key_list(),
                super::params(1, self.keys.len())
            ));
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", self.key_list()));
        sql
    }

    /// `(keys) IN (VALUES ($1, $2), ...)` for `n` keys.
    fn keys_in(&self, n: usize) -> String {
        let k = self.keys.len();
        let tuples: Vec<String> = (0..n)
            .map(|i| format!("({})", super::params(i * k + 1, k)))
            .collect();
        format!("({}) IN (VALUES {})", self.key_list(), tuples.join(", "))
    }

    /// The upsert of `rows` rows: new rows added, changed rows updated.
    fn upsert(&self, rows: usize) -> String {
        let n = self.columns.len();
        let tuples: Vec<String> = (0..rows)
            .map(|r| format!("({})", super::params(r * n + 1, n)))
            .collect();
        let set: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !self.keys.contains(&c.name))
            .map(|c| {
                let q = quote(&c.name);
                if c.name == "log_gz" {
                    // A log the destination has is kept when the source's
                    // copy of it went missing since.
                    format!(
                        "{q} = CASE WHEN excluded.{q} IS NULL OR length(excluded.{q}) = 0 THEN {t}.{q} ELSE excluded.{q} END",
                        t = quote(self.table)
                    )
                } else {
                    format!("{q} = excluded.{q}")
                }
            })
            .collect();
        let action = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        format!(
            "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) {action}",
            quote(self.table),
            self.names(),
            tuples.join(", "),
            self.key_list()
        )
    }

    fn has_blobs(&self) -> bool {
        self.columns.iter().any(|c| matches!(c.kind, Kind::Bytes))
    }
}

type Src<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// Copies every row of one table, in key order and bounded batches.
async fn copy_table(
    src_store: &Store,
    src: &mut Src<'_>,
    to: &Store,
    shape: &Shape,
    progress: &mut impl FnMut(&str, u64),
) -> Result<u64> {
    let limit = if shape.has_blobs() { BLOB_BATCH } else { BATCH };
    let mut missing = 0;
    let names = shape.names();
    let width = shape.columns.len();
    let mut after: Option<Vec<Value>> = None;
    let mut done = 0u64;
    loop {
        let sql = shape.page(&names, after.is_some(), limit);
        let mut q = sqlx::query(sql.as_str());
        for v in after.take().into_iter().flatten() {
            q = bind(q, v);
        }
        let rows = q.fetch_all(&mut **src).await?;
        let Some(last) = rows.last() else { break };
        let mut key = Vec::new();
        for &i in &shape.key_idx {
            key.push(read_raw(last, i, shape.columns[i].kind)?);
        }
        let mut batch: Vec<Value> = Vec::new();
        let mut bytes = 0;
        for (n, r) in rows.iter().enumerate() {
            let mut row = Vec::with_capacity(width);
            for (i, c) in shape.columns.iter().enumerate() {
                row.push(read(r, i, c.kind)?);
            }
            if !src_store.inline_log(shape, &mut row).await {
                missing += 1;
            }
            for v in row {
                bytes += v.size();
                batch.push(v);
            }
            if bytes >= INSERT_BYTES || n + 1 == rows.len() {
                let sql = shape.upsert(batch.len() / width);
                let mut q = sqlx::query(sql.as_str());
                for v in batch.drain(..) {
                    q = bind(q, v);
                }
                q.execute(to.writer()).await?;
                bytes = 0;
            }
        }
        done += rows.len() as u64;
        progress(shape.table, done);
        if (rows.len() as i64) < limit {
            break;
        }
        after = Some(key);
    }
    Ok(missing)
}

/// Deletes the destination's rows whose keys the source does not have.
async fn remove_missing(src: &mut Src<'_>, to: &Store, shape: &Shape) -> Result<u64> {
    let keys = shape.key_list();
    let mut after: Option<Vec<Value>> = None;
    let mut removed = 0;
    loop {
        let sql = shape.page(&keys, after.is_some(), BATCH);
        let mut q = sqlx::query(sql.as_str());
        for v in after.take().into_iter().flatten() {
            q = bind(q, v);
        }
        let rows = q.fetch_all(to.pool()).await?;
        let Some(last) = rows.last() else { break };
        let kinds: Vec<Kind> = shape
            .key_idx
            .iter()
            .map(|&i| shape.columns[i].kind)
            .collect();
        let read_key = |r: &AnyRow| -> Result<Vec<Value>> {
            kinds
                .iter()
                .enumerate()
                .map(|(i, k)| read(r, i, *k))
                .collect()
        };
        let next = read_key(last)?;
        let found = {
            let sql = format!(
                "SELECT {keys} FROM {} WHERE {}",
                quote(shape.table),
                shape.keys_in(rows.len())
            );
            let mut q = sqlx::query(sql.as_str());
            for r in &rows {
                for v in read_key(r)? {
                    q = bind(q, v);
                }
            }
            let mut found = std::collections::HashSet::new();
            for r in q.fetch_all(&mut **src).await? {
                found.insert(key_text(&read_key(&r)?));
            }
            found
        };
        let missing: Vec<&AnyRow> = rows
            .iter()
            .filter(|r| read_key(r).is_ok_and(|k| !found.contains(&key_text(&k))))
            .collect();
        if !missing.is_empty() {
            let sql = format!(
                "DELETE FROM {} WHERE {}",
                quote(shape.table),
                shape.keys_in(missing.len())
            );
            let mut q = sqlx::query(sql.as_str());
            for r in &missing {
                for v in read_key(r)? {
                    q = bind(q, v);
                }
            }
            removed += q.execute(to.writer()).await?.rows_affected();
        }
        if (rows.len() as i64) < BATCH {
            break;
        }
        after = Some(next);
    }
    Ok(removed)
}

impl Store {
    /// A finished log the source keeps in its artifact store (its row's
    /// blob empty) goes into the destination's row: the copy carries the
    /// whole history, whatever the destination's artifact store will be.
    /// False when the log should be in the artifact store and is not.
    async fn inline_log(&self, shape: &Shape, row: &mut [Value]) -> bool {
        let (key_col, key): (&str, fn(i64) -> String) = match shape.table {
            "steps" => ("id", super::logs::step_key),
            "attempt_logs" => ("attempt_id", super::logs::attempt_key),
            _ => return true,
        };
        let at = |name: &str| shape.columns.iter().position(|c| c.name == name);
        let (Some(k), Some(gz), Some(size)) = (at(key_col), at("log_gz"), at("log_size")) else {
            return true;
        };
        let (Value::Int(Some(id)), Value::Int(Some(size))) = (&row[k], &row[size]) else {
            return true;
        };
        let empty = match &row[gz] {
            Value::Bytes(b) => b.as_ref().is_none_or(Vec::is_empty),
            _ => false,
        };
        if !empty || *size == 0 {
            return true;
        }
        // A PostgreSQL source without one keeps such logs in a bucket the
        // destination's farm reads too.
        let Some(blobs) = &self.blobs else {
            return self.engine() != Engine::Sqlite;
        };
        match blobs.get(&key(*id)).await {
            Ok(Some(data)) => {
                row[gz] = Value::Bytes(Some(data.to_vec()));
                true
            }
            Ok(None) => {
                tracing::warn!(
                    table = shape.table,
                    id,
                    "a finished log is missing from the {}",
                    blobs.describe()
                );
                false
            }
            Err(e) => {
                tracing::warn!(
                    table = shape.table,
                    id,
                    "reading a finished log from the {}: {e}",
                    blobs.describe()
                );
                false
            }
        }
    }
}

/// A key as one comparable string.
fn key_text(k: &[Value]) -> String {
    k.iter()
        .map(|v| match v {
            Value::Int(i) => format!("i{i:?}"),
            Value::Text(t) => format!("t{t:?}"),
            Value::Bytes(b) => format!("b{b:?}"),
        })
        .collect::<Vec<_>>()
        .join("\u{1f}")
}

impl Store {
    /// Copies every table of `self` into `to` (a PostgreSQL store, its
    /// schema already migrated), calling `progress` after each batch, and
    /// checks that each table then holds as many rows as the source.
    pub async fn copy_to(
        &self,
        to: &Store,
        mut progress: impl FnMut(&str, u64),
    ) -> Result<Vec<TableCopy>> {
        if to.engine() != Engine::Postgres {
            return Err(StoreError::Invalid(
                "the destination of a store copy must be PostgreSQL (postgres://…)".into(),
            ));
        }
        let dest_tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name NOT LIKE '\\_sqlx%' ORDER BY table_name",
        )
        .fetch_all(to.pool())
        .await?;
        if let Some(t) = dest_tables.iter().find(|t| !TABLES.contains(&t.as_str())) {
            return Err(StoreError::Invalid(format!(
                "the destination has a table {t:?} the copy does not know; this farmer is older than that database"
            )));
        }
        // One read transaction: a consistent snapshot of the source.
        let mut conn = self.pool().acquire().await?;
        let mut src: Src = conn.begin().await?;
        if self.engine() == Engine::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *src)
                .await?;
        }
        let count = |t: &str| format!("SELECT COUNT(*) FROM {}", quote(t));
        let mut shapes = Vec::new();
        for &table in TABLES {
            shapes.push(shape(to, table).await?);
        }
        let mut out = Vec::new();
        for shape in &shapes {
            let before: i64 = sqlx::query_scalar(&count(shape.table))
                .fetch_one(to.pool())
                .await?;
            out.push(TableCopy {
                table: shape.table,
                source: 0,
                before,
                destination: 0,
                removed: 0,
                missing_logs: 0,
            });
        }
        // First what the source no longer has, children before parents (a
        // stale row could otherwise clash with a new one on a unique index).
        for (shape, c) in shapes.iter().zip(out.iter_mut()).rev() {
            if c.before > 0 {
                c.removed = remove_missing(&mut src, to, shape).await?;
            }
        }
        // Then every row of the source, parents before children.
        for (shape, c) in shapes.iter().zip(out.iter_mut()) {
            c.missing_logs = copy_table(self, &mut src, to, shape, &mut progress).await?;
        }
        for (shape, c) in shapes.iter().zip(out.iter_mut()) {
            c.source = sqlx::query_scalar(&count(c.table))
                .fetch_one(&mut *src)
                .await?;
            c.destination = sqlx::query_scalar(&count(c.table))
                .fetch_one(to.pool())
                .await?;
            if shape.columns.iter().any(|col| col.name == "id") {
                // Identities go on after the highest id copied.
                sqlx::query(&format!(
                    "SELECT setval(pg_get_serial_sequence('{t}', 'id'), COALESCE((SELECT MAX(id) FROM {q}), 0) + 1, false)",
                    t = c.table,
                    q = quote(c.table)
                ))
                .execute(to.writer())
                .await?;
            }
        }
        src.rollback().await?;
        let wrong: Vec<String> = out
            .iter()
            .filter(|c| c.source != c.destination)
            .map(|c| {
                format!(
                    "{}: {} in the source, {} in the destination",
                    c.table, c.source, c.destination
                )
            })
            .collect();
        if !wrong.is_empty() {
            return Err(StoreError::Invalid(format!(
                "the copy does not match (was the destination used by another farm?): {}",
                wrong.join("; ")
            )));
        }
        Ok(out)
    }
}

fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    v: Value,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    match v {
        Value::Int(x) => q.bind(x),
        Value::Text(x) => q.bind(x),
        Value::Bytes(x) => q.bind(x),
    }
}

/// A destination table's columns and primary key.
async fn shape(to: &Store, table: &'static str) -> Result<Shape> {
    let columns = columns(to, table).await?;
    let keys = primary_key(to, table).await?;
    let key_idx = keys
        .iter()
        .map(|k| {
            columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                StoreError::Invalid(format!("{table}: key column {k} is not a column"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Shape {
        table,
        columns,
        keys,
        key_idx,
    })
}

/// A destination table's columns, in order, with the kind each holds.
async fn columns(to: &Store, table: &str) -> Result<Vec<Column>> {
    let rows = sqlx::query(
        "SELECT column_name::text AS name, data_type::text AS ty FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(to.pool())
    .await?;
    if rows.is_empty() {
        return Err(StoreError::Invalid(format!(
            "the destination has no table {table:?}"
        )));
    }
    rows.iter()
        .map(|r| {
            let name: String = r.try_get("name")?;
            let ty: String = r.try_get("ty")?;
            let kind = match ty.as_str() {
                "bigint" | "integer" | "smallint" => Kind::Int,
                "text" | "character varying" => Kind::Text,
                "bytea" => Kind::Bytes,
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "{table}.{name} has type {ty}, which the copy does not handle"
                    )));
                }
            };
            Ok(Column { name, kind })
        })
        .collect()
}

/// A destination table's primary key columns, in key order.
async fn primary_key(to: &Store, table: &str) -> Result<Vec<String>> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT k.column_name::text FROM information_schema.table_constraints c \
         JOIN information_schema.key_column_usage k ON k.constraint_name = c.constraint_name AND k.table_schema = c.table_schema AND k.table_name = c.table_name \
         WHERE c.table_schema = current_schema() AND c.table_name = $1 AND c.constraint_type = 'PRIMARY KEY' ORDER BY k.ordinal_position",
    )
    .bind(table)
    .fetch_all(to.pool())
    .await?;
    if keys.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{table} has no primary key in the destination"
        )));
    }
    Ok(keys)
}
