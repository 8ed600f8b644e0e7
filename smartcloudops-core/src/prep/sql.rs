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

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, ArrayAccessor, ArrayRef, AsArray, MapArray, MapBuilder, RecordBatch, StringArray,
    StringBuilder, TypedDictionaryArray, UInt64Array,
};
use arrow::compute::{CastOptions, can_cast_types, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use arrow::util::display::FormatOptions;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::JoinType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::prelude::SessionContext;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SQLOptions, SessionConfig};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::{Prep, PrepConfig};
use crate::component::{BuildContext, ComponentConfig, resolve_path};
use crate::error::{ConfigError, Error, Problems, Result};
use crate::schema::{self, col};

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

/// What the executor thread reports once the query is planned.
struct Ready {
    output: Conform,
    reset_per_batch: bool,
    explain: String,
}

/// After this many batches the physical plan is built afresh from the logical plan: every
/// execution registers metrics in the plan's operators, which would otherwise grow forever.
const REPLAN_EVERY: u32 = 1024;

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

/// The planned query on the executor thread.
struct Executor {
    ctx: SessionContext,
    logical: LogicalPlan,
    plan: Arc<dyn ExecutionPlan>,
    reset_per_batch: bool,
    input: Arc<InputSlot>,
    runs: u32,
}

impl Executor {
    async fn plan(
        config: &SqlConfig,
        input_schema: SchemaRef,
    ) -> Result<(Self, Ready), SqlPlanError> {
        let mut session = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false);
        let options = session.options_mut();
        options.sql_parser.collect_spans = true;
        // Dynamic filters live in the plan and would carry one batch's state into the next.
        options.optimizer.enable_dynamic_filter_pushdown = false;
        options.optimizer.enable_topk_dynamic_filter_pushdown = false;
        options.optimizer.enable_join_dynamic_filter_pushdown = false;
        options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(session);

        let input = Arc::new(InputSlot {
            schema: input_schema.clone(),
            batch: Mutex::new(None),
        });
        let table = StreamingTable::try_new(input_schema, vec![input.clone()])
            .map_err(|e| plan_error("query", e.to_string()))?;
        ctx.register_table("input", Arc::new(table))
            .map_err(|e| plan_error("query", e.to_string()))?;

        for (i, table) in config.tables.iter().enumerate() {
            load_table(&ctx, table)
                .await
                .map_err(|message| plan_error(&format!("table[{i}]"), message))?;
        }

        let sql_options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = ctx
            .sql_with_options(&config.query, sql_options)
            .await
            .map_err(|e| query_error(&config.query, &e))?;
        let logical = frame.logical_plan().clone();
        let (plan, reset_per_batch) = physical_plan(&ctx, &logical)
            .await
            .map_err(|e| query_error(&config.query, &e))?;
        let output = Conform::new(&plan.schema(), &config.into_labels)
            .map_err(|message| plan_error("query", message))?;
        let ready = Ready {
            output,
            reset_per_batch,
            explain: datafusion::physical_plan::displayable(plan.as_ref())
                .indent(true)
                .to_string(),
        };
        let executor = Self {
            ctx,
            logical,
            plan,
            reset_per_batch,
            input,
            runs: 0,
        };
        Ok((executor, ready))
    }

    async fn run(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        self.runs += 1;
        if self.runs > REPLAN_EVERY {
            // The same optimiser on the same plan and schemas: it cannot fail where it
            // succeeded at start-up, but if it does, the current plan stays.
            match physical_plan(&self.ctx, &self.logical).await {
                Ok((plan, _)) => self.plan = plan,
                Err(e) => tracing::warn!("re-planning the SQL stage failed: {e}"),
            }
            self.runs = 1;
        }
        let plan = if self.reset_per_batch {
            reset_plan_states(self.plan.clone()).map_err(|e| run_error(&e))?
        } else {
            self.plan.clone()
        };
        *self.input.lock() = Some(batch);
        let collected = collect(&plan, self.ctx.task_ctx()).await;
        *self.input.lock() = None;
        let batches = collected.map_err(|e| run_error(&e))?;
        Ok(concat_batches(&plan.schema(), &batches)?)
    }
}

/// Every partition's output, partition after partition.
async fn collect(
    plan: &Arc<dyn ExecutionPlan>,
    task_ctx: Arc<TaskContext>,
) -> datafusion::error::Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for partition in 0..plan.output_partitioning().partition_count() {
        let stream = plan.execute(partition, task_ctx.clone())?;
        batches.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(batches)
}

