//! The engine: rules over each scored batch, the dispatcher's groups, the ticker that sends
//! what falls due later, and the [`Action`] the pipeline runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::audit::{AuditLog, AuditRecord, Rotation};
use super::config::{DecisionConfig, IdempotencyBackend};
use super::dispatch::{CapTrip, Dispatcher, Inhibit, Silence, SilenceConfig};
use super::guard::rate_limit::Bucket;
use super::guard::{
    CircuitBreaker, FileIdempotency, IdempotencyStore, MemoryIdempotency, TokenBucket,
};
use super::journal::{Changes, Journal, Restored};
use super::outbox::{Chain, Outbox, OutboxEntry};
use super::receiver::{Receiver, ReceiverConfig};
use super::rule::{AlertState, Phase, Rule, RuleConfig, Transition};
use super::store::StateStore;
use super::{AlertRecord, AlertStatus, Clock, Notification, NotificationKind, SystemClock};
use crate::action::{Action, ActionInput, Alert};
use crate::dead_letter::{DeadLetterSink, JsonlDeadLetters, LogDeadLetters};
use crate::error::{Error, Result};
use crate::schema::{MetricsColumns, ScoreColumns};

/// One receiver with its guards.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) config: ReceiverConfig,
    pub(super) receiver: Box<dyn Receiver>,
    /// The receiver's rate limit.
    pub(super) bucket: Bucket,
    /// The receiver's circuit breaker.
    pub(super) breaker: Mutex<Option<CircuitBreaker>>,
}

/// A suggested remediation waiting for a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    /// The notification it came from.
    pub notification: String,
    /// The receiver (command) that would run.
    pub receiver: String,
    /// What would run.
    pub plan: Value,
    /// When it was suggested, ms.
    pub at_ms: i64,
}

/// Counters of the engine's outcomes.
#[derive(Debug, Default)]
pub struct DecisionStats {
    /// Notifications delivered (including to fallbacks).
    pub delivered: AtomicU64,
    /// Notifications held back by a guard, a silence or inhibition.
    pub held_back: AtomicU64,
    /// Notifications dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Delivery attempts that failed.
    pub failed_attempts: AtomicU64,
    /// Alerts not grouped because their rule had opened `max_new_groups_per_minute` groups
    /// in the minute.
    pub over_group_cap: AtomicU64,
    /// Suggestions dropped from a full queue (`max_pending_suggestions`).
    pub suggestions_dropped: AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct EngineState {
    alerts: rustc_hash::FxHashMap<(usize, u64), AlertState>,
    dispatcher: Dispatcher,
    /// Oldest first, at most `max_pending_suggestions`.
    pub(super) suggestions: VecDeque<Suggestion>,
    silence_seq: u64,
    /// Notifications whose execution failed before it was recorded (the audit log or the key
    /// store failed); the ticker tries them again.
    pub(super) pending: Vec<Notification>,
    /// Alert states changed since the journal last saved them (kept only with a journal).
    changed_alerts: rustc_hash::FxHashSet<(usize, u64)>,
}

/// The id prefix of silences added at run time (static ones are rebuilt from the config at
/// start, so only these are journaled).
const RUNTIME_SILENCE: &str = "silence-";

/// The decision layer as a pipeline action. See the [module docs](crate::decision).
#[derive(Debug)]
pub struct DecisionEngine {
    inner: Arc<Inner>,
    ticker: Mutex<
        Option<(
            tokio::task::JoinHandle<()>,
            tokio_util::sync::CancellationToken,
        )>,
    >,
}

#[derive(Debug)]
pub(super) struct Inner {
    rules: Vec<Rule>,
    rule_configs: Vec<RuleConfig>,
    pub(super) slots: HashMap<String, Slot>,
    state: Mutex<EngineState>,
    pub(super) audit: AuditLog,
    pub(super) idempotency: Arc<dyn IdempotencyStore>,
    pub(super) idempotency_ttl: Duration,
    pub(super) clock: Arc<dyn Clock>,
    max_silence: Duration,
    tick: Option<Duration>,
    pub(super) stats: DecisionStats,
    /// The rate limit over all receivers.
    pub(super) global_bucket: Bucket,
    /// One lock per (receiver, group): a group's notifications reach a receiver in order.
    pub(super) delivery_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `[decision] max_pending_suggestions`.
    pub(super) max_pending_suggestions: usize,
    /// The state file (`state_dir`) of the journal and the outbox: its sync makes both
    /// durable, one fsync shared by the batches waiting for it.
    store: Option<Arc<StateStore>>,
    /// The decision journal (`state_dir`); held while a commit is collected and written, so
    /// commits reach the file in the order their changes were taken.
    journal: Option<Mutex<Journal>>,
    /// Held from deciding (rules, groups) until what was decided is in the outbox, and by
    /// each journal commit: a commit never carries the decisions of a concurrent batch whose
    /// notifications are not in the outbox yet (a crash then would lose them, the batch's
    /// redelivery finding them already decided).
    decide: Mutex<()>,
    /// Every notification from when it is due until its receiver accepted it.
    pub(super) outbox: Outbox,
    /// Where notifications that finally failed go, whole.
    pub(super) dead_letters: Arc<dyn DeadLetterSink>,
    /// `[decision] max_delivery_age`.
    pub(super) max_delivery_age: Duration,
}

/// Options of [`DecisionEngine::with_options`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// Run the background ticker that sends notifications falling due later.
    pub ticker: bool,
    /// Use this idempotency store instead of the configured one.
    pub idempotency: Option<Arc<dyn IdempotencyStore>>,
    /// The pipeline's `[redis]` connection, for Redis receivers and the Redis key store.
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis::RedisConnection>,
    /// The pipeline's dead-letter output, for notifications that finally failed. Without
    /// it they go to `dead-letters.jsonl` in `state_dir`, or to the log.
    pub dead_letters: Option<Arc<dyn DeadLetterSink>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            ticker: true,
            idempotency: None,
            #[cfg(feature = "redis")]
            redis: None,
            dead_letters: None,
        }
    }
}

