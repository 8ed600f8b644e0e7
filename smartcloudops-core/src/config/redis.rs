//! Checks and helpers for the Redis stages of a configuration.

use super::{ActionConfig, PipelineConfig, SourceConfig, check_batch_size};
use crate::redis::RedisConnection;

impl PipelineConfig {
    /// The `[redis]` connection, or the default (`redis://127.0.0.1:6379`).
    pub fn redis_connection(&self) -> RedisConnection {
        self.redis.clone().unwrap_or_default()
    }
}

/// Reports `problems` of a part at `path` (`field` appended).
fn report(
    check: &mut impl FnMut(bool, &str, String, &str),
    path: &str,
    problems: Vec<(&'static str, String)>,
) {
    for (field, message) in problems {
        check(false, &format!("{path}.{field}"), message, "");
    }
}

pub(super) fn validate(config: &PipelineConfig, check: &mut impl FnMut(bool, &str, String, &str)) {
    if let Some(redis) = &config.redis {
        report(check, "redis", redis.problems());
    }
    let connection = |c: &Option<RedisConnection>| c.as_ref().map(RedisConnection::problems);
    match &config.source {
        SourceConfig::RedisPubsub(r) => {
            if let Some(p) = connection(&r.redis) {
                report(check, "source.redis", p);
            }
            check(
                !r.channels.is_empty() || !r.patterns.is_empty(),
                "source.channels",
                "subscribe to at least one channel or pattern".into(),
                "e.g. channels = [\"metrics\"] or patterns = [\"metrics.*\"]",
            );
            check_batch_size(check, r.batch_size, "");
        }
        SourceConfig::RedisStream(r) => {
            if let Some(p) = connection(&r.redis) {
                report(check, "source.redis", p);
            }
            check(
                !r.streams.is_empty(),
                "source.streams",
                "must list at least one stream".into(),
                "",
            );
            check(
                !r.group.trim().is_empty(),
                "source.group",
                "must not be empty".into(),
                "every replica of the pipeline uses the same group",
            );
            check(
                r.consumer.as_ref().is_none_or(|c| !c.trim().is_empty()),
                "source.consumer",
                "must not be empty".into(),
                "leave it out for {hostname}-{pid}",
            );
            check_batch_size(check, r.batch_size, "");
            check(
                r.max_deliveries >= 1,
                "source.max_deliveries",
                "must be at least 1".into(),
                "",
            );
            check(
                r.max_unacked >= 1,
                "source.max_unacked",
                "must be at least 1".into(),
                "",
            );
            check(
                !r.block.is_zero() && r.block <= super::MAX_DURATION,
                "source.block",
                "must be longer than 0 and at most a day".into(),
                "e.g. \"500ms\"",
            );
            check(
                !r.claim_interval.is_zero(),
                "source.claim_interval",
                "must be longer than 0".into(),
                "e.g. \"5s\"",
            );
            check(
                r.claim_idle >= r.block,
                "source.claim_idle",
                "must be at least `block`".into(),
                "an entry is claimed from a consumer that kept it this long without acknowledging it",
            );
        }
        _ => {}
    }
    if let Some(state) = config
        .detector
        .as_ref()
        .and_then(|d| d.redis_state.as_ref())
    {
        report(check, "detector.redis_state", state.problems());
    }
    for (i, a) in config.actions.iter().enumerate() {
        let path = format!("action[{i}]");
        match a {
            ActionConfig::RedisPublish(p) => {
                if let Some(problems) = connection(&p.redis) {
                    report(check, &format!("{path}.redis"), problems);
                }
                check(
                    !p.channel.trim().is_empty(),
                    &format!("{path}.channel"),
                    "must not be empty".into(),
                    "",
                );
            }
            ActionConfig::RedisStream(s) => {
                if let Some(problems) = connection(&s.redis) {
                    report(check, &format!("{path}.redis"), problems);
                }
                check(
                    !s.stream.trim().is_empty(),
                    &format!("{path}.stream"),
                    "must not be empty".into(),
                    "",
                );
            }
            ActionConfig::RedisCache(c) => report(check, &path, c.problems()),
            _ => {}
        }
    }
}
