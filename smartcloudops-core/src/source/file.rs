//! File source: replays JSON lines or CSV from a file or standard input.
//!
//! Reads `batch_size` lines at a time, decodes them, dead-letters the bad ones (origin
//! `file:line`) and yields the rest. With `speed > 0` it replays in event time: `speed = 60`
//! plays an hour of data in a minute; `speed = 0` reads as fast as the pipeline takes it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use super::{
    Origin, Source, SourceBatch, SourceConfig, SourceContext, SourceStream, check_batch_size,
};
use crate::ack::{Ack, AckOutcome};
use crate::component::{BuildContext, ComponentConfig, resolve_path};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{CsvOptions, Decoder, Format, Reject};
use crate::error::{Error, Problems, Result};
use crate::schema::{MetricsBatchBuilder, MetricsColumns};

/// Configuration of a [`FileSource`] (`[source] type = "file"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// The file to read; `-` reads standard input.
    pub path: PathBuf,
    /// Payload format.
    #[serde(default)]
    pub format: Format,
    /// Lines per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Replay speed in event time: `0` as fast as possible, `1` real time, `60` a minute
    /// of data per second.
    #[serde(default)]
    pub speed: f64,
    /// CSV options (`format = "csv"`).
    #[serde(default)]
    pub csv: CsvOptions,
    /// What one record may hold (line length, labels, label sizes): over-limit records are
    /// dead-lettered with the limit's name. See [`DecodeLimits`](crate::decode::DecodeLimits).
    #[serde(default)]
    pub limits: crate::decode::DecodeLimits,
    /// Longest line accepted; longer ones are dead-lettered (memory stays bounded).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

fn default_max_line_bytes() -> usize {
    1 << 20
}

fn default_batch_size() -> usize {
    1024
}

impl FileSourceConfig {
    /// A config reading `path` as JSON lines with default settings.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            limits: crate::decode::DecodeLimits::default(),
            path: path.into(),
            format: Format::Json,
            batch_size: default_batch_size(),
            speed: 0.0,
            csv: CsvOptions::default(),
            max_line_bytes: default_max_line_bytes(),
        }
    }
}

/// Reads a file or standard input. See the [module docs](self).
#[derive(Debug)]
pub struct FileSource {
    config: FileSourceConfig,
}