fn config_error(message: String) -> Error {
    Error::Action {
        action: "decision".into(),
        message,
        retryable: false,
    }
}

impl DecisionEngine {
    /// An engine for `config` on the system clock.
    pub fn new(config: DecisionConfig) -> Result<Self> {
        Self::with_options(config, EngineOptions::default())
    }

    /// An engine for `config` with `options`.
    pub fn with_options(config: DecisionConfig, options: EngineOptions) -> Result<Self> {
        let problems = config.problems();
        if let Some(e) = problems.iter().next() {
            return Err(config_error(format!("decision.{}: {}", e.path, e.message)));
        }
        let now = options.clock.now_ms();
        #[cfg(feature = "redis")]
        let redis_ref = options.redis.as_ref();
        #[cfg(not(feature = "redis"))]
        let redis_ref: Option<&super::receiver::PipelineRedis> = None;
        let mut slots = HashMap::new();
        for r in &config.receivers {
            let receiver = r
                .settings
                .build(&config.build_context(r, redis_ref))
                .map_err(config_error)?;
            slots.insert(
                r.name.clone(),
                Slot {
                    config: r.clone(),
                    receiver,
                    bucket: Mutex::new(r.guards.rate_limit.map(|l| TokenBucket::new(l, now))),
                    breaker: Mutex::new(r.guards.circuit_breaker.map(CircuitBreaker::new)),
                },
            );
        }
        let rules = config
            .rules
            .iter()
            .cloned()
            .map(Rule::new)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(config_error)?;
        let idempotency: Arc<dyn IdempotencyStore> = match options.idempotency {
            Some(store) => store,
            None => match config.idempotency.store {
                IdempotencyBackend::Memory => Arc::new(MemoryIdempotency::default()),
                IdempotencyBackend::File => {
                    Arc::new(FileIdempotency::open(&config.idempotency.path, now)?)
                }
                IdempotencyBackend::Redis => {
                    #[cfg(feature = "redis")]
                    {
                        Arc::new(super::guard::RedisIdempotency::new(
                            options.redis.clone().unwrap_or_default(),
                            config.idempotency.key_prefix.clone(),
                        ))
                    }
                    #[cfg(not(feature = "redis"))]
                    return Err(config_error("this build has no Redis support".into()));
                }
            },
        };
        let audit = match &config.audit_log {
            Some(path) => AuditLog::open_with(
                path,
                Rotation {
                    max_bytes: config.audit_max_bytes,
                    keep: config.audit_keep,
                },
            )?,
            None => AuditLog::in_memory(),
        };
        let mut state = EngineState::default();
        let store = config
            .state_dir
            .as_deref()
            .map(StateStore::open)
            .transpose()?;
        let journal = match &store {
            Some(store) => {
                let (mut journal, restored) = Journal::open(Arc::clone(store))?;
                let records = restore(&mut state, &mut journal, restored, &config, now)?;
                store.sync_blocking()?;
                audit.write(&records)?;
                state.dispatcher.track_changes = true;
                Some(Mutex::new(journal))
            }
            None => None,
        };
        // Restored groups fall due (group_wait, a resolution) without waiting for a batch.
        let resume_groups = state.dispatcher.has_groups();
        state.dispatcher.max_new_groups_per_minute = config.max_new_groups_per_minute;
        for c in &config.inhibits {
            state
                .dispatcher
                .inhibits
                .push(Inhibit::new(c).map_err(config_error)?);
        }
        for (i, s) in config.silences.iter().enumerate() {
            // Numbered by position (not by the shared sequence, which a journal restores).
            let id = format!("static-{}", i + 1);
            state
                .dispatcher
                .silences
                .push(Silence::new(id, s.clone(), now, config.max_silence).map_err(config_error)?);
        }
        let outbox = Outbox::open(store.clone(), config.outbox.clone())?;
        let dead_letters: Arc<dyn DeadLetterSink> = match (options.dead_letters, &config.state_dir)
        {
            (Some(sink), _) => sink,
            (None, Some(dir)) => Arc::new(JsonlDeadLetters::open(dir.join("dead-letters.jsonl"))?),
            (None, None) => Arc::new(LogDeadLetters),
        };
        let engine = Self {
            inner: Arc::new(Inner {
                rule_configs: config.rules.clone(),
                rules,
                slots,
                state: Mutex::new(state),
                audit,
                idempotency,
                idempotency_ttl: config.idempotency.ttl,
                clock: options.clock,
                max_silence: config.max_silence,
                tick: options.ticker.then_some(config.tick),
                stats: DecisionStats::default(),
                global_bucket: Mutex::new(config.rate_limit.map(|l| TokenBucket::new(l, now))),
                delivery_locks: Mutex::default(),
                max_pending_suggestions: config.max_pending_suggestions,
                store,
                journal,
                decide: Mutex::default(),
                outbox,
                dead_letters,
                max_delivery_age: config.max_delivery_age,
            }),
            ticker: Mutex::new(None),
        };
        // Deliveries a restart interrupted resume without waiting for a batch.
        if (resume_groups || !engine.inner.outbox.entries().is_empty())
            && tokio::runtime::Handle::try_current().is_ok()
        {
            engine.ensure_ticker();
        }
        Ok(engine)
    }

