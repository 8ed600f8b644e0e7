//! The delivery outbox: every notification the engine makes due, kept from before the batch
//! that made it due is acknowledged until its receiver accepted it (`[decision.outbox]`).
//!
//! - **Durable before the ack.** Each notification is written to the outbox (in the
//!   state file `state_dir/decision.redb`, one commit per batch) before it is
//!   delivered, and is durable (the shared fsync) before the pipeline acknowledges its batch.
//!   A crash between a delivery and that fsync re-decides the batch on its redelivery: the
//!   same notification, under the same `Idempotency-Key`. Without a state directory the
//!   outbox lives in memory: the same retries, but nothing survives a restart.
//! - **Removed once accepted.** An entry leaves the outbox when its receiver accepted it, a
//!   guard deliberately held it back (a cooldown, a duplicate), or it was handed on (to the
//!   receiver's fallback, or the dead letters). A crash or a shutdown cut short leaves it in
//!   the outbox, and the engine resumes it after the restart under the same
//!   `Idempotency-Key`.
//! - **Retried with backoff.** A delivery that failed all its tries (or met an open circuit)
//!   stays, and is tried again by the ticker after an exponential backoff with jitter
//!   (`initial_backoff`, doubling, at most `max_backoff`, or the receiver's `Retry-After`),
//!   until it is `max_delivery_age` old (`[decision]`, or the receiver's own). Then it is
//!   escalated to the receiver's `escalate_to` and dead-lettered with its whole body.
//! - **In order.** The notifications of one group to one receiver are delivered in the order
//!   they were made: a later one waits until the one before it left the outbox.
//! - **Bounded.** At most `max_entries` notifications wait; one more is dead-lettered (whole,
//!   with an audit record), never dropped silently.
//!
//! Removing a delivered entry is made durable by the next sync (the batch's, the tick's, or
//! at shutdown): a crash may leave a delivered entry behind, and it is sent again under the
//! same idempotency key, which the key store then recognises as delivered.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Notification;
use super::store::{StateStore, StateWrite, unreadable};
use crate::error::{Error, Problems, Result};

/// Entries by sequence number (the order they were made): JSON of [`OutboxEntry`].
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// `[decision.outbox]`: how many notifications may wait, and how retries back off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Most notifications waiting for delivery; one more is dead-lettered.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Wait before the first retry of a failed delivery; doubles per failure, with jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between two retries (also caps a receiver's `Retry-After`).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_max_entries() -> usize {
    10_000
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl OutboxConfig {
    /// Problems of these settings (paths relative to `[decision.outbox]`).
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.max_entries == 0 {
            out.push_hint(
                "max_entries",
                "must be at least 1",
                "the default, 10000, holds a long outage of a busy receiver",
            );
        }
        if self.initial_backoff.is_zero() {
            out.push("initial_backoff", "must be longer than 0");
        }
        if self.max_backoff < self.initial_backoff {
            out.push("max_backoff", "must be at least `initial_backoff`");
        }
        out
    }

    /// The wait after the `failures`-th failed delivery (1-based): the exponential backoff
    /// with equal jitter (between half of it and all of it: retries of many notifications
    /// spread out, and none comes back at once), or longer when the receiver asked for it
    /// (`Retry-After`); never more than `max_backoff`.
    pub fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let jittered = ceiling / 2 + (ceiling / 2).mul_f64(rand::random::<f64>());
        jittered
            .max(retry_after.unwrap_or_default())
            .min(self.max_backoff)
    }
}

/// One notification waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The notification, whole.
    pub notification: Notification,
    /// Whether its failure may go to the receiver's fallback or `escalate_to` (false for
    /// escalations and fallbacks themselves).
    pub may_escalate: bool,
    /// When it entered the outbox (ms, the engine's clock); its age counts from here.
    pub enqueued_ms: i64,
    /// Deliveries that failed so far.
    pub failures: u32,
    /// Not tried again before this time (ms).
    pub next_attempt_ms: i64,
    /// The last failure.
    pub last_error: Option<String>,
}

impl OutboxEntry {
    /// The (receiver, group) whose notifications are delivered in order.
    fn chain(&self) -> Chain {
        (
            self.notification.receiver.clone(),
            self.notification.group_key.clone(),
        )
    }
}

/// A receiver and a group: the notifications of one chain are delivered in order.
pub(crate) type Chain = (String, String);

/// What [`Outbox::enqueue`] did.
#[derive(Debug, Default)]
pub(crate) struct Enqueued {
    /// The chains of the notifications given (new, or already waiting).
    pub(crate) chains: Vec<Chain>,
    /// Notifications already waiting (the same id): not added again, but their chain is in
    /// `chains` (a redelivered batch delivers what it made, and a restart interrupted).
    pub(crate) already: usize,
    /// Notifications that did not fit (`max_entries`), for the dead letters.
    pub(crate) overflow: Vec<Notification>,
}

