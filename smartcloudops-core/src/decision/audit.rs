//! The audit log: append-only JSON lines linking each trigger to its decisions, executions and
//! results, hash-chained so that an edit, a deletion or a reordering shows.
//!
//! Every record has a `kind` and the ids that link it:
//!
//! | kind | written when | links |
//! |---|---|---|
//! | `trigger` | an alert fires, resolves or starts flapping | `fingerprint`, `rule`, `origin` (source, client, partitions) |
//! | `decision` | a notification is sent on, or held back (silenced, inhibited, duplicate, cooldown, rate limit, open circuit, suggest, dry run, invalid parameters, a rule over its cap of new groups, a suggestion dropped from a full queue) | `notification`, `receiver`, `key`, `fingerprints` |
//! | `execution` | one attempt starts | `notification`, `receiver`, `key`, `attempt` |
//! | `result` | an attempt ends, or the notification ends in a fallback, an escalation or a dead letter | `notification`, `receiver`, `attempt`, `outcome` |
//!
//! Records are written through and synced (`fdatasync`) before the engine moves on, so what
//! the log says happened did happen. Secrets never reach it: receivers describe their target
//! with credentials masked.
//!
//! **Tamper evidence.** Each line carries `seq` (0, 1, 2, … over the log's whole life) and
//! `prev`, the SHA-256 (hex) of the previous line as written (64 zeros for the first). A
//! reopened log resumes the chain from its last line. [`verify`] walks the chain and says
//! where it breaks: an edited line no longer hashes to the next line's `prev`, a deleted one
//! leaves a gap in `seq`, a moved one puts `seq` out of order. The chain cannot show an edit
//! of the very last line, or a log cut short at its end: keep the last hash [`verify`] reports
//! somewhere else (a ticket, another host) to pin the head.
//!
//! **The file** is created with mode 0600 and opened with `O_NOFOLLOW`: a symbolic link at its
//! path is refused rather than followed. An existing file readable by others is narrowed to
//! 0600, with a warning. When it would grow past `max_bytes` it is **rotated**: `audit.jsonl`
//! becomes `audit.jsonl.1` (`.1` becomes `.2`, …, and the oldest beyond `keep` goes), and the
//! chain goes on in the new file, so `verify` of `audit.jsonl.2 audit.jsonl.1 audit.jsonl`
//! checks across them.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Wall-clock time of the record, RFC 3339.
    pub time: String,
    /// `trigger`, `decision`, `execution` or `result`.
    pub kind: &'static str,
    /// The rule concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The notification concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification: Option<String>,
    /// The receiver concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
    /// The idempotency key of the execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The attempt number (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What was decided or what came of it, e.g. `notify`, `silenced`, `delivered`.
    pub outcome: String,
    /// Why, in words.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Everything else (the alert, the masked target, a command's output …).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl AuditRecord {
    /// A record of `kind` with `outcome`, stamped now.
    pub fn new(kind: &'static str, outcome: impl Into<String>) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind,
            rule: None,
            notification: None,
            receiver: None,
            key: None,
            attempt: None,
            outcome: outcome.into(),
            reason: String::new(),
            details: Value::Null,
        }
    }
}

