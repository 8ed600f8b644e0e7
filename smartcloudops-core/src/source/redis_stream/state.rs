//! What the consumption of a stream keeps in Redis beside the consumer group, so that it
//! survives restarts, takeovers and the loss of the group:
//!
//! - `<key_prefix>:<stream>:<group>:attempts`, a hash: entry id → failed processing attempts
//!   that counted against it, and `<id>:error` → the last one's reason. Written when a failure
//!   counts, deleted with the entry's `XACK`; the hash expires `attempts_ttl` after the last
//!   failure written, which bounds what entries lost with their group leave behind.
//! - `<key_prefix>:<stream>:<group>:acked`, a string: an id through which every entry of the
//!   stream is acknowledged by the group. It only moves forward and never passes an entry
//!   still pending with any consumer of the group, so a group created again there skips
//!   only what was acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::config::StateKeys;
use super::reply::compare_ids;

/// Acknowledges entries of one stream and moves the group's acknowledged-through mark forward,
/// in one step.
///
/// KEYS: the stream, its attempts hash, its mark. ARGV: the group, then the entry ids.
/// Returns `{acknowledged, mark}` (the mark is nil while the group has none).
///
/// The mark is the group's last delivered id, or just below the oldest entry still pending
/// with any consumer: every entry up to it was delivered and is no longer pending, so it was
/// acknowledged. Ids are compared as decimal strings, exact for any 64-bit part.
const ACK_SCRIPT: &str = r#"
local function cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am then return true end
  if not bm then return false end
  local c = cmp(am, bm)
  if c ~= 0 then return c < 0 end
  return cmp(as, bs) < 0
end
local function dec(n)
  local d = {string.byte(n, 1, -1)}
  local i = #d
  while d[i] == 48 do d[i] = 57; i = i - 1 end
  d[i] = d[i] - 1
  local s = string.gsub(string.char(unpack(d)), '^0+(%d)', '%1')
  return s
end
local function before(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then return nil end
  if not string.match(seq, '^0+$') then return ms .. '-' .. dec(seq) end
  if string.match(ms, '^0+$') then return nil end
  return dec(ms) .. '-18446744073709551615'
end
local acked = 0
if #ARGV > 1 then
  local ids = {}
  local fields = {}
  for i = 2, #ARGV do
    ids[#ids + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i] .. ':error'
  end
  acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(fields))
end
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) ~= 'table' or groups.err then return {acked, false} end
local delivered
for _, g in ipairs(groups) do
  local name, last
  for j = 1, #g - 1, 2 do
    if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
  end
  if name == ARGV[1] then delivered = last end
end
if not delivered then return {acked, false} end
local mark = delivered
local oldest = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1)
if #oldest > 0 then mark = before(oldest[1][1]) end
if not mark or mark == '0-0' then return {acked, false} end
local current = redis.call('GET', KEYS[3])
if current and not older(current, mark) then return {acked, current} end
redis.call('SET', KEYS[3], mark)
return {acked, mark}
"#;

/// Entries per `XACK` script call: Lua's `unpack` takes a few thousand values at most.
const ACK_CHUNK: usize = 1000;

/// The longest reason kept per entry: enough for any action's message, bounded per entry.
const MAX_REASON: usize = 1024;

/// What is known of an entry's failed processing attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Failures {
    /// Failures that counted against the entry (see `max_deliveries`).
    pub(super) count: u32,
    /// The last counted failure's reason.
    pub(super) last_error: Option<Arc<str>>,
}

impl Failures {
    /// The larger of two accounts of one entry (one in memory, one from Redis): each may
    /// lag the other.
    pub(super) fn max(self, other: Failures) -> Failures {
        if other.count > self.count {
            other
        } else {
            self
        }
    }
}

/// Adds to `pipe` the acknowledgement of `ids` of `stream` by `group`: `XACK`, the entries'
/// failure counts deleted, the mark moved forward. Each chunk's reply is
/// `[acknowledged, mark]`.
pub(super) fn add_ack(
    pipe: &mut redis::Pipeline,
    stream: &str,
    group: &str,
    keys: &StateKeys,
    ids: &[&str],
) -> usize {
    let mut calls = 0;
    for chunk in ids.chunks(ACK_CHUNK) {
        pipe.cmd("EVAL")
            .arg(ACK_SCRIPT)
            .arg(3)
            .arg(stream)
            .arg(&keys.attempts)
            .arg(&keys.acked)
            .arg(group)
            .arg(chunk);
        calls += 1;
    }
    calls
}

/// The mark in one reply of the ack script, if the group has one.
pub(super) fn parse_ack_mark(reply: &Value) -> Option<String> {
    match reply {
        Value::Array(parts) => parts.get(1).and_then(text),
        _ => None,
    }
}

/// Adds to `pipe` one counted failure for each of `failed` (`(id, reason)`) of one stream,
/// and the hash's expiry.
pub(super) fn add_failures(
    pipe: &mut redis::Pipeline,
    keys: &StateKeys,
    ttl: Duration,
    failed: &[(&str, &str)],
) {
    if failed.is_empty() {
        return;
    }
    for (id, reason) in failed {
        pipe.cmd("HINCRBY")
            .arg(&keys.attempts)
            .arg(*id)
            .arg(1)
            .ignore();
        pipe.cmd("HSET")
            .arg(&keys.attempts)
            .arg(format!("{id}:error"))
            .arg(bounded(reason))
            .ignore();
    }
    pipe.cmd("EXPIRE")
        .arg(&keys.attempts)
        .arg(ttl.as_secs().max(1))
        .ignore();
}

