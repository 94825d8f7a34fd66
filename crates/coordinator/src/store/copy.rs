//! `farmer store migrate`: copies a farm's whole store (every table, ids
//! kept) from one store to a PostgreSQL one, then checks the counts.
//!
//! The copy reads the source in one transaction (a consistent snapshot, even
//! if something writes meanwhile) in primary-key order and batches, and
//! inserts with `ON CONFLICT DO NOTHING`: a copy cut short is simply run
//! again, and goes on where the rows stop matching.

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

/// Rows per insert. Logs ride along in `steps` and `attempt_logs`, so a
/// batch is kept small enough to hold in memory.
const BATCH: i64 = 200;

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    pub table: &'static str,
    /// Rows in the source.
    pub source: i64,
    /// Rows inserted now (fewer than `source` when a copy is run again).
    pub inserted: u64,
    /// Rows in the destination afterwards.
    pub destination: i64,
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

fn read(r: &AnyRow, i: usize, kind: Kind) -> Result<Value> {
    Ok(match kind {
        Kind::Int => Value::Int(r.try_get(i)?),
        Kind::Text => Value::Text(r.try_get(i)?),
        Kind::Bytes => Value::Bytes(r.try_get(i)?),
    })
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
        let mut src = self.pool().begin().await?;
        let mut out = Vec::new();
        for &table in TABLES {
            let columns = columns(to, table).await?;
            let keys = primary_key(to, table).await?;
            let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
            let key_list = keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
            let key_idx: Vec<usize> = keys
                .iter()
                .map(|k| columns.iter().position(|c| &c.name == k).unwrap_or(0))
                .collect();
            let mut after: Option<Vec<Value>> = None;
            let mut inserted = 0u64;
            loop {
                let mut sql = format!("SELECT {} FROM {}", names.join(", "), quote(table));
                if after.is_some() {
                    let marks = super::params(1, keys.len());
                    sql.push_str(&format!(" WHERE ({key_list}) > ({marks})"));
                }
                sql.push_str(&format!(" ORDER BY {key_list} LIMIT {BATCH}"));
                let mut q = sqlx::query(&sql);
                for v in after.iter().flatten() {
                    q = bind(q, v);
                }
                let rows = q.fetch_all(&mut *src).await?;
                if rows.is_empty() {
                    break;
                }
                let mut values = Vec::with_capacity(rows.len() * columns.len());
                for r in &rows {
                    for (i, c) in columns.iter().enumerate() {
                        values.push(read(r, i, c.kind)?);
                    }
                }
                let tuples: Vec<String> = (0..rows.len())
                    .map(|n| format!("({})", super::params(n * columns.len() + 1, columns.len())))
                    .collect();
                let insert = format!(
                    "INSERT INTO {} ({}) VALUES {} ON CONFLICT DO NOTHING",
                    quote(table),
                    names.join(", "),
                    tuples.join(", ")
                );
                let mut q = sqlx::query(&insert);
                for v in &values {
                    q = bind(q, v);
                }
                inserted += q.execute(to.pool()).await?.rows_affected();
                progress(table, inserted);
                let last = rows.len() - 1;
                let mut key = Vec::new();
                for &i in &key_idx {
                    key.push(read(&rows[last], i, columns[i].kind)?);
                }
                after = Some(key);
                if (rows.len() as i64) < BATCH {
                    break;
                }
            }
            if columns.iter().any(|c| c.name == "id") {
                // Identities go on after the highest id copied.
                sqlx::query(&format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {q}), 0) + 1, false)",
                    q = quote(table)
                ))
                .execute(to.pool())
                .await?;
            }
            let count = format!("SELECT COUNT(*) FROM {}", quote(table));
            let source: i64 = sqlx::query_scalar(&count).fetch_one(&mut *src).await?;
            let destination: i64 = sqlx::query_scalar(&count).fetch_one(to.pool()).await?;
            out.push(TableCopy {
                table,
                source,
                inserted,
                destination,
            });
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
    v: &Value,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    match v {
        Value::Int(x) => q.bind(*x),
        Value::Text(x) => q.bind(x.clone()),
        Value::Bytes(x) => q.bind(x.clone()),
    }
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
