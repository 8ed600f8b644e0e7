//! Acknowledgements: how a source learns that a batch it produced was fully handled.
//!
//! A source pairs every batch with an [`Ack`]. Stages that fan a batch out (one share per
//! action, say) call [`Ack::share`]; every share must be resolved with [`Ack::ack`] or one of
//! the nacks. When the last share is resolved the source's callback runs **exactly once**:
//! with [`AckOutcome::Acked`] if every share acked, otherwise with [`AckOutcome::Nacked`].
//!
//! **A nack says why** ([`NackKind`]), because sources treat failures differently:
//!
//! - [`Retryable`](NackKind::Retryable) ([`Ack::nack`], the safe default): a later attempt
//!   may succeed (a receiver down, a timeout). The batch is delivered again; a source never
//!   gives up on good input because of an outage.
//! - [`Permanent`](NackKind::Permanent) ([`Ack::nack_permanent`]): the batch itself fails and
//!   will fail the same way again (a rejected payload). A source may count these towards a
//!   poison limit and dead-letter the batch.
//! - [`Abandoned`](NackKind::Abandoned) ([`Ack::abandon`]): the pipeline stopped before the
//!   batch was finished. Not a failure at all; it is delivered again after a restart.
//!
//! [`Ack::resolve_error`] picks the kind from the error ([`Error::is_retryable`]).
//!
//! **Joining.** When several shares fail, the batch's nack is the most severe one —
//! `Permanent` over `Retryable` over `Abandoned` — and, among failures of that kind, the
//! first one's reason. So one share abandoned at shutdown never hides another share's real
//! failure, and one permanent failure is never washed out by retryable ones. [`Ack::all`]
//! hands the joined nack on, kind included, to every batch it stands for.
//!
//! A share dropped without being resolved (a panicked task, an aborted shutdown) counts as a
//! retryable nack, so a batch can never be acknowledged before everyone finished with it.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use smartcloudops_core::ack::{Ack, AckOutcome, Nack};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = seen.clone();
//! let ack = Ack::new(move |outcome| sink.lock().unwrap().push(outcome));
//! let for_webhook = ack.share();
//! ack.ack();
//! assert!(seen.lock().unwrap().is_empty()); // the webhook share is still out
//! for_webhook.nack("503 from receiver");
//! assert_eq!(
//!     *seen.lock().unwrap(),
//!     vec![AckOutcome::Nacked(Nack::retryable("503 from receiver"))]
//! );
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// The final fate of a batch, reported to its source once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Every stage and action finished with the batch (or dead-lettered its bad rows).
    Acked,
    /// Some stage or action failed, or the pipeline stopped first: what and why (the
    /// [module docs](self) say which failure a batch with several reports).
    Nacked(Nack),
}

impl AckOutcome {
    /// Whether the batch was fully handled.
    pub fn is_acked(&self) -> bool {
        matches!(self, AckOutcome::Acked)
    }

    /// The nack, unless the batch was acked.
    pub fn nack(&self) -> Option<&Nack> {
        match self {
            AckOutcome::Acked => None,
            AckOutcome::Nacked(nack) => Some(nack),
        }
    }

    /// Whether the batch was nacked only because the pipeline stopped before it could be
    /// finished ([`Ack::abandon`]): not a failure of its records, which a source should not
    /// count towards a poison limit.
    pub fn is_abandoned(&self) -> bool {
        self.nack().is_some_and(|n| n.kind == NackKind::Abandoned)
    }
}

/// Why a batch was not acknowledged; decides whether its source counts it as a failure of
/// the batch's records. Ordered by severity: `Abandoned < Retryable < Permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NackKind {
    /// The pipeline stopped before the batch was finished (its rows waited in an open
    /// window, say). Nothing failed: deliver it again, count nothing.
    Abandoned,
    /// A later attempt may succeed: a receiver or store was down or slow. Deliver it again;
    /// an outage must never dead-letter good input.
    Retryable,
    /// The batch fails as it is and will fail the same way again (a receiver rejected it,
    /// a stage cannot process it). A source may dead-letter it after a few attempts.
    Permanent,
}

impl NackKind {
    /// The kind of a failure with `error`: [`Retryable`](Self::Retryable) when
    /// [`Error::is_retryable`], [`Permanent`](Self::Permanent) otherwise.
    pub fn of(error: &Error) -> Self {
        if error.is_retryable() {
            NackKind::Retryable
        } else {
            NackKind::Permanent
        }
    }

