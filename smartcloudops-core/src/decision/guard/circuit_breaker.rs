//! A circuit breaker per receiver: after `failures` notifications in a row failed all their
//! tries, the receiver is left alone for `open_for`; then one trial notification goes, and its
//! outcome closes the circuit or opens it again.

use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Deliver, Guard, Guarded, Hold, Outcome, Request};
use crate::decision::Clock;
use crate::error::Result;

/// `circuit_breaker = { failures = K, open_for = "5m" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed deliveries (after their retries) that open the circuit.
    pub failures: u32,
    /// How long an open circuit stops the receiver; then one trial delivery is let through.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
}

fn default_open_for() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: i64,
    },
    /// `open_for` passed: one trial delivery is out.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    config: CircuitBreakerConfig,
    circuit: Circuit,
}

impl CircuitBreaker {
    pub(crate) fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            circuit: Circuit::Closed { failures: 0 },
        }
    }

    /// Whether a delivery may go now: always while closed; once `open_for` has passed, one
    /// trial (the circuit is half-open until its outcome is recorded); never while open.
    pub(crate) fn try_pass(&mut self, now_ms: i64) -> bool {
        match self.circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until_ms } if now_ms >= until_ms => {
                self.circuit = Circuit::HalfOpen;
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => false,
        }
    }

    /// Gives back a trial that produced no outcome (a cooldown or rate limit held it, or an
    /// error stopped it before the receiver answered): the next delivery is the trial.
    /// Without this, a half-open circuit would wait for an outcome that never comes.
    pub(crate) fn release_trial(&mut self, now_ms: i64) {
        if self.circuit == Circuit::HalfOpen {
            self.circuit = Circuit::Open { until_ms: now_ms };
        }
    }

    /// Records a delivery's outcome; true when this failure opened the circuit (a failed
    /// trial opens it again). Failures that were in flight while it opened change nothing.
    pub(crate) fn record(&mut self, ok: bool, now_ms: i64) -> bool {
        let open_ms = i64::try_from(self.config.open_for.as_millis()).unwrap_or(i64::MAX);
        let open = Circuit::Open {
            until_ms: now_ms.saturating_add(open_ms),
        };
        match (self.circuit, ok) {
            (_, true) => {
                self.circuit = Circuit::Closed { failures: 0 };
                false
            }
            (Circuit::Closed { failures }, false)
                if failures + 1 >= self.config.failures.max(1) =>
            {
                self.circuit = open;
                true
            }
            (Circuit::Closed { failures }, false) => {
                self.circuit = Circuit::Closed {
                    failures: failures + 1,
                };
                false
            }
            (Circuit::HalfOpen, false) => {
                self.circuit = open;
                true
            }
            (Circuit::Open { .. }, false) => false,
        }
    }
}

/// Holds a notification back (as an overflow) while the receiver's circuit is open, and
/// records the outcome of each one it lets through (timed by `clock`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CircuitBreakerLayer<'b> {
    /// The receiver's breaker, if it has one.
    pub(crate) breaker: &'b Mutex<Option<CircuitBreaker>>,
    /// Times the outcomes.
    pub(crate) clock: &'b dyn Clock,
    /// When the notification is decided.
    pub(crate) now_ms: i64,
}

impl Guard for CircuitBreakerLayer<'_> {}

impl CircuitBreakerLayer<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut CircuitBreaker) -> T) -> Option<T> {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.as_mut().map(f)
    }
}

