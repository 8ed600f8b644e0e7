//! Delivering notifications: each goes into the outbox ([`super::outbox`]) first, durably,
//! then each (receiver, group) chain of the outbox is delivered in order. One delivery is
//! the checks before any guard (remediation only for firing alerts, parameters, the state of
//! the idempotency key, the mode), then the guard layers ([`super::guard`]) around the
//! receiver, the idempotency key claimed innermost, then what follows a failure: the
//! circuit's escalation, the fallback, a retry from the outbox later, or (once the
//! notification is too old, or the failure is permanent) an escalation and a dead letter with
//! the notification's whole body. Every step is in the audit log.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::audit::AuditRecord;
use super::engine::{Inner, Slot, Suggestion};
use super::guard::{
    CircuitBreakerLayer, CooldownLayer, Deliver, Guarantee, Guard, Guarded, IdempotencyLayer,
    KeyState, Outcome, RateLimitLayer, ReceiverService, Request, RetryLayer, Stack, TimeoutLayer,
};
use super::notification::hash_hex;
use super::outbox::{Chain, OutboxEntry};
use super::receiver::ExecutionMode;
use super::{AlertStatus, Notification, NotificationKind};
use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};

/// Bytes of a failure's text an escalation carries: enough for a person to see what went
/// wrong, never a command's whole output in a chat channel (the audit log keeps that).
pub(super) const ESCALATION_TEXT: usize = 4 * 1024;