/// The physical plan of `logical`, with reference tables on the build side of hash joins,
/// and whether it must be reset before each batch.
async fn physical_plan(
    ctx: &SessionContext,
    logical: &LogicalPlan,
) -> datafusion::error::Result<(Arc<dyn ExecutionPlan>, bool)> {
    let plan = ctx.state().create_physical_plan(logical).await?;
    let plan = reference_tables_on_build_side(plan)?;
    let reset = keeps_input_state(&plan);
    Ok((plan, reset))
}

/// The table `input`: a slot holding the batch being processed, read by the plan's scan.
#[derive(Debug)]
struct InputSlot {
    schema: SchemaRef,
    batch: Mutex<Option<RecordBatch>>,
}

impl InputSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<RecordBatch>> {
        // The slot holds no invariant a panic could break.
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PartitionStream for InputSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.lock().clone();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batch.map(Ok)),
        ))
    }
}

/// Reads a reference table into memory, registered under its name.
async fn load_table(ctx: &SessionContext, table: &ReferenceTable) -> Result<(), String> {
    let path = table.path.to_str().ok_or("the path is not UTF-8")?;
    if !table.path.is_file() {
        return Err(format!("no such file: {}", table.path.display()));
    }
    let frame = match table.format() {
        Some(TableFormat::Csv) => ctx.read_csv(path, CsvReadOptions::new()).await,
        Some(TableFormat::Parquet) => ctx.read_parquet(path, ParquetReadOptions::new()).await,
        None => {
            return Err(format!(
                "cannot tell the format of {}: set format = \"csv\" or \"parquet\"",
                table.path.display()
            ));
        }
    }
    .map_err(|e| format!("reading {}: {}", table.path.display(), first_line(&e)))?;
    let schema: SchemaRef = frame.schema().inner().clone();
    let batches = frame
        .collect()
        .await
        .map_err(|e| format!("reading {}: {}", table.path.display(), first_line(&e)))?;
    let memory = MemTable::try_new(schema, vec![batches]).map_err(|e| e.to_string())?;
    ctx.register_table(table.name.as_str(), Arc::new(memory))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether `plan` reads the table `input`.
fn reads_input(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.name() == "StreamingTableExec" || plan.children().into_iter().any(reads_input)
}

/// Swaps the inputs of hash joins that would build their hash table from `input` while the
/// other side is a reference table, so the reference table's hash table is built once and
/// kept. DataFusion's join selection cannot do this itself: it knows the reference table's
/// size but not the batch's. Only joins that stay stateless per batch after the swap
/// (inner, and `input LEFT JOIN reference`) are swapped.
fn reference_tables_on_build_side(
    plan: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else {
            return Ok(Transformed::no(node));
        };
        if *join.partition_mode() == PartitionMode::CollectLeft
            && matches!(join.join_type(), JoinType::Inner | JoinType::Left)
            && reads_input(join.left())
            && !reads_input(join.right())
        {
            return Ok(Transformed::yes(
                join.swap_inputs(PartitionMode::CollectLeft)?,
            ));
        }
        Ok(Transformed::no(node))
    })
    .map(|t| t.data)
}

/// Whether executing `plan` twice could reuse state from the first execution. An allow-list:
/// operators whose state lives in their stream (one per execution) are safe; a hash join is
/// safe when it builds from a reference table only and emits nothing from its build side at
/// the end; a sort is safe without a limit (a top-k sort keeps its threshold in the plan).
/// Anything else (scalar subqueries, cross and nested-loop joins, repartitioning, operators
/// this list does not know) counts as keeping state, and the plan is reset per batch.
fn keeps_input_state(plan: &Arc<dyn ExecutionPlan>) -> bool {
    const STATELESS: &[&str] = &[
        "AggregateExec",
        "BoundedWindowAggExec",
        "CoalesceBatchesExec",
        "CoalescePartitionsExec",
        "CooperativeExec",
        "DataSourceExec",
        "EmptyExec",
        "FilterExec",
        "GlobalLimitExec",
        "LocalLimitExec",
        "PlaceholderRowExec",
        "ProjectionExec",
        "SortPreservingMergeExec",
        "StreamingTableExec",
        "UnionExec",
        "UnnestExec",
        "WindowAggExec",
    ];
    let here = if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        reads_input(join.left())
            || matches!(
                join.join_type(),
                JoinType::Left
                    | JoinType::Full
                    | JoinType::LeftSemi
                    | JoinType::LeftAnti
                    | JoinType::LeftMark
            )
    } else if let Some(sort) = plan.downcast_ref::<SortExec>() {
        sort.fetch().is_some()
    } else {
        !STATELESS.contains(&plan.name())
    };
    here || plan.children().into_iter().any(keeps_input_state)
}

