//! Acknowledgements: how a source learns that a batch it produced was fully handled.
//!
//! A source pairs every batch with an [`Ack`]. Stages that fan a batch out (one share per
//! action, say) call [`Ack::share`]; every share must be resolved with [`Ack::ack`] or
//! [`Ack::nack`]. When the last share is resolved the source's callback runs **exactly once**:
//! with [`AckOutcome::Acked`] if every share acked, otherwise with the first
//! [`AckOutcome::Nacked`] reason.
//!
//! A share dropped without being resolved (a panicked task, an aborted shutdown) counts as a
//! nack, so a batch can never be acknowledged before everyone finished with it.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use smartcloudops_core::ack::{Ack, AckOutcome};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = seen.clone();
//! let ack = Ack::new(move |outcome| sink.lock().unwrap().push(outcome));
//! let for_webhook = ack.share();
//! ack.ack();
//! assert!(seen.lock().unwrap().is_empty()); // the webhook share is still out
//! for_webhook.nack("503 from receiver");
//! assert_eq!(*seen.lock().unwrap(), vec![AckOutcome::Nacked("503 from receiver".into())]);
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// The final fate of a batch, reported to its source once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Every stage and action finished with the batch (or dead-lettered its bad rows).
    Acked,
    /// Some stage or action failed; the reason of the first failure.
    Nacked(String),
}

impl AckOutcome {
    /// Whether the batch was fully handled.
    pub fn is_acked(&self) -> bool {
        matches!(self, AckOutcome::Acked)
    }

    /// Whether the batch was nacked only because the pipeline stopped before it could be
    /// finished ([`Ack::abandon`]): not a failure of its records, which a source should not
    /// count towards a poison limit.
    pub fn is_abandoned(&self) -> bool {
        matches!(self, AckOutcome::Nacked(reason) if reason.starts_with(ABANDONED))
    }
}

/// How the reason of an [abandoned](Ack::abandon) batch starts.
pub const ABANDONED: &str = "abandoned at shutdown";

type Callback = Box<dyn FnOnce(AckOutcome) + Send + 'static>;

struct Shared {
    // A Mutex only to make `Shared` Sync; it is only touched through `get_mut` in `drop`.
    callback: Mutex<Option<Callback>>,
    failure: OnceLock<String>,
}

impl Drop for Shared {
    // Runs when the last share is gone: the one place an outcome is delivered.
    fn drop(&mut self) {
        let callback = match self.callback.get_mut() {
            Ok(callback) => callback.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(callback) = callback {
            let outcome = match self.failure.take() {
                Some(reason) => AckOutcome::Nacked(reason),
                None => AckOutcome::Acked,
            };
            callback(outcome);
        }
    }
}

/// One share of a batch's acknowledgement. See the [module docs](self).
///
/// The callback runs on whichever thread resolves the last share; it must be quick and must
/// not block (record the outcome, send on an unbounded-by-construction path, or notify).
#[must_use = "an Ack that is dropped unresolved nacks its batch"]
pub struct Ack {
    shared: Arc<Shared>,
    resolved: bool,
}

impl Ack {
    /// A new acknowledgement whose outcome is delivered to `callback`.
    pub fn new(callback: impl FnOnce(AckOutcome) + Send + 'static) -> Self {
        Self {
            shared: Arc::new(Shared {
                callback: Mutex::new(Some(Box::new(callback))),
                failure: OnceLock::new(),
            }),
            resolved: false,
        }
    }

    /// An acknowledgement nobody listens to, for sources that need none (generators, tests).
    pub fn none() -> Self {
        Self {
            shared: Arc::new(Shared {
                callback: Mutex::new(None),
                failure: OnceLock::new(),
            }),
            resolved: false,
        }
    }

    /// Another share of the same batch; the outcome waits for it too.
    pub fn share(&self) -> Ack {
        Ack {
            shared: self.shared.clone(),
            resolved: false,
        }
    }

    /// This share finished successfully.
    pub fn ack(mut self) {
        self.resolved = true;
    }

    /// This share failed; the batch will be nacked with `reason` (the first reason wins).
    pub fn nack(mut self, reason: impl Into<String>) {
        let _ = self.shared.failure.set(reason.into());
        self.resolved = true;
    }