/// A record as written: its place in the chain, then its fields.
#[derive(Serialize)]
struct Chained<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// The `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of `line` (without its line end), hex.
pub fn line_hash(line: &[u8]) -> String {
    Sha256::digest(line)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When the audit file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before the file would grow past this many bytes; 0 never rotates.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` … `audit.jsonl.{keep}`), at least 1.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 100 * 1024 * 1024,
            keep: 10,
        }
    }
}

/// `path.{n}`: the `n`th rotated file of the log at `path`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of the log at `path`, oldest first: the rotated ones that exist, then `path`.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let mut n = 1;
    while rotated(path, n).exists() {
        n += 1;
    }
    let mut out: Vec<PathBuf> = (1..n).rev().map(|i| rotated(path, i)).collect();
    out.push(path.to_path_buf());
    out
}

/// The audit file and where its chain stands.
#[derive(Debug)]
struct ChainFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    size: u64,
    /// `seq` of the next record.
    seq: u64,
    /// Hash of the last line written.
    prev: String,
    rotation: Rotation,
}

/// Opens `path` for appending: created 0600, never through a symbolic link; an existing file
/// open to others is narrowed to 0600.
fn open_file(path: &Path, create_new: bool) -> std::io::Result<File> {
    let refuse_link = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a symbolic link, and the audit log never follows one (it could point the \
             log at any file): remove the link or point `audit_log` at the real file",
        )
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refuse_link());
    }
    let mut options = OpenOptions::new();
    options
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    let file = options.open(path).map_err(|e| {
        // A link that appeared between the look and the open.
        if e.raw_os_error() == Some(libc::ELOOP) {
            refuse_link()
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        tracing::warn!(
            "the audit log {} was readable by others (mode {:o}): narrowed to 0600",
            path.display(),
            mode & 0o777
        );
    }
    Ok(file)
}

/// The last two non-empty lines of the file at `path`, and whether it ends in a line end.
fn last_lines(path: &Path) -> std::io::Result<(Vec<Vec<u8>>, bool)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), true)),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut last: VecDeque<Vec<u8>> = VecDeque::with_capacity(2);
    let mut ends_clean = true;
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        ends_clean = line.last() == Some(&b'\n');
        if ends_clean {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        if last.len() == 2 {
            last.pop_front();
        }
        last.push_back(line);
    }
    Ok((last.into(), ends_clean))
}

/// `(seq, prev)` of a chained line.
fn chain_fields(line: &[u8]) -> Option<(u64, String)> {
    let value: Value = serde_json::from_slice(line).ok()?;
    Some((
        value.get("seq")?.as_u64()?,
        value.get("prev")?.as_str()?.to_owned(),
    ))
}

impl ChainFile {
    fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = open_file(path, false)?;
        let (mut lines, ends_clean) = last_lines(path)?;
        if !ends_clean {
            // A torn last line (a crash mid-write): the next record starts on a line of its
            // own, and `verify` reports the torn one.
            file.write_all(b"\n")?;
            file.sync_data()?;
        }
        if lines.is_empty() {
            // Just rotated: the chain goes on from the previous file.
            lines = last_lines(&rotated(path, 1))?.0;
        }
        // Resume after the last chained line (a torn one after it is skipped).
        let (seq, prev) = lines
            .iter()
            .rev()
            .find_map(|l| chain_fields(l).map(|(seq, _)| (seq + 1, line_hash(l))))
            .or_else(|| lines.last().map(|l| (0, line_hash(l))))
            .unwrap_or((0, GENESIS.to_owned()));
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            seq,
            prev,
            rotation,
        })
    }

    /// `audit.jsonl` → `.1` → `.2` …, the oldest beyond `keep` dropped; a new file at `path`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.rotation.keep.max(1);
        for n in (1..keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = open_file(&self.path, true)?;
        self.size = 0;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }

    /// Appends `records`, chained, and syncs them. On an error the chain does not advance.
    fn append(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        let mut bytes = Vec::new();
        for record in records {
            let start = bytes.len();
            serde_json::to_writer(
                &mut bytes,
                &Chained {
                    seq,
                    prev: &prev,
                    record,
                },
            )?;
            prev = line_hash(&bytes[start..]);
            bytes.push(b'\n');
            seq += 1;
        }
        let len = bytes.len() as u64;
        if self.rotation.max_bytes > 0 && self.size > 0 && self.size + len > self.rotation.max_bytes
        {
            self.rotate()?;
        }
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.size = self.file.metadata().map_or(self.size, |m| m.len());
            return Err(e);
        }
        self.size += len;
        self.seq = seq;
        self.prev = prev;
        Ok(())
    }
}

/// Where audit records go.
#[derive(Debug)]
pub struct AuditLog {
    /// The file, unless the log is kept in memory only.
    file: Option<Mutex<ChainFile>>,
    /// The last records, for tests and the API.
    recent: Mutex<VecDeque<AuditRecord>>,
}

/// Records kept in memory for [`AuditLog::recent`] (a record may hold a notification or a
/// command's output, so not many).
const RECENT: usize = 2_000;

impl AuditLog {
    /// A log appending to `path` (created with its directories), rotated at the defaults.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Rotation::default())
    }

    /// A log appending to `path` (created with its directories), rotated as `rotation` says.
    pub fn open_with(path: &Path, rotation: Rotation) -> Result<Self> {
        let file = ChainFile::open(path, rotation)
            .map_err(|e| Error::io(format!("opening the audit log {}", path.display()), e))?;
        Ok(Self {
            file: Some(Mutex::new(file)),
            recent: Mutex::default(),
        })
    }

    /// A log kept in memory only (its recent records), for tests and embedding.
    pub fn in_memory() -> Self {
        Self {
            file: None,
            recent: Mutex::default(),
        }
    }

    /// Appends `records` and syncs them to disk. An error means they are not durable.
    pub fn write(&self, records: &[AuditRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(file) = &self.file {
            // One lock over encoding and writing: the chain's order is the file's.
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.append(records).map_err(|e| {
                Error::io(format!("writing the audit log {}", file.path.display()), e)
            })?;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(r.clone());
        }
        Ok(())
    }

    /// The most recent records (up to 2 000), oldest first.
    pub fn recent(&self) -> Vec<AuditRecord> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Where and how a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based).
    pub line: usize,
    /// The record's `seq`, when it has one.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, "seq {seq}: ")?;
        }
        f.write_str(&self.problem)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Lines read.
    pub records: u64,
    /// `seq` of the first record (not 0 when older files were rotated away or not given).
    pub first_seq: Option<u64>,
    /// `seq` of the last record.
    pub last_seq: Option<u64>,
    /// Hash of the last line: keep it elsewhere to pin the head of the chain.
    pub head: Option<String>,
    /// Every place the chain breaks, in order.
    pub breaks: Vec<Break>,
}

impl Verification {
    /// Whether the chain holds.
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks the hash chain through `files`, oldest first (`audit.jsonl.2`, `audit.jsonl.1`,
/// `audit.jsonl`). A file that cannot be read is an error; everything else is a
/// [`Break`].
pub fn verify(files: &[PathBuf]) -> std::io::Result<Verification> {
    let mut out = Verification::default();
    // The last chained line: where, its seq and its hash.
    let mut last: Option<(PathBuf, usize, u64, String)> = None;
    for path in files {
        let mut reader = BufReader::new(File::open(path)?);
        let mut number = 0usize;
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            number += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            out.records += 1;
            let at = |seq: Option<u64>, problem: String| Break {
                file: path.clone(),
                line: number,
                seq,
                problem,
            };
            let Some((seq, prev)) = chain_fields(&line) else {
                let problem = if serde_json::from_slice::<Value>(&line).is_ok() {
                    "no `seq` and `prev`: not a chained record (written before the chain, or \
                     inserted)"
                } else {
                    "not a JSON record (a write torn by a crash, or an edit)"
                };
                out.breaks.push(at(None, problem.into()));
                continue;
            };
            match &last {
                None if seq == 0 && prev != GENESIS => out.breaks.push(at(
                    Some(seq),
                    "the first record's `prev` is not the start of a chain".into(),
                )),
                None => {}
                Some((_, _, last_seq, _)) if seq <= *last_seq => out.breaks.push(at(
                    Some(seq),
                    format!(
                        "out of order: seq {seq} after seq {last_seq} (records moved or copied)"
                    ),
                )),
                Some((_, _, last_seq, _)) if seq > last_seq + 1 => {
                    let missing = if seq == last_seq + 2 {
                        format!("seq {} is missing", last_seq + 1)
                    } else {
                        format!("seqs {}..={} are missing", last_seq + 1, seq - 1)
                    };
                    out.breaks.push(at(
                        Some(seq),
                        format!("{missing}: records deleted before this line"),
                    ));
                }
                Some((file, line_no, last_seq, hash)) if *hash != prev => out.breaks.push(Break {
                    file: file.clone(),
                    line: *line_no,
                    seq: Some(*last_seq),
                    problem: format!(
                        "record edited: it no longer hashes to the `prev` that the next record \
                         ({}:{number}, seq {seq}) holds",
                        path.display()
                    ),
                }),
                Some(_) => {}
            }
            out.first_seq.get_or_insert(seq);
            out.last_seq = Some(seq);
            let hash = line_hash(&line);
            out.head = Some(hash.clone());
            last = Some((path.clone(), number, seq, hash));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_records(log: &AuditLog, n: usize) {
        for i in 0..n {
            let mut r = AuditRecord::new("decision", "notify");
            r.reason = format!("record {i}");
            log.write(&[r]).unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn records_are_appended_as_chained_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut r = AuditRecord::new("decision", "silenced");
        r.rule = Some("cpu".into());
        log.write(&[r.clone(), AuditRecord::new("result", "delivered")])
            .unwrap();
        let text = lines(&path);
        let values: Vec<Value> = text
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0]["kind"], "decision");
        assert_eq!(values[0]["rule"], "cpu");
        assert!(values[1].get("rule").is_none());
        assert_eq!(values[0]["seq"], 0);
        assert_eq!(values[0]["prev"], GENESIS);
        assert_eq!(values[1]["seq"], 1);
        assert_eq!(values[1]["prev"], line_hash(text[0].as_bytes()));
        assert_eq!(log.recent().len(), 2);
    }

    #[test]
    fn the_file_is_private_and_a_symlink_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        AuditLog::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = AuditLog::open(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // A dangling link is refused too (O_CREAT would create its target).
        let dangling = dir.path().join("dangling.jsonl");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(AuditLog::open(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());

        // An existing file open to others is narrowed.
        let loose = dir.path().join("loose.jsonl");
        std::fs::write(&loose, "").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&loose).unwrap();
        let mode = std::fs::metadata(&loose).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_reopened_log_resumes_the_chain_after_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&AuditLog::open(&path).unwrap(), 3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"pr").unwrap(); // a crash mid-write
        drop(f);
        write_records(&AuditLog::open(&path).unwrap(), 2);
        let report = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(report.last_seq, Some(4));
        assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
        assert_eq!(report.breaks[0].line, 4);
        assert!(report.breaks[0].problem.contains("torn"));
    }

    #[test]
    fn verify_passes_a_fresh_log_and_finds_edits_deletions_and_moves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&AuditLog::open(&path).unwrap(), 5);
        let report = verify(std::slice::from_ref(&path)).unwrap();
        assert!(report.is_intact(), "{:?}", report.breaks);
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (5, Some(0), Some(4))
        );
        let original = lines(&path);
        let rewrite = |lines: &[String]| std::fs::write(&path, lines.join("\n") + "\n").unwrap();

        let mut edited = original.clone();
        edited[1] = edited[1].replace("record 1", "record one");
        rewrite(&edited);
        let breaks = verify(std::slice::from_ref(&path)).unwrap().breaks;
        assert_eq!(breaks.len(), 1, "{breaks:?}");
        assert_eq!((breaks[0].line, breaks[0].seq), (2, Some(1)));
        assert!(breaks[0].problem.contains("edited"), "{}", breaks[0]);

        let mut deleted = original.clone();
        deleted.remove(2);
        rewrite(&deleted);
        let breaks = verify(std::slice::from_ref(&path)).unwrap().breaks;
        assert_eq!(breaks.len(), 1, "{breaks:?}");
        assert_eq!((breaks[0].line, breaks[0].seq), (3, Some(3)));
        assert!(
            breaks[0].problem.contains("seq 2 is missing"),
            "{}",
            breaks[0]
        );

        let mut moved = original.clone();
        moved.swap(3, 4);
        rewrite(&moved);
        let breaks = verify(std::slice::from_ref(&path)).unwrap().breaks;
        assert!(
            breaks.iter().any(|b| b.problem.contains("out of order")),
            "{breaks:?}"
        );
    }

    #[test]
    fn rotation_keeps_the_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 600,
            keep: 2,
        };
        let log = AuditLog::open_with(&path, rotation).unwrap();
        write_records(&log, 12);
        drop(log);
        let files = files_of(&path);
        assert_eq!(
            files,
            [rotated(&path, 2), rotated(&path, 1), path.clone()],
            "two rotated files kept"
        );
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 600);
        }
        let report = verify(&files).unwrap();
        assert!(report.is_intact(), "{:?}", report.breaks);
        assert_eq!(report.last_seq, Some(11));
        assert!(report.first_seq.unwrap() > 0, "the oldest file was dropped");
        // The first record of each file carries the previous file's last hash.
        let last_of_older = lines(&files[1]).pop().unwrap();
        let first_of_live: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first_of_live["prev"], line_hash(last_of_older.as_bytes()));
        // Reopened right after a rotation, the chain goes on from the rotated file.
        std::fs::write(&path, "").unwrap();
        write_records(&AuditLog::open_with(&path, rotation).unwrap(), 1);
        let report = verify(&files_of(&path)).unwrap();
        assert_eq!(report.breaks.len(), 0, "{:?}", report.breaks);
        // Out of order files break it.
        let report = verify(&[rotated(&path, 1), rotated(&path, 2)]).unwrap();
        assert!(!report.is_intact());
    }
}
