//! The decision journal: the engine's state kept in `state_dir/decision.redb`, so that a
//! restart (or a `kill -9`) forgets nothing the engine had decided.
//!
//! What is kept: each (rule, series) alert state (pending `for` start, firing start, the
//! firing record that a resolution needs, flap history), each dispatcher group (its alerts,
//! what was sent, `created_ms`, `last_notified_ms`, the episode and its sequence number,
//! muting), the silences added at run time and their id sequence, and the suggestions
//! waiting for a person.
//!
//! The store is [redb](https://docs.rs/redb) (pure Rust, ACID, one file), shared with the
//! outbox in one state file. The engine writes only what changed since its
//! last commit, per pipeline batch and per ticker tick that changed something, made durable
//! (with the outbox's) by one fsync shared by the batches waiting for it, before they are
//! acknowledged.
//!
//! Each commit appends the batch's changes as one entry to a log (one key, one value: an
//! alert storm changes hundreds of states per batch, and one B-tree insert per state cost
//! more than the rest of the journal). Every 16 entries (`FOLD_EVERY`), and at start, the log is
//! folded into the keyed tables in the same transaction: only the latest value of each key is
//! written, and the entries are deleted. Keys are overwritten in place and deleted when
//! their alert or group is gone, and the file is compacted at each start, so it stays the
//! size of the live state plus a short log. Rules are named, not numbered, in the journal: a restart with rules added,
//! removed or reordered finds its own.
//!
//! A journal that cannot be read (corrupt, truncated, another format) stops the engine from
//! starting with an error naming the file; moving the file aside starts with an empty state
//! (firing alerts are then forgotten, as before the journal existed).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::dispatch::{Group, Silence, SilenceConfig};
use super::engine::Suggestion;
use super::rule::AlertState;
use super::store::{StateStore, StateWrite, unreadable};
use crate::error::{Error, Result};

/// The journal's file in `state_dir` (one state file, shared with the outbox).
pub use super::store::FILE_NAME;

/// Alert states by (rule name, series id): postcard of [`AlertState`].
const ALERTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("alerts");
/// Groups by group key: postcard of (rule name, [`Group`]).
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// Run-time silences by id: postcard of [`SilenceEntry`].
const SILENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("silences");
/// `format`, `silence_seq` (u64, little endian), `suggestions` (JSON: a plan is any JSON).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Commits not yet folded into the tables above, in order: postcard of [`LogEntry`].
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// Log entries after which a commit folds the log into the tables.
pub(crate) const FOLD_EVERY: u64 = 16;

/// The layout of the values; another number is refused rather than misread (postcard is not
/// self-describing).
const FORMAT: u8 = 1;

/// A silence added at run time, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SilenceEntry {
    pub(crate) id: String,
    pub(crate) config: SilenceConfig,
    pub(crate) starts_ms: i64,
    pub(crate) ends_ms: i64,
}

impl SilenceEntry {
    fn of(s: &Silence) -> Self {
        Self {
            id: s.id.clone(),
            config: s.config.clone(),
            starts_ms: s.starts_ms,
            ends_ms: s.ends_ms,
        }
    }
}

/// What the journal held at start.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// (rule name, series id, state).
    pub(crate) alerts: Vec<(String, u64, AlertState)>,
    /// (group key, rule name, group).
    pub(crate) groups: Vec<(String, String, Group)>,
    pub(crate) silences: Vec<SilenceEntry>,
    pub(crate) silence_seq: u64,
    /// Oldest first.
    pub(crate) suggestions: Vec<Suggestion>,
}

/// A value to save, or `None` to delete the key.
type Put = Option<Vec<u8>>;

/// One commit in the log, as read back.
#[derive(Debug, Deserialize)]
struct LogEntry {
    alerts: Vec<((String, u64), Put)>,
    groups: Vec<(String, Put)>,
    silences: Vec<(String, Put)>,
    silence_seq: Option<u64>,
    suggestions: Option<Vec<u8>>,
}

/// One commit in the log, as written (borrowing [`Changes`]; the same encoding as
/// [`LogEntry`]).
#[derive(Serialize)]
struct LogEntryRef<'a> {
    alerts: &'a [((String, u64), Put)],
    groups: &'a [(String, Put)],
    silences: &'a [(String, Put)],
    silence_seq: Option<u64>,
    suggestions: Option<&'a [u8]>,
}

