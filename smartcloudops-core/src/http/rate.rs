//! Per-client rate limits: a token bucket per client IP, in a map of bounded size.
//!
//! Hand-written rather than `governor`'s keyed limiter: that map grows with every address
//! seen until someone calls `retain_recent`, and a bound on memory is the point here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Problems;

/// `rate_limit = { … }`: requests per second each client IP may make.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client IP; `0` turns the limit off.
    pub requests_per_second: f64,
    /// Requests a client may send at once before the rate applies.
    pub burst: u32,
    /// Most client addresses tracked at once. When full, idle clients are forgotten; if none
    /// is idle, new clients are refused (429) until one is.
    pub max_clients: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        // A Prometheus with many shards sends tens of requests per second; this leaves it
        // room while stopping a single client from flooding the decoder.
        Self {
            requests_per_second: 200.0,
            burst: 400,
            max_clients: 10_000,
        }
    }
}

impl RateLimitConfig {
    /// Every problem of this table, paths relative to it.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            self.requests_per_second >= 0.0 && self.requests_per_second.is_finite(),
            "requests_per_second",
            format!(
                "must be 0 (off) or positive, got {}",
                self.requests_per_second
            ),
            "",
        );
        p.check(
            self.requests_per_second == 0.0 || self.burst >= 1,
            "burst",
            "must be at least 1",
            "",
        );
        p.check(
            self.max_clients >= 1,
            "max_clients",
            "must be at least 1",
            "",
        );
        p
    }
}

/// Token buckets keyed by client IP.
#[derive(Debug)]
pub(crate) struct ClientRateLimiter {
    config: RateLimitConfig,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl ClientRateLimiter {
    pub(crate) fn new(config: RateLimitConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `client`'s bucket at `now`; `Err(wait)` when it is empty,
    /// with how long until the next request would be allowed.
    pub(crate) fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = self.config.requests_per_second;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(self.config.burst.max(1));
        // A poisoned lock only means another request panicked mid-update; the map is valid.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&client) && buckets.len() >= self.config.max_clients {
            // Forget clients whose bucket has refilled: they are indistinguishable from new.
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
            if buckets.len() >= self.config.max_clients {
                return Err(Duration::from_secs(1));
            }
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max_clients: usize) -> ClientRateLimiter {
        ClientRateLimiter::new(RateLimitConfig {
            requests_per_second: rate,
            burst,
            max_clients,
        })
    }

    #[test]
    fn a_client_gets_its_burst_then_the_rate() {
        let l = limiter(2.0, 3, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        // Another client is not affected.
        assert!(l.check(b, t0).is_ok());
        // Half a second later one token is back.
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn the_map_stays_bounded_and_idle_clients_are_forgotten() {
        let l = limiter(1.0, 1, 2);
        let t0 = Instant::now();
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        assert!(l.check(ip(1), t0).is_ok());
        assert!(l.check(ip(2), t0).is_ok());
        // Full, nobody idle: a third client is refused rather than growing the map.
        assert!(l.check(ip(3), t0).is_err());
        assert_eq!(l.buckets.lock().unwrap().len(), 2);
        // After a second both buckets are full again, so they are dropped for the new one.
        assert!(l.check(ip(3), t0 + Duration::from_secs(1)).is_ok());
        assert!(l.buckets.lock().unwrap().len() <= 2);
    }

    #[test]
    fn zero_rate_is_off_and_bad_values_are_problems() {
        let l = limiter(0.0, 0, 1);
        for i in 0..10 {
            assert!(l.check(IpAddr::from([10, 0, 0, i]), Instant::now()).is_ok());
        }
        assert!(RateLimitConfig::default().problems().is_empty());
        let bad = RateLimitConfig {
            requests_per_second: -1.0,
            ..RateLimitConfig::default()
        };
        assert_eq!(bad.problems().0[0].path, "requests_per_second");
    }
}