/// Makes the query's output canonical: the four required columns cast to their types,
/// `series_id` kept or computed, `into_labels` columns merged into `labels`.
#[derive(Debug)]
struct Conform {
    schema: SchemaRef,
    ts: usize,
    metric: usize,
    labels: usize,
    value: usize,
    series_id: Option<usize>,
    /// Output columns (index, label name) merged into `labels`.
    into_labels: Vec<(usize, String)>,
    /// Other output columns, in query order.
    extra: Vec<usize>,
}

impl Conform {
    fn new(output: &Schema, into_labels: &[String]) -> Result<Self, String> {
        let canonical = schema::metrics_schema();
        let find = |name: &str| -> Result<usize, String> {
            let i = output.index_of(name).map_err(|_| {
                format!(
                    "the query's result has no `{name}` column; it needs ts, metric, labels and value (it has {})",
                    describe(output)
                )
            })?;
            let from = output.field(i).data_type();
            let to = canonical
                .field_with_name(name)
                .expect("canonical")
                .data_type();
            let ok = match name {
                col::TS => matches!(from, DataType::Timestamp(_, _)),
                col::METRIC => is_string(from),
                col::VALUE => from.is_numeric(),
                _ => can_cast_types(from, to),
            } && can_cast_types(from, to);
            if !ok {
                let want = match name {
                    col::TS => "a timestamp, e.g. CAST(x AS TIMESTAMP)",
                    col::METRIC => "a string",
                    col::VALUE => "a number",
                    _ => "the labels map",
                };
                return Err(format!("column `{name}` is {from}; it must be {want}"));
            }
            Ok(i)
        };
        let (ts, metric, labels, value) = (
            find(col::TS)?,
            find(col::METRIC)?,
            find(col::LABELS)?,
            find(col::VALUE)?,
        );
        let mut merged = Vec::new();
        for name in into_labels {
            let i = output.index_of(name).map_err(|_| {
                format!(
                    "into_labels names `{name}`, which the query's result does not have (it has {})",
                    describe(output)
                )
            })?;
            if [ts, metric, labels, value].contains(&i) {
                return Err(format!(
                    "into_labels cannot take the canonical column `{name}`"
                ));
            }
            if !can_cast_types(output.field(i).data_type(), &DataType::Utf8) {
                return Err(format!(
                    "into_labels column `{name}` is {}, which has no text form",
                    output.field(i).data_type()
                ));
            }
            merged.push((i, name.clone()));
        }
        let series_id = match output.index_of(col::SERIES_ID) {
            Ok(i) if merged.is_empty() => {
                if output.field(i).data_type() != &DataType::UInt64 {
                    return Err(format!(
                        "column `series_id` is {}; leave it out and the stage computes it",
                        output.field(i).data_type()
                    ));
                }
                Some(i)
            }
            _ => None,
        };
        let taken: Vec<usize> = [Some(ts), Some(metric), Some(labels), Some(value)]
            .into_iter()
            .chain([output.index_of(col::SERIES_ID).ok()])
            .flatten()
            .chain(merged.iter().map(|(i, _)| *i))
            .collect();
        let extra: Vec<usize> = (0..output.fields().len())
            .filter(|i| !taken.contains(i))
            .collect();
        let mut fields: Vec<Field> = canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(extra.iter().map(|&i| output.field(i).clone()));
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            ts,
            metric,
            labels,
            value,
            series_id,
            into_labels: merged,
            extra,
        })
    }

    fn apply(&self, out: &RecordBatch) -> Result<RecordBatch> {
        let canonical = schema::metrics_schema();
        let options = CastOptions {
            safe: false,
            format_options: FormatOptions::default(),
        };
        let cast = |i: usize, name: &str| -> Result<ArrayRef> {
            let array = out.column(i);
            if array.null_count() > 0 {
                return Err(Error::schema(
                    STAGE,
                    format!(
                        "the query returned NULL in `{name}` for {} of {} rows; filter them with WHERE {name} IS NOT NULL",
                        array.null_count(),
                        out.num_rows()
                    ),
                ));
            }
            let to = canonical
                .field_with_name(name)
                .expect("canonical")
                .data_type();
            if array.data_type() == to {
                return Ok(array.clone());
            }
            // Strings of any flavour become Utf8 first: not every one casts to a dictionary.
            let array = if name == col::METRIC && !matches!(array.data_type(), DataType::Utf8) {
                cast_with_options(array, &DataType::Utf8, &options)?
            } else {
                array.clone()
            };
            Ok(cast_with_options(&array, to, &options)?)
        };
        let ts = cast(self.ts, col::TS)?;
        let metric = cast(self.metric, col::METRIC)?;
        let mut labels = cast(self.labels, col::LABELS)?;
        let value = cast(self.value, col::VALUE)?;
        let mut merged_ids = None;
        if !self.into_labels.is_empty() {
            let (merged, ids) = self.merge_labels(out, &metric, &labels, &options)?;
            labels = merged;
            merged_ids = Some(ids);
        }
        let series_id: ArrayRef = match (self.series_id, merged_ids) {
            (_, Some(ids)) => Arc::new(ids),
            (Some(i), None) if out.column(i).null_count() == 0 => out.column(i).clone(),
            _ => Arc::new(series_ids(&metric, &labels)?),
        };
        let mut columns = vec![ts, metric, labels, value, series_id];
        columns.extend(self.extra.iter().map(|&i| out.column(i).clone()));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// `labels` with the `into_labels` columns added (replacing a label of the same name;
    /// keys kept sorted), and the series ids of the new labels, in one pass that borrows
    /// every string rather than copying it.
    fn merge_labels(
        &self,
        out: &RecordBatch,
        metric: &ArrayRef,
        labels: &ArrayRef,
        options: &CastOptions<'_>,
    ) -> Result<(ArrayRef, UInt64Array)> {
        let texts: Vec<(ArrayRef, &str)> = self
            .into_labels
            .iter()
            .map(|(i, name)| {
                Ok((
                    cast_with_options(out.column(*i), &DataType::Utf8, options)?,
                    name.as_str(),
                ))
            })
            .collect::<Result<_>>()?;
        let texts: Vec<(&StringArray, &str)> = texts
            .iter()
            .map(|(array, name)| (array.as_string::<i32>(), *name))
            .collect();
        let metric = metric_names(metric)?;
        let map = labels.as_map();
        let rows = map.len();
        let mut builder = MapBuilder::with_capacity(
            None,
            StringBuilder::with_capacity(rows * 4, rows * 32),
            StringBuilder::with_capacity(rows * 4, rows * 32),
            rows,
        );
        let mut ids = Vec::with_capacity(rows);
        let mut scratch = Vec::with_capacity(128);
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for row in 0..rows {
            pairs.clear();
            row_labels(map, row, &mut pairs);
            for (text, name) in &texts {
                if text.is_valid(row) {
                    pairs.push((name, text.value(row)));
                }
            }
            schema::sort_labels(&mut pairs);
            for (k, v) in &pairs {
                builder.keys().append_value(k);
                builder.values().append_value(v);
            }
            builder.append(true)?;
            ids.push(schema::series_id_with(
                &mut scratch,
                metric.value(row),
                pairs.iter().copied(),
            ));
        }
        Ok((Arc::new(builder.finish()), UInt64Array::from(ids)))
    }
}

