//! SQL over every batch (`[[prep]] type = "sql"`), planned once by DataFusion.
//!
//! The incoming batch is the table `input`; small reference tables (CSV or Parquet, e.g.
//! host → service, owner) are loaded into memory at start-up and can be joined:
//!
//! ```toml
//! [[prep]]
//! type = "sql"
//! query = """
//! SELECT i.ts, i.metric, i.labels, i.value * 100 AS value, h.service, h.owner
//! FROM input i JOIN hosts h ON i.labels['host'] = h.host
//! WHERE i.metric LIKE 'cpu%'
//! """
//! into_labels = ["service", "owner"]   # these output columns become labels
//!
//! [[prep.table]]
//! name = "hosts"
//! path = "hosts.csv"
//! ```
//!
//! # How a batch is run
//!
//! The query is parsed, optimised and turned into a physical plan once, at start-up, against
//! the schema the stage receives; `validate` reports SQL and schema errors there, with their
//! line and column. Per batch the stage only executes that plan, with one partition: the
//! table `input` is a one-batch slot the plan's scan reads. The plan runs on a thread the
//! stage owns, with a single-threaded Tokio runtime: a few operators (unions, merges, large
//! sorts) spawn tasks, and they must run on a runtime the stage drives, not on a pipeline
//! worker that waits for them.
//!
//! Hash joins whose build side would be the batch while the other side is a reference table
//! are swapped, so the reference table is hashed once and kept from batch to batch.
//! DataFusion cannot do this itself: it knows the reference table's size but not the batch's.
//! A plan that keeps other state in its operators (the batch on a join's build side, a scalar
//! subquery over `input`, a top-k sort) is reset before each batch; dynamic filters, which
//! would carry one batch's state into the next, are off. Every 1 024 batches the physical plan
//! is built afresh, because each execution adds metrics to the plan's operators.
//!
//! # The output
//!
//! The result must carry the canonical columns `ts` (a timestamp), `metric` (a string),
//! `labels` (the map) and `value` (a number); they are cast to their canonical types and come
//! first. `series_id` is kept when the query selects it (`SELECT *` does) and computed from
//! `metric` and `labels` when it does not, or when `into_labels` changed the labels: a query
//! that rewrites `metric` or `labels` itself should leave `series_id` out
//! (`SELECT * EXCLUDE (series_id) …`). A NULL in an `into_labels` column leaves that label
//! as it was. Other
//! columns follow in query order. A NULL in a canonical column fails the batch (filter such
//! rows with `WHERE`); a batch whose schema is not the planned one, or whose query fails at
//! run time (a failed cast, say), fails too. A failed batch goes to the dead-letter output
//! with the reason and the pipeline goes on.

mod conform;
mod exec;

use std::fmt;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};

use super::{Prep, PrepConfig};
use crate::component::{BuildContext, ComponentConfig, resolve_path};
use crate::error::{ConfigError, Error, Problems, Result};

use self::conform::Conform;
use self::exec::Executor;

const STAGE: &str = "prep:sql";

/// Configuration of a [`SqlPrep`] (`[[prep]] type = "sql"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// The query; the incoming batch is the table `input`.
    pub query: String,
    /// Reference tables loaded once at start-up (`[[prep.table]]`).
    #[serde(default, rename = "table", skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<ReferenceTable>,
    /// Output columns moved into the `labels` map (a NULL leaves the label out); the rows'
    /// `series_id` is then computed from the new labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub into_labels: Vec<String>,
}

/// A reference table (`[[prep.table]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceTable {
    /// The table's name in the query.
    pub name: String,
    /// The file; relative paths are relative to the config file.
    pub path: PathBuf,
    /// `csv` (with a header row) or `parquet`; by default from the file's extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TableFormat>,
}

/// The file formats of reference tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableFormat {
    /// Comma-separated, with a header row; column types are inferred.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl ReferenceTable {
    fn format(&self) -> Option<TableFormat> {
        self.format.or_else(|| {
            match self
                .path
                .extension()?
                .to_str()?
                .to_ascii_lowercase()
                .as_str()
            {
                "csv" => Some(TableFormat::Csv),
                "parquet" | "pq" => Some(TableFormat::Parquet),
                _ => None,
            }
        })
    }
}

/// What went wrong while planning, and where: `field` is relative to the stage's table in
/// the config (`query`, `table[0].path` …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlPlanError {
    /// The config field at fault.
    pub field: String,
    /// What is wrong, with the query's line and column when DataFusion knows them.
    pub message: String,
    /// The query line at fault with a caret under the column, when known.
    pub hint: Option<String>,
}

impl fmt::Display for SqlPlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n{hint}")?;
        }
        Ok(())
    }
}

/// Runs a SQL query over every batch; see the [module docs](self).
pub struct SqlPrep {
    query: String,
    input_schema: SchemaRef,
    output: Conform,
    reset_per_batch: bool,
    explain: String,
    /// Batches to the executor thread; `None` once dropped, which stops the thread.
    requests: Option<std::sync::mpsc::SyncSender<RecordBatch>>,
    results: std::sync::mpsc::Receiver<Result<RecordBatch>>,
    executor: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for SqlPrep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlPrep")
            .field("query", &self.query)
            .field("reset_per_batch", &self.reset_per_batch)
            .field("output", &self.output.schema)
            .finish()
    }
}

