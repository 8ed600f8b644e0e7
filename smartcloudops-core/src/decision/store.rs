//! The decision state file (`state_dir/decision.redb`): the [journal](super::journal) and the
//! [outbox](super::outbox) in one redb database, written behind the engine, with one fsync
//! shared by every batch that waits for it (group commit).
//!
//! - **Writes are queued, not committed.** A [`write`](StateStore::write) encodes its change
//!   and queues it: the engine never waits on the file while it decides.
//! - **One sync applies the queue in one durable transaction.** Before a batch is
//!   acknowledged, [`sync`](StateStore::sync) takes every change queued so far, applies them
//!   in order in one redb transaction and commits it durably (one `fdatasync`), on tokio's
//!   blocking pool. Batches that queue meanwhile (the pipeline runs `action_concurrency` of
//!   them at once) are decided while it runs, then share the next one: one fsync per round
//!   of concurrent batches, not per batch, and no batch's decisions wait behind another's
//!   fsync.
//! - **One file, one order.** Changes are applied in the order they were queued, and a
//!   transaction is all or nothing. The engine queues the outbox entries a batch made due
//!   before the journal changes that record them as sent: no crash can keep the second
//!   without the first.
//! - **A failed sync loses nothing.** Its changes stay queued, ahead of newer ones, and the
//!   next sync retries them; the batches that waited for it are not acknowledged.
//! - **A crash** (or power loss) loses only what no sync covered, which no source was told is
//!   done: the batches are delivered again and decided again, under the same notification ids.

use std::fmt::{Debug, Display};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The file in `state_dir`.
pub const FILE_NAME: &str = "decision.redb";

/// How much of the file redb may cache; the state is small.
const CACHE_BYTES: usize = 16 << 20;

/// One queued change: applied to the sync's transaction, again after a failed sync.
pub(crate) trait StateWrite: Debug + Send {
    /// Names the part written (`journal`, `outbox`), for errors.
    fn part(&self) -> &'static str;

    /// Writes the change into `txn`.
    fn apply(&self, txn: &redb::WriteTransaction) -> std::result::Result<(), redb::Error>;
}

/// Changes queued and not yet durable.
#[derive(Debug, Default)]
struct Queue {
    writes: Vec<Box<dyn StateWrite>>,
    /// Writes queued since the file was opened (the last queued one's number).
    queued: u64,
}

/// The open state file. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct StateStore {
    db: redb::Database,
    path: PathBuf,
    queue: Mutex<Queue>,
    /// Every write numbered up to this is durable.
    synced: AtomicU64,
    /// Durable commits (fsyncs) made.
    syncs: AtomicU64,
    /// Held while a sync takes the queue and commits it: syncs are applied in queue order.
    applying: Mutex<()>,
    /// Held by the one async sync running; the batches waiting queue here, and most find
    /// their writes covered when their turn comes.
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
            queue: Mutex::new(Queue::default()),
            synced: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            applying: Mutex::new(()),
            syncing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A durable transaction, to read (and initialise) the file at start, before anything
    /// is queued.
    pub(crate) fn begin_read_at_start(&self) -> Result<redb::WriteTransaction> {
        self.db
            .begin_write()
            .map_err(|e| unreadable(&self.path, &e))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `write`, made durable by the next [`sync`](Self::sync).
    pub(crate) fn write(&self, write: impl StateWrite + 'static) {
        let mut queue = self.queue();
        queue.writes.push(Box::new(write));
        queue.queued += 1;
    }

    /// Whether every write queued so far is durable.
    #[cfg(test)]
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.queue().queued
    }

    /// Makes every write queued before this call durable, sharing the fsync with every other
    /// caller waiting at the same time (group commit). The fsync runs on the blocking pool.
    pub(crate) async fn sync(self: &Arc<Self>) -> Result<()> {
        let target = self.queue().queued;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _syncing = self.syncing.lock().await;
        // The sync before ours may have covered our writes.
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
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let (writes, covered) = {
            let mut queue = self.queue();
            (std::mem::take(&mut queue.writes), queue.queued)
        };
        if writes.is_empty() {
            return Ok(());
        }
        match self.commit(&writes) {
            Ok(()) => {
                self.synced.fetch_max(covered, Ordering::AcqRel);
                self.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Kept, ahead of what was queued meanwhile, for the next sync to retry.
                let mut queue = self.queue();
                let newer = std::mem::replace(&mut queue.writes, writes);
                queue.writes.extend(newer);
                Err(e)
            }
        }
    }

    /// Applies `writes` in order in one durable transaction.
    fn commit(&self, writes: &[Box<dyn StateWrite>]) -> Result<()> {
        let failed = |what: &str, e: &dyn Display| self.write_error(what, e);
        let txn = self.db.begin_write().map_err(|e| failed("sync", &e))?;
        for write in writes {
            write.apply(&txn).map_err(|e| failed(write.part(), &e))?;
        }
        txn.commit().map_err(|e| failed("sync", &e))
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

    /// Writes `key → key`; fails its first `failures` applications.
    #[derive(Debug)]
    struct Put {
        key: u64,
        failures: AtomicU64,
    }

    impl StateWrite for Put {
        fn part(&self) -> &'static str {
            "test"
        }

        fn apply(&self, txn: &redb::WriteTransaction) -> std::result::Result<(), redb::Error> {
            if self.failures.load(Ordering::Relaxed) > 0 {
                self.failures.fetch_sub(1, Ordering::Relaxed);
                return Err(redb::StorageError::Io(std::io::Error::other("disk full")).into());
            }
            txn.open_table(T)?.insert(self.key, self.key)?;
            Ok(())
        }
    }

    fn put(store: &StateStore, key: u64) {
        store.write(Put {
            key,
            failures: AtomicU64::new(0),
        });
    }

    fn keys(store: &StateStore) -> Vec<u64> {
        let txn = store.begin_read_at_start().unwrap();
        let table = txn.open_table(T).unwrap();
        redb::ReadableTable::iter(&table)
            .unwrap()
            .map(|row| row.unwrap().0.value())
            .collect()
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
        while store.queue().queued < 8 {
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
        assert_eq!(keys(&store), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failed_sync_keeps_its_writes_in_order_for_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        put(&store, 1);
        store.write(Put {
            key: 2,
            failures: AtomicU64::new(1),
        });
        let err = store.sync().await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!store.is_synced());
        assert_eq!(store.syncs(), 0);
        // Queued meanwhile: applied after the retried ones.
        put(&store, 3);
        store.sync().await.unwrap();
        assert!(store.is_synced());
        drop(store);
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(keys(&store), vec![1, 2, 3]);
    }

    #[test]
    fn writes_do_not_wait_for_a_sync_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        // A sync in the middle of its transaction holds redb's one write transaction (and
        // keeps it through the fsync). A write must not wait for it.
        let applying = store.applying.lock().unwrap();
        let txn = store.db.begin_write().unwrap();
        let (done, written) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                put(&store, 1);
                done.send(()).unwrap();
            });
            written
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the write waited for the transaction");
            assert_eq!(store.queue().queued, 1);
            drop(txn);
            drop(applying);
        });
        store.sync_blocking().unwrap();
        assert_eq!(store.syncs(), 1);
        assert!(store.is_synced());
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