/// The labels of `row` of a canonical labels map, borrowed from the map's arrays.
fn row_labels<'a>(map: &'a MapArray, row: usize, out: &mut Vec<(&'a str, &'a str)>) {
    let keys = map.keys().as_string::<i32>();
    let values = map.values().as_string::<i32>();
    let offsets = map.value_offsets();
    let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
    out.extend(
        (start..end)
            .filter(|&j| values.is_valid(j))
            .map(|j| (keys.value(j), values.value(j))),
    );
}

fn metric_names(metric: &ArrayRef) -> Result<TypedDictionaryArray<'_, Int32Type, StringArray>> {
    metric
        .as_dictionary::<Int32Type>()
        .downcast_dict::<StringArray>()
        .ok_or_else(|| Error::schema(STAGE, "metric is not a string dictionary"))
}

/// The canonical series id of every row.
fn series_ids(metric: &ArrayRef, labels: &ArrayRef) -> Result<UInt64Array> {
    let metric = metric_names(metric)?;
    let map = labels.as_map();
    let mut ids = Vec::with_capacity(map.len());
    let mut scratch = Vec::with_capacity(128);
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for row in 0..map.len() {
        pairs.clear();
        row_labels(map, row, &mut pairs);
        schema::sort_labels(&mut pairs);
        ids.push(schema::series_id_with(
            &mut scratch,
            metric.value(row),
            pairs.iter().copied(),
        ));
    }
    Ok(UInt64Array::from(ids))
}

fn is_string(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
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
