//! Emitted-window marks: per series, the start of the last window its watermark closed (and,
//! for resampling, that step's value), kept in a file so a process restarted after a crash
//! recognizes the rows its source delivers again whose windows were already emitted.
//!
//! **A mark is written only once the actions acknowledged its window.** The stage knows at
//! once which windows it emitted (rows of older windows are dropped as replayed from then
//! on), but the file learns them from [`Marks::take_commit`]: the pipeline runs that commit
//! when the emitted batch was acknowledged, before the input's acknowledgements go on to the
//! source. A window whose delivery failed, or was cut short by a crash or a shutdown, is thus
//! not marked, and the source's replay rebuilds it.
//!
//! The file is an append-only log: an 8-byte header, then 24-byte records
//! (series id, window start, value; little-endian), the last record of a series winning. Each
//! commit appends the marks it carries and syncs the data; when the log holds more than
//! twice the live marks it is rewritten (temporary file, sync, rename). A record torn by a
//! crash is ignored when the file is read: the windows it marked were not acknowledged yet,
//! so their input is delivered again whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;

use crate::error::{Error, Result};

const HEADER: &[u8; 8] = b"SCOWIN01";
const RECORD: usize = 24;
/// Records the log may hold beyond twice the live marks before it is rewritten.
const SLACK: usize = 4096;

/// A series' mark: the start of its last window emitted, and that window's value.
type Mark = (i64, f64);

/// The marks of one window stage and their file. See the [module docs](self).
#[derive(Debug)]
pub(super) struct Marks {
    /// Per series, the last window emitted, acknowledged or not.
    emitted: FxHashMap<u64, Mark>,
    /// Emitted since the last [`take_commit`](Self::take_commit).
    uncommitted: Vec<(u64, Mark)>,
    /// Marks whose window starts at or before this are forgotten.
    cutoff: i64,
    /// The acknowledged marks and their file, shared with the commits in flight.
    file: Arc<Mutex<MarksFile>>,
}

/// What a commit needs: the marks of acknowledged windows and the log that keeps them.
#[derive(Debug)]
struct MarksFile {
    path: PathBuf,
    file: File,
    marks: FxHashMap<u64, Mark>,
    /// Records in the file.
    records: usize,
    cutoff: i64,
}

/// Makes the marks of one emitted batch durable; see [`Marks::take_commit`].
pub(super) type MarksCommit = Box<dyn FnOnce() -> Result<()> + Send>;

impl Marks {
    /// Reads the marks at `path`, or starts an empty file there.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(|e| io("reading", e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("opening", e)),
        }
        let mut marks = FxHashMap::default();
        if !bytes.is_empty() {
            if !bytes.starts_with(HEADER) {
                return Err(Error::io(
                    format!("reading {}", path.display()),
                    std::io::Error::other("not a window marks file"),
                ));
            }
            for record in bytes[HEADER.len()..].chunks_exact(RECORD) {
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&record[i * 8..i * 8 + 8]);
                    b
                };
                let series = u64::from_le_bytes(word(0));
                let start = i64::from_le_bytes(word(1));
                let value = f64::from_le_bytes(word(2));
                marks.insert(series, (start, value));
            }
        }
        // Rewritten at once: drops a torn record and starts the file when there was none.
        let file = MarksFile {
            path: path.to_owned(),
            file: rewrite(path, &marks)?,
            records: marks.len(),
            marks: marks.clone(),
            cutoff: i64::MIN,
        };
        Ok(Self {
            emitted: marks,
            uncommitted: Vec::new(),
            cutoff: i64::MIN,
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// The mark of `series`: the start of its last window emitted (acknowledged yet or not),
    /// and that window's value.
    pub(super) fn get(&self, series: u64) -> Option<Mark> {
        self.emitted.get(&series).copied()
    }

    /// Every mark, for a stage that resumes from them.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, Mark)> + '_ {
        self.emitted.iter().map(|(k, v)| (*k, *v))
    }

    /// Marks the window at `start` of `series` emitted (a later start only); the file learns
    /// it from the next [`take_commit`](Self::take_commit).
    pub(super) fn set(&mut self, series: u64, start: i64, value: f64) {
        let mark = self.emitted.entry(series).or_insert((i64::MIN, f64::NAN));
        if start >= mark.0 {
            *mark = (start, value);
            self.uncommitted.push((series, (start, value)));
        }
    }

    /// Forgets the marks of windows starting at or before `cutoff` (the file drops them at
    /// its next commit).
    pub(super) fn forget_up_to(&mut self, cutoff: i64) {
        if cutoff > self.cutoff {
            self.cutoff = cutoff;
            self.emitted.retain(|_, (start, _)| *start > cutoff);
        }
    }

    /// The commit of the marks set since the last call, to run once the windows they mark
    /// were acknowledged (`None` when there are none): it appends them to the file and
    /// syncs it. Commits may run in any order and on any thread: a mark only moves forward.
    pub(super) fn take_commit(&mut self) -> Option<MarksCommit> {
        if self.uncommitted.is_empty() {
            return None;
        }
        let marks = std::mem::take(&mut self.uncommitted);
        let (file, cutoff) = (self.file.clone(), self.cutoff);
        Some(Box::new(move || {
            // A panic elsewhere while holding the lock left the marks as they were; go on.
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.commit(&marks, cutoff)
        }))
    }
}

