//! Rate limits: a token bucket per receiver and one over all receivers. A notification goes
//! only when both have a token, and then takes one from each: a notification held back by one
//! limit never spends the other's budget.

use std::sync::Mutex;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Deliver, Guard, Guarded, Hold, Outcome, Request};
use crate::error::Result;

/// `rate_limit = { per_minute = N }`: a token bucket refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Executions per minute, with a burst of the same size.
    pub per_minute: u32,
}

#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    at_ms: i64,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit, now_ms: i64) -> Self {
        let capacity = f64::from(limit.per_minute.max(1));
        Self {
            per_ms: capacity / 60_000.0,
            capacity,
            tokens: capacity,
            at_ms: now_ms,
        }
    }

    /// Whether a token is available at `now_ms`, without taking it.
    pub(crate) fn has_token(&self, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        (self.tokens + elapsed * self.per_ms).min(self.capacity) >= 1.0
    }

    pub(crate) fn try_take(&mut self, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A bucket that may not be configured.
pub(crate) type Bucket = Mutex<Option<TokenBucket>>;

/// Holds a notification back (as an overflow) when the receiver's bucket or the global one
/// is empty at `now_ms`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateLimitLayer<'b> {
    /// The receiver's own limit.
    pub(crate) own: &'b Bucket,
    /// The limit over all receivers.
    pub(crate) global: &'b Bucket,
    /// When the notification is decided.
    pub(crate) now_ms: i64,
}

impl Guard for RateLimitLayer<'_> {}

impl RateLimitLayer<'_> {
    /// Takes a token from both buckets, or from neither and says which was empty.
    fn take(&self) -> Option<&'static str> {
        let now = self.now_ms;
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        let own_ok = own.as_ref().is_none_or(|b| b.has_token(now));
        let global_ok = global.as_ref().is_none_or(|b| b.has_token(now));
        if !own_ok {
            return Some("the receiver's rate limit is reached");
        }
        if !global_ok {
            return Some("the global rate limit is reached");
        }
        for bucket in [own.as_mut(), global.as_mut()].into_iter().flatten() {
            bucket.try_take(now);
        }
        None
    }
}

impl<S: Deliver> Deliver for Guarded<RateLimitLayer<'_>, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            if let Some(reason) = self.guard.take() {
                return Ok(Outcome::Held(Hold::overflow("rate_limited", reason)));
            }
            self.inner.deliver(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Layer;
    use super::super::testing::*;
    use super::*;
    use crate::decision::AlertStatus;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(RateLimit { per_minute: 2 }, 0);
        assert!(b.try_take(0) && b.try_take(0));
        assert!(!b.try_take(1000));
        assert!(b.try_take(30_000), "one token per 30 s");
        assert!(!b.try_take(30_001));
    }

    fn bucket(per_minute: u32) -> Bucket {
        Mutex::new(Some(TokenBucket::new(RateLimit { per_minute }, 0)))
    }

    fn tokens(b: &Bucket, now_ms: i64) -> bool {
        b.lock().unwrap().as_ref().unwrap().has_token(now_ms)
    }

    #[tokio::test]
    async fn both_limits_are_checked_before_either_is_spent() {
        let n = notification(AlertStatus::Firing);
        let script = Script::default();
        let (own, global) = (bucket(1), bucket(2));
        let layer = |now_ms| RateLimitLayer {
            own: &own,
            global: &global,
            now_ms,
        };
        let first = layer(0).layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(first.unwrap(), Outcome::Delivered("ok".into()));
        let second = layer(1).layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(
            second.unwrap(),
            Outcome::Held(Hold::overflow(
                "rate_limited",
                "the receiver's rate limit is reached"
            ))
        );
        assert_eq!(script.calls().len(), 1);
        assert!(tokens(&global, 1), "the global token was not spent");

        // The global bucket empty, the receiver's full: held, and the receiver's kept.
        let (own, global) = (bucket(5), bucket(1));
        let layer = RateLimitLayer {
            own: &own,
            global: &global,
            now_ms: 0,
        };
        layer
            .layer(&script)
            .deliver(Request::new(&n))
            .await
            .unwrap();
        let held = layer.layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(
            held.unwrap(),
            Outcome::Held(Hold::overflow(
                "rate_limited",
                "the global rate limit is reached"
            ))
        );
        let mut own = own.lock().unwrap();
        let own = own.as_mut().unwrap();
        assert!((0..4).all(|_| own.try_take(0)), "four of five tokens left");
    }

    #[tokio::test]
    async fn no_limit_passes_everything() {
        let n = notification(AlertStatus::Firing);
        let script = Script::default();
        let (own, global) = (Mutex::new(None), Mutex::new(None));
        let layer = RateLimitLayer {
            own: &own,
            global: &global,
            now_ms: 0,
        };
        for _ in 0..100 {
            layer
                .layer(&script)
                .deliver(Request::new(&n))
                .await
                .unwrap();
        }
        assert_eq!(script.calls().len(), 100);
    }
}