#[derive(Debug, Default)]
struct Entries {
    next_seq: u64,
    by_seq: BTreeMap<u64, OutboxEntry>,
    /// Notification id → sequence number.
    ids: HashMap<String, u64>,
    /// Each chain's entries, oldest first.
    chains: HashMap<Chain, BTreeSet<u64>>,
    /// Entries being delivered now.
    in_flight: HashSet<u64>,
}

impl Entries {
    fn insert(&mut self, seq: u64, entry: OutboxEntry) {
        self.ids.insert(entry.notification.id.clone(), seq);
        self.chains.entry(entry.chain()).or_default().insert(seq);
        self.by_seq.insert(seq, entry);
        self.next_seq = self.next_seq.max(seq + 1);
    }

    fn remove(&mut self, seq: u64) -> Option<OutboxEntry> {
        let entry = self.by_seq.remove(&seq)?;
        self.ids.remove(&entry.notification.id);
        self.in_flight.remove(&seq);
        let chain = entry.chain();
        if let Some(seqs) = self.chains.get_mut(&chain) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.chains.remove(&chain);
            }
        }
        Some(entry)
    }

    /// The first entry of `chain`, when it is due at `now_ms` and nobody delivers it now.
    fn due_head(&self, chain: &Chain, now_ms: i64) -> Option<u64> {
        let seq = *self.chains.get(chain)?.first()?;
        let entry = self.by_seq.get(&seq)?;
        (entry.next_attempt_ms <= now_ms && !self.in_flight.contains(&seq)).then_some(seq)
    }
}

/// The outbox. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Outbox {
    config: OutboxConfig,
    store: Option<Arc<StateStore>>,
    entries: Mutex<Entries>,
}

