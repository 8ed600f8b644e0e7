//! A time limit on each try: a try that takes longer fails as transient (worth another try).

use std::time::Duration;

use futures::future::BoxFuture;

use super::{Deliver, Guard, Guarded, Outcome, Request};
use crate::decision::receiver::DeliveryError;
use crate::error::Result;

/// Bounds each try by `timeout`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeoutLayer(pub(crate) Duration);

impl Guard for TimeoutLayer {}

impl<S: Deliver> Deliver for Guarded<TimeoutLayer, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            match tokio::time::timeout(self.guard.0, self.inner.deliver(request)).await {
                Ok(outcome) => outcome,
                Err(_) => Ok(Outcome::failed(DeliveryError::transient(format!(
                    "timed out after {:?}",
                    self.guard.0
                )))),
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

    #[tokio::test(start_paused = true)]
    async fn a_slow_try_fails_as_transient_and_a_quick_one_passes() {
        let n = notification(AlertStatus::Firing);
        let slow = Script {
            takes: Duration::from_secs(5),
            ..Script::default()
        };
        let limited = TimeoutLayer(Duration::from_secs(2)).layer(&slow);
        let start = tokio::time::Instant::now();
        assert_eq!(
            limited.deliver(Request::new(&n)).await.unwrap(),
            transient("timed out after 2s")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let quick = Script {
            takes: Duration::from_secs(1),
            ..Script::default()
        };
        let limited = TimeoutLayer(Duration::from_secs(2)).layer(&quick);
        assert_eq!(
            limited.deliver(Request::new(&n)).await.unwrap(),
            Outcome::Delivered("ok".into())
        );
    }
}