    /// Notifications waiting in the delivery outbox (due, or failed and waiting for their
    /// next try), oldest first.
    pub fn undelivered(&self) -> Vec<OutboxEntry> {
        self.inner.outbox.entries()
    }

    /// The state file of the decision journal and the delivery outbox, when the state is
    /// durable (`state_dir`).
    pub fn journal_path(&self) -> Option<PathBuf> {
        self.inner.store.as_ref().map(|s| s.path().to_owned())
    }

    /// Durable commits (fsyncs) of the state file so far: one per round of batches that
    /// waited together, not one per batch.
    pub fn state_syncs(&self) -> u64 {
        self.inner.store.as_ref().map_or(0, |s| s.syncs())
    }

    /// Sends the notifications due now; returns how many went out (or were held back).
    pub async fn tick(&self) -> Result<usize> {
        self.inner.tick(false).await
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Outcome counters.
    pub fn stats(&self) -> &DecisionStats {
        &self.inner.stats
    }

    /// Alerts firing now (notified or waiting for their group).
    pub fn firing(&self) -> Vec<AlertRecord> {
        self.inner.lock().dispatcher.firing()
    }

    /// Remediations suggested and waiting for a person.
    pub fn suggestions(&self) -> Vec<Suggestion> {
        self.inner.lock().suggestions.iter().cloned().collect()
    }

    /// Adds a silence; returns its id. Its end is capped at `max_silence`. With a journal
    /// (`state_dir`) the silence is saved before this returns: an error means it was not
    /// added.
    pub fn add_silence(&self, config: SilenceConfig) -> Result<String> {
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.lock();
        state.silence_seq += 1;
        let id = format!("silence-{}", state.silence_seq);
        let silence =
            Silence::new(id.clone(), config, now, self.inner.max_silence).map_err(config_error)?;
        let mut record = AuditRecord::new("decision", "silence_added");
        record.reason = format!(
            "by {}: {}",
            silence.config.created_by, silence.config.comment
        );
        record.details =
            json!({ "id": id, "matchers": silence.config.matchers, "ends_ms": silence.ends_ms });
        state.dispatcher.silences.push(silence);
        drop(state);
        // Durable before it returns (one fsync on this thread: a person's action, rare).
        let saved = self.inner.persist().and_then(|()| match &self.inner.store {
            Some(store) => store.sync_blocking(),
            None => Ok(()),
        });
        if let Err(e) = saved {
            self.inner.lock().dispatcher.silences.retain(|s| s.id != id);
            return Err(e);
        }
        self.inner.audit.write(&[record])?;
        Ok(id)
    }

    /// Active and future silences.
    pub fn silences(&self) -> Vec<Silence> {
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.lock();
        state.dispatcher.silences.retain(|s| s.ends_ms > now);
        state.dispatcher.silences.clone()
    }

    fn ensure_ticker(&self) {
        let Some(every) = self.inner.tick else { return };
        let mut ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner());
        if ticker.is_some() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(inner) = inner.upgrade() else { return };
                // Not cancelled while it works: a claimed execution runs to its end.
                if let Err(e) = inner.tick(false).await {
                    tracing::error!("decision: sending due notifications failed: {e}");
                }
            }
        });
        *ticker = Some((handle, stop));
    }
}