/// `text` cut to at most `cap` bytes (at a character boundary), with how much was cut.
pub(super) fn cut(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_owned();
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What one pass of a notification through its guards and receiver came to.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pass {
    /// Delivered, deliberately not sent (a cooldown, a duplicate, a blocked plan), or
    /// handed on (a fallback, a dead letter): it leaves the outbox.
    Done,
    /// Not delivered, and worth another try later (a transient failure, an open circuit):
    /// it stays in the outbox.
    Later {
        /// Why.
        reason: String,
        /// How long the receiver asked us to wait.
        retry_after: Option<Duration>,
        /// The failure already told a person (it opened the circuit).
        escalated: bool,
    },
}

impl Inner {
    fn delivery_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .delivery_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key).or_default().clone()
    }

    fn record(&self, kind: &'static str, n: &Notification, outcome: &str) -> AuditRecord {
        let mut r = AuditRecord::new(kind, outcome);
        r.rule = Some(n.rule.clone());
        r.notification = Some(n.id.clone());
        r.receiver = Some(n.receiver.clone());
        r
    }

    /// Delivers the outbox's entries that are due now (retries, and what a restart found).
    pub(super) async fn send_due(&self) -> Result<()> {
        let chains = self.outbox.due_chains(self.clock.now_ms());
        self.deliver_chains(chains).await
    }

    /// Adds notifications to the outbox; returns the chains that got one. One that does not
    /// fit is dead-lettered, with an audit record.
    pub(super) fn enqueue(&self, items: Vec<(Notification, bool)>) -> Result<Vec<Chain>> {
        let enqueued = self.outbox.enqueue(items, self.clock.now_ms())?;
        for n in &enqueued.overflow {
            let reason = format!(
                "the delivery outbox is full (max_entries = {}): dead-lettered instead of \
                 delivered",
                self.outbox.config().max_entries
            );
            let mut r = self.record("decision", n, "outbox_full");
            r.reason = reason.clone();
            self.audit.write(&[r])?;
            self.dead_letter(n, &reason)?;
        }
        Ok(enqueued.chains)
    }

    /// Delivers each chain from its first entry, in order, as far as it goes now: up to an
    /// entry that is not due, being delivered elsewhere, or failed again. The first error is
    /// returned after the other chains ran.
    pub(super) fn deliver_chains(&self, chains: Vec<Chain>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut first_error = None;
            for chain in chains {
                while let Some((seq, entry)) = self.outbox.start(&chain, self.clock.now_ms()) {
                    match self.deliver_entry(seq, entry).await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            first_error.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    /// One pass of outbox entry `seq`; true when it left the outbox. A failure schedules the
    /// next try (backoff), or, past the receiver's `max_delivery_age`, gives it up.
    async fn deliver_entry(&self, seq: u64, entry: OutboxEntry) -> Result<bool> {
        let n = &entry.notification;
        // A notification tried before passed its cooldown then: a retry is not held by it.
        let retry = entry.failures > 0;
        let result = self.execute(n.clone(), entry.may_escalate, retry).await;
        let (reason, retry_after, escalated) = match result {
            Err(e) => {
                self.outbox.release(seq);
                return Err(e);
            }
            Ok(Pass::Done) => {
                self.outbox
                    .finish(seq)
                    .inspect_err(|_| self.outbox.release(seq))?;
                return Ok(true);
            }
            Ok(Pass::Later {
                reason,
                retry_after,
                escalated,
            }) => (reason, retry_after, escalated),
        };
        let now = self.clock.now_ms();
        let max_age = self
            .slots
            .get(&n.receiver)
            .and_then(|s| s.config.guards.max_delivery_age)
            .unwrap_or(self.max_delivery_age);
        let deadline = entry.enqueued_ms.saturating_add(millis(max_age));
        if now >= deadline {
            let age = Duration::from_millis(u64::try_from(now - entry.enqueued_ms).unwrap_or(0));
            let reason = format!(
                "not delivered within max_delivery_age ({}; {} old after {} tries from the \
                 outbox): {reason}",
                humantime::format_duration(max_age),
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                entry.failures + 1,
            );
            self.finally_failed(n, &reason, entry.may_escalate, escalated)
                .await
                .inspect_err(|_| self.outbox.release(seq))?;
            self.outbox
                .finish(seq)
                .inspect_err(|_| self.outbox.release(seq))?;
            return Ok(true);
        }
        let failures = entry.failures + 1;
        let wait = self.outbox.config().backoff(failures, retry_after);
        let next = now.saturating_add(millis(wait)).min(deadline);
        self.outbox
            .retry_at(seq, next, &reason)
            .inspect_err(|_| self.outbox.release(seq))?;
        let mut r = self.record("result", n, "retry_scheduled");
        r.reason = reason;
        r.details = json!({
            "failures": failures,
            "next_attempt_ms": next,
            "enqueued_ms": entry.enqueued_ms,
            "give_up_at_ms": deadline,
        });
        self.audit.write(&[r])?;
        Ok(false)
    }

    /// Sends a notification that another one's outcome made (an escalation, a fallback)
    /// through the outbox, now if its chain allows. It may not escalate again.
    fn send_now(&self, n: Notification) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let chains = self.enqueue(vec![(n, false)])?;
            self.deliver_chains(chains).await
        })
    }

    /// Runs one notification through the guards and its receiver; `retry` when the outbox
    /// tried it before. An error means its outcome could not be recorded (the audit log or
    /// the key store failed): it stays in the outbox.
    pub(super) fn execute<'a>(
        &'a self,
        n: Notification,
        may_escalate: bool,
        retry: bool,
    ) -> BoxFuture<'a, Result<Pass>> {
        Box::pin(async move {
            let Some(slot) = self.slots.get(&n.receiver) else {
                return Ok(Pass::Done); // checked at start-up
            };
            let order = self.delivery_lock(format!("{}|{}", n.receiver, n.group_key));
            let _in_order = order.lock().await;
            let remediation = slot.receiver.is_remediation();
            let now = self.clock.now_ms();
            let key = n.idempotency_key(remediation);
            let fingerprints: Vec<&str> = n.alerts.iter().map(|a| a.fingerprint.as_str()).collect();
            let decision = |outcome: &str, reason: String, details: Value| {
                let mut r = self.record("decision", &n, outcome);
                r.key = Some(key.clone());
                r.reason = reason;
                r.details = json!({
                    "group_key": n.group_key,
                    "fingerprints": fingerprints,
                    "target": slot.receiver.target(),
                    "receiver_type": slot.receiver.kind(),
                    "plan": details,
                });
                r
            };
            if remediation
                && (n.kind != NotificationKind::Alerts || n.status() != AlertStatus::Firing)
            {
                return self.held(decision(
                    "skipped",
                    "remediation runs only for firing alerts".into(),
                    Value::Null,
                ));
            }
            // Parameters: a plan that must not run stops here.
            let plan = match slot.receiver.prepare(&n) {
                Ok(plan) => plan,
                Err(reason) => return self.held(decision("blocked", reason, Value::Null)),
            };
            // A key seen before: a duplicate is not news, spends no guard's budget, and never
            // goes to a fallback. (Only a look: the key is claimed once every guard has let
            // the notification through, below.)
            let duplicate = || {
                decision(
                    "duplicate",
                    "this execution already happened".into(),
                    plan.clone(),
                )
            };
            let mode = slot.receiver.mode();
            let mut resumed = false;
            match self.idempotency.state(&key, now).await? {
                None => {}
                Some(KeyState::Delivered) => return self.held(duplicate()),
                Some(KeyState::Claimed) if remediation && mode == ExecutionMode::Auto => {
                    // At most once: it may have run. A person checks.
                    let reason = "this remediation was started before and its end was never \
                                  recorded (the process stopped while it ran?): not run again \
                                  (at most once per episode); check what it did"
                        .to_owned();
                    self.held(decision("outcome_unknown", reason.clone(), plan))?;
                    self.idempotency
                        .mark_delivered(&key, self.idempotency_ttl, now)
                        .await?;
                    if may_escalate {
                        self.notify_person(&n, slot, &reason).await?;
                    }
                    return Ok(Pass::Done);
                }
                Some(KeyState::Claimed) if remediation || mode != ExecutionMode::Auto => {
                    return self.held(duplicate());
                }
                // At least once: a delivery that did not end is sent again, same key.
                Some(KeyState::Claimed) => resumed = true,
            }
            if mode != ExecutionMode::Auto {
                // Nothing runs, so no guard applies: the key makes the plan recorded (or
                // suggested) once per execution it stands for.
                if !self
                    .idempotency
                    .claim(&key, self.idempotency_ttl, now)
                    .await?
                {
                    return self.held(duplicate());
                }
                let records = if mode == ExecutionMode::DryRun {
                    vec![decision(
                        "dry_run",
                        "mode = dry_run: not executed".into(),
                        plan,
                    )]
                } else {
                    self.suggested(&n, plan, now, &decision)
                };
                self.stats.held_back.fetch_add(1, Ordering::Relaxed);
                self.audit.write(&records)?;
                self.idempotency
                    .mark_delivered(&key, self.idempotency_ttl, now)
                    .await?;
                return Ok(Pass::Done);
            }
            let guards = &slot.config.guards;
            // The cooldown is claimed before the other guards decide (see CooldownLayer); a
            // retry, or a delivery a restart interrupted, claimed it the first time.
            let cooldown = if retry || resumed {
                CooldownLayer::passed()
            } else {
                CooldownLayer::claim(&*self.idempotency, guards.cooldown, &n, now).await?
            };
            let start_reason = if resumed {
                "resumed: a delivery under this key started before and did not finish; sent \
                 again under the same key"
                    .to_owned()
            } else {
                String::new()
            };
            let stack = Stack::new()
                .layer(CircuitBreakerLayer {
                    breaker: &slot.breaker,
                    clock: &*self.clock,
                    now_ms: now,
                })
                .layer(cooldown)
                .layer(RateLimitLayer {
                    own: &slot.bucket,
                    global: &self.global_bucket,
                    now_ms: now,
                })
                .layer(IdempotencyLayer {
                    store: &*self.idempotency,
                    key: &key,
                    ttl: self.idempotency_ttl,
                    now_ms: now,
                    guarantee: if remediation {
                        Guarantee::AtMostOnce
                    } else {
                        Guarantee::AtLeastOnce
                    },
                })
                .layer(AuditStart {
                    inner: self,
                    record: decision("execute", start_reason, plan),
                })
                .layer(RetryLayer::new(guards.retry, remediation))
                .layer(AuditTries {
                    inner: self,
                    key: &key,
                })
                .layer(TimeoutLayer(guards.timeout))
                .service(ReceiverService(&*slot.receiver));
            let to_fallback = may_escalate && guards.fallback.is_some();
            match stack.deliver(Request::new(&n)).await? {
                Outcome::Delivered(_) => Ok(Pass::Done),
                Outcome::Held(hold) => {
                    // A cooldown or a duplicate is a deliberate pause: recorded only. A rate
                    // limit is an overflow: the notification goes to the fallback or the dead
                    // letters. An open circuit sends it to the fallback, or keeps it in the
                    // outbox for when the circuit lets deliveries through again. (A
                    // remediation is just not run, and keeps its key for a later notification
                    // of the episode.)
                    self.held(decision(hold.outcome, hold.reason.clone(), Value::Null))?;
                    if !hold.overflow || remediation {
                        return Ok(Pass::Done);
                    }
                    if hold.outcome == "circuit_open" && !to_fallback {
                        return Ok(Pass::Later {
                            reason: hold.reason,
                            retry_after: None,
                            escalated: false,
                        });
                    }
                    self.give_up(&n, slot, &hold.reason, may_escalate).await?;
                    Ok(Pass::Done)
                }
                Outcome::Failed {
                    error,
                    circuit_opened,
                } => {
                    if circuit_opened {
                        self.escalate(&n, slot, &error.message, may_escalate)
                            .await?;
                    }
                    if remediation || to_fallback {
                        // A remediation is never tried again; a fallback takes it now.
                        self.give_up(&n, slot, &error.message, may_escalate).await?;
                        return Ok(Pass::Done);
                    }
                    if !error.retryable {
                        // It would fail again however long it waits.
                        self.finally_failed(&n, &error.message, may_escalate, circuit_opened)
                            .await?;
                        return Ok(Pass::Done);
                    }
                    Ok(Pass::Later {
                        reason: error.message,
                        retry_after: error.retry_after,
                        escalated: circuit_opened,
                    })
                }
            }
        })
    }

    /// Queues the suggestion of `plan`; returns its audit records (and the dropped oldest
    /// suggestion's, when the queue was full).
    fn suggested(
        &self,
        n: &Notification,
        plan: Value,
        now: i64,
        decision: &dyn Fn(&str, String, Value) -> AuditRecord,
    ) -> Vec<AuditRecord> {
        let dropped = self.suggest(Suggestion {
            notification: n.id.clone(),
            receiver: n.receiver.clone(),
            plan: plan.clone(),
            at_ms: now,
        });
        let mut records = vec![decision(
            "suggested",
            "mode = suggest: waits for a person".into(),
            plan,
        )];
        if let Some(old) = dropped {
            self.stats
                .suggestions_dropped
                .fetch_add(1, Ordering::Relaxed);
            let mut r = AuditRecord::new("decision", "suggestion_dropped");
            r.notification = Some(old.notification.clone());
            r.receiver = Some(old.receiver.clone());
            r.reason = format!(
                "the queue of suggestions is full (max_pending_suggestions = {}): the oldest is \
                 dropped",
                self.max_pending_suggestions
            );
            r.details = json!({ "plan": old.plan, "suggested_at_ms": old.at_ms });
            records.push(r);
        }
        records
    }

    /// Records that `n`'s failure opened its receiver's circuit, and tells the receiver's
    /// person (`escalate_to`), unless `n` is itself an escalation or a fallback.
    async fn escalate(
        &self,
        n: &Notification,
        slot: &Slot,
        last_error: &str,
        may_escalate: bool,
    ) -> Result<()> {
        let mut r = self.record("result", n, "circuit_opened");
        r.reason = last_error.to_owned();
        self.audit.write(&[r])?;
        if may_escalate {
            self.notify_person(n, slot, last_error).await?;
        }
        Ok(())
    }

    /// Sends the receiver's person (`escalate_to`, if any) an escalation about `n`.
    async fn notify_person(&self, n: &Notification, slot: &Slot, reason: &str) -> Result<()> {
        let Some(person) = &slot.config.guards.escalate_to else {
            return Ok(());
        };
        // The audit log has the whole error; a person's channel gets its start.
        let escalation = Notification::new(
            person,
            &n.rule,
            &n.group_key,
            n.group_labels.clone(),
            n.alerts.clone(),
            n.epoch_ms,
            n.sequence,
            NotificationKind::Escalation {
                failed_receiver: n.receiver.clone(),
                reason: cut(reason, ESCALATION_TEXT),
            },
        );
        self.send_now(escalation).await
    }

    /// A notification that will not be delivered: recorded, escalated to the receiver's
    /// person (unless `n` is itself an escalation or a fallback, or its failure escalated
    /// already), and handed to the fallback or dead-lettered.
    async fn finally_failed(
        &self,
        n: &Notification,
        reason: &str,
        may_escalate: bool,
        escalated: bool,
    ) -> Result<()> {
        let Some(slot) = self.slots.get(&n.receiver) else {
            return Ok(());
        };
        let mut r = self.record("result", n, "undeliverable");
        r.reason = reason.to_owned();
        self.audit.write(&[r])?;
        if may_escalate && !escalated {
            self.notify_person(n, slot, reason).await?;
        }
        self.give_up(n, slot, reason, may_escalate).await
    }

    /// Queues `suggestion`; returns the oldest one, dropped when the queue was full.
    fn suggest(&self, suggestion: Suggestion) -> Option<Suggestion> {
        let mut state = self.lock();
        state.suggestions.push_back(suggestion);
        (state.suggestions.len() > self.max_pending_suggestions.max(1))
            .then(|| state.suggestions.pop_front())
            .flatten()
    }

    /// Records a decision not to execute.
    fn held(&self, record: AuditRecord) -> Result<Pass> {
        self.stats.held_back.fetch_add(1, Ordering::Relaxed);
        self.audit.write(&[record])?;
        Ok(Pass::Done)
    }

    /// A notification its receiver could not take: to the fallback, else a dead letter.
    async fn give_up(
        &self,
        n: &Notification,
        slot: &Slot,
        reason: &str,
        may_escalate: bool,
    ) -> Result<()> {
        if let (Some(fallback), true) = (&slot.config.guards.fallback, may_escalate) {
            let mut r = self.record("result", n, "fallback");
            r.reason = format!("to `{fallback}`: {reason}");
            self.audit.write(&[r])?;
            let mut other = n.clone();
            other.receiver = fallback.clone();
            other.id = hash_hex(&format!("{}|fallback|{fallback}", n.id));
            return self.send_now(other).await;
        }
        self.dead_letter(n, reason)
    }

    /// Dead-letters `n` with its whole body (the dead-letter output, then the audit log).
    /// An error means it was not stored: the caller keeps `n`.
    fn dead_letter(&self, n: &Notification, reason: &str) -> Result<()> {
        let body = serde_json::to_string(n)
            .map_err(|e| Error::DeadLetter(format!("encoding notification {}: {e}", n.id)))?;
        let letter = DeadLetter::new(
            "decision",
            format!("receiver {} notification {}", n.receiver, n.id),
            reason,
            body,
        );
        self.dead_letters.send(letter)?;
        self.dead_letters.flush()?;
        let mut r = self.record("result", n, "dead_lettered");
        r.reason = reason.to_owned();
        r.details = serde_json::to_value(n).unwrap_or(Value::Null);
        self.audit.write(&[r])?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::error!(receiver = %n.receiver, notification = %n.id, "notification dead-lettered: {reason}");
        Ok(())
    }
}