impl<S: Deliver> Deliver for Guarded<CircuitBreakerLayer<'_>, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            if self.guard.with(|b| b.try_pass(self.guard.now_ms)) == Some(false) {
                return Ok(Outcome::Held(Hold::overflow(
                    "circuit_open",
                    "the receiver's circuit is open after repeated failures",
                )));
            }
            let result = self.inner.deliver(request).await;
            let Ok(mut outcome) = result else {
                self.guard
                    .with(|b| b.release_trial(self.guard.clock.now_ms()));
                return result;
            };
            match &mut outcome {
                Outcome::Delivered(_) => {
                    self.guard
                        .with(|b| b.record(true, self.guard.clock.now_ms()));
                }
                Outcome::Failed { circuit_opened, .. } => {
                    *circuit_opened = self
                        .guard
                        .with(|b| b.record(false, self.guard.clock.now_ms()))
                        .unwrap_or(false);
                }
                Outcome::Held(_) => {
                    self.guard
                        .with(|b| b.release_trial(self.guard.clock.now_ms()));
                }
            }
            Ok(outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Layer;
    use super::super::testing::*;
    use super::*;
    use crate::decision::{AlertStatus, ManualClock};

    /// One notification through a breaker layer around `script`, decided at `now_ms`.
    async fn through_breaker(
        breaker: &Mutex<Option<CircuitBreaker>>,
        clock: &ManualClock,
        script: &Script,
        n: &crate::decision::Notification,
        now_ms: i64,
    ) -> Outcome {
        let layer = CircuitBreakerLayer {
            breaker,
            clock,
            now_ms,
        };
        layer.layer(script).deliver(Request::new(n)).await.unwrap()
    }

    #[test]
    fn breaker_opens_after_k_failures_and_lets_one_trial_through_after_open_for() {
        let mut c = CircuitBreaker::new(CircuitBreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(60),
        });
        assert!(c.try_pass(0));
        assert!(!c.record(false, 0) && !c.record(false, 1));
        assert!(c.record(false, 2), "the third failure opens it");
        assert!(
            !c.record(false, 3),
            "a failure in flight does not open it again"
        );
        assert!(!c.try_pass(30_000));
        assert!(c.try_pass(60_002), "half-open: one trial");
        assert!(!c.try_pass(60_003), "and only one");
        assert!(c.record(false, 60_004), "a failed trial opens it again");
        assert!(!c.try_pass(60_005));
        assert!(c.try_pass(120_010));
        assert!(!c.record(true, 120_011), "a good trial closes it");
        assert!(c.try_pass(120_012) && c.try_pass(120_013));
    }

    #[tokio::test]
    async fn the_layer_opens_on_failures_holds_while_open_and_closes_on_a_good_trial() {
        let n = notification(AlertStatus::Firing);
        let clock = ManualClock::at(0);
        let breaker = Mutex::new(Some(CircuitBreaker::new(CircuitBreakerConfig {
            failures: 2,
            open_for: Duration::from_secs(60),
        })));
        let script = Script::new([transient("a"), transient("b"), transient("c")]);
        let deliver = |now_ms| through_breaker(&breaker, &clock, &script, &n, now_ms);
        assert_eq!(deliver(0).await, transient("a"));
        let opened = deliver(0).await;
        assert_eq!(
            opened,
            Outcome::Failed {
                error: crate::decision::receiver::DeliveryError::transient("b"),
                circuit_opened: true
            }
        );
        assert!(
            matches!(deliver(30_000).await, Outcome::Held(h) if h.outcome == "circuit_open" && h.overflow)
        );
        assert_eq!(script.calls().len(), 2, "nothing reached the receiver");
        clock.advance(Duration::from_secs(60));
        assert!(
            matches!(
                deliver(60_000).await,
                Outcome::Failed {
                    circuit_opened: true,
                    ..
                }
            ),
            "a failed trial opens it again"
        );
        clock.advance(Duration::from_secs(60));
        assert_eq!(deliver(120_000).await, Outcome::Delivered("ok".into()));
        assert_eq!(deliver(120_001).await, Outcome::Delivered("ok".into()));
    }

    #[test]
    fn a_trial_without_an_outcome_is_given_back() {
        let mut c = CircuitBreaker::new(CircuitBreakerConfig {
            failures: 1,
            open_for: Duration::from_secs(60),
        });
        assert!(c.record(false, 0));
        assert!(c.try_pass(60_000), "the trial");
        c.release_trial(60_001);
        assert!(
            c.try_pass(60_002),
            "held back, so the next one is the trial"
        );
        assert!(!c.try_pass(60_003), "and still only one");
        c.release_trial(60_004);
        c.release_trial(60_005);
        assert!(c.try_pass(60_006));
        assert!(!c.record(true, 60_007));
        c.release_trial(60_008);
        assert!(c.try_pass(60_009), "a closed circuit stays closed");
    }

    #[tokio::test]
    async fn a_trial_held_further_in_does_not_leave_the_circuit_half_open() {
        let n = notification(AlertStatus::Firing);
        let clock = ManualClock::at(0);
        let breaker = Mutex::new(Some(CircuitBreaker::new(CircuitBreakerConfig {
            failures: 1,
            open_for: Duration::from_secs(60),
        })));
        let held = Outcome::Held(Hold::overflow("rate_limited", "over the limit"));
        let script = Script::new([
            transient("a"),
            held.clone(),
            Outcome::Delivered("ok".into()),
        ]);
        let deliver = |now_ms| through_breaker(&breaker, &clock, &script, &n, now_ms);
        assert!(matches!(
            deliver(0).await,
            Outcome::Failed {
                circuit_opened: true,
                ..
            }
        ));
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            deliver(60_000).await,
            held,
            "the trial, held by a rate limit"
        );
        assert_eq!(
            deliver(60_001).await,
            Outcome::Delivered("ok".into()),
            "the next notification is the trial, and it closes the circuit"
        );
    }

    #[tokio::test]
    async fn without_a_breaker_everything_passes() {
        let n = notification(AlertStatus::Firing);
        let clock = ManualClock::at(0);
        let none = Mutex::new(None);
        let script = Script::new([transient("a"), transient("b"), transient("c")]);
        for _ in 0..3 {
            let layer = CircuitBreakerLayer {
                breaker: &none,
                clock: &clock,
                now_ms: 0,
            };
            let outcome = layer.layer(&script).deliver(Request::new(&n)).await;
            assert!(matches!(
                outcome.unwrap(),
                Outcome::Failed {
                    circuit_opened: false,
                    ..
                }
            ));
        }
    }
}