/// Aborts a task when dropped (unless taken out first).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

impl Drop for DecisionEngine {
    fn drop(&mut self) {
        if let Some((handle, _)) = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }
}

impl Inner {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the rules over one scored batch; returns the audit records and the
    /// notifications due now.
    fn evaluate(&self, input: &ActionInput) -> Result<(Vec<AuditRecord>, Vec<Notification>)> {
        let batch = &input.batch;
        let Ok(scores) = ScoreColumns::try_new(batch, "decision") else {
            return Ok((Vec::new(), Vec::new())); // not scored: nothing to decide
        };
        let cols = MetricsColumns::try_new(batch, "decision")?;
        let now = self.clock.now_ms();
        let mut records = Vec::new();
        let mut notices = Vec::new();
        let mut due = Vec::new();
        let mut state = self.lock();
        let state = &mut *state;
        for row in 0..batch.num_rows() {
            let metric = cols.metric(row);
            let detector = scores.detector(row);
            let series_id = cols.series_id.value(row);
            let mut labels: Option<BTreeMap<String, String>> = None;
            for (ri, rule) in self.rules.iter().enumerate() {
                let key = (ri, series_id);
                let firing = state.alerts.get(&key).is_some_and(AlertState::is_firing);
                let active = rule.is_active(
                    scores.score.value(row),
                    scores.is_anomaly.value(row),
                    firing,
                );
                if !active && !state.alerts.contains_key(&key) {
                    continue; // the common case: a normal row of a series with no alert
                }
                let labels = labels.get_or_insert_with(|| cols.labels(row).into_iter().collect());
                if !rule.matches(metric, labels, detector) {
                    continue;
                }
                let alert_state = state.alerts.entry(key).or_default();
                let before = (alert_state.phase, alert_state.flapping);
                let transition = alert_state.step_at(&rule.config, cols.ts.value(row), now, active);
                alert_state.seen_ms = now;
                // Flap history only moves with a transition (or by ageing out, which a later
                // step repeats); `seen_ms` is not journaled.
                let changed = transition != Transition::None
                    || before != (alert_state.phase, alert_state.flapping);
                let idle = alert_state.is_idle();
                if idle {
                    state.alerts.remove(&key);
                }
                if (changed || idle) && self.journal.is_some() {
                    state.changed_alerts.insert(key);
                }
                if transition == Transition::None {
                    continue;
                }
                let alert = Alert::at(&cols, &scores, row);
                let (status, starts, ends, outcome) = match transition {
                    Transition::Fired { since } => (AlertStatus::Firing, since, None, "fired"),
                    Transition::StoppedFlapping {
                        firing_since: Some(since),
                        ..
                    } => (AlertStatus::Firing, since, None, "stable"),
                    Transition::Resolved { since, at } => {
                        (AlertStatus::Resolved, since, Some(at), "resolved")
                    }
                    Transition::StoppedFlapping {
                        at,
                        firing_since: None,
                    } => (AlertStatus::Resolved, at, Some(at), "stable"),
                    Transition::StartedFlapping { at } => {
                        (AlertStatus::Firing, at, None, "flapping")
                    }
                    Transition::None => unreachable!("handled above"),
                };
                let record = AlertRecord::new(&rule.config, &alert, status, starts, ends);
                let mut trigger = AuditRecord::new("trigger", outcome);
                trigger.rule = Some(rule.config.name.clone());
                trigger.reason = alert.reason.clone();
                trigger.details = json!({
                    "fingerprint": record.fingerprint,
                    "status": status.as_str(),
                    "labels": record.labels,
                    "value": alert.value,
                    "score": alert.score,
                    "time": alert.time,
                    // Which source, client or partition fed the row: forged data is traced.
                    "origin": input.origin,
                });
                records.push(trigger);
                if let Transition::StartedFlapping { at } = transition {
                    // One notice to the receivers that only notify; no remediation. A muted
                    // alert's notice is muted too.
                    if let Some(m) = state.dispatcher.muted(&record, now) {
                        let (outcome, by) = m.outcome();
                        let mut d = AuditRecord::new("decision", outcome);
                        d.rule = Some(rule.config.name.clone());
                        d.reason = format!("flapping notice {outcome} by {by}");
                        d.details = json!({ "fingerprint": record.fingerprint });
                        records.push(d);
                        continue;
                    }
                    for receiver in &rule.config.receivers {
                        if self
                            .slots
                            .get(receiver)
                            .is_some_and(|s| !s.receiver.is_remediation())
                        {
                            notices.push(Notification::new(
                                receiver,
                                &rule.config.name,
                                &format!("{}:flapping:{}", rule.config.name, record.fingerprint),
                                BTreeMap::from([(
                                    "alertname".to_owned(),
                                    rule.config.name.clone(),
                                )]),
                                vec![record.clone()],
                                at,
                                0,
                                NotificationKind::Flapping,
                            ));
                        }
                    }
                    continue;
                }
                if let Some(alert_state) = state.alerts.get_mut(&key) {
                    // Kept for the staleness sweep: a series that stops reporting resolves.
                    alert_state.record = (status == AlertStatus::Firing).then(|| record.clone());
                }
                let Some(group) = state.dispatcher.update(ri, &rule.config, record, now) else {
                    self.stats.over_group_cap.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if rule.config.group_wait.is_zero() {
                    // Announce now, before a later row of this batch resolves it again.
                    due.extend(state.dispatcher.due_one(&self.rule_configs, &group, now));
                }
            }
        }
        due.extend(state.dispatcher.due(&self.rule_configs, now, false));
        records.extend(dispatch_records(&mut state.dispatcher, &self.stats));
        let global_cap = state.dispatcher.max_new_groups_per_minute;
        for trip in std::mem::take(&mut state.dispatcher.cap_trips) {
            let cap = self.rule_configs[trip.rule]
                .max_new_groups_per_minute
                .unwrap_or(global_cap);
            let (record, escalations) = self.cap_escalation(trip, cap);
            records.push(record);
            due.extend(escalations);
        }
        due.extend(notices);
        Ok((records, due))
    }

    /// The audit record and the escalations of a rule that reached its cap of new groups:
    /// one to each of the rule's receivers that notify people, and to the `escalate_to` of
    /// its remediations.
    fn cap_escalation(&self, trip: CapTrip, cap: u32) -> (AuditRecord, Vec<Notification>) {
        let rule = &self.rule_configs[trip.rule];
        let reason = format!(
            "rule `{}` opened {cap} new alert groups within a minute: further new alerts are \
             counted, not notified one by one, until the minute is over (a flood of new series: \
             a fleet-wide fault, or forged data)",
            rule.name
        );
        let mut record = AuditRecord::new("decision", "group_cap_reached");
        record.rule = Some(rule.name.clone());
        record.reason = reason.clone();
        record.details = json!({
            "max_new_groups_per_minute": cap,
            "window_start_ms": trip.window_start_ms,
            "first_over_cap": { "fingerprint": trip.alert.fingerprint, "labels": trip.alert.labels },
        });
        let mut targets: Vec<&str> = Vec::new();
        for name in &rule.receivers {
            let Some(slot) = self.slots.get(name) else {
                continue;
            };
            let target = if slot.receiver.is_remediation() {
                slot.config.guards.escalate_to.as_deref()
            } else {
                Some(name.as_str())
            };
            if let Some(t) = target.filter(|t| !targets.contains(t)) {
                targets.push(t);
            }
        }
        let escalations = targets
            .into_iter()
            .map(|to| {
                Notification::new(
                    to,
                    &rule.name,
                    &format!("{}:group-cap", rule.name),
                    BTreeMap::from([("alertname".to_owned(), rule.name.clone())]),
                    vec![trip.alert.clone()],
                    trip.window_start_ms,
                    0,
                    NotificationKind::Escalation {
                        failed_receiver: format!("rule {} (max_new_groups_per_minute)", rule.name),
                        reason: reason.clone(),
                    },
                )
            })
            .collect();
        (record, escalations)
    }

    /// Queues what changed since the last commit as one journal commit (nothing without a
    /// journal, or when nothing changed), durable at the next [`Self::sync`]. On error the
    /// changes stay marked, for the next commit.
    pub(super) fn persist(&self) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let _decide = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let mut journal = journal.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.lock();
        let alert_keys: Vec<(usize, u64)> = state.changed_alerts.drain().collect();
        let group_keys: Vec<String> = state.dispatcher.changed_groups.drain().collect();
        let changes = self.changes(&state, &journal, &alert_keys, &group_keys);
        drop(state);
        let result = changes.and_then(|changes| journal.commit(changes));
        if result.is_err() {
            let mut state = self.lock();
            state.changed_alerts.extend(alert_keys);
            state.dispatcher.changed_groups.extend(group_keys);
        }
        result
    }