impl MarksFile {
    /// Records `marks` (those after `cutoff`, and later than the file's), durably.
    fn commit(&mut self, marks: &[(u64, Mark)], cutoff: i64) -> Result<()> {
        if cutoff > self.cutoff {
            self.cutoff = cutoff;
            self.marks.retain(|_, (start, _)| *start > cutoff);
        }
        let mut changed = Vec::with_capacity(marks.len());
        for &(series, (start, value)) in marks {
            let mark = self.marks.entry(series).or_insert((i64::MIN, f64::NAN));
            if start > cutoff && start >= mark.0 {
                *mark = (start, value);
                changed.push(series);
            } else if mark.0 == i64::MIN {
                self.marks.remove(&series);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        changed.sort_unstable();
        changed.dedup();
        if self.records + changed.len() > 2 * self.marks.len() + SLACK {
            self.file = rewrite(&self.path, &self.marks)?;
            self.records = self.marks.len();
        } else {
            let mut bytes = Vec::with_capacity(changed.len() * RECORD);
            for series in &changed {
                if let Some((start, value)) = self.marks.get(series) {
                    push_record(&mut bytes, *series, *start, *value);
                }
            }
            let io = |e| Error::io(format!("writing {}", self.path.display()), e);
            self.file.write_all(&bytes).map_err(io)?;
            self.file.sync_data().map_err(io)?;
            self.records += bytes.len() / RECORD;
        }
        Ok(())
    }
}

/// Writes `marks` to a new file that replaces `path`; the file, open for appending.
fn rewrite(path: &Path, marks: &FxHashMap<u64, Mark>) -> Result<File> {
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let tmp = path.with_extension("tmp");
    let mut bytes = Vec::with_capacity(HEADER.len() + marks.len() * RECORD);
    bytes.extend_from_slice(HEADER);
    for (series, (start, value)) in marks {
        push_record(&mut bytes, *series, *start, *value);
    }
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    OpenOptions::new().append(true).open(path).map_err(io)
}

fn push_record(out: &mut Vec<u8>, series: u64, start: i64, value: f64) {
    out.extend_from_slice(&series.to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commits what was set since the last commit.
    fn commit(marks: &mut Marks) {
        if let Some(commit) = marks.take_commit() {
            commit().unwrap();
        }
    }

    #[test]
    fn marks_survive_a_reopen_and_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w").join("marks");
        let mut marks = Marks::open(&path).unwrap();
        marks.set(1, 60_000, 2.5);
        marks.set(2, 0, 1.0);
        commit(&mut marks);
        marks.set(1, 120_000, 3.5);
        marks.set(2, -60_000, 9.0); // older than its mark: ignored
        commit(&mut marks);
        drop(marks);
        // A crash mid-append leaves part of a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[7u8; 10]).unwrap();
        drop(f);
        let marks = Marks::open(&path).unwrap();
        assert_eq!(marks.get(1), Some((120_000, 3.5)));
        assert_eq!(marks.get(2), Some((0, 1.0)));
        assert_eq!(marks.get(3), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 + 2 * 24);
    }

    #[test]
    fn only_committed_marks_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        let mut marks = Marks::open(&path).unwrap();
        marks.set(1, 0, 1.0);
        let first = marks.take_commit().expect("a mark to commit");
        marks.set(1, 60_000, 2.0);
        marks.set(2, 60_000, 3.0);
        let second = marks.take_commit().expect("marks to commit");
        assert!(marks.take_commit().is_none(), "nothing new");
        assert_eq!(
            marks.get(1),
            Some((60_000, 2.0)),
            "known to the stage at once"
        );
        // The second batch was acknowledged, then the first; the first's commit is older.
        second().unwrap();
        first().unwrap();
        marks.set(3, 0, 4.0); // emitted, never acknowledged
        let _dropped = marks.take_commit();
        drop(marks);
        let reread = Marks::open(&path).unwrap();
        assert_eq!(
            reread.get(1),
            Some((60_000, 2.0)),
            "a mark only moves forward"
        );
        assert_eq!(reread.get(2), Some((60_000, 3.0)));
        assert_eq!(
            reread.get(3),
            None,
            "an unacknowledged window is not marked"
        );
    }

    #[test]
    fn the_log_is_rewritten_once_it_is_mostly_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        let mut marks = Marks::open(&path).unwrap();
        for start in 0..(SLACK as i64 + 10) {
            marks.set(1, start, 0.0);
            commit(&mut marks);
        }
        assert!(std::fs::metadata(&path).unwrap().len() < 8 + 24 * 20);
        marks.forget_up_to(i64::MAX - 1);
        assert_eq!(marks.get(1), None);
        marks.set(5, i64::MAX, 1.0);
        commit(&mut marks);
        let reread = Marks::open(&path).unwrap();
        assert_eq!(reread.get(5), Some((i64::MAX, 1.0)));
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(Marks::open(&path).is_err());
    }
}
