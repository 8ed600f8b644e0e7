//! Emitted-window marks: per series, the start of the last window its watermark closed (and,
//! for resampling, that step's value), kept in a file so a process restarted after a crash
//! recognizes the rows its source delivers again whose windows were already emitted.
//!
//! The file is an append-only log: an 8-byte header, then 24-byte records
//! (series id, window start, value; little-endian), the last record of a series winning. Each
//! write appends the marks changed since the previous one and syncs the data; when the log
//! holds more than twice the live marks it is rewritten (temporary file, sync, rename). A
//! record torn by a crash is ignored when the file is read: the windows it marked were not
//! acknowledged yet, so their input is delivered again whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use crate::error::{Error, Result};

const HEADER: &[u8; 8] = b"SCOWIN01";
const RECORD: usize = 24;
/// Records the log may hold beyond twice the live marks before it is rewritten.
const SLACK: usize = 4096;

/// The marks of one window stage and their file. See the [module docs](self).
#[derive(Debug)]
pub(super) struct Marks {
    path: PathBuf,
    file: File,
    marks: FxHashMap<u64, (i64, f64)>,
    /// Changed since the last write.
    changed: Vec<u64>,
    /// Records in the file.
    records: usize,
}

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
        let mut records = 0;
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
                records += 1;
            }
        }
        // Rewritten at once: drops a torn record and starts the file when there was none.
        let mut this = Self {
            path: path.to_owned(),
            file: Self::rewrite(path, &marks)?,
            marks,
            changed: Vec::new(),
            records,
        };
        this.records = this.marks.len();
        Ok(this)
    }

    /// The mark of `series`: the start of its last window emitted, and that window's value.
    pub(super) fn get(&self, series: u64) -> Option<(i64, f64)> {
        self.marks.get(&series).copied()
    }

    /// Every mark, for a stage that resumes from them.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, (i64, f64))> + '_ {
        self.marks.iter().map(|(k, v)| (*k, *v))
    }

    /// Marks the window at `start` of `series` emitted (a later start only).
    pub(super) fn set(&mut self, series: u64, start: i64, value: f64) {
        let mark = self.marks.entry(series).or_insert((i64::MIN, f64::NAN));
        if start >= mark.0 {
            *mark = (start, value);
            self.changed.push(series);
        }
    }

    /// Forgets the marks `keep` refuses (the file drops them at its next rewrite).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(i64) -> bool) {
        self.marks.retain(|_, (start, _)| keep(*start));
    }

    /// Makes the changed marks durable.
    pub(super) fn write(&mut self) -> Result<()> {
        if self.changed.is_empty() {
            return Ok(());
        }
        self.changed.sort_unstable();
        self.changed.dedup();
        if self.records + self.changed.len() > 2 * self.marks.len() + SLACK {
            self.file = Self::rewrite(&self.path, &self.marks)?;
            self.records = self.marks.len();
        } else {
            let mut bytes = Vec::with_capacity(self.changed.len() * RECORD);
            for series in &self.changed {
                if let Some((start, value)) = self.marks.get(series) {
                    push_record(&mut bytes, *series, *start, *value);
                }
            }
            let io = |e| Error::io(format!("writing {}", self.path.display()), e);
            self.file.write_all(&bytes).map_err(io)?;
            self.file.sync_data().map_err(io)?;
            self.records += bytes.len() / RECORD;
        }
        self.changed.clear();
        Ok(())
    }

    /// Writes `marks` to a new file that replaces `path`; the file, open for appending.
    fn rewrite(path: &Path, marks: &FxHashMap<u64, (i64, f64)>) -> Result<File> {
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
}

fn push_record(out: &mut Vec<u8>, series: u64, start: i64, value: f64) {
    out.extend_from_slice(&series.to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w").join("marks");
        let mut marks = Marks::open(&path).unwrap();
        marks.set(1, 60_000, 2.5);
        marks.set(2, 0, 1.0);
        marks.write().unwrap();
        marks.set(1, 120_000, 3.5);
        marks.set(2, -60_000, 9.0); // older than its mark: ignored
        marks.write().unwrap();
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
    fn the_log_is_rewritten_once_it_is_mostly_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        let mut marks = Marks::open(&path).unwrap();
        for start in 0..(SLACK as i64 + 10) {
            marks.set(1, start, 0.0);
            marks.write().unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() < 8 + 24 * 20);
        marks.retain(|_| false);
        marks.set(5, 1, 1.0);
        marks.write().unwrap();
        let reread = Marks::open(&path).unwrap();
        assert_eq!(reread.get(5), Some((1, 1.0)));
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(Marks::open(&path).is_err());
    }
}