impl SqlPrep {
    /// Plans `config.query` for batches of `input_schema`: loads the reference tables, parses,
    /// optimises, and checks that the output can be made canonical.
    ///
    /// The stage owns a thread with a single-threaded Tokio runtime that plans and then
    /// executes the query: DataFusion is async, and some operators (unions, merges, large
    /// sorts) spawn tasks even on one partition, which must run on a runtime this stage
    /// drives rather than on a pipeline worker that is waiting for them.
    pub fn new(config: &SqlConfig, input_schema: SchemaRef) -> Result<Self, SqlPlanError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (requests, request_rx) = std::sync::mpsc::sync_channel::<RecordBatch>(1);
        let (result_tx, results) = std::sync::mpsc::sync_channel(1);
        let query = config.query.clone();
        let config = config.clone();
        let schema = input_schema.clone();
        let executor = std::thread::Builder::new()
            .name("sql-prep".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(plan_error(
                            "query",
                            format!("starting the SQL runtime: {e}"),
                        )));
                        return;
                    }
                };
                let planned = runtime.block_on(Executor::plan(&config, schema));
                let mut executor = match planned {
                    Ok((executor, ready)) => {
                        if ready_tx.send(Ok(ready)).is_err() {
                            return;
                        }
                        executor
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(batch) = request_rx.recv() {
                    let result = runtime.block_on(executor.run(batch));
                    if result_tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| plan_error("query", format!("starting the SQL thread: {e}")))?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(plan_error("query", "the SQL planner panicked".into())));
        let ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                let _ = executor.join();
                return Err(e);
            }
        };
        Ok(Self {
            query,
            input_schema,
            output: ready.output,
            reset_per_batch: ready.reset_per_batch,
            explain: ready.explain,
            requests: Some(requests),
            results,
            executor: Some(executor),
        })
    }

    /// The schema of the batches this stage emits.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.schema.clone()
    }

    /// The schema the stage was planned for.
    pub fn input_schema(&self) -> SchemaRef {
        self.input_schema.clone()
    }

    /// Whether the plan's state is rebuilt for every batch because some of it is built from
    /// `input` (see the [module docs](self)); false when only reference tables are kept.
    pub fn resets_per_batch(&self) -> bool {
        self.reset_per_batch
    }

    /// The physical plan, as `EXPLAIN` shows it.
    pub fn explain(&self) -> &str {
        &self.explain
    }

    fn execute(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let stopped = || Error::Sql("the SQL executor thread stopped".into());
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(batch.clone())
            .map_err(|_| stopped())?;
        self.results.recv().map_err(|_| stopped())?
    }
}

impl Drop for SqlPrep {
    fn drop(&mut self) {
        // Closing the request channel ends the executor's loop.
        self.requests = None;
        if let Some(thread) = self.executor.take() {
            let _ = thread.join();
        }
    }
}

impl Prep for SqlPrep {
    fn name(&self) -> &str {
        "sql"
    }

    fn process(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let expected = &self.input_schema;
        let same = batch.schema().fields().len() == expected.fields().len()
            && batch
                .schema()
                .fields()
                .iter()
                .zip(expected.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            return Err(Error::schema(
                STAGE,
                format!(
                    "the query was planned for columns ({}), the batch has ({})",
                    describe(expected),
                    describe(&batch.schema())
                ),
            ));
        }
        let out = self.execute(batch)?;
        self.output.apply(&out)
    }
}

fn describe(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plan_error(field: &str, message: String) -> SqlPlanError {
    SqlPlanError {
        field: field.to_owned(),
        message,
        hint: None,
    }
}

fn first_line(e: &DataFusionError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// A planning error on `query`, with the position DataFusion reports: a diagnostic span
/// (planning) or the parser's `Line: l, Column: c` (syntax).
fn query_error(query: &str, e: &DataFusionError) -> SqlPlanError {
    let message = first_line(e);
    let position = e
        .diagnostic()
        .and_then(|d| d.span)
        .map(|span| (span.start.line, span.start.column))
        .or_else(|| parser_position(&message))
        .or_else(|| {
            // sqlparser gives no position when the query ends too early: point past its end.
            message.contains("found: EOF").then(|| {
                let lines: Vec<&str> = query.trim_end().lines().collect();
                let last = lines.last().map_or(0, |l| l.chars().count());
                (lines.len().max(1) as u64, last as u64 + 1)
            })
        });
    let Some((line, column)) = position.filter(|&(l, c)| l > 0 && c > 0) else {
        return plan_error("query", message);
    };
    let hint = query
        .lines()
        .nth(line as usize - 1)
        .map(|text| format!("    {text}\n    {}^", " ".repeat(column as usize - 1)));
    SqlPlanError {
        field: "query".into(),
        message: format!("line {line}, column {column}: {message}"),
        hint,
    }
}

/// `… at Line: 2, Column: 8` in sqlparser's messages.
fn parser_position(message: &str) -> Option<(u64, u64)> {
    let at = message.rfind("Line: ")?;
    let rest = &message[at + "Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

fn run_error(e: &DataFusionError) -> Error {
    Error::Sql(first_line(e))
}

impl From<SqlPlanError> for Problems {
    fn from(e: SqlPlanError) -> Self {
        let mut error = ConfigError::new(e.field, e.message);
        if let Some(hint) = e.hint {
            error = error.hint(hint);
        }
        error.into()
    }
}

impl ComponentConfig for SqlConfig {
    fn resolve_paths(&mut self, base_dir: &Path) {
        for t in &mut self.tables {
            t.path = resolve_path(base_dir, &t.path);
        }
    }
}

impl PrepConfig for SqlConfig {
    fn build(&self, _ctx: &BuildContext, input: &SchemaRef) -> Result<Box<dyn Prep>> {
        let sql = SqlPrep::new(self, input.clone()).map_err(|e| Error::Config(e.into()))?;
        Ok(Box::new(sql))
    }

    /// Plans the query against `input`: a query that does not plan is a configuration error.
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, Problems> {
        Ok(SqlPrep::new(self, input.clone())?.output_schema())
    }
}