impl FileSource {
    /// A source for `config`; the file is opened when the pipeline starts.
    pub fn new(config: FileSourceConfig) -> Self {
        Self { config }
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        "file"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let config = self.config;
        let stdin = config.path.as_os_str() == "-";
        let origin = if stdin {
            "stdin".to_owned()
        } else {
            config.path.display().to_string()
        };
        let state = OpenState {
            config,
            origin,
            ctx,
        };
        // The file is opened on first poll so that `open` stays synchronous.
        let stream = futures::stream::once(state.into_reader())
            .map(|reader| match reader {
                Ok(reader) => reader.into_stream(),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .flatten();
        Ok(stream.boxed())
    }
}

struct OpenState {
    config: FileSourceConfig,
    origin: String,
    ctx: SourceContext,
}

impl OpenState {
    async fn into_reader(self) -> Result<FileReader> {
        let OpenState {
            config,
            origin,
            ctx,
        } = self;
        let input: Box<dyn AsyncBufRead + Send + Unpin> = if config.path.as_os_str() == "-" {
            Box::new(BufReader::with_capacity(1 << 16, tokio::io::stdin()))
        } else {
            let file = tokio::fs::File::open(&config.path)
                .await
                .map_err(|e| Error::io(format!("opening {}", config.path.display()), e))?;
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        let pacing = (config.speed > 0.0).then(|| Pacing::new(config.speed));
        Ok(FileReader {
            input,
            decoder: config
                .format
                .decoder_with_limits(config.csv.clone(), config.limits),
            builder: MetricsBatchBuilder::with_capacity(config.batch_size),
            chunk: Vec::with_capacity(config.batch_size * 128),
            rejects: Vec::new(),
            lines_read: 0,
            max_line_bytes: config.max_line_bytes.max(1),
            batch_size: config.batch_size.max(1),
            origin,
            dead_letters: ctx.dead_letters,
            pacing,
            pending: VecDeque::new(),
            eof: false,
        })
    }
}

struct FileReader {
    input: Box<dyn AsyncBufRead + Send + Unpin>,
    decoder: Box<dyn Decoder>,
    builder: MetricsBatchBuilder,
    chunk: Vec<u8>,
    rejects: Vec<Reject>,
    lines_read: usize,
    max_line_bytes: usize,
    batch_size: usize,
    origin: String,
    dead_letters: DeadLetterQueue,
    pacing: Option<Pacing>,
    pending: VecDeque<(arrow::record_batch::RecordBatch, String)>,
    eof: bool,
}

impl FileReader {
    fn into_stream(self) -> SourceStream {
        futures::stream::unfold(self, |mut reader| async move {
            reader.next_batch().await.map(|item| (item, reader))
        })
        .boxed()
    }

    async fn next_batch(&mut self) -> Option<Result<SourceBatch>> {
        loop {
            if let Some((batch, range)) = self.pending.pop_front() {
                if let Some(pacing) = &mut self.pacing {
                    pacing.wait_for(&batch).await;
                }
                let origin = Origin::from_parts([self.origin.clone()]);
                return Some(Ok(
                    SourceBatch::new(batch, self.ack_for(range)).with_origin(origin)
                ));
            }
            if self.eof {
                return None;
            }
            if let Err(e) = self.read_chunk().await {
                self.eof = true;
                return Some(Err(e));
            }
        }
    }

    /// Reads up to `batch_size` lines, decodes them and queues the resulting batches.
    async fn read_chunk(&mut self) -> Result<()> {
        self.chunk.clear();
        let first_line = self.lines_read + 1;
        let mut lines = 0;
        let mut too_long = Vec::new();
        while lines < self.batch_size {
            let read = read_line_capped(&mut self.input, &mut self.chunk, self.max_line_bytes)
                .await
                .map_err(|e| Error::io(format!("reading {}", self.origin), e))?;
            match read {
                LineRead::Eof => {
                    self.eof = true;
                    break;
                }
                LineRead::Line => {}
                LineRead::TooLong { bytes, prefix } => {
                    // Keep line numbering: an empty line stands in for the dropped one.
                    self.chunk.push(b'\n');
                    too_long.push((first_line + lines, bytes, prefix));
                }
            }
            lines += 1;
        }
        for (line, bytes, prefix) in too_long {
            self.dead_letters.send(
                format!("{}:{line}", self.origin),
                format!(
                    "line of {bytes} bytes is longer than max_line_bytes ({})",
                    self.max_line_bytes
                ),
                format!("{}…", String::from_utf8_lossy(&prefix)),
            )?;
        }
        self.lines_read += lines;
        if lines == 0 {
            return Ok(());
        }
        self.rejects.clear();
        self.decoder
            .decode(&self.chunk, &mut self.builder, &mut self.rejects);
        for reject in self.rejects.drain(..) {
            // Not storing a dead letter would lose the record: stop instead.
            self.dead_letters.send(
                format!("{}:{}", self.origin, first_line + reject.record),
                reject.reason,
                reject.raw,
            )?;
        }
        let batch = self.builder.finish();
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let range = format!("{}:{}-{}", self.origin, first_line, first_line + lines - 1);
        match &self.pacing {
            Some(pacing) => {
                for slice in pacing.split(&batch) {
                    self.pending.push_back((slice, range.clone()));
                }
            }
            None => self.pending.push_back((batch, range)),
        }
        Ok(())
    }

    fn ack_for(&self, range: String) -> Ack {
        Ack::new(move |outcome| {
            if let AckOutcome::Nacked(reason) = outcome {
                tracing::warn!(lines = %range, %reason, "batch from file was not processed");
            }
        })
    }
}

/// What [`read_line_capped`] found.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    Eof,
    /// A line (with its `\n`, if any) was appended to the buffer.
    Line,
    /// A line longer than the cap was skipped; the first bytes are kept for the dead letter.
    TooLong {
        bytes: usize,
        prefix: Vec<u8>,
    },
}

/// Reads one line into `out`, or skips it whole when it is longer than `max` bytes, so one
/// endless line cannot exhaust memory.
async fn read_line_capped<R: AsyncBufRead + Unpin + ?Sized>(
    input: &mut R,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    const PREFIX: usize = 256;
    let start = out.len();
    let mut total = 0usize;
    let mut prefix: Option<Vec<u8>> = None;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match (total, prefix) {
                (0, _) => LineRead::Eof,
                (bytes, Some(prefix)) => LineRead::TooLong { bytes, prefix },
                (_, None) => LineRead::Line,
            });
        }
        let (n, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        match &mut prefix {
            None if total + n > max => {
                let mut kept = out.split_off(start);
                kept.extend_from_slice(&buf[..n.min(PREFIX)]);
                kept.truncate(PREFIX);
                prefix = Some(kept);
            }
            None => out.extend_from_slice(&buf[..n]),
            Some(_) => {}
        }
        total += n;
        input.consume(n);
        if done {
            return Ok(match prefix {
                Some(prefix) => LineRead::TooLong {
                    bytes: total,
                    prefix,
                },
                None => LineRead::Line,
            });
        }
    }
}