    /// A short name for logs and headers: `retryable`, `permanent` or `abandoned`.
    pub fn as_str(self) -> &'static str {
        match self {
            NackKind::Abandoned => "abandoned",
            NackKind::Retryable => "retryable",
            NackKind::Permanent => "permanent",
        }
    }
}

impl fmt::Display for NackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A batch's failure: its kind and a reason for people. Displays as the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// What went wrong, e.g. ``action `webhook` failed: 503``.
    pub reason: String,
    /// What the source should make of it.
    pub kind: NackKind,
}

impl Nack {
    /// A failure of `kind` with `reason`.
    pub fn new(kind: NackKind, reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            kind,
        }
    }

    /// A failure a later attempt may not have.
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::new(NackKind::Retryable, reason)
    }

    /// A failure every attempt will have.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::new(NackKind::Permanent, reason)
    }

    /// A batch the pipeline stopped before finishing; the reason says why it was left.
    pub fn abandoned(why: &str) -> Self {
        Self::new(NackKind::Abandoned, format!("abandoned at shutdown: {why}"))
    }

    /// The failure `error` is: its message, and its kind ([`NackKind::of`]).
    pub fn from_error(error: &Error) -> Self {
        Self::new(NackKind::of(error), error.to_string())
    }
}

impl fmt::Display for Nack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

type Callback = Box<dyn FnOnce(AckOutcome) + Send + 'static>;

struct Shared {
    // A Mutex only to make `Shared` Sync; it is only touched through `get_mut` in `drop`.
    callback: Mutex<Option<Callback>>,
    /// The most severe failure so far (the first of its kind).
    failure: Mutex<Option<Nack>>,
}

impl Shared {
    fn new(callback: Option<Callback>) -> Self {
        Self {
            callback: Mutex::new(callback),
            failure: Mutex::new(None),
        }
    }

    /// Records `nack` unless a failure at least as severe is already recorded.
    fn fail(&self, nack: Nack) {
        // A panic elsewhere while holding the lock left a plain `Option` behind; keep going.
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.as_ref().is_none_or(|first| nack.kind > first.kind) {
            *failure = Some(nack);
        }
    }