    /// Makes every journal and outbox change queued so far durable, sharing the fsync with the
    /// batches waiting at the same time.
    pub(super) async fn sync(&self) -> Result<()> {
        match &self.store {
            Some(store) => store.sync().await,
            None => Ok(()),
        }
    }

    /// The journal changes of the alerts `alert_keys` and groups `group_keys` (saved as they
    /// are now, deleted when gone), silences, their sequence and suggestions.
    fn changes(
        &self,
        state: &EngineState,
        journal: &Journal,
        alert_keys: &[(usize, u64)],
        group_keys: &[String],
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        for &(ri, series) in alert_keys {
            let rule = &self.rule_configs[ri].name;
            changes.alert(rule, series, state.alerts.get(&(ri, series)))?;
        }
        for key in group_keys {
            let group = state.dispatcher.group(key);
            let rule = group.map(|g| (self.rule_configs[g.rule()].name.as_str(), g));
            changes.group(key, rule)?;
        }
        journal.silences(
            &state.dispatcher.silences,
            |s| s.id.starts_with(RUNTIME_SILENCE),
            &mut changes,
        )?;
        journal.silence_seq(state.silence_seq, &mut changes);
        journal.suggestions(state.suggestions.iter(), &mut changes)?;
        Ok(changes)
    }

