//! The ingestion check right after the source: rows dated outside the source's
//! [`TimestampPolicy`] go to the dead-letter output, the rest of the batch goes on. It runs
//! here, not in each source, so every source (an embedder's own too) gets it.

use arrow::record_batch::RecordBatch;

use crate::dead_letter::DeadLetterQueue;
use crate::error::Result;
use crate::source::TimestampPolicy;

/// The wall clock, in milliseconds since the epoch.
fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The rows of `batch` that `policy` accepts now. The others are dead-lettered through
/// `queue` (one letter per reason, counted per row in the source's metrics). An error means
/// a letter could not be stored: the caller nacks the batch.
pub(super) fn accepted_rows(
    policy: &TimestampPolicy,
    batch: RecordBatch,
    queue: &DeadLetterQueue,
) -> Result<RecordBatch> {
    if !policy.check {
        return Ok(batch);
    }
    let (kept, refused) = policy.split(&batch, wall_clock_ms())?;
    for rejected in refused {
        let rows = rejected.rows.num_rows();
        queue.send(
            format!("{rows} rows"),
            rejected.reason,
            crate::util::batch_to_json_lines(&rejected.rows),
        )?;
        // `send` counted one letter; the other rows went with it.
        queue.stage().record_dead_lettered(rows.saturating_sub(1));
    }
    Ok(kept)
}