/// Paces batches in event time.
#[derive(Debug)]
struct Pacing {
    speed: f64,
    /// Wall-clock instant and event time of the first batch.
    origin: Option<(Instant, i64)>,
}

impl Pacing {
    /// Each paced batch spans at most this much wall-clock time.
    const SLICE: Duration = Duration::from_millis(100);

    fn new(speed: f64) -> Self {
        Self {
            speed,
            origin: None,
        }
    }

    fn first_ts(batch: &arrow::record_batch::RecordBatch) -> Option<i64> {
        let cols = MetricsColumns::try_new(batch, "source:file").ok()?;
        (!cols.ts.is_empty()).then(|| cols.ts.value(0))
    }

    /// Cuts `batch` where event time moves more than one slice away from a slice's start.
    fn split(
        &self,
        batch: &arrow::record_batch::RecordBatch,
    ) -> Vec<arrow::record_batch::RecordBatch> {
        let Ok(cols) = MetricsColumns::try_new(batch, "source:file") else {
            return vec![batch.clone()];
        };
        let span = (Self::SLICE.as_secs_f64() * 1000.0 * self.speed).max(1.0) as i64;
        let ts = cols.ts.values();
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..ts.len() {
            if ts[i].abs_diff(ts[start]) >= span as u64 {
                out.push(batch.slice(start, i - start));
                start = i;
            }
        }
        out.push(batch.slice(start, ts.len() - start));
        out
    }

    async fn wait_for(&mut self, batch: &arrow::record_batch::RecordBatch) {
        let Some(ts) = Self::first_ts(batch) else {
            return;
        };
        let (wall, event) = *self.origin.get_or_insert((Instant::now(), ts));
        let ahead_ms = ts.saturating_sub(event) as f64 / self.speed;
        let due = Duration::try_from_secs_f64(ahead_ms / 1000.0)
            .ok()
            .and_then(|ahead| wall.checked_add(ahead));
        if let Some(due) = due {
            tokio::time::sleep_until(due).await;
        }
    }
}

impl ComponentConfig for FileSourceConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.extend_at("limits", self.limits.problems());
        check_batch_size(&mut p, self.batch_size, "1024 is a good start");
        p.check(
            self.speed == 0.0 || (1e-6..=1e9).contains(&self.speed),
            "speed",
            format!(
                "must be 0 (as fast as possible) or between 1e-6 and 1e9, got {}",
                self.speed
            ),
            "1 is real time, 60 plays an hour per minute",
        );
        p.check(
            self.path.as_os_str() == "-" || (self.path.exists() && !self.path.is_dir()),
            "path",
            format!("no such file: {}", self.path.display()),
            "relative paths are relative to the config file; use \"-\" for standard input",
        );
        p.check(
            self.csv.delimiter.is_ascii(),
            "csv.delimiter",
            format!("must be one ASCII character, got {:?}", self.csv.delimiter),
            "",
        );
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        format!("file {} ({})", self.path.display(), self.format)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        self.path = resolve_path(base_dir, &self.path);
    }
}

