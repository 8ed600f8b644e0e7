//! The one JSON-lines appender: dead letters, the audit log, the `jsonl` action and the
//! idempotency store all append records to a file this way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// Appends lines to a file opened in append mode (created with its parent directories).
///
/// One [`append`](Self::append) is one `write(2)` of whole lines, so concurrent appenders in
/// this process never interleave within a line; with `sync` it returns only once the lines
/// are on disk (`fdatasync`). A crash can at worst leave a torn last line, which readers skip.
#[derive(Debug)]
pub struct JsonlAppender {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl JsonlAppender {
    /// Opens (appending) or creates the file at `path`, creating its directories.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// The file appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `lines` (already encoded, each ending in `\n`), then syncs them to disk when
    /// `sync` is set.
    pub fn append(&self, lines: &[u8], sync: bool) -> std::io::Result<()> {
        // A panic elsewhere while holding the lock leaves the file as it was: keep using it.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(lines)?;
        if sync {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Syncs everything appended so far to disk.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_data()
    }

    /// Replaces the file's contents with `lines` atomically (written to a temporary file,
    /// synced, renamed over the file, directory synced): a crash leaves the old contents or
    /// the new, never an empty file. Later appends go to the new file.
    pub fn replace(&self, lines: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(lines)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
        *file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }
}

/// `records` encoded as JSON lines, each ending in `\n`.
pub fn encode_lines<'a, T: Serialize + 'a>(
    records: impl IntoIterator<Item = &'a T>,
) -> serde_json::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for r in records {
        serde_json::to_writer(&mut bytes, r)?;
        bytes.push(b'\n');
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_whole_lines_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/out.jsonl");
        let appender = JsonlAppender::open(&path).unwrap();
        let lines = encode_lines(&[
            serde_json::json!({"a": 1}),
            serde_json::json!({"b": "x\ny"}),
        ])
        .unwrap();
        appender.append(&lines, true).unwrap();
        appender.append(b"{\"c\":3}\n", false).unwrap();
        appender.sync().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"b\":\"x\\ny\"}\n{\"c\":3}\n");

        appender.replace(b"{\"kept\":true}\n").unwrap();
        appender.append(b"{\"after\":1}\n", true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"kept\":true}\n{\"after\":1}\n");
        assert!(!path.with_extension("tmp").exists());

        // Reopening appends to what is there.
        drop(appender);
        JsonlAppender::open(&path)
            .unwrap()
            .append(b"{\"again\":1}\n", false)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
