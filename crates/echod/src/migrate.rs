//! `echod migrate`: moves an embedded installation (one SQLite file per service, files
//! under `DATA_DIR/blobs`) to the scale path — every service's data into PostgreSQL
//! (each in the schema its store creates) and, when asked, the files into an
//! S3-compatible bucket — without loss: each table's rows are counted on both sides,
//! each file's SHA-256 is checked against the ledger as it is copied, and the audit chain
//! must still verify where it now lives. Echo must be stopped; the bus (`queue.db`) is
//! not moved (drain it first: it holds only work in flight), nor the search index (it
//! stays in the data dir). The source is never changed: until the configuration names
//! the new places, the embedded installation is as it was.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::TryStreamExt;
use sqlx::{Row, TypeInfo, ValueRef};

use common::config::{Secret, StorageConfig};
use common::{EchoConfig, ServiceName};

/// What moved.
#[derive(Debug, Default)]
pub struct Report {
    /// (schema.table, rows) copied, in order.
    pub tables: Vec<(String, u64)>,
    /// SQLite tables with no counterpart on PostgreSQL (search indexes of the logs).
    pub skipped: Vec<String>,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub audit_records: i64,
}

/// The services whose data moves, with their schema (= service name).
const SERVICES: [ServiceName; 10] = [
    ServiceName::Identity,
    ServiceName::Authz,
    ServiceName::Gateway,
    ServiceName::Storage,
    ServiceName::Ingest,
    ServiceName::Rag,
    ServiceName::Logs,
    ServiceName::Audit,
    ServiceName::Profile,
    ServiceName::Chat,
];

/// One value as PostgreSQL's column wants it.
enum Value {
    Int(Option<i64>),
    Bool(Option<bool>),
    Float(Option<f64>),
    Text(Option<String>),
    Json(Option<serde_json::Value>),
    Bytes(Option<Vec<u8>>),
}

fn read(row: &sqlx::sqlite::SqliteRow, index: usize, pg_type: &str) -> anyhow::Result<Value> {
    // SQLite stores what it was given; read it as the target column needs.
    let raw = row.try_get_raw(index)?;
    let sqlite_type = raw.type_info().name().to_string();
    let null = raw.is_null();
    Ok(match pg_type {
        "bigint" | "integer" | "smallint" => Value::Int(if null { None } else { Some(row.try_get::<i64, _>(index)?) }),
        "boolean" => Value::Bool(if null { None } else { Some(row.try_get::<i64, _>(index)? != 0) }),
        "double precision" | "real" | "numeric" => Value::Float(if null { None } else { Some(row.try_get::<f64, _>(index)?) }),
        "jsonb" | "json" => Value::Json(if null {
            None
        } else {
            let text: String = row.try_get(index)?;
            Some(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
        }),
        "bytea" => Value::Bytes(if null { None } else { Some(row.try_get::<Vec<u8>, _>(index)?) }),
        _ if sqlite_type == "INTEGER" && !null => Value::Text(Some(row.try_get::<i64, _>(index)?.to_string())),
        _ => Value::Text(if null { None } else { Some(row.try_get::<String, _>(index)?) }),
    })
}

fn bind(builder: &mut sqlx::query_builder::Separated<'_, sqlx::Postgres, &'static str>, value: Value) {
    match value {
        Value::Int(v) => builder.push_bind(v),
        Value::Bool(v) => builder.push_bind(v),
        Value::Float(v) => builder.push_bind(v),
        Value::Text(v) => builder.push_bind(v),
        Value::Json(v) => builder.push_bind(v),
        Value::Bytes(v) => builder.push_bind(v),
    };
}

/// A target column: name, type, and whether it fills itself (a serial's default is
/// overwritten by the copied ids, then the sequence is moved past them).
struct TargetColumn {
    name: String,
    data_type: String,
    serial: bool,
}

async fn pg_columns(pg: &sqlx::PgPool, schema: &str, table: &str) -> anyhow::Result<Vec<TargetColumn>> {
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT column_name::TEXT, data_type::TEXT, is_generated::TEXT, column_default::TEXT FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, _, generated, _)| generated != "ALWAYS")
        .map(|(name, data_type, _, default)| TargetColumn { name, data_type, serial: default.is_some_and(|d| d.starts_with("nextval(")) })
        .collect())
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Copies one service's SQLite file into its PostgreSQL schema.
async fn copy_service(file: &std::path::Path, pg: &sqlx::PgPool, schema: &str, report: &mut Report) -> anyhow::Result<()> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(file).read_only(true);
    let sqlite = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await.with_context(|| format!("opening {}", file.display()))?;
    let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != '_migrations' ORDER BY rowid")
        .fetch_all(&sqlite)
        .await?;
    for table in tables {
        // authz's version counter is the target's own (its triggers count the copy).
        if table == "meta" {
            continue;
        }
        let target = pg_columns(pg, schema, &table).await?;
        if target.is_empty() {
            report.skipped.push(format!("{schema}.{table}"));
            continue;
        }
        let qualified = format!("{}.{}", quoted(schema), quoted(&table));
        let present: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {qualified}"))).fetch_one(pg).await?;
        anyhow::ensure!(present == 0, "{schema}.{table} already holds {present} rows: migrate into an empty database");
        let source_columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)").bind(&table).fetch_all(&sqlite).await?;
        let columns: Vec<&TargetColumn> = target.iter().filter(|c| source_columns.contains(&c.name)).collect();
        let list = columns.iter().map(|c| quoted(&c.name)).collect::<Vec<_>>().join(", ");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {list} FROM {}", quoted(&table)))).fetch(&sqlite);
        let mut tx = pg.begin().await?;
        let mut copied: u64 = 0;
        let mut batch: Vec<Vec<Value>> = Vec::new();
        let flush = async |tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, batch: &mut Vec<Vec<Value>>| -> anyhow::Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO {qualified} ({list}) "));
            insert.push_values(batch.drain(..), |mut row, values| {
                for value in values {
                    bind(&mut row, value);
                }
            });
            insert.build().execute(&mut **tx).await?;
            Ok(())
        };
        while let Some(row) = rows.try_next().await? {
            let values = columns.iter().enumerate().map(|(i, c)| read(&row, i, &c.data_type)).collect::<anyhow::Result<Vec<_>>>().with_context(|| format!("reading {table}"))?;
            batch.push(values);
            copied += 1;
            // PostgreSQL takes at most 65,535 parameters a statement.
            if batch.len() * columns.len() >= 30_000 {
                flush(&mut tx, &mut batch).await.with_context(|| format!("copying {table}"))?;
            }
        }
        flush(&mut tx, &mut batch).await.with_context(|| format!("copying {table}"))?;
        for serial in columns.iter().filter(|c| c.serial) {
            let sql = format!(
                "SELECT setval(pg_get_serial_sequence('{}', '{}'), COALESCE((SELECT MAX({}) FROM {qualified}), 0) + 1, false)",
                qualified.replace('\'', "''"),
                serial.name.replace('\'', "''"),
                quoted(&serial.name)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let source_count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {}", quoted(&table)))).fetch_one(&sqlite).await?;
        let target_count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {qualified}"))).fetch_one(pg).await?;
        anyhow::ensure!(source_count == target_count && target_count as u64 == copied, "{schema}.{table}: {source_count} rows in SQLite, {target_count} in PostgreSQL");
        report.tables.push((format!("{schema}.{table}"), copied));
    }
    sqlite.close().await;
    Ok(())
}

