//! Guards around every execution, as layers around a receiver: a circuit breaker, a
//! cooldown, rate limits, the idempotency key, retries with error classification and a
//! timeout per try (each in its module, with the idempotency stores in [`idempotency`]).
//!
//! A guard is a `Layer` that wraps a `Deliver` (a receiver, or guards around one) in
//! another `Deliver`, as tower's layers wrap services. The engine stacks them, outer first:
//!
//! ```text
//! circuit breaker → cooldown → rate limit → idempotency → (audit: execute) → retry → (audit: each try) → timeout → receiver
//! ```
//!
//! so an open circuit is the first reason given, a cooldown or a rate limit never spends the
//! other's budget, the idempotency key is claimed only by a notification that every other
//! guard let through (a rate-limited remediation keeps its key and runs later in the same
//! episode, once the limit allows), the retries happen inside one pass of the breaker (it
//! counts a notification that failed all its tries as one failure), and the timeout bounds
//! each try. A guard that holds a notification back answers `Outcome::Held` without calling
//! inward.

pub mod circuit_breaker;
pub mod cooldown;
pub mod idempotency;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use futures::future::BoxFuture;

pub use self::circuit_breaker::CircuitBreakerConfig;
pub(crate) use self::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer};
pub(crate) use self::cooldown::CooldownLayer;
#[cfg(feature = "redis")]
pub use self::idempotency::RedisIdempotency;
pub use self::idempotency::{FileIdempotency, IdempotencyStore, KeyState, MemoryIdempotency};
pub(crate) use self::idempotency::{Guarantee, IdempotencyLayer};
pub use self::rate_limit::RateLimit;
pub(crate) use self::rate_limit::{RateLimitLayer, TokenBucket};
pub(crate) use self::retry::RetryLayer;
pub use self::retry::RetryPolicy;
pub(crate) use self::timeout::TimeoutLayer;
use super::Notification;
use super::receiver::{DeliveryError, Receiver};
use crate::error::Result;

/// One try of one notification.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// What is delivered.
    pub(crate) notification: &'a Notification,
    /// The try (1-based); set by the retry layer, 1 above it.
    pub(crate) attempt: u32,
}

impl<'a> Request<'a> {
    /// The first try of `notification`.
    pub(crate) fn new(notification: &'a Notification) -> Self {
        Self {
            notification,
            attempt: 1,
        }
    }
}

/// Why a guard held a notification back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hold {
    /// The audit outcome, e.g. `rate_limited`.
    pub(crate) outcome: &'static str,
    /// Why, in words.
    pub(crate) reason: String,
    /// An overflow (the notification goes to the fallback or the dead letters) rather than
    /// a deliberate pause (recorded only).
    pub(crate) overflow: bool,
}

impl Hold {
    /// The receiver cannot take it now: fallback or dead letter.
    pub(crate) fn overflow(outcome: &'static str, reason: impl Into<String>) -> Self {
        Self {
            outcome,
            reason: reason.into(),
            overflow: true,
        }
    }

    /// Deliberately not sent: recorded only.
    pub(crate) fn pause(outcome: &'static str, reason: impl Into<String>) -> Self {
        Self {
            outcome,
            reason: reason.into(),
            overflow: false,
        }
    }
}

/// What came of a delivery through the guards.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Delivered; what the receiver said happened.
    Delivered(String),
    /// Failed (the last try's error).
    Failed {
        /// The error.
        error: DeliveryError,
        /// This failure opened the receiver's circuit.
        circuit_opened: bool,
    },
    /// A guard held it back.
    Held(Hold),
}

impl Outcome {
    /// A failure that opened nothing (yet).
    pub(crate) fn failed(error: DeliveryError) -> Self {
        Self::Failed {
            error,
            circuit_opened: false,
        }
    }
}

/// Delivers a notification: a receiver, or guards around one. An `Err` is not a failed
/// delivery but a failure to record one (the audit log or the key store): the caller keeps
/// the notification for later.
pub(crate) trait Deliver: Send + Sync {
    /// Delivers `request`.
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>>;
}

/// Wraps a [`Deliver`] in a guard.
pub(crate) trait Layer<S> {
    /// The guarded service.
    type Service: Deliver;
    /// `inner` behind this guard.
    fn layer(self, inner: S) -> Self::Service;
}

/// A guard's settings and state, put in front of a service as a [`Layer`]; what it does is
/// its [`Deliver`] impl for [`Guarded`].
pub(crate) trait Guard {}

/// A guard in front of a service.
#[derive(Debug)]
pub(crate) struct Guarded<G, S> {
    /// The guard.
    pub(crate) guard: G,
    /// What it guards.
    pub(crate) inner: S,
}

impl<G: Guard, S> Layer<S> for G
where
    Guarded<G, S>: Deliver,
{
    type Service = Guarded<G, S>;
    fn layer(self, inner: S) -> Guarded<G, S> {
        Guarded { guard: self, inner }
    }
}