    /// Resolves firing alerts whose series went quiet for `stale_after`, and forgets quiet
    /// alerts that have nothing left to remember.
    fn sweep(&self, state: &mut EngineState, now: i64) -> Vec<AuditRecord> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut stale = Vec::new();
        let track = self.journal.is_some();
        let changed = &mut state.changed_alerts;
        state.alerts.retain(|key, st| {
            let rule = &self.rule_configs[key.0];
            let quiet = now.saturating_sub(st.seen_ms);
            let keep = if let Phase::Firing { active_at, .. } = st.phase {
                let stale_now = !rule.stale_after.is_zero() && quiet >= ms(rule.stale_after);
                if stale_now && let Some(mut record) = st.record.take() {
                    record.status = AlertStatus::Resolved;
                    record.ends_at_ms = Some(active_at);
                    stale.push((key.0, record));
                }
                !stale_now
            } else {
                quiet < ms(rule.flap.window).max(ms(rule.stale_after))
            };
            if !keep && track {
                changed.insert(*key);
            }
            keep
        });
        let mut records = Vec::new();
        for (ri, record) in stale {
            let rule = &self.rule_configs[ri];
            let mut trigger = AuditRecord::new("trigger", "stale");
            trigger.rule = Some(rule.name.clone());
            trigger.reason = format!("no row for {:?}: resolved", rule.stale_after);
            trigger.details = json!({ "fingerprint": record.fingerprint, "status": "resolved", "labels": record.labels });
            records.push(trigger);
            state.dispatcher.update(ri, rule, record, now);
        }
        records
    }

    async fn tick(&self, flush: bool) -> Result<usize> {
        let (chains, n) = {
            let _decide = self.decide.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.clock.now_ms();
            let (due, records) = {
                let mut state = self.lock();
                let mut records = self.sweep(&mut state, now);
                let due = state.dispatcher.due(&self.rule_configs, now, flush);
                records.extend(dispatch_records(&mut state.dispatcher, &self.stats));
                (due, records)
            };
            if let Err(e) = self.audit.write(&records) {
                self.lock().pending.extend(due);
                return Err(e);
            }
            let mut all = std::mem::take(&mut self.lock().pending);
            all.extend(due);
            let n = all.len();
            (self.enqueue_due(all)?, n)
        };
        self.deliver_chains(chains).await?;
        // What the tick changed (groups notified, stale alerts, suggestions), if anything.
        self.persist()?;
        // Failed deliveries whose next try is due, and those a restart interrupted.
        self.send_due().await?;
        self.sync().await?;
        Ok(n)
    }

    /// Puts `notifications` into the delivery outbox (durably); the caller holds the decide
    /// lock and delivers the returned chains after releasing it. What could not enter the
    /// outbox is kept for the ticker, and the error returned.
    fn enqueue_due(&self, notifications: Vec<Notification>) -> Result<Vec<Chain>> {
        let chains = if notifications.is_empty() {
            Vec::new()
        } else {
            let items = notifications.iter().cloned().map(|n| (n, true)).collect();
            match self.enqueue(items) {
                Ok(chains) => chains,
                Err(e) => {
                    self.lock().pending.extend(notifications);
                    return Err(e);
                }
            }
        };
        Ok(chains)
    }
}

