//! The decision state file (`state_dir/decision.redb`): the [journal](super::journal) and the
//! [outbox](super::outbox) in one redb database, with one fsync shared by every batch that
//! waits for it (group commit).
//!
//! - **One file, one order.** Journal and outbox changes are redb transactions on one
//!   database, so a durable commit makes every earlier one durable with it, in the order they
//!   were made. The engine writes the outbox entries a batch made due before the journal
//!   changes that record them as sent: no crash can keep the second without the first.
//! - **Commits are cheap; syncs are shared.** Every write is a non-durable redb commit
//!   ([`Durability::None`](redb::Durability::None)): in the file's pages, not yet synced.
//!   Before a batch is acknowledged, [`sync`](StateStore::sync) makes everything committed so
//!   far durable with one empty [`Durability::Immediate`](redb::Durability::Immediate) commit
//!   (one `fdatasync`), run on tokio's blocking pool. Batches that wait meanwhile (the
//!   pipeline runs `action_concurrency` of them at once) find their commits covered by that
//!   sync, or share the next one: one fsync per round of concurrent batches, not per batch,
//!   and no batch's decisions wait behind another's fsync.
//! - **A crash** (or power loss) loses only what no sync covered, which no source was told is
//!   done: the batches are delivered again and decided again, under the same notification ids.

use std::fmt::Display;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The file in `state_dir`.
pub const FILE_NAME: &str = "decision.redb";

/// How much of the file redb may cache; the state is small.
const CACHE_BYTES: usize = 16 << 20;

/// The open state file. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct StateStore {
    db: redb::Database,
    path: PathBuf,
    /// Commits made so far (each counted after it completed).
    committed: AtomicU64,
    /// The commits a sync has made durable: every commit counted up to this number.
    synced: AtomicU64,
    /// Durable commits (fsyncs) made.
    syncs: AtomicU64,
    /// Held by the one sync running; the batches waiting queue here, and most find their
    /// commits covered when their turn comes.
    syncing: tokio::sync::Mutex<()>,
}

impl StateStore {
    /// Opens (or creates, with `dir`, owner-only) the file in `dir`, checks every page's
    /// checksum and compacts it. A file that cannot be read is an error naming it.
    pub(crate) fn open(dir: &Path) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating the state directory {}", dir.display()),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        // Alerts' labels and notifications' bodies are as private as the audit log.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(Error::Io {
                context: format!("creating the decision state file {}", path.display()),
                source: e,
            });
        }
        let mut db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| unreadable(&path, &e))?;
        // Space freed by deleted keys is reused while running; a compaction at start also
        // gives it back to the file system.
        if let Err(e) = db.compact(redb::CompactionMode::Balanced) {
            tracing::warn!("decision state {}: compaction failed: {e}", path.display());
        }
        Ok(Arc::new(Self {
            db,
            path,
            committed: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A durable transaction, to read (and initialise) the file at start.
    pub(crate) fn begin_read_at_start(&self) -> Result<redb::WriteTransaction> {
        self.db
            .begin_write()
            .map_err(|e| unreadable(&self.path, &e))
    }

    /// Runs `write` in one transaction and commits it, not yet durable: [`sync`](Self::sync)
    /// makes it so. `what` names the part written, for errors. On error nothing of it is
    /// saved.
    pub(crate) fn write(
        &self,
        what: &str,
        write: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<(), redb::Error>,
    ) -> Result<()> {
        let failed = |e: &dyn Display| self.write_error(what, e);
        let mut txn = self.db.begin_write().map_err(|e| failed(&e))?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| failed(&e))?;
        write(&txn).map_err(|e| failed(&e))?;
        txn.commit().map_err(|e| failed(&e))?;
        self.committed.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Whether every commit made so far is durable.
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.committed.load(Ordering::Acquire)
    }

    /// Makes every commit made before this call durable, sharing the fsync with every other
    /// caller waiting at the same time (group commit). The fsync runs on the blocking pool.
    pub(crate) async fn sync(self: &Arc<Self>) -> Result<()> {
        let target = self.committed.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _syncing = self.syncing.lock().await;
        // The sync before ours may have covered our commits.
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.sync_blocking())
            .await
            .map_err(|e| Error::Task(format!("syncing the decision state: {e}")))?
    }

    /// [`sync`](Self::sync) on the calling thread (at start, at shutdown, in tests).
    pub(crate) fn sync_blocking(&self) -> Result<()> {
        if self.is_synced() {
            return Ok(());
        }
        // Read before the durable commit begins: every commit counted by then completed
        // before it (redb runs one write transaction at a time), so it covers them.
        let covered = self.committed.load(Ordering::Acquire);
        let failed = |e: &dyn Display| self.write_error("sync", e);
        let txn = self.db.begin_write().map_err(|e| failed(&e))?;
        txn.commit().map_err(|e| failed(&e))?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Durable commits (fsyncs) made since the file was opened.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn write_error(&self, what: &str, e: &dyn Display) -> Error {
        Error::Action {
            action: "decision".into(),
            message: format!(
                "writing the decision state {} ({what}) failed: {e}",
                self.path.display()
            ),
            // A full or failing disk may recover; the batch is retried meanwhile.
            retryable: true,
        }
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        // A clean close keeps everything committed; a crash keeps what was synced.
        if let Err(e) = self.sync_blocking() {
            tracing::warn!("{e}");
        }
    }
}

/// The error for a state file that cannot be read, with what to do about it.
pub(crate) fn unreadable(path: &Path, e: &dyn Display) -> Error {
    Error::Action {
        action: "decision".into(),
        message: format!(
            "the decision state {} cannot be read: {e}. Move it aside to start with an empty \
             decision state (alerts firing before are then forgotten: no resolved \
             notification will follow them; notifications not yet delivered are lost)",
            path.display()
        ),
        retryable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");

    fn put(store: &StateStore, k: u64) {
        store
            .write("test", |txn| {
                txn.open_table(T)?.insert(k, k)?;
                Ok(())
            })
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_waiting_together_share_one_fsync_that_covers_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // A sync in progress: eight batches commit and wait behind it.
        let running = store.syncing.lock().await;
        let tasks: Vec<_> = (0..8)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    put(&store, k);
                    store.sync().await
                })
            })
            .collect();
        while store.committed.load(Ordering::Acquire) < 8 {
            tokio::task::yield_now().await;
        }
        drop(running);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(store.is_synced());
        assert_eq!(store.syncs(), 1, "the first sync covered all eight");
        // Durable: read back after a reopen.
        drop(store);
        let store = StateStore::open(dir.path()).unwrap();
        let txn = store.begin_read_at_start().unwrap();
        let len = redb::ReadableTableMetadata::len(&txn.open_table(T).unwrap()).unwrap();
        assert_eq!(len, 8);
    }

    #[tokio::test]
    async fn a_sync_with_nothing_new_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.sync().await.unwrap();
        assert_eq!(store.syncs(), 0, "no commit, no fsync");
        put(&store, 1);
        assert!(!store.is_synced());
        store.sync().await.unwrap();
        assert!(store.is_synced());
        assert_eq!(store.syncs(), 1);
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not a database").unwrap();
        let err = StateStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