/// A receiver as the innermost [`Deliver`].
#[derive(Debug)]
pub(crate) struct ReceiverService<'r>(pub(crate) &'r dyn Receiver);

impl Deliver for ReceiverService<'_> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            Ok(match self.0.deliver(request.notification).await {
                Ok(detail) => Outcome::Delivered(detail),
                Err(e) => Outcome::failed(e),
            })
        })
    }
}

/// Layers listed outer first, applied to a service at the end (tower's `ServiceBuilder`).
#[derive(Debug)]
pub(crate) struct Stack<L>(L);

/// No layer.
#[derive(Debug)]
pub(crate) struct Identity;

impl<S: Deliver> Layer<S> for Identity {
    type Service = S;
    fn layer(self, inner: S) -> S {
        inner
    }
}

/// `outer` around `inner` around a service.
#[derive(Debug)]
pub(crate) struct Nested<Inner, Outer> {
    inner: Inner,
    outer: Outer,
}

impl<S, Inner, Outer> Layer<S> for Nested<Inner, Outer>
where
    Inner: Layer<S>,
    Outer: Layer<Inner::Service>,
{
    type Service = Outer::Service;
    fn layer(self, service: S) -> Self::Service {
        self.outer.layer(self.inner.layer(service))
    }
}

impl Stack<Identity> {
    /// No layers yet.
    pub(crate) fn new() -> Self {
        Self(Identity)
    }
}

impl<L> Stack<L> {
    /// Adds `layer` inside the ones added before.
    pub(crate) fn layer<T>(self, layer: T) -> Stack<Nested<T, L>> {
        Stack(Nested {
            inner: layer,
            outer: self.0,
        })
    }

    /// The layers around `service`.
    pub(crate) fn service<S>(self, service: S) -> L::Service
    where
        L: Layer<S>,
    {
        self.0.layer(service)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A scripted service and a notification for the layers' tests.

    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;

    use super::*;
    use crate::decision::{AlertRecord, AlertStatus, NotificationKind};

    /// Answers from a script (then `Delivered("ok")`), and counts its calls.
    #[derive(Debug, Default)]
    pub(crate) struct Script {
        pub(crate) answers: Mutex<VecDeque<Outcome>>,
        pub(crate) calls: Mutex<Vec<u32>>,
        /// How long each call takes (tokio time).
        pub(crate) takes: std::time::Duration,
    }

    impl Script {
        pub(crate) fn new(answers: impl IntoIterator<Item = Outcome>) -> Self {
            Self {
                answers: Mutex::new(answers.into_iter().collect()),
                ..Self::default()
            }
        }

        pub(crate) fn calls(&self) -> Vec<u32> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Deliver for &Script {
        fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(request.attempt);
                tokio::time::sleep(self.takes).await;
                let next = self.answers.lock().unwrap().pop_front();
                Ok(next.unwrap_or_else(|| Outcome::Delivered("ok".into())))
            })
        }
    }

    /// A firing (or resolved) notification of group `g` to `hook`.
    pub(crate) fn notification(status: AlertStatus) -> Notification {
        let alert = AlertRecord {
            fingerprint: "f".into(),
            rule: "cpu".into(),
            status,
            severity: Default::default(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            starts_at_ms: 0,
            ends_at_ms: None,
            series_id: 1,
        };
        Notification::new(
            "hook",
            "cpu",
            "g",
            BTreeMap::new(),
            vec![alert],
            0,
            1,
            NotificationKind::Alerts,
        )
    }

    pub(crate) fn transient(message: &str) -> Outcome {
        Outcome::failed(DeliveryError::transient(message))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::decision::AlertStatus;

    /// Tags each outcome with its name so the order of layers shows.
    struct Tag(&'static str);
    struct Tagged<S>(&'static str, S);

    impl<S: Deliver> Layer<S> for Tag {
        type Service = Tagged<S>;
        fn layer(self, inner: S) -> Tagged<S> {
            Tagged(self.0, inner)
        }
    }

    impl<S: Deliver> Deliver for Tagged<S> {
        fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
            Box::pin(async move {
                Ok(match self.1.deliver(request).await? {
                    Outcome::Delivered(d) => Outcome::Delivered(format!("{}({d})", self.0)),
                    other => other,
                })
            })
        }
    }

    #[tokio::test]
    async fn a_stack_lists_its_layers_outer_first() {
        let script = Script::default();
        let n = notification(AlertStatus::Firing);
        let stack = Stack::new()
            .layer(Tag("outer"))
            .layer(Tag("inner"))
            .service(&script);
        assert_eq!(
            stack.deliver(Request::new(&n)).await.unwrap(),
            Outcome::Delivered("outer(inner(ok))".into())
        );
    }
}