    /// One acknowledgement standing for several batches' (a window's rows come from many):
    /// its outcome, once all its shares are resolved, is passed on to each of `acks`.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use smartcloudops_core::ack::{Ack, AckOutcome};
    ///
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let batch = |i: u32| {
    ///     let sink = seen.clone();
    ///     Ack::new(move |outcome| sink.lock().unwrap().push((i, outcome)))
    /// };
    /// let window = Ack::all(vec![batch(1), batch(2)]);
    /// window.ack();
    /// assert_eq!(*seen.lock().unwrap(), vec![(1, AckOutcome::Acked), (2, AckOutcome::Acked)]);
    /// ```
    pub fn all(acks: Vec<Ack>) -> Ack {
        let mut acks = acks;
        match acks.len() {
            0 => Ack::none(),
            1 => acks.pop().unwrap_or_else(Ack::none),
            _ => Ack::new(move |outcome| match outcome {
                AckOutcome::Acked => acks.into_iter().for_each(Ack::ack),
                AckOutcome::Nacked(reason) => {
                    for ack in acks {
                        ack.nack(reason.clone());
                    }
                }
            }),
        }
    }

    /// This share was not finished because the pipeline stopped (rows of the batch waited in
    /// an open window): a nack whose outcome says so ([`AckOutcome::is_abandoned`]), so the
    /// source delivers the batch again without counting it as failed.
    pub fn abandon(self, why: &str) {
        self.nack(format!("{ABANDONED}: {why}"));
    }

    /// Resolves this share from a result: `Ok` acks, `Err` nacks with the error's message.
    pub fn resolve<T, E: fmt::Display>(self, result: &Result<T, E>) {
        match result {
            Ok(_) => self.ack(),
            Err(e) => self.nack(e.to_string()),
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.resolved {
            let _ = self
                .shared
                .failure
                .set("dropped before it was fully processed".to_owned());
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("shares", &Arc::strong_count(&self.shared))
            .field("failed", &self.shared.failure.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn recorder() -> (Ack, Arc<Mutex<Vec<AckOutcome>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (Ack::new(move |o| sink.lock().unwrap().push(o)), seen)
    }

    #[test]
    fn acked_once_after_every_share() {
        let (ack, seen) = recorder();
        let shares: Vec<Ack> = (0..3).map(|_| ack.share()).collect();
        ack.ack();
        for share in shares {
            assert!(
                seen.lock().unwrap().is_empty(),
                "acked before all shares finished"
            );
            share.ack();
        }
        assert_eq!(*seen.lock().unwrap(), vec![AckOutcome::Acked]);
    }

    #[test]
    fn first_nack_reason_wins() {
        let (ack, seen) = recorder();
        let other = ack.share();
        ack.nack("first");
        other.nack("second");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![AckOutcome::Nacked("first".into())]
        );
    }

    #[test]
    fn dropping_unresolved_is_a_nack() {
        let (ack, seen) = recorder();
        let share = ack.share();
        ack.ack();
        drop(share);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].is_acked());
    }

    #[test]
    fn all_passes_its_outcome_to_every_batch() {
        let (first, first_seen) = recorder();
        let (second, second_seen) = recorder();
        let joined = Ack::all(vec![first, second]);
        let share = joined.share();
        joined.ack();
        assert!(
            first_seen.lock().unwrap().is_empty(),
            "a share is still out"
        );
        share.nack("503");
        assert_eq!(
            *first_seen.lock().unwrap(),
            vec![AckOutcome::Nacked("503".into())]
        );
        assert_eq!(
            *second_seen.lock().unwrap(),
            vec![AckOutcome::Nacked("503".into())]
        );

        let (only, only_seen) = recorder();
        Ack::all(vec![only]).ack();
        assert_eq!(*only_seen.lock().unwrap(), vec![AckOutcome::Acked]);
        Ack::all(Vec::new()).ack(); // nothing to pass on
    }

    #[test]
    fn an_abandoned_batch_is_nacked_but_not_failed() {
        let (ack, seen) = recorder();
        Ack::all(vec![ack, Ack::none()]).abandon("window open");
        let seen = seen.lock().unwrap();
        assert!(!seen[0].is_acked());
        assert!(seen[0].is_abandoned(), "{seen:?}");
        assert!(!AckOutcome::Nacked("503".into()).is_abandoned());
        assert!(!AckOutcome::Acked.is_abandoned());
    }

    #[test]
    fn outcome_crosses_threads() {
        let (ack, seen) = recorder();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let share = ack.share();
                std::thread::spawn(move || share.ack())
            })
            .collect();
        ack.ack();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), vec![AckOutcome::Acked]);
    }
}