/// The changes of one commit, encoded.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// By (rule name, series id).
    alerts: Vec<((String, u64), Put)>,
    groups: Vec<(String, Put)>,
    silences: Vec<(String, Put)>,
    silence_ids: Option<HashSet<String>>,
    silence_seq: Option<u64>,
    suggestions: Option<(Vec<u8>, Vec<Suggestion>)>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.alerts.is_empty()
            && self.groups.is_empty()
            && self.silences.is_empty()
            && self.silence_seq.is_none()
            && self.suggestions.is_none()
    }

    /// Saves (or, with `None`, deletes) the state of `rule`'s alert on `series`.
    pub(crate) fn alert(
        &mut self,
        rule: &str,
        series: u64,
        state: Option<&AlertState>,
    ) -> Result<()> {
        let value = state.map(|s| encode(s, "an alert state")).transpose()?;
        self.alerts.push(((rule.to_owned(), series), value));
        Ok(())
    }

    /// Saves (or deletes) the group `key` of `rule`.
    pub(crate) fn group(&mut self, key: &str, group: Option<(&str, &Group)>) -> Result<()> {
        let value = group.map(|g| encode(&g, "a group")).transpose()?;
        self.groups.push((key.to_owned(), value));
        Ok(())
    }
}

/// The open journal, and what it last saved of the parts compared whole at each commit.
#[derive(Debug)]
pub(crate) struct Journal {
    store: Arc<StateStore>,
    /// Entries in the log (the next one's key).
    logged: u64,
    silence_ids: HashSet<String>,
    silence_seq: u64,
    suggestions: Vec<Suggestion>,
}

fn encode<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| Error::Action {
        action: "decision".into(),
        message: format!("the decision journal cannot encode {what}: {e}"),
        retryable: false,
    })
}

impl Journal {
    /// Reads the journal's part of `store` whole.
    pub(crate) fn open(store: Arc<StateStore>) -> Result<(Self, Restored)> {
        let path = store.path().to_owned();
        let unreadable = |e: &dyn std::fmt::Display| unreadable(&path, e);
        let mut restored = Restored::default();
        let txn = store.begin_read_at_start()?;
        fold(&txn).map_err(|e| unreadable(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| unreadable(&e))?;
            let format = meta
                .get("format")
                .map_err(|e| unreadable(&e))?
                .map(|v| v.value().to_vec());
            match format.as_deref() {
                None => {
                    meta.insert("format", [FORMAT].as_slice())
                        .map_err(|e| unreadable(&e))?;
                }
                Some([FORMAT]) => {}
                Some([other]) => {
                    return Err(unreadable(&format!(
                        "it has format {other}, this version reads format {FORMAT}"
                    )));
                }
                Some(other) => {
                    return Err(unreadable(&format!("its format mark {other:?} is unknown")));
                }
            }
            if let Some(v) = meta.get("silence_seq").map_err(|e| unreadable(&e))? {
                let bytes: [u8; 8] = v
                    .value()
                    .try_into()
                    .map_err(|_| unreadable(&"`silence_seq` is not 8 bytes"))?;
                restored.silence_seq = u64::from_le_bytes(bytes);
            }
            if let Some(v) = meta.get("suggestions").map_err(|e| unreadable(&e))? {
                restored.suggestions = serde_json::from_slice(v.value())
                    .map_err(|e| unreadable(&format!("suggestions: {e}")))?;
            }
            let alerts = txn.open_table(ALERTS).map_err(|e| unreadable(&e))?;
            for item in alerts.iter().map_err(|e| unreadable(&e))? {
                let (k, v) = item.map_err(|e| unreadable(&e))?;
                let (rule, series) = k.value();
                let state: AlertState = postcard::from_bytes(v.value()).map_err(|e| {
                    unreadable(&format!(
                        "the alert of rule `{rule}` on series {series}: {e}"
                    ))
                })?;
                restored.alerts.push((rule.to_owned(), series, state));
            }
            let groups = txn.open_table(GROUPS).map_err(|e| unreadable(&e))?;
            for item in groups.iter().map_err(|e| unreadable(&e))? {
                let (k, v) = item.map_err(|e| unreadable(&e))?;
                let (rule, group): (String, Group) = postcard::from_bytes(v.value())
                    .map_err(|e| unreadable(&format!("the group `{}`: {e}", k.value())))?;
                restored.groups.push((k.value().to_owned(), rule, group));
            }
            let silences = txn.open_table(SILENCES).map_err(|e| unreadable(&e))?;
            for item in silences.iter().map_err(|e| unreadable(&e))? {
                let (k, v) = item.map_err(|e| unreadable(&e))?;
                let entry: SilenceEntry = postcard::from_bytes(v.value())
                    .map_err(|e| unreadable(&format!("the silence `{}`: {e}", k.value())))?;
                restored.silences.push(entry);
            }
        }
        txn.commit().map_err(|e| unreadable(&e))?;
        let journal = Self {
            store,
            logged: 0,
            silence_ids: restored.silences.iter().map(|s| s.id.clone()).collect(),
            silence_seq: restored.silence_seq,
            suggestions: restored.suggestions.clone(),
        };
        Ok((journal, restored))
    }