    fn has_failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl Drop for Shared {
    // Runs when the last share is gone: the one place an outcome is delivered.
    fn drop(&mut self) {
        let callback = match self.callback.get_mut() {
            Ok(callback) => callback.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(callback) = callback {
            let failure = match self.failure.get_mut() {
                Ok(failure) => failure.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            let outcome = match failure {
                Some(nack) => AckOutcome::Nacked(nack),
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
            shared: Arc::new(Shared::new(Some(Box::new(callback)))),
            resolved: false,
        }
    }

    /// An acknowledgement nobody listens to, for sources that need none (generators, tests).
    pub fn none() -> Self {
        Self {
            shared: Arc::new(Shared::new(None)),
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

    /// This share failed with `nack` (see the [module docs](self) for which failure the batch
    /// reports).
    pub fn fail(mut self, nack: Nack) {
        self.shared.fail(nack);
        self.resolved = true;
    }

    /// This share failed, and a later attempt may succeed: a [retryable](NackKind::Retryable)
    /// nack with `reason`, the safe default when the cause is unknown.
    pub fn nack(self, reason: impl Into<String>) {
        self.fail(Nack::retryable(reason));
    }

    /// This share failed, and every attempt will: a [permanent](NackKind::Permanent) nack
    /// with `reason`.
    pub fn nack_permanent(self, reason: impl Into<String>) {
        self.fail(Nack::permanent(reason));
    }

    /// This share failed with a nack of `kind` and `reason` (an error's kind with a reason
    /// that says more than the error's message).
    pub fn nack_as(self, kind: NackKind, reason: impl Into<String>) {
        self.fail(Nack::new(kind, reason));
    }

    /// This share failed with `error`: nacked with its message, retryable or permanent as
    /// the error is ([`NackKind::of`]).
    pub fn resolve_error(self, error: &Error) {
        self.fail(Nack::from_error(error));
    }

    /// One acknowledgement standing for several batches' (a window's rows come from many):
    /// its outcome, once all its shares are resolved, is passed on to each of `acks`, a nack
    /// with its kind.
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
                AckOutcome::Nacked(nack) => {
                    for ack in acks {
                        ack.fail(nack.clone());
                    }
                }
            }),
        }
    }

    /// This share was not finished because the pipeline stopped (rows of the batch waited in
    /// an open window): an [abandoned](NackKind::Abandoned) nack, so the source delivers the
    /// batch again without counting it as failed.
    pub fn abandon(self, why: &str) {
        self.fail(Nack::abandoned(why));
    }

    /// Resolves this share from a result: `Ok` acks, `Err` nacks as
    /// [`resolve_error`](Self::resolve_error) does.
    pub fn resolve<T>(self, result: &Result<T, Error>) {
        match result {
            Ok(_) => self.ack(),
            Err(e) => self.resolve_error(e),
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.resolved {
            // Why it was dropped is unknown (a panic, an abort): retryable is the safe guess.
            self.shared
                .fail(Nack::retryable("dropped before it was fully processed"));
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("shares", &Arc::strong_count(&self.shared))
            .field("failed", &self.shared.has_failed())
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
            vec![AckOutcome::Nacked(Nack::retryable("first"))]
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
        assert_eq!(
            seen[0].nack().map(|n| n.kind),
            Some(NackKind::Retryable),
            "a panicked task's batch is not the batch's fault"
        );
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
        share.nack_permanent("400");
        assert_eq!(
            *first_seen.lock().unwrap(),
            vec![AckOutcome::Nacked(Nack::permanent("400"))],
            "the kind is passed on too"
        );
        assert_eq!(
            *second_seen.lock().unwrap(),
            vec![AckOutcome::Nacked(Nack::permanent("400"))]
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
        assert!(!AckOutcome::Nacked(Nack::retryable("503")).is_abandoned());
        assert!(
            !AckOutcome::Nacked(Nack::retryable("abandoned at shutdown: not really"))
                .is_abandoned(),
            "the kind decides, not the wording"
        );
        assert!(!AckOutcome::Acked.is_abandoned());
    }

    /// The outcome of a batch whose shares resolve with `nacks`, in order.
    fn joined(nacks: Vec<Nack>) -> Nack {
        let (ack, seen) = recorder();
        let shares: Vec<Ack> = nacks.iter().map(|_| ack.share()).collect();
        ack.ack();
        for (share, nack) in shares.into_iter().zip(nacks) {
            share.fail(nack);
        }
        let seen = seen.lock().unwrap();
        seen[0].nack().cloned().expect("nacked")
    }

    #[test]
    fn the_most_severe_failure_wins_then_the_first_of_its_kind() {
        use Nack as N;
        assert_eq!(
            joined(vec![
                N::abandoned("stopping"),
                N::retryable("503"),
                N::permanent("400 bad payload"),
                N::retryable("timeout"),
                N::permanent("422"),
            ]),
            N::permanent("400 bad payload")
        );
        assert_eq!(
            joined(vec![
                N::retryable("503"),
                N::abandoned("stopping"),
                N::retryable("504")
            ]),
            N::retryable("503"),
            "a share abandoned at shutdown never hides a real failure"
        );
        assert_eq!(
            joined(vec![N::abandoned("window open"), N::abandoned("later")]),
            N::abandoned("window open")
        );
    }

    #[test]
    fn errors_nack_with_their_kind() {
        let action = |retryable| Error::Action {
            action: "webhook".into(),
            message: "status 500".into(),
            retryable,
        };
        let cases = [
            (action(true), NackKind::Retryable),
            (action(false), NackKind::Permanent),
            (
                Error::schema("zscore", "no column `value`"),
                NackKind::Permanent,
            ),
            (Error::Sql("cast failed".into()), NackKind::Permanent),
            (Error::DeadLetter("disk full".into()), NackKind::Retryable),
            (
                Error::io("writing", std::io::Error::other("disk full")),
                NackKind::Retryable,
            ),
        ];
        for (error, kind) in cases {
            let (ack, seen) = recorder();
            let message = error.to_string();
            ack.resolve_error(&error);
            assert_eq!(
                *seen.lock().unwrap(),
                vec![AckOutcome::Nacked(Nack::new(kind, message))],
                "{error}"
            );
        }
        let (ack, seen) = recorder();
        ack.resolve::<()>(&Ok(()));
        assert_eq!(*seen.lock().unwrap(), vec![AckOutcome::Acked]);
        assert_eq!(NackKind::Permanent.to_string(), "permanent");
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