impl SourceConfig for FileSourceConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(FileSource::new(self.clone())))
    }

    /// A file is history: replayed rows keep the dates they were recorded with.
    fn default_timestamps(&self) -> super::TimestampPolicy {
        super::TimestampPolicy::unchecked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::MemoryDeadLetters;
    use crate::metrics::StageMetrics;
    use futures::TryStreamExt;
    use std::io::Write;
    use std::sync::Arc;

    fn ctx(dead: Arc<MemoryDeadLetters>) -> SourceContext {
        SourceContext {
            dead_letters: DeadLetterQueue::new(dead, Arc::new(StageMetrics::new("source:file"))),
            shutdown: Default::default(),
            tasks: Default::default(),
        }
    }

    #[tokio::test]
    async fn reads_batches_and_dead_letters_bad_lines_with_line_numbers() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..5 {
            writeln!(file, r#"{{"ts": {i}, "metric": "m", "value": {i}}}"#).unwrap();
        }
        writeln!(file, "garbage").unwrap();
        writeln!(file, r#"{{"ts": 6, "metric": "m", "value": 6}}"#).unwrap();
        let mut config = FileSourceConfig::new(file.path());
        config.batch_size = 2;
        let dead = Arc::new(MemoryDeadLetters::default());
        let ctx = ctx(dead.clone());
        let stream = Box::new(FileSource::new(config)).open(ctx.clone()).unwrap();
        let batches: Vec<SourceBatch> = stream.try_collect().await.unwrap();
        let rows: usize = batches.iter().map(|b| b.batch.num_rows()).sum();
        assert_eq!(rows, 6);
        let letters = dead.letters();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].origin.ends_with(":6"), "{}", letters[0].origin);
        assert_eq!(letters[0].payload, "garbage");
        assert_eq!(ctx.dead_letters.stage().snapshot().dead_lettered, 1);
        for b in batches {
            b.ack.ack();
        }
    }

    #[tokio::test]
    async fn overlong_lines_are_dead_lettered_and_numbering_holds() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, r#"{{"ts": 1, "metric": "m", "value": 1}}"#).unwrap();
        writeln!(file, "{}", "x".repeat(5000)).unwrap();
        writeln!(file, "bad").unwrap();
        write!(file, r#"{{"ts": 4, "metric": "m", "value": 4}}"#).unwrap(); // no final newline
        let mut config = FileSourceConfig::new(file.path());
        config.max_line_bytes = 100;
        let dead = Arc::new(MemoryDeadLetters::default());
        let stream = Box::new(FileSource::new(config))
            .open(ctx(dead.clone()))
            .unwrap();
        let batches: Vec<SourceBatch> = stream.try_collect().await.unwrap();
        assert_eq!(batches.iter().map(|b| b.batch.num_rows()).sum::<usize>(), 2);
        let letters = dead.letters();
        assert_eq!(letters.len(), 2);
        assert!(
            letters[0].origin.ends_with(":2") && letters[0].reason.contains("5001 bytes"),
            "{letters:?}"
        );
        assert!(letters[0].payload.len() < 300);
        assert!(letters[1].origin.ends_with(":3"), "{letters:?}");
        for b in batches {
            b.ack.ack();
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_an_error_naming_it() {
        let config = FileSourceConfig::new("/nonexistent/metrics.jsonl");
        let stream = Box::new(FileSource::new(config))
            .open(SourceContext::detached())
            .unwrap();
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/metrics.jsonl"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn speed_paces_batches_in_event_time() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        // Three samples 60 s apart in event time, replayed at 60x: about 1 s apart.
        for i in 0..3 {
            writeln!(
                file,
                r#"{{"ts": {}, "metric": "m", "value": 1}}"#,
                i * 60_000
            )
            .unwrap();
        }
        let mut config = FileSourceConfig::new(file.path());
        config.speed = 60.0;
        let mut stream = Box::new(FileSource::new(config))
            .open(SourceContext::detached())
            .unwrap();
        let start = Instant::now();
        let mut arrivals = Vec::new();
        while let Some(b) = stream.try_next().await.unwrap() {
            arrivals.push(start.elapsed().as_millis());
            b.ack.ack();
        }
        assert_eq!(arrivals.len(), 3, "each sample is its own paced batch");
        assert!(arrivals[1] >= 999 && arrivals[1] <= 1100, "{arrivals:?}");
        assert!(arrivals[2] >= 1999 && arrivals[2] <= 2100, "{arrivals:?}");
    }
}