    /// The journal's file.
    pub(crate) fn path(&self) -> &Path {
        self.store.path()
    }

    /// Adds to `changes` the run-time silences (those `journaled` keeps) that differ from
    /// what was saved.
    pub(crate) fn silences(
        &self,
        silences: &[Silence],
        journaled: impl Fn(&Silence) -> bool,
        changes: &mut Changes,
    ) -> Result<()> {
        let now: HashSet<String> = silences
            .iter()
            .filter(|s| journaled(s))
            .map(|s| s.id.clone())
            .collect();
        if now == self.silence_ids {
            return Ok(()); // silences never change but by being added or expiring
        }
        for s in silences.iter().filter(|s| journaled(s)) {
            if !self.silence_ids.contains(&s.id) {
                let value = encode(&SilenceEntry::of(s), "a silence")?;
                changes.silences.push((s.id.clone(), Some(value)));
            }
        }
        for id in self.silence_ids.difference(&now) {
            changes.silences.push((id.clone(), None));
        }
        changes.silence_ids = Some(now);
        Ok(())
    }

    /// Adds the silence id sequence to `changes` if it moved.
    pub(crate) fn silence_seq(&self, seq: u64, changes: &mut Changes) {
        if seq != self.silence_seq {
            changes.silence_seq = Some(seq);
        }
    }

    /// Adds the suggestions to `changes` if they differ from what was saved (they are few:
    /// `max_pending_suggestions`).
    pub(crate) fn suggestions<'a>(
        &self,
        now: impl ExactSizeIterator<Item = &'a Suggestion> + Clone,
        changes: &mut Changes,
    ) -> Result<()> {
        if now.len() == self.suggestions.len() && now.clone().eq(self.suggestions.iter()) {
            return Ok(());
        }
        let now: Vec<Suggestion> = now.cloned().collect();
        let value = serde_json::to_vec(&now).map_err(|e| Error::Action {
            action: "decision".into(),
            message: format!("the decision journal cannot encode suggestions: {e}"),
            retryable: false,
        })?;
        changes.suggestions = Some((value, now));
        Ok(())
    }

    /// Queues `changes` as one log entry, made durable by the next
    /// [sync](StateStore::sync). On error nothing of it is queued.
    pub(crate) fn commit(&mut self, changes: Changes) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let entry = LogEntryRef {
            alerts: &changes.alerts,
            groups: &changes.groups,
            silences: &changes.silences,
            silence_seq: changes.silence_seq,
            suggestions: changes.suggestions.as_ref().map(|(v, _)| v.as_slice()),
        };
        let entry = encode(&entry, "a journal entry")?;
        let key = self.logged;
        let folds = key + 1 >= FOLD_EVERY;
        self.store.write(LogAppend { key, entry, folds });
        self.logged = if folds { 0 } else { key + 1 };
        if let Some(ids) = changes.silence_ids {
            self.silence_ids = ids;
        }
        if let Some(seq) = changes.silence_seq {
            self.silence_seq = seq;
        }
        if let Some((_, now)) = changes.suggestions {
            self.suggestions = now;
        }
        Ok(())
    }
}

/// One commit, queued in the state file: a log entry, and the fold that may follow it.
#[derive(Debug)]
struct LogAppend {
    key: u64,
    entry: Vec<u8>,
    folds: bool,
}

impl StateWrite for LogAppend {
    fn part(&self) -> &'static str {
        "journal"
    }

    fn apply(&self, txn: &redb::WriteTransaction) -> std::result::Result<(), redb::Error> {
        txn.open_table(LOG)?
            .insert(self.key, self.entry.as_slice())?;
        if self.folds {
            fold(txn)?;
        }
        Ok(())
    }
}