/// Puts the journal's state back into `state`: alert states (their staleness counted from
/// now), groups (their `group_wait` still measured from their `created_ms`), run-time
/// silences still active, their id sequence, and suggestions. The state of rules no longer
/// in `config` is dropped from the journal; returns the audit records saying so.
fn restore(
    state: &mut EngineState,
    journal: &mut Journal,
    restored: Restored,
    config: &DecisionConfig,
    now: i64,
) -> Result<Vec<AuditRecord>> {
    let index: HashMap<&str, usize> = config
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    let mut changes = Changes::default();
    // Per removed rule: alert states and groups dropped.
    let mut dropped: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (alerts, groups) = (restored.alerts.len(), restored.groups.len());
    for (rule, series, mut alert) in restored.alerts {
        match index.get(rule.as_str()) {
            Some(&ri) => {
                alert.seen_ms = now;
                state.alerts.insert((ri, series), alert);
            }
            None => {
                changes.alert(&rule, series, None)?;
                dropped.entry(rule).or_default().0 += 1;
            }
        }
    }
    for (key, rule, group) in restored.groups {
        match index.get(rule.as_str()) {
            Some(&ri) => state.dispatcher.restore_group(key, group, ri),
            None => {
                changes.group(&key, None)?;
                dropped.entry(rule).or_default().1 += 1;
            }
        }
    }
    let silences = restored.silences.len();
    for s in restored.silences.into_iter().filter(|s| s.ends_ms > now) {
        let silence =
            Silence::restore(s.id, s.config, s.starts_ms, s.ends_ms).map_err(config_error)?;
        state.dispatcher.silences.push(silence);
    }
    state.silence_seq = restored.silence_seq;
    let suggestions = restored.suggestions.len();
    let skip = suggestions.saturating_sub(config.max_pending_suggestions.max(1));
    state
        .suggestions
        .extend(restored.suggestions.into_iter().skip(skip));
    // Expired silences and suggestions over a lowered cap leave the journal too.
    journal.silences(
        &state.dispatcher.silences,
        |s| s.id.starts_with(RUNTIME_SILENCE),
        &mut changes,
    )?;
    journal.suggestions(state.suggestions.iter(), &mut changes)?;
    journal.commit(changes)?;

    let mut records = Vec::new();
    if alerts + groups + silences + suggestions > 0 {
        let mut r = AuditRecord::new("decision", "state_restored");
        r.reason = format!(
            "restored from {}: {alerts} alert states, {groups} groups, {silences} silences, \
             {suggestions} suggestions",
            journal.path().display()
        );
        r.details = json!({
            "alerts": alerts, "groups": groups, "silences": silences, "suggestions": suggestions,
            "firing": state.alerts.values().filter(|a| a.is_firing()).count(),
        });
        records.push(r);
    }
    for (rule, (alerts, groups)) in dropped {
        let mut r = AuditRecord::new("decision", "state_dropped");
        r.reason = format!(
            "rule `{rule}` is no longer in the config: its {alerts} alert states and {groups} \
             groups from before the restart are dropped (no resolved notification follows them)"
        );
        r.details = json!({ "alerts": alerts, "groups": groups });
        r.rule = Some(rule);
        records.push(r);
    }
    Ok(records)
}

