//! The wall clock of the dispatcher and the guards, behind a trait so tests can move it, and
//! what tells replayed history from live rows ([`is_history`]).

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// The wall clock the dispatcher and the guards use; tests substitute a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// How far behind the wall clock event time must be for rows to count as replayed history
/// rather than live data: the ingestion check's default `max_age`, so a live source's rows
/// (checked against it) are never history.
pub const HISTORY_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// Whether a row at event time `event_ms`, seen when the wall clock read `wall_ms`, is
/// replayed history (a file of last year's metrics, say): then event time alone measures
/// durations such as a rule's `for`, since a replay runs through years in seconds. Live rows
/// are measured on the wall clock too, so forged timestamps cannot shorten a duration.
pub fn is_history(event_ms: i64, wall_ms: i64) -> bool {
    let horizon = i64::try_from(HISTORY_AFTER.as_millis()).unwrap_or(i64::MAX);
    event_ms < wall_ms.saturating_sub(horizon)
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            i64::try_from(by.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
    }

    #[test]
    fn rows_a_week_behind_the_clock_are_history_and_the_ends_of_time_do_not_overflow() {
        const DAY: i64 = 86_400_000;
        let now = SystemClock.now_ms();
        assert!(is_history(now - 8 * DAY, now));
        assert!(!is_history(now - DAY, now));
        assert!(
            !is_history(now + 365 * DAY, now),
            "the future is not history"
        );
        assert!(is_history(i64::MIN, now));
        assert!(!is_history(i64::MAX, i64::MIN));
    }

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
