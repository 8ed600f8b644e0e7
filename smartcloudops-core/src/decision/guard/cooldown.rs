//! A cooldown per (receiver, group): after an execution for a firing group, the next one
//! waits `cooldown`. A deliberate pause: a notification it holds back is recorded, not sent
//! elsewhere.

use std::time::Duration;

use futures::future::BoxFuture;

use super::{Deliver, Guard, Guarded, Hold, IdempotencyStore, Outcome, Request};
use crate::decision::{AlertStatus, Notification, NotificationKind};
use crate::error::Result;

/// Holds the notification back when its cooldown was running at [`claim`](Self::claim).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CooldownLayer {
    /// The cooldown that holds this notification back, if one does.
    running: Option<Duration>,
}

impl CooldownLayer {
    /// Holds nothing back: for a notification tried before, which claimed its cooldown then
    /// (its retries from the outbox are the same execution, not a new one).
    pub(crate) fn passed() -> Self {
        Self { running: None }
    }

    /// Claims the cooldown of `n`'s (receiver, group) in `store` when it applies (a firing
    /// group's alerts). Claimed before any guard decides, so a notification that another
    /// guard holds back starts the cooldown all the same.
    pub(crate) async fn claim(
        store: &dyn IdempotencyStore,
        cooldown: Duration,
        n: &Notification,
        now_ms: i64,
    ) -> Result<Self> {
        let applies = !cooldown.is_zero()
            && n.kind == NotificationKind::Alerts
            && n.status() == AlertStatus::Firing;
        let running = applies
            && !store
                .claim(
                    &format!("cooldown|{}|{}", n.receiver, n.group_key),
                    cooldown,
                    now_ms,
                )
                .await?;
        Ok(Self {
            running: running.then_some(cooldown),
        })
    }
}

impl Guard for CooldownLayer {}

impl<S: Deliver> Deliver for Guarded<CooldownLayer, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            if let Some(cooldown) = self.guard.running {
                return Ok(Outcome::Held(Hold::pause(
                    "cooldown",
                    format!("ran for this group less than {cooldown:?} ago"),
                )));
            }
            self.inner.deliver(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Layer;
    use super::super::MemoryIdempotency;
    use super::super::testing::*;
    use super::*;

    #[tokio::test]
    async fn a_group_runs_once_per_cooldown_while_firing() {
        let store = MemoryIdempotency::default();
        let script = Script::default();
        let firing = notification(AlertStatus::Firing);
        let minute = Duration::from_secs(60);
        let deliver = |now_ms| {
            let (store, script, firing) = (&store, &script, &firing);
            async move {
                CooldownLayer::claim(store, minute, firing, now_ms)
                    .await
                    .unwrap()
                    .layer(script)
                    .deliver(Request::new(firing))
                    .await
                    .unwrap()
            }
        };
        assert_eq!(deliver(0).await, Outcome::Delivered("ok".into()));
        assert_eq!(
            deliver(30_000).await,
            Outcome::Held(Hold::pause(
                "cooldown",
                "ran for this group less than 60s ago"
            ))
        );
        assert_eq!(deliver(60_000).await, Outcome::Delivered("ok".into()));
        assert_eq!(script.calls().len(), 2);
    }

    #[tokio::test]
    async fn resolved_notifications_and_a_zero_cooldown_are_not_held() {
        let store = MemoryIdempotency::default();
        let resolved = notification(AlertStatus::Resolved);
        let firing = notification(AlertStatus::Firing);
        for (n, cooldown) in [
            (&resolved, Duration::from_secs(60)),
            (&resolved, Duration::from_secs(60)),
            (&firing, Duration::ZERO),
            (&firing, Duration::ZERO),
        ] {
            let layer = CooldownLayer::claim(&store, cooldown, n, 0).await.unwrap();
            assert!(layer.running.is_none());
        }
    }
}