/// `HMGET` of the failure counts and reasons of `ids`.
pub(super) fn read_failures(keys: &StateKeys, ids: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(&keys.attempts);
    for id in ids {
        cmd.arg(*id).arg(format!("{id}:error"));
    }
    cmd
}

/// The reply of [`read_failures`] for `ids`: the entries with a count.
pub(super) fn parse_failures(reply: &Value, ids: &[&str]) -> HashMap<String, Failures> {
    let Value::Array(values) = reply else {
        return HashMap::new();
    };
    ids.iter()
        .zip(values.chunks(2))
        .filter_map(|(id, pair)| {
            let count: u32 = text(pair.first()?)?.parse().ok()?;
            let last_error = pair.get(1).and_then(text).map(Arc::from);
            Some(((*id).to_owned(), Failures { count, last_error }))
        })
        .collect()
}

/// Where a group that disappeared is created again, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recreation {
    /// The id the group starts after.
    pub(super) at: String,
    /// Why there, for the log.
    pub(super) why: &'static str,
}

/// Where to create a lost group again: never at `$`, which would skip what producers wrote
/// since the loss.
///
/// - The mark in Redis survived (the group alone was lost): at the mark. Entries up to it
///   were acknowledged; later ones were pending or unread and are delivered.
/// - Only this process's mark survived, and the stream still holds entries up to it (Redis
///   lost the key, not the stream): at that mark.
/// - Nothing survived (Redis restarted without persistence): from `0`. Every entry then in
///   the stream was written after the loss and must be processed.
pub(super) fn recreation_start(
    durable: Option<&str>,
    in_memory: Option<&str>,
    first_entry: Option<&str>,
) -> Recreation {
    if let Some(mark) = durable {
        return Recreation {
            at: mark.to_owned(),
            why: "at the acknowledged-through mark kept in Redis",
        };
    }
    if let (Some(mark), Some(first)) = (in_memory, first_entry)
        && compare_ids(first, mark).is_le()
    {
        return Recreation {
            at: mark.to_owned(),
            why: "at this process's acknowledged-through mark (the key was lost, the stream was not)",
        };
    }
    Recreation {
        at: "0".to_owned(),
        why: "from the beginning (the stream was lost with the group: everything in it is new)",
    }
}

/// `reason`, cut on a character boundary to at most [`MAX_REASON`] bytes.
fn bounded(reason: &str) -> &str {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_lost_group_is_never_created_again_at_the_end() {
        let durable = recreation_start(Some("5-3"), Some("9-0"), Some("1-0"));
        assert_eq!(durable.at, "5-3", "the durable mark wins");
        let kept = recreation_start(None, Some("9-0"), Some("1-0"));
        assert_eq!(
            kept.at, "9-0",
            "the stream survived: skip what was acknowledged"
        );
        let lost = recreation_start(None, Some("9-0"), Some("12-0"));
        assert_eq!(
            lost.at, "0",
            "only newer entries: they were all written after the loss"
        );
        assert_eq!(recreation_start(None, Some("9-0"), None).at, "0");
        assert_eq!(recreation_start(None, None, Some("1-0")).at, "0");
    }

    #[test]
    fn failure_counts_parse_with_their_reasons_and_missing_ones_are_absent() {
        let reply = Value::Array(vec![
            bulk("2"),
            bulk("sink down"),
            Value::Nil,
            Value::Nil,
            bulk("x"),
            Value::Nil,
        ]);
        let parsed = parse_failures(&reply, &["1-0", "2-0", "3-0"]);
        assert_eq!(
            parsed.get("1-0"),
            Some(&Failures {
                count: 2,
                last_error: Some(Arc::from("sink down"))
            })
        );
        assert!(!parsed.contains_key("2-0"), "never failed");
        assert!(!parsed.contains_key("3-0"), "not a count");
        let memory = Failures {
            count: 3,
            last_error: None,
        };
        assert_eq!(memory.clone().max(Failures::default()).count, 3);
        assert_eq!(Failures::default().max(memory).count, 3);
    }

    #[test]
    fn ack_replies_carry_the_mark() {
        let reply = Value::Array(vec![Value::Int(3), bulk("7-2")]);
        assert_eq!(parse_ack_mark(&reply).as_deref(), Some("7-2"));
        let none = Value::Array(vec![Value::Int(3), Value::Nil]);
        assert_eq!(parse_ack_mark(&none), None);
    }

    #[test]
    fn reasons_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_REASON);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_REASON && cut.len() >= MAX_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn acks_are_chunked_for_lua() {
        let keys = StateKeys {
            attempts: "a".into(),
            acked: "m".into(),
        };
        let ids: Vec<String> = (0..2500).map(|i| format!("{i}-0")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut pipe = redis::pipe();
        assert_eq!(add_ack(&mut pipe, "s", "g", &keys, &refs), 3);
    }
}