/// Moves the embedded installation `source` describes to the database at `to` (and its
/// files to `storage` when given). `source` must be stopped and embedded.
pub async fn run(source: &EchoConfig, to: &str, storage: Option<StorageConfig>) -> anyhow::Result<Report> {
    anyhow::ensure!(to.starts_with("postgres://") || to.starts_with("postgresql://"), "--to must be a postgres:// URL");
    anyhow::ensure!(
        source.database.url.is_empty(),
        "this installation already keeps its data at database.url; migrate moves an embedded one (unset database.url)"
    );
    let gateway = format!("127.0.0.1:{}", source.port(ServiceName::Gateway));
    if tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(&gateway)).await.is_ok_and(|c| c.is_ok()) {
        anyhow::bail!("something answers at {gateway}: stop Echo before migrating (nothing may change while it is copied)");
    }
    let mut target = source.clone();
    target.database.url = Secret(to.to_string());
    for own in [
        &mut target.identity.database_url,
        &mut target.authz.database_url,
        &mut target.gateway.database_url,
        &mut target.storage.database_url,
        &mut target.ingest.database_url,
        &mut target.rag.database_url,
        &mut target.logs.database_url,
        &mut target.audit.database_url,
        &mut target.profile.database_url,
        &mut target.chat.database_url,
    ] {
        *own = Secret::default();
    }
    // Each service creates its schema, as it would at its first start there.
    identity::prepare_store(&target).await?;
    authz::prepare_store(&target).await?;
    gateway::prepare_store(&target).await?;
    storage::prepare_store(&target).await?;
    ingest::prepare_store(&target).await?;
    rag::prepare_store(&target).await?;
    logs::prepare_store(&target).await?;
    audit::prepare_store(&target).await?;
    profile::prepare_store(&target).await?;
    chat::prepare_store(&target).await?;
    let pg = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(to).await.context("connecting to the target database")?;
    let mut report = Report::default();
    for service in SERVICES {
        let file = source.db_path(service);
        if file.exists() {
            copy_service(&file, &pg, service.as_str(), &mut report).await.with_context(|| format!("moving {}", service.as_str()))?;
        }
    }
    if let Some(storage) = storage {
        let expected = ledger_hashes(&source.db_path(ServiceName::Storage)).await?;
        let (n, bytes) = storage::copy_local_blobs(&source.data_dir, &storage, &expected).await?;
        report.blobs = n;
        report.blob_bytes = bytes;
    }
    let verification = audit::verify(&target).await?;
    anyhow::ensure!(verification.ok, "the audit chain does not verify after the move: {verification:?}");
    report.audit_records = verification.n_records;
    pg.close().await;
    Ok(report)
}

/// blob id → SHA-256 as the embedded ledger records them.
async fn ledger_hashes(file: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
    if !file.exists() {
        return Ok(HashMap::new());
    }
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(file).read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, sha256 FROM blobs").fetch_all(&pool).await?;
    pool.close().await;
    Ok(rows.into_iter().collect())
}
