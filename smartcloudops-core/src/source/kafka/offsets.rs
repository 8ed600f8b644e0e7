//! Which offsets of each partition may be committed: the contiguous acknowledged high-water
//! mark, never past a batch that failed or is still in flight.
//!
//! Batches cover consecutive offset ranges of a partition (every consumed message, good or
//! dead-lettered, belongs to exactly one batch). Acks arrive in any order; the commit point
//! only moves over a prefix of acknowledged ranges. A nack asks for a *rewind*: the ranges from
//! the failed one on are forgotten, and the consumer seeks back to redeliver them. Each range
//! remembers the epoch it was registered in, so a late ack for a forgotten range (after a
//! rewind or a revoke) is ignored instead of moving the commit point.
//!
//! **What a nack counts** depends on its [kind](NackKind). Every nack rewinds. A
//! [permanent](NackKind::Permanent) or [retryable](NackKind::Retryable) failure counts towards
//! the backoff of the redelivery; only a permanent one counts towards the poison limit, so a
//! downstream outage (retryable failures) is retried for as long as it lasts and never
//! dead-letters good messages. An [abandoned](NackKind::Abandoned) batch (the pipeline
//! stopped) counts nothing.
//!
//! **Poison limit.** A partition whose batches failed permanently `max_attempts` times
//! without its commit point moving past the failed range marks the range of the last such
//! failure as *poisoned*: its next delivery goes to the dead-letter output instead of the
//! pipeline, so that the partition moves on. The mark lives as long as the partition's
//! ownership (a revoke forgets it; the new owner counts again from zero) and is lifted once
//! the commit point passes it.

use std::collections::{BTreeMap, HashMap};

use crate::ack::{Nack, NackKind};

/// A topic and partition.
pub(crate) type TopicPartition = (String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    last: i64,
    epoch: u64,
    acked: bool,
    /// Handed to the pipeline (as opposed to claimed and still waiting to be sent).
    handed: bool,
}

#[derive(Debug, Default)]
struct PartitionState {
    epoch: u64,
    /// The next offset to commit (the first not yet acknowledged), once known.
    commit: Option<i64>,
    /// In-flight ranges by first offset.
    ranges: BTreeMap<i64, Range>,
    /// Offset to seek back to, set by a nack and taken by the consumer.
    rewind: Option<i64>,
    /// Consecutive failures (retryable or permanent) without progress, for the backoff.
    failures: u32,
    /// The first offset of the last failure: only a commit past it is progress (an earlier
    /// range still in flight when it failed may be acknowledged after it).
    failed_from: Option<i64>,
    /// Permanent failures without progress, for the poison limit.
    permanent_failures: u32,
    /// The first offset of the last permanent failure; like `failed_from`.
    permanent_from: Option<i64>,
    /// The range to dead-letter on its next delivery, once failures reached the limit.
    poison: Option<Poison>,
}

/// A range that failed permanently `attempts` times: its messages are dead-lettered on the
/// next delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Poison {
    pub(crate) first: i64,
    pub(crate) last: i64,
    /// Deliveries that failed permanently (without the commit point moving past them).
    pub(crate) attempts: u32,
    /// The reason of the failure that reached the limit.
    pub(crate) reason: String,
}

impl Poison {
    /// Whether the message at `offset` is in the poisoned range.
    pub(crate) fn covers(&self, offset: i64) -> bool {
        (self.first..=self.last).contains(&offset)
    }
}

/// Per-partition commit bookkeeping for the partitions this consumer owns.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
    /// Source of epochs, shared by all partitions and assignments, so a late outcome from an
    /// earlier ownership of a partition can never match a range of the current one.
    next_epoch: u64,
    /// Permanently failed deliveries of a range before it is poisoned; 0 = never.
    max_attempts: u32,
}

/// A registered batch's claim on a range of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RangeTicket {
    pub(crate) tp: TopicPartition,
    pub(crate) first: i64,
    pub(crate) last: i64,
    pub(crate) epoch: u64,
}