/// Records the decision to execute once the guards let a notification through.
struct AuditStart<'e> {
    inner: &'e Inner,
    record: AuditRecord,
}

impl Guard for AuditStart<'_> {}

impl<S: Deliver> Deliver for Guarded<AuditStart<'_>, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let start = std::slice::from_ref(&self.guard.record);
            self.guard.inner.audit.write(start)?;
            self.inner.deliver(request).await
        })
    }
}

/// Records each try (`execution` when it starts, `result` when it ends) and counts
/// deliveries and failed tries.
struct AuditTries<'e> {
    inner: &'e Inner,
    key: &'e str,
}

impl Guard for AuditTries<'_> {}

impl<S: Deliver> Deliver for Guarded<AuditTries<'_>, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let AuditTries { inner, key } = self.guard;
            let n = request.notification;
            let mut exec = inner.record("execution", n, "started");
            exec.key = Some(key.to_owned());
            exec.attempt = Some(request.attempt);
            inner.audit.write(&[exec])?;
            let outcome = self.inner.deliver(request).await?;
            let mut res = inner.record("result", n, "");
            res.key = Some(key.to_owned());
            res.attempt = Some(request.attempt);
            match &outcome {
                Outcome::Delivered(detail) => {
                    res.outcome = "delivered".into();
                    res.details = json!({ "detail": detail });
                    inner.audit.write(&[res])?;
                    inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed { error, .. } => {
                    inner.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    res.outcome = "failed".into();
                    res.reason = error.message.clone();
                    res.details = json!({ "retryable": error.retryable });
                    inner.audit.write(&[res])?;
                }
                Outcome::Held(_) => {} // no guard sits between a try and its receiver
            }
            Ok(outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_at_a_character_boundary_with_a_count() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(3_000); // 6 000 bytes
        let out = cut(&long, ESCALATION_TEXT);
        assert!(out.starts_with(&"é".repeat(2_048)), "{}", &out[..10]);
        assert!(
            out.ends_with("… (1904 bytes cut)"),
            "{}",
            &out[out.len() - 30..]
        );
        assert_eq!(cut("aé", 2), "a… (2 bytes cut)");
    }
}