/// Audit records of what the dispatcher decided without notifying: muting that started or
/// ended, and alerts that resolved before anything about them was notified.
fn dispatch_records(dispatcher: &mut Dispatcher, stats: &DecisionStats) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = dispatcher
        .mute_changes
        .drain(..)
        .map(|change| {
            let (outcome, reason) = match &change.muted {
                Some(m) => {
                    stats.held_back.fetch_add(1, Ordering::Relaxed);
                    let (outcome, by) = m.outcome();
                    (outcome, format!("{outcome} by {by}"))
                }
                None => (
                    "unmuted",
                    "no silence or inhibition applies any more".to_owned(),
                ),
            };
            let mut r = AuditRecord::new("decision", outcome);
            r.rule = Some(change.rule);
            r.reason = reason;
            r.details = json!({ "fingerprint": change.fingerprint });
            r
        })
        .collect();
    out.extend(
        dispatcher
            .unannounced
            .drain(..)
            .map(|(rule, group_key, fingerprints)| {
                let mut r = AuditRecord::new("decision", "resolved_before_notified");
                r.rule = Some(rule);
                r.reason =
                    "resolved before a notification announced it (group_wait, or muted)".into();
                r.details = json!({ "group_key": group_key, "fingerprints": fingerprints });
                r
            }),
    );
    out
}

impl Action for DecisionEngine {
    fn name(&self) -> &str {
        "decision"
    }

    fn wants_every_batch(&self) -> bool {
        true // resolving needs the normal rows too
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.ensure_ticker();
            let chains = {
                let _decide = self.inner.decide.lock().unwrap_or_else(|p| p.into_inner());
                let (records, due) = self.inner.evaluate(input)?;
                // Durable before anything is acted on, and before the batch is acknowledged.
                if let Err(e) = self.inner.audit.write(&records) {
                    self.inner.lock().pending.extend(due);
                    return Err(e);
                }
                self.inner.enqueue_due(due)?
            };
            self.inner.deliver_chains(chains).await?;
            // This batch's changes queued as one commit, then durable (with its outbox
            // entries, queued before them) before it is acknowledged; a failure nacks it. A crash before the sync
            // re-decides the batch on its redelivery: the same notifications, with the same
            // ids, which the outbox and the idempotency keys de-duplicate. Not after a failed
            // run: the batch is retried.
            self.inner.persist()?;
            self.inner.sync().await
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((handle, stop)) = ticker {
                stop.cancel();
                // Let a running tick finish its executions; if the pipeline gives up on this
                // shutdown (`shutdown_timeout`), the tick is aborted with it: what it was
                // delivering stays in the outbox and resumes after a restart.
                let mut running = AbortOnDrop(Some(handle));
                if let Some(handle) = running.0.as_mut() {
                    let _ = handle.await;
                }
                running.0 = None;
            }
            // What was decided must not be lost with the process: every pending group goes
            // into the outbox, and out as far as the receivers take it.
            let sent = self.inner.tick(true).await.map(|_| ());
            // Removals of delivered entries, made durable here.
            let synced = self.inner.sync().await;
            sent.and(synced)
        })
    }
}