impl OffsetTracker {
    /// A tracker that poisons a range after `max_attempts` permanently failed deliveries
    /// (0 = never).
    pub(crate) fn with_max_attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// The consumer now owns `tp`.
    pub(crate) fn assign(&mut self, tp: TopicPartition) {
        let epoch = self.new_epoch();
        self.partitions.entry(tp).or_insert_with(|| PartitionState {
            epoch,
            ..PartitionState::default()
        });
    }

    fn new_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// Asks again for a rewind whose seek failed.
    pub(crate) fn retry_rewind(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.rewind = Some(p.rewind.map_or(offset, |r| r.min(offset)));
        }
    }

    /// The consumer gives `tp` up; returns the offset to commit for it, if any moved.
    pub(crate) fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.remove(tp).and_then(|p| p.commit)
    }

    /// Whether the consumer owns `tp`.
    #[cfg(test)]
    pub(crate) fn owns(&self, tp: &TopicPartition) -> bool {
        self.partitions.contains_key(tp)
    }

    /// Records that offsets `first..=last` of `tp` are in flight in one batch. `None` when the
    /// partition is not owned (revoked meanwhile): the batch must not be sent.
    pub(crate) fn register(
        &mut self,
        tp: &TopicPartition,
        first: i64,
        last: i64,
    ) -> Option<RangeTicket> {
        let p = self.partitions.get_mut(tp)?;
        if p.rewind.is_some_and(|r| first >= r) {
            return None; // about to be redelivered from `r`
        }
        p.commit.get_or_insert(first);
        p.ranges.insert(
            first,
            Range {
                last,
                epoch: p.epoch,
                acked: false,
                handed: false,
            },
        );
        Some(RangeTicket {
            tp: tp.clone(),
            first,
            last,
            epoch: p.epoch,
        })
    }

    /// The range was fully processed. Returns the new commit offset if it moved.
    pub(crate) fn ack(&mut self, t: &RangeTicket) -> Option<i64> {
        let p = self.partitions.get_mut(&t.tp)?;
        match p.ranges.get_mut(&t.first) {
            Some(r) if r.epoch == t.epoch && r.last == t.last => r.acked = true,
            _ => return None,
        }
        let mut moved = None;
        while let Some(entry) = p.ranges.first_entry() {
            if !entry.get().acked {
                break;
            }
            let next = entry.get().last + 1;
            entry.remove();
            p.commit = Some(next);
            moved = Some(next);
        }
        if let Some(next) = moved {
            if p.failed_from.is_none_or(|from| next > from) {
                p.failures = 0;
                p.failed_from = None;
            }
            if p.permanent_from.is_none_or(|from| next > from) {
                p.permanent_failures = 0;
                p.permanent_from = None;
            }
            if p.poison.as_ref().is_some_and(|poison| poison.last < next) {
                p.poison = None;
            }
        }
        moved
    }

    /// The range was nacked. Forgets it and every later range of the partition and asks for
    /// a rewind to its first offset; counts the failure by its kind (see the
    /// [module docs](self)) and, at the limit of permanent failures, poisons the range.
    /// Returns the rewind offset when this nack set it.
    pub(crate) fn nack(&mut self, t: &RangeTicket, nack: &Nack) -> Option<i64> {
        let p = self.partitions.get_mut(&t.tp)?;
        match p.ranges.get(&t.first) {
            Some(r) if r.epoch == t.epoch => {}
            _ => return None,
        }
        p.ranges.split_off(&t.first);
        self.next_epoch += 1;
        let p = self.partitions.get_mut(&t.tp)?;
        p.epoch = self.next_epoch;
        if nack.kind != NackKind::Abandoned {
            p.failures = p.failures.saturating_add(1);
            p.failed_from = Some(t.first);
        }
        if nack.kind == NackKind::Permanent {
            p.permanent_failures = p.permanent_failures.saturating_add(1);
            p.permanent_from = Some(t.first);
            // A poisoned range whose dead letters failed stays poisoned with its first reason.
            if self.max_attempts > 0
                && p.permanent_failures >= self.max_attempts
                && p.poison.is_none()
            {
                p.poison = Some(Poison {
                    first: t.first,
                    last: t.last,
                    attempts: p.permanent_failures,
                    reason: nack.reason.clone(),
                });
            }
        }
        let rewind = p.rewind.map_or(t.first, |r| r.min(t.first));
        p.rewind = Some(rewind);
        Some(rewind)
    }

    /// Takes the pending rewinds: `(partition, offset, consecutive failures)`, the failures
    /// retryable or permanent (for the backoff).
    pub(crate) fn take_rewinds(&mut self) -> Vec<(TopicPartition, i64, u32)> {
        self.partitions
            .iter_mut()
            .filter_map(|(tp, p)| p.rewind.take().map(|o| (tp.clone(), o, p.failures)))
            .collect()
    }

    /// The poison mark of `tp`, if a range of it reached the limit.
    pub(crate) fn poison(&self, tp: &TopicPartition) -> Option<&Poison> {
        self.partitions.get(tp)?.poison.as_ref()
    }

    /// The poison mark covering `offset` of `tp`, if any: that message is dead-lettered.
    #[cfg(test)]
    pub(crate) fn poisoned(&self, tp: &TopicPartition, offset: i64) -> Option<&Poison> {
        self.poison(tp).filter(|p| p.covers(offset))
    }

    /// Ranges in flight for `tp`.
    pub(crate) fn in_flight(&self, tp: &TopicPartition) -> usize {
        self.partitions.get(tp).map_or(0, |p| {
            p.ranges.values().filter(|r| r.handed && !r.acked).count()
        })
    }

    /// The ticket's batch was handed to the pipeline: a revoke now waits for its outcome.
    pub(crate) fn mark_handed(&mut self, t: &RangeTicket) {
        if let Some(r) = self
            .partitions
            .get_mut(&t.tp)
            .and_then(|p| p.ranges.get_mut(&t.first))
            .filter(|r| r.epoch == t.epoch)
        {
            r.handed = true;
        }
    }

    /// Whether the ticket still belongs to the current ownership of its partition (not
    /// revoked, not forgotten by a rewind).
    pub(crate) fn is_current(&self, t: &RangeTicket) -> bool {
        self.partitions
            .get(&t.tp)
            .and_then(|p| p.ranges.get(&t.first))
            .is_some_and(|r| r.epoch == t.epoch)
    }

    /// The commit offsets of every owned partition that has one.
    pub(crate) fn commit_points(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(tp, p)| p.commit.map(|c| (tp.clone(), c)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp() -> TopicPartition {
        ("metrics".to_owned(), 0)
    }

    fn permanent(reason: &str) -> Nack {
        Nack::permanent(reason)
    }

    #[test]
    fn an_outage_retries_forever_and_only_permanent_failures_poison() {
        let mut t = OffsetTracker::with_max_attempts(3);
        t.assign(tp());
        for attempt in 1..=20 {
            let batch = t.register(&tp(), 0, 9).unwrap();
            assert_eq!(t.nack(&batch, &Nack::retryable("503")), Some(0));
            assert_eq!(
                t.take_rewinds(),
                vec![(tp(), 0, attempt)],
                "the backoff still grows"
            );
        }
        assert_eq!(
            t.poisoned(&tp(), 0),
            None,
            "retryable failures never dead-letter"
        );
        // The batch is bad after all: max_attempts permanent failures, the outage not counted.
        let mut failures = 20;
        for attempt in 1..=3 {
            assert_eq!(t.poisoned(&tp(), 0), None, "not before attempt {attempt}");
            let batch = t.register(&tp(), 0, 9).unwrap();
            t.nack(&batch, &permanent("400"));
            failures += 1;
            assert_eq!(t.take_rewinds(), vec![(tp(), 0, failures)]);
            if attempt == 1 {
                // An outage in between neither counts nor resets the permanent failures.
                let batch = t.register(&tp(), 0, 9).unwrap();
                t.nack(&batch, &Nack::retryable("503"));
                failures += 1;
                assert_eq!(t.take_rewinds(), vec![(tp(), 0, failures)]);
            }
        }
        let poison = t.poisoned(&tp(), 0).cloned().unwrap();
        assert_eq!((poison.attempts, poison.reason.as_str()), (3, "400"));
    }

    #[test]
    fn an_abandoned_batch_rewinds_but_counts_nothing() {
        let mut t = OffsetTracker::with_max_attempts(1);
        t.assign(tp());
        let a = t.register(&tp(), 0, 9).unwrap();
        let b = t.register(&tp(), 10, 19).unwrap();
        assert_eq!(t.nack(&a, &Nack::abandoned("window open")), Some(0));
        assert_eq!(t.ack(&b), None, "forgotten: redelivered from 0");
        assert_eq!(t.take_rewinds(), vec![(tp(), 0, 0)], "no failure counted");
        assert_eq!(t.poisoned(&tp(), 0), None);
        assert_eq!(t.commit_points(), vec![(tp(), 0)], "nothing committed");
    }

    #[test]
    fn permanent_failures_reset_once_their_range_is_committed() {
        let mut t = OffsetTracker::with_max_attempts(2);
        t.assign(tp());
        let bad = t.register(&tp(), 0, 9).unwrap();
        t.nack(&bad, &permanent("400"));
        t.take_rewinds();
        let early = t.register(&tp(), 0, 9).unwrap();
        let later = t.register(&tp(), 10, 19).unwrap();
        // A later range fails for an outage before the first one is acknowledged.
        t.nack(&later, &Nack::retryable("503"));
        assert_eq!(t.ack(&early), Some(10), "the failed range went through");
        t.take_rewinds();
        let later = t.register(&tp(), 10, 19).unwrap();
        t.nack(&later, &permanent("422"));
        assert_eq!(
            t.poisoned(&tp(), 10),
            None,
            "the first range's failure was not this one's"
        );
    }

    #[test]
    fn commit_moves_only_over_a_contiguous_acked_prefix() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let a = t.register(&tp(), 0, 9).unwrap();
        let b = t.register(&tp(), 10, 19).unwrap();
        let c = t.register(&tp(), 20, 29).unwrap();
        assert_eq!(
            t.ack(&c),
            None,
            "a later success never skips an earlier batch"
        );
        assert_eq!(t.ack(&a), Some(10));
        assert_eq!(t.ack(&b), Some(30), "then jumps over everything acked");
        assert_eq!(t.commit_points(), vec![(tp(), 30)]);
        assert_eq!(t.in_flight(&tp()), 0);
    }

    #[test]
    fn only_batches_handed_to_the_pipeline_are_in_flight() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let a = t.register(&tp(), 0, 9).unwrap();
        let b = t.register(&tp(), 10, 19).unwrap();
        assert_eq!(t.in_flight(&tp()), 0, "claimed, not handed");
        t.mark_handed(&a);
        assert_eq!(t.in_flight(&tp()), 1);
        t.ack(&a);
        assert_eq!(t.in_flight(&tp()), 0);
        assert!(t.is_current(&b));
        t.revoke(&tp());
        assert!(!t.is_current(&b), "a revoked claim is stale");
    }

    #[test]
    fn a_nack_rewinds_and_late_acks_of_forgotten_ranges_are_ignored() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let a = t.register(&tp(), 0, 9).unwrap();
        let b = t.register(&tp(), 10, 19).unwrap();
        let c = t.register(&tp(), 20, 29).unwrap();
        assert_eq!(t.nack(&b, &permanent("boom")), Some(10));
        assert_eq!(t.ack(&c), None, "forgotten by the rewind");
        assert_eq!(
            t.register(&tp(), 30, 39),
            None,
            "messages past the rewind point are refused"
        );
        assert_eq!(t.take_rewinds(), vec![(tp(), 10, 1)]);
        assert_eq!(t.ack(&a), Some(10), "earlier ranges still count");
        // Redelivered from 10, with a new epoch: the old ticket for 10 cannot ack it.
        let b2 = t.register(&tp(), 10, 19).unwrap();
        assert_eq!(t.ack(&b), None);
        assert_eq!(t.ack(&b2), Some(20));
    }

    #[test]
    fn outcomes_from_an_earlier_ownership_never_match_the_current_one() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let old = t.register(&tp(), 0, 9).unwrap();
        assert_eq!(t.revoke(&tp()), Some(0));
        t.assign(tp());
        let new = t.register(&tp(), 0, 9).unwrap();
        assert_ne!(old.epoch, new.epoch);
        assert_eq!(
            t.nack(&old, &permanent("boom")),
            None,
            "a late nack from before the revoke is ignored"
        );
        assert_eq!(t.ack(&old), None);
        assert_eq!(t.ack(&new), Some(10));
    }

    #[test]
    fn a_failed_seek_keeps_the_rewind_pending() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let a = t.register(&tp(), 0, 9).unwrap();
        t.nack(&a, &permanent("boom"));
        assert_eq!(t.take_rewinds().len(), 1);
        t.retry_rewind(&tp(), 0);
        assert_eq!(
            t.register(&tp(), 10, 19),
            None,
            "nothing past the failed batch registers"
        );
        assert_eq!(t.take_rewinds(), vec![(tp(), 0, 1)]);
    }

    #[test]
    fn revoked_partitions_refuse_registrations_and_return_their_commit_point() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let a = t.register(&tp(), 5, 9).unwrap();
        t.ack(&a);
        assert_eq!(t.revoke(&tp()), Some(10));
        assert!(!t.owns(&tp()));
        assert_eq!(t.register(&tp(), 10, 19), None);
        assert_eq!(t.ack(&a), None);
    }

    #[test]
    fn a_range_failing_max_attempts_times_is_poisoned_until_the_commit_passes_it() {
        let mut t = OffsetTracker::with_max_attempts(3);
        t.assign(tp());
        let ok = t.register(&tp(), 0, 4).unwrap();
        t.ack(&ok);
        for attempt in 1..=3 {
            assert_eq!(
                t.poisoned(&tp(), 5),
                None,
                "not before attempt {attempt} failed"
            );
            let bad = t.register(&tp(), 5, 9).unwrap();
            assert_eq!(
                t.nack(&bad, &permanent(&format!("failure {attempt}"))),
                Some(5)
            );
            assert_eq!(t.take_rewinds(), vec![(tp(), 5, attempt)]);
        }
        let poison = t.poisoned(&tp(), 7).cloned().unwrap();
        assert_eq!((poison.first, poison.last, poison.attempts), (5, 9, 3));
        assert_eq!(
            poison.reason, "failure 3",
            "the failure that reached the limit"
        );
        assert_eq!(t.poisoned(&tp(), 10), None, "only the failed range");
        assert_eq!(t.poisoned(&tp(), 4), None);
        // Its dead letters failed: still poisoned, with the first reason.
        let again = t.register(&tp(), 5, 9).unwrap();
        t.nack(&again, &Nack::retryable("dead-lettering failed"));
        assert_eq!(t.poisoned(&tp(), 5).unwrap().reason, "failure 3");
        t.take_rewinds();
        // A redelivery cut shorter: the rest of the range stays poisoned.
        let part = t.register(&tp(), 5, 6).unwrap();
        assert_eq!(t.ack(&part), Some(7));
        assert!(t.poisoned(&tp(), 8).is_some());
        let rest = t.register(&tp(), 7, 12).unwrap();
        assert_eq!(t.ack(&rest), Some(13));
        assert_eq!(t.poisoned(&tp(), 8), None, "lifted once committed past");
    }

    #[test]
    fn an_earlier_range_acked_after_a_later_one_failed_is_not_progress() {
        let mut t = OffsetTracker::with_max_attempts(2);
        t.assign(tp());
        let early = t.register(&tp(), 0, 9).unwrap();
        let bad = t.register(&tp(), 10, 19).unwrap();
        t.nack(&bad, &permanent("boom"));
        assert_eq!(t.ack(&early), Some(10));
        t.take_rewinds();
        let bad = t.register(&tp(), 10, 19).unwrap();
        t.nack(&bad, &permanent("boom"));
        assert_eq!(
            t.take_rewinds(),
            vec![(tp(), 10, 2)],
            "the failures of the range still count"
        );
        assert!(t.poisoned(&tp(), 10).is_some());
    }

    #[test]
    fn no_limit_never_poisons_and_a_revoke_forgets_the_mark() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        for _ in 0..50 {
            let bad = t.register(&tp(), 0, 9).unwrap();
            t.nack(&bad, &permanent("boom"));
            t.take_rewinds();
        }
        assert_eq!(
            t.poisoned(&tp(), 0),
            None,
            "max_attempts = 0 retries forever"
        );

        let mut t = OffsetTracker::with_max_attempts(1);
        t.assign(tp());
        let bad = t.register(&tp(), 0, 9).unwrap();
        t.nack(&bad, &permanent("boom"));
        assert!(t.poisoned(&tp(), 0).is_some());
        t.revoke(&tp());
        t.assign(tp());
        assert_eq!(t.poisoned(&tp(), 0), None, "the new ownership counts again");
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Model {
        Pending,
        Acked,
        Failed,
    }

    proptest! {
        /// Whatever order acks and nacks arrive in, every offset below the commit point was
        /// acknowledged in its latest delivery, and the commit point never moves back.
        #[test]
        fn commit_never_passes_an_unacked_offset(
            steps in proptest::collection::vec((0usize..16, 0u8..6), 1..80)
        ) {
            let mut t = OffsetTracker::default();
            t.assign(tp());
            let mut live: Vec<RangeTicket> = Vec::new();
            // Tickets a rewind forgot: their outcomes may still arrive, late, and must not count.
            let mut stale: Vec<RangeTicket> = Vec::new();
            let mut state: std::collections::HashMap<i64, Model> = Default::default();
            let mut next = 0i64;
            let mut last_commit = 0i64;
            for (pick, op) in steps {
                if op >= 4 && !stale.is_empty() {
                    let ticket = stale[pick % stale.len()].clone();
                    if op == 4 {
                        prop_assert_eq!(t.ack(&ticket), None, "a late ack moved the commit point");
                    } else {
                        prop_assert_eq!(t.nack(&ticket, &permanent("boom")), None, "a late nack rewound");
                    }
                    continue;
                }
                if op == 0 || op >= 4 || live.is_empty() {
                    for (_, offset, _) in t.take_rewinds() {
                        next = offset;
                    }
                    if let Some(ticket) = t.register(&tp(), next, next + 2) {
                        for o in next..=next + 2 {
                            state.insert(o, Model::Pending);
                        }
                        next += 3;
                        live.push(ticket);
                    }
                    continue;
                }
                let ticket = live.remove(pick % live.len());
                if op == 3 {
                    prop_assert!(t.nack(&ticket, &permanent("boom")).is_some());
                    stale.push(ticket.clone());
                    stale.extend(live.iter().filter(|l| l.first >= ticket.first).cloned());
                    live.retain(|l| l.first < ticket.first);
                    for (o, s) in state.iter_mut() {
                        if *o >= ticket.first {
                            *s = Model::Failed;
                        }
                    }
                } else {
                    t.ack(&ticket);
                    for o in ticket.first..=ticket.last {
                        state.insert(o, Model::Acked);
                    }
                }
                let commit = t.commit_points().first().map_or(0, |c| c.1);
                prop_assert!(commit >= last_commit, "commit moved back");
                last_commit = commit;
                for o in 0..commit {
                    prop_assert_eq!(state.get(&o).copied(), Some(Model::Acked), "offset {} committed", o);
                }
            }
        }
    }
}