impl Outbox {
    /// An outbox in `store`, holding what it held before; in memory without `store`.
    pub(crate) fn open(store: Option<Arc<StateStore>>, config: OutboxConfig) -> Result<Self> {
        let mut entries = Entries::default();
        if let Some(store) = &store {
            for (seq, entry) in load(store)? {
                entries.insert(seq, entry);
            }
        }
        Ok(Self {
            config,
            store,
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings.
    pub(crate) fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Notifications waiting, oldest first.
    pub(crate) fn entries(&self) -> Vec<OutboxEntry> {
        self.lock().by_seq.values().cloned().collect()
    }

    /// Adds `notifications` (with whether each may escalate), due now, in one commit (durable
    /// at the next [sync](StateStore::sync)). A notification already waiting is not added twice; those beyond
    /// `max_entries` are returned as overflow. An error means none was added.
    pub(crate) fn enqueue(
        &self,
        notifications: Vec<(Notification, bool)>,
        now_ms: i64,
    ) -> Result<Enqueued> {
        let mut entries = self.lock();
        let mut out = Enqueued::default();
        let mut fresh: Vec<(u64, OutboxEntry)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (notification, may_escalate) in notifications {
            if entries.ids.contains_key(&notification.id) || !seen.insert(notification.id.clone()) {
                let chain = (notification.receiver, notification.group_key);
                if !out.chains.contains(&chain) {
                    out.chains.push(chain);
                }
                out.already += 1;
                continue;
            }
            if entries.by_seq.len() + fresh.len() >= self.config.max_entries {
                out.overflow.push(notification);
                continue;
            }
            let seq = entries.next_seq + fresh.len() as u64;
            fresh.push((
                seq,
                OutboxEntry {
                    notification,
                    may_escalate,
                    enqueued_ms: now_ms,
                    failures: 0,
                    next_attempt_ms: now_ms,
                    last_error: None,
                },
            ));
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        if let Some(store) = &self.store {
            // Written before the entries are visible: a failed commit adds nothing.
            write(store, fresh.iter().map(|(s, e)| (*s, Some(e))))?;
        }
        for (seq, entry) in fresh {
            let chain = entry.chain();
            if !out.chains.contains(&chain) {
                out.chains.push(chain);
            }
            entries.insert(seq, entry);
        }
        Ok(out)
    }

    /// Takes the first entry of `chain` for delivery, when it is due and nobody delivers it
    /// now; the caller then [`finish`](Self::finish)es, [`retry_at`](Self::retry_at) or
    /// [`release`](Self::release)s it.
    pub(crate) fn start(&self, chain: &Chain, now_ms: i64) -> Option<(u64, OutboxEntry)> {
        let mut entries = self.lock();
        let seq = entries.due_head(chain, now_ms)?;
        let entry = entries.by_seq.get(&seq)?.clone();
        entries.in_flight.insert(seq);
        Some((seq, entry))
    }

    /// The chains whose first entry is due at `now_ms` and not being delivered.
    pub(crate) fn due_chains(&self, now_ms: i64) -> Vec<Chain> {
        let entries = self.lock();
        let mut chains: Vec<(u64, Chain)> = entries
            .chains
            .keys()
            .filter_map(|c| entries.due_head(c, now_ms).map(|seq| (seq, c.clone())))
            .collect();
        chains.sort(); // the oldest first
        chains.into_iter().map(|(_, c)| c).collect()
    }

    /// Removes entry `seq`: delivered, or handed on.
    pub(crate) fn finish(&self, seq: u64) -> Result<()> {
        let mut entries = self.lock();
        if let Some(store) = &self.store {
            write(store, [(seq, None)])?;
        }
        entries.remove(seq);
        Ok(())
    }

    /// Entry `seq` failed again: it is tried again at `next_attempt_ms`.
    pub(crate) fn retry_at(&self, seq: u64, next_attempt_ms: i64, error: &str) -> Result<()> {
        let mut entries = self.lock();
        entries.in_flight.remove(&seq);
        let Some(entry) = entries.by_seq.get_mut(&seq) else {
            return Ok(());
        };
        entry.failures = entry.failures.saturating_add(1);
        entry.next_attempt_ms = next_attempt_ms;
        entry.last_error = Some(error.to_owned());
        if let Some(store) = &self.store {
            write(store, [(seq, Some(&*entry))])?;
        }
        Ok(())
    }

    /// Gives entry `seq` back unchanged (its delivery stopped on an error of ours).
    pub(crate) fn release(&self, seq: u64) {
        self.lock().in_flight.remove(&seq);
    }
}

/// The entries `store` holds, in order.
fn load(store: &StateStore) -> Result<Vec<(u64, OutboxEntry)>> {
    let unreadable = |e: &dyn std::fmt::Display| unreadable(store.path(), e);
    let txn = store.begin_read_at_start()?;
    let mut loaded = Vec::new();
    {
        let table = txn.open_table(ENTRIES).map_err(|e| unreadable(&e))?;
        for row in table.iter().map_err(|e| unreadable(&e))? {
            let (seq, value) = row.map_err(|e| unreadable(&e))?;
            let entry: OutboxEntry = serde_json::from_slice(value.value())
                .map_err(|e| unreadable(&format!("outbox entry {}: {e}", seq.value())))?;
            loaded.push((seq.value(), entry));
        }
    }
    txn.commit().map_err(|e| unreadable(&e))?;
    Ok(loaded)
}

/// Queues writes (`Some`) and deletions (`None`) of entries, made durable by the next
/// [sync](StateStore::sync).
fn write<'a>(
    store: &StateStore,
    changes: impl IntoIterator<Item = (u64, Option<&'a OutboxEntry>)>,
) -> Result<()> {
    let changes = changes
        .into_iter()
        .map(|(seq, entry)| {
            let bytes = entry
                .map(serde_json::to_vec)
                .transpose()
                .map_err(|e| Error::Action {
                    action: "decision".into(),
                    message: format!("the outbox cannot encode entry {seq}: {e}"),
                    retryable: false,
                })?;
            Ok((seq, bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    store.write(OutboxWrite(changes));
    Ok(())
}

/// Outbox entries to write (`Some`, JSON) or delete (`None`), queued in the state file.
#[derive(Debug)]
struct OutboxWrite(Vec<(u64, Option<Vec<u8>>)>);

impl StateWrite for OutboxWrite {
    fn part(&self) -> &'static str {
        "outbox"
    }

    fn apply(&self, txn: &redb::WriteTransaction) -> std::result::Result<(), redb::Error> {
        let mut table = txn.open_table(ENTRIES)?;
        for (seq, bytes) in &self.0 {
            match bytes {
                Some(bytes) => drop(table.insert(*seq, bytes.as_slice())?),
                None => drop(table.remove(*seq)?),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::guard::testing::notification;
    use crate::decision::{AlertStatus, NotificationKind};

    fn numbered(group: &str, sequence: u32) -> Notification {
        let n = notification(AlertStatus::Firing);
        Notification::new(
            "hook",
            "cpu",
            group,
            n.group_labels,
            n.alerts,
            0,
            sequence,
            NotificationKind::Alerts,
        )
    }

    fn config(max_entries: usize) -> OutboxConfig {
        OutboxConfig {
            max_entries,
            ..OutboxConfig::default()
        }
    }

    fn chain(group: &str) -> Chain {
        ("hook".into(), group.into())
    }

    #[test]
    fn entries_survive_a_reopen_in_order_with_their_retry_state() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(Some(StateStore::open(dir.path()).unwrap()), config(10)).unwrap();
        let added = outbox
            .enqueue(vec![(numbered("g", 1), true), (numbered("g", 2), true)], 5)
            .unwrap();
        assert_eq!(added.chains, [chain("g")]);
        let (first, _) = outbox.start(&chain("g"), 5).unwrap();
        outbox.retry_at(first, 1_000, "HTTP 503").unwrap();
        drop(outbox);

        let reopened =
            Outbox::open(Some(StateStore::open(dir.path()).unwrap()), config(10)).unwrap();
        let entries = reopened.entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].notification, numbered("g", 1));
        assert_eq!(entries[0].failures, 1);
        assert_eq!(entries[0].next_attempt_ms, 1_000);
        assert_eq!(entries[0].last_error.as_deref(), Some("HTTP 503"));
        assert_eq!(entries[0].enqueued_ms, 5);
        assert_eq!(entries[1].notification, numbered("g", 2));
        assert!(
            reopened.start(&chain("g"), 999).is_none(),
            "the head waits for its retry time, and the second waits behind it"
        );
        let (seq, entry) = reopened.start(&chain("g"), 1_000).unwrap();
        assert_eq!(entry.notification.sequence, 1);
        reopened.finish(seq).unwrap();
        drop(reopened);
        let again = Outbox::open(Some(StateStore::open(dir.path()).unwrap()), config(10)).unwrap();
        assert_eq!(
            again.entries().len(),
            1,
            "the finished one is gone for good"
        );
    }

    #[test]
    fn a_chain_is_delivered_in_order_and_one_delivery_at_a_time() {
        let outbox = Outbox::open(None, config(10)).unwrap();
        outbox
            .enqueue(
                vec![
                    (numbered("a", 1), true),
                    (numbered("b", 1), true),
                    (numbered("a", 2), true),
                ],
                0,
            )
            .unwrap();
        assert_eq!(outbox.due_chains(0), [chain("a"), chain("b")]);
        let (a1, entry) = outbox.start(&chain("a"), 0).unwrap();
        assert_eq!(entry.notification.sequence, 1);
        assert!(outbox.start(&chain("a"), 0).is_none(), "a1 is in flight");
        assert_eq!(outbox.due_chains(0), [chain("b")]);
        outbox.release(a1);
        let (a1, _) = outbox.start(&chain("a"), 0).unwrap();
        outbox.finish(a1).unwrap();
        let (_, entry) = outbox.start(&chain("a"), 0).unwrap();
        assert_eq!(entry.notification.sequence, 2);
    }

    #[test]
    fn a_notification_is_kept_once_and_the_bound_overflows() {
        let outbox = Outbox::open(None, config(2)).unwrap();
        let first = outbox
            .enqueue(vec![(numbered("g", 1), true), (numbered("g", 1), true)], 0)
            .unwrap();
        assert_eq!((first.already, outbox.entries().len()), (1, 1));
        let again = outbox
            .enqueue(
                vec![
                    (numbered("g", 1), true),
                    (numbered("g", 2), true),
                    (numbered("g", 3), true),
                ],
                0,
            )
            .unwrap();
        assert_eq!(again.already, 1, "a redelivered batch's notification");
        assert_eq!(
            again.chains,
            [chain("g")],
            "whose chain is delivered all the same"
        );
        assert_eq!(again.overflow, [numbered("g", 3)]);
        assert_eq!(outbox.entries().len(), 2);
    }

    #[test]
    fn backoff_doubles_with_jitter_within_its_bounds() {
        let c = OutboxConfig {
            max_entries: 1,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let first = c.backoff(1, None);
            assert!((Duration::from_secs(5)..=Duration::from_secs(10)).contains(&first));
            let third = c.backoff(3, None);
            assert!((Duration::from_secs(20)..=Duration::from_secs(40)).contains(&third));
            assert!(c.backoff(30, None) <= Duration::from_secs(60));
        }
        assert_eq!(
            c.backoff(1, Some(Duration::from_secs(45))),
            Duration::from_secs(45)
        );
        assert_eq!(
            c.backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn settings_that_cannot_work_are_problems() {
        let bad = OutboxConfig {
            max_entries: 0,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        };
        let paths: Vec<String> = bad.problems().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["max_entries", "initial_backoff"]);
        let inverted = OutboxConfig {
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(1),
            ..OutboxConfig::default()
        };
        assert_eq!(
            inverted.problems().into_iter().next().unwrap().path,
            "max_backoff"
        );
        assert!(OutboxConfig::default().problems().is_empty());
    }
}