/// Applies the log's entries, in order, to the keyed tables (the latest value of each key
/// only), and empties the log.
fn fold(txn: &redb::WriteTransaction) -> std::result::Result<(), redb::Error> {
    let mut log = txn.open_table(LOG)?;
    if log.is_empty()? {
        return Ok(());
    }
    let mut alerts: HashMap<(String, u64), Put> = HashMap::new();
    let mut groups: HashMap<String, Put> = HashMap::new();
    let mut silences: HashMap<String, Put> = HashMap::new();
    let (mut silence_seq, mut suggestions) = (None, None);
    for item in log.iter()? {
        let (key, value) = item?;
        let entry: LogEntry = postcard::from_bytes(value.value()).map_err(|e| {
            redb::StorageError::Io(std::io::Error::other(format!(
                "journal log entry {}: {e}",
                key.value()
            )))
        })?;
        alerts.extend(entry.alerts);
        groups.extend(entry.groups);
        silences.extend(entry.silences);
        silence_seq = entry.silence_seq.or(silence_seq);
        suggestions = entry.suggestions.or(suggestions);
    }
    {
        let mut table = txn.open_table(ALERTS)?;
        for ((rule, series), value) in &alerts {
            let key = (rule.as_str(), *series);
            match value {
                Some(v) => drop(table.insert(key, v.as_slice())?),
                None => drop(table.remove(key)?),
            }
        }
    }
    for (definition, entries) in [(GROUPS, &groups), (SILENCES, &silences)] {
        let mut table = txn.open_table(definition)?;
        for (key, value) in entries {
            match value {
                Some(v) => drop(table.insert(key.as_str(), v.as_slice())?),
                None => drop(table.remove(key.as_str())?),
            }
        }
    }
    let mut meta = txn.open_table(META)?;
    if let Some(seq) = silence_seq {
        meta.insert("silence_seq", seq.to_le_bytes().as_slice())?;
    }
    if let Some(value) = &suggestions {
        meta.insert("suggestions", value.as_slice())?;
    }
    log.retain(|_, _| false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence(id: &str) -> Silence {
        let config = SilenceConfig {
            matchers: [("host".to_owned(), "web-1".to_owned())].into(),
            created_by: "ops".into(),
            comment: String::new(),
            starts_at: None,
            ends_at: None,
            duration: Some(std::time::Duration::from_secs(60)),
        };
        Silence::new(id.into(), config, 0, std::time::Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn what_is_committed_is_read_back_and_deletions_stick() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, restored) = Journal::open(StateStore::open(dir.path()).unwrap()).unwrap();
        assert!(restored.alerts.is_empty() && restored.groups.is_empty());
        let mode = std::fs::metadata(journal.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let firing = AlertState::default();
        let mut changes = Changes::default();
        changes.alert("cpu", 7, Some(&firing)).unwrap();
        changes.alert("cpu", 8, Some(&firing)).unwrap();
        let silences = [silence("silence-1"), silence("static-1")];
        journal
            .silences(&silences, |s| s.id.starts_with("silence-"), &mut changes)
            .unwrap();
        journal.silence_seq(1, &mut changes);
        journal.commit(changes).unwrap();

        let mut changes = Changes::default();
        journal
            .silences(&silences, |s| s.id.starts_with("silence-"), &mut changes)
            .unwrap();
        journal.silence_seq(1, &mut changes);
        journal
            .suggestions(Vec::<Suggestion>::new().iter(), &mut changes)
            .unwrap();
        assert!(changes.is_empty(), "unchanged parts are not written again");
        changes.alert("cpu", 8, None).unwrap();
        journal.commit(changes).unwrap();
        drop(journal);

        let (journal, restored) = Journal::open(StateStore::open(dir.path()).unwrap()).unwrap();
        let alerts: Vec<_> = restored
            .alerts
            .iter()
            .map(|(r, s, _)| (r.as_str(), *s))
            .collect();
        assert_eq!(alerts, [("cpu", 7)]);
        assert_eq!(restored.alerts[0].2, firing);
        assert_eq!(restored.silence_seq, 1);
        assert_eq!(
            restored.silences.len(),
            1,
            "static silences are not journaled"
        );
        assert_eq!(restored.silences[0], SilenceEntry::of(&silences[0]));
        let mut changes = Changes::default();
        journal
            .silences(&[], |s| s.id.starts_with("silence-"), &mut changes)
            .unwrap();
        assert_eq!(
            changes.silences,
            [("silence-1".to_owned(), None)],
            "expired"
        );
    }

    #[test]
    fn a_journal_of_another_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        drop(Journal::open(StateStore::open(dir.path()).unwrap()).unwrap());
        let db = redb::Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format", [FORMAT + 1].as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        let e = Journal::open(StateStore::open(dir.path()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(FILE_NAME) && e.contains("format 2"), "{e}");
    }
}
