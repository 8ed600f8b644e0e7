//! Retries of failed tries, by error class: a permanent error (most 4xx) is never retried, a
//! transient one (5xx, 408, 429, timeouts) after an exponential backoff with full jitter or
//! the `Retry-After` the receiver asked for.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Deliver, Guard, Guarded, Outcome, Request};
use crate::error::Result;

/// How a receiver retries a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the second try; doubles per try, with full jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between tries (also caps a `Retry-After`).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `attempt` (1-based): a `Retry-After` the receiver
    /// asked for (capped), else a random wait up to the exponential backoff (full jitter:
    /// retries of many failures spread out instead of arriving together).
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_backoff);
        }
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Tries up to `attempts` times under `policy`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryLayer {
    policy: RetryPolicy,
    attempts: u32,
}

impl RetryLayer {
    /// Tries per `policy`; a remediation (`once`) is tried once: running it again could do
    /// twice what was asked once.
    pub(crate) fn new(policy: RetryPolicy, once: bool) -> Self {
        let attempts = if once { 1 } else { policy.attempts.max(1) };
        Self { policy, attempts }
    }
}

impl Guard for RetryLayer {}

impl<S: Deliver> Deliver for Guarded<RetryLayer, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                let outcome = self.inner.deliver(Request { attempt, ..request }).await?;
                let Outcome::Failed { error, .. } = &outcome else {
                    return Ok(outcome);
                };
                if !error.retryable || attempt >= self.guard.attempts {
                    return Ok(outcome);
                }
                tokio::time::sleep(self.guard.policy.backoff(attempt, error.retry_after)).await;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Layer;
    use super::super::testing::*;
    use super::*;
    use crate::decision::AlertStatus;
    use crate::decision::receiver::DeliveryError;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let p = RetryPolicy {
            attempts: 10,
            ..policy(10)
        };
        for attempt in 1..10 {
            assert!(p.backoff(attempt, None) <= Duration::from_secs(1));
        }
        assert_eq!(
            p.backoff(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_tried_again_until_one_succeeds() {
        let script = Script::new([transient("500"), transient("500")]);
        let retry = RetryLayer::new(policy(3), false).layer(&script);
        let n = notification(AlertStatus::Firing);
        let outcome = retry.deliver(Request::new(&n)).await.unwrap();
        assert_eq!(outcome, Outcome::Delivered("ok".into()));
        assert_eq!(script.calls(), [1, 2, 3], "each try knows its number");
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_failure_is_returned_after_all_tries() {
        let script = Script::new([transient("a"), transient("b"), transient("c")]);
        let retry = RetryLayer::new(policy(2), false).layer(&script);
        let n = notification(AlertStatus::Firing);
        let outcome = retry.deliver(Request::new(&n)).await.unwrap();
        assert_eq!(outcome, transient("b"));
        assert_eq!(script.calls().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_and_remediations_are_tried_once() {
        let permanent = Outcome::failed(DeliveryError::permanent("HTTP 400"));
        let script = Script::new([permanent.clone()]);
        let n = notification(AlertStatus::Firing);
        let retry = RetryLayer::new(policy(5), false).layer(&script);
        assert_eq!(retry.deliver(Request::new(&n)).await.unwrap(), permanent);
        assert_eq!(script.calls().len(), 1);

        let script = Script::new([transient("timed out")]);
        let once = RetryLayer::new(policy(5), true).layer(&script);
        assert_eq!(
            once.deliver(Request::new(&n)).await.unwrap(),
            transient("timed out")
        );
        assert_eq!(script.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_sets_the_wait() {
        let asked = Outcome::failed(DeliveryError {
            retry_after: Some(Duration::from_millis(700)),
            ..DeliveryError::transient("HTTP 429")
        });
        let script = Script::new([asked]);
        let retry = RetryLayer::new(policy(2), false).layer(&script);
        let n = notification(AlertStatus::Firing);
        let start = tokio::time::Instant::now();
        retry.deliver(Request::new(&n)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(700));
    }
}
