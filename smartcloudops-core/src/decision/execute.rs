//! Executing one notification on one receiver: the checks before any guard (remediation only
//! for firing alerts, parameters, a key already claimed, the mode), then the guard layers
//! ([`super::guard`]) around the receiver, the idempotency key claimed innermost, then what
//! follows a failure: the circuit's escalation, the fallback or a dead letter. Every step is
//! in the audit log.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::audit::AuditRecord;
use super::engine::{Inner, Slot, Suggestion};
use super::guard::{
    CircuitBreakerLayer, CooldownLayer, Deliver, Guard, Guarded, IdempotencyLayer, Outcome,
    RateLimitLayer, ReceiverService, Request, RetryLayer, Stack, TimeoutLayer,
};
use super::notification::hash_hex;
use super::receiver::ExecutionMode;
use super::{AlertStatus, Notification, NotificationKind};
use crate::error::Result;

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

    /// Runs one notification through the guards and its receiver. An error means it could
    /// not even be dead-lettered (the audit log failed).
    pub(super) fn execute<'a>(
        &'a self,
        n: Notification,
        may_escalate: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(slot) = self.slots.get(&n.receiver) else {
                return Ok(()); // checked at start-up
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
            // A key claimed before: a duplicate is not news, spends no guard's budget, and
            // never goes to a fallback. (Only a look: the key is claimed once every guard
            // has let the notification through, below.)
            let duplicate = || {
                decision(
                    "duplicate",
                    "this execution already happened".into(),
                    plan.clone(),
                )
            };
            if self.idempotency.is_claimed(&key, now).await? {
                return self.held(duplicate());
            }
            let mode = slot.receiver.mode();
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
                if mode == ExecutionMode::DryRun {
                    return self.held(decision(
                        "dry_run",
                        "mode = dry_run: not executed".into(),
                        plan,
                    ));
                }
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
                        "the queue of suggestions is full (max_pending_suggestions = {}): the \
                         oldest is dropped",
                        self.max_pending_suggestions
                    );
                    r.details = json!({ "plan": old.plan, "suggested_at_ms": old.at_ms });
                    records.push(r);
                }
                self.stats.held_back.fetch_add(1, Ordering::Relaxed);
                return self.audit.write(&records);
            }
            let guards = &slot.config.guards;
            // The cooldown is claimed before the other guards decide (see CooldownLayer).
            let cooldown =
                CooldownLayer::claim(&*self.idempotency, guards.cooldown, &n, now).await?;
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
                })
                .layer(AuditStart {
                    inner: self,
                    record: decision("execute", String::new(), plan),
                })
                .layer(RetryLayer::new(guards.retry, remediation))
                .layer(AuditTries {
                    inner: self,
                    key: &key,
                })
                .layer(TimeoutLayer(guards.timeout))
                .service(ReceiverService(&*slot.receiver));
            match stack.deliver(Request::new(&n)).await? {
                Outcome::Delivered(_) => Ok(()),
                Outcome::Held(hold) => {
                    // A cooldown or a duplicate is a deliberate pause: recorded only. An open
                    // circuit or a rate limit is an overflow: the notification goes to the
                    // fallback or the dead letters (a remediation is just not run, and keeps
                    // its key for a later notification of the episode).
                    self.held(decision(hold.outcome, hold.reason.clone(), Value::Null))?;
                    if !hold.overflow || remediation {
                        return Ok(());
                    }
                    self.give_up(&n, slot, &hold.reason, may_escalate).await
                }
                Outcome::Failed {
                    error,
                    circuit_opened,
                } => {
                    if circuit_opened {
                        self.escalate(&n, slot, &error.message, may_escalate)
                            .await?;
                    }
                    self.give_up(&n, slot, &error.message, may_escalate).await
                }
            }
        })
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
        if let (Some(person), true) = (&slot.config.guards.escalate_to, may_escalate) {
            // The audit log has the whole error; a person's channel gets its start.
            let last_error = cut(last_error, ESCALATION_TEXT);
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
                    reason: last_error,
                },
            );
            self.execute(escalation, false).await?;
        }
        Ok(())
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
    fn held(&self, record: AuditRecord) -> Result<()> {
        self.stats.held_back.fetch_add(1, Ordering::Relaxed);
        self.audit.write(&[record])
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
            return self.execute(other, false).await;
        }
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
