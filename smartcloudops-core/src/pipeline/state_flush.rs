//! Saving the detector's per-series states when the source hands input over to another
//! replica (a Kafka revoke): the pipeline's [`RevokeListener`].
//!
//! The source's thread asks ([`RevokeListener::on_revoke`]) and blocks; the transform task,
//! which owns the detector, notices the request between two batches
//! ([`recv_or_flush`]), saves the states that changed and answers. Requests are a counter,
//! not a queue: any number of them is served by one save that starts after they were made.
//!
//! No deadlock: the source asks only after the revoked partitions' in-flight batches were
//! drained, and waits at most the given timeout; once the transform task is gone (the
//! pipeline stopped, and saved at its end) a request returns at once. A transform task busy with a batch (or
//! waiting for room in the actions' queue) answers late; the revoke then goes on without
//! the save, and the new owner loads the state of the previous periodic save.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::run::Pending;
use super::transform::TransformTask;
use crate::source::RevokeListener;

/// Revoke requests and their answers. See the [module docs](self).
#[derive(Debug, Default)]
struct Answered {
    up_to: u64,
    closed: bool,
}

#[derive(Debug, Default)]
pub(super) struct StateFlush {
    /// Requests made so far.
    requested: AtomicU64,
    /// The highest request answered, and whether nobody answers any more.
    done: Mutex<Answered>,
    answered: Condvar,
    /// Wakes the transform task.
    wake: Notify,
}

impl StateFlush {
    /// Waits for a request not yet answered; returns the newest one (answering it answers
    /// every earlier one). Cancel safe: a request is never consumed by a dropped call.
    async fn requested(&self) -> u64 {
        loop {
            let notified = self.wake.notified();
            let requested = self.requested.load(Ordering::SeqCst);
            if requested > self.answered_up_to() {
                return requested;
            }
            notified.await;
        }
    }

    fn answered_up_to(&self) -> u64 {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).up_to
    }

    /// Every request up to `request` has been served.
    fn answer(&self, request: u64) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.up_to = done.up_to.max(request);
        self.answered.notify_all();
    }

    /// Nobody serves requests any more (the transform task ended): they return at once.
    pub(super) fn close(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.closed = true;
        self.answered.notify_all();
    }
}

impl RevokeListener for StateFlush {
    fn on_revoke(&self, timeout: Duration) {
        let request = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        let started = std::time::Instant::now();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (done, waited) = self
            .answered
            .wait_timeout_while(done, timeout, |done| done.up_to < request && !done.closed)
            .unwrap_or_else(|p| p.into_inner());
        let closed = done.closed && done.up_to < request;
        drop(done);
        if closed {
            tracing::debug!("revoke: the pipeline has stopped (its states were saved then)");
        } else if waited.timed_out() {
            tracing::warn!(
                ?timeout,
                "revoke: detector states not saved in time; the new owner loads older ones"
            );
        } else {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "revoke: detector states saved"
            );
        }
    }
}

/// The next batch from the source (`None` once it is gone), saving the detector's states
/// whenever a revoke asks meanwhile. Cancel safe, like [`tokio::sync::mpsc::Receiver::recv`].
pub(super) async fn recv_or_flush(t: &mut TransformTask) -> Option<Pending> {
    loop {
        let Some(flush) = t.handoff.as_ref().map(|h| h.revoke_listener()) else {
            return t.rx.recv().await;
        };
        tokio::select! {
            biased;
            request = flush.requested() => {
                if let (Some(handoff), Some((detector, stage))) =
                    (t.handoff.as_mut(), t.detector.as_mut())
                {
                    handoff.save_final(detector.as_mut(), stage).await;
                }
                flush.answer(request);
            }
            next = t.rx.recv() => return next,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoke_waits_for_the_answer_and_one_answer_serves_earlier_requests() {
        let flush = Arc::new(StateFlush::default());
        let saves = Arc::new(AtomicU64::new(0));
        let server = {
            let (flush, saves) = (flush.clone(), saves.clone());
            tokio::spawn(async move {
                loop {
                    let request = flush.requested().await;
                    saves.fetch_add(1, Ordering::SeqCst);
                    flush.answer(request);
                }
            })
        };
        let asking = flush.clone();
        tokio::task::spawn_blocking(move || asking.on_revoke(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(saves.load(Ordering::SeqCst), 1, "answered after one save");
        assert_eq!(flush.answered_up_to(), 1);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoke_after_the_pipeline_stopped_returns_at_once() {
        let flush = Arc::new(StateFlush::default());
        flush.close();
        let asking = flush.clone();
        // A timeout no test would sit out: returning proves the close was noticed.
        tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || asking.on_revoke(Duration::from_secs(3600))),
        )
        .await
        .expect("returned without waiting for the timeout")
        .unwrap();
        assert_eq!(flush.answered_up_to(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nobody_answering_times_out_instead_of_blocking_the_revoke() {
        let flush = Arc::new(StateFlush::default());
        let asking = flush.clone();
        tokio::task::spawn_blocking(move || asking.on_revoke(Duration::from_millis(50)))
            .await
            .unwrap();
        assert_eq!(flush.answered_up_to(), 0, "not answered");
        // The request stays pending: the transform task serves it when it gets to it.
        let pending = tokio::time::timeout(Duration::from_secs(5), flush.requested()).await;
        assert_eq!(pending.ok(), Some(1));
    }
}
