//! The planned query on the stage's own thread: the session, the table `input` the plan
//! reads each batch from, reference tables, and the plan rewrites that keep it stateless.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::JoinType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::MemTable;
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

use super::conform::Conform;
use super::{ReferenceTable, SqlConfig, SqlPlanError, TableFormat};
use super::{first_line, plan_error, query_error, run_error};
use crate::error::Result;

/// What the executor thread reports once the query is planned.
pub(super) struct Ready {
    pub(super) output: Conform,
    pub(super) reset_per_batch: bool,
    pub(super) explain: String,
}

/// After this many batches the physical plan is built afresh from the logical plan: every
/// execution registers metrics in the plan's operators, which would otherwise grow forever.
const REPLAN_EVERY: u32 = 1024;

/// The planned query on the executor thread.
pub(super) struct Executor {
    ctx: SessionContext,
    logical: LogicalPlan,
    plan: Arc<dyn ExecutionPlan>,
    reset_per_batch: bool,
    input: Arc<InputSlot>,
    runs: u32,
}

impl Executor {
    pub(super) async fn plan(
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

    pub(super) async fn run(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
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
