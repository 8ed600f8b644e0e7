//! The decision layer: from scored rows to notifications and guarded remediation, with an
//! audit trail (`[decision]`).
//!
//! [`DecisionEngine`] is an [`Action`](crate::action::Action): it sees every scored batch and
//!
//! 1. runs the **rules** ([`rule`]): which rows are active, `for`, `keep_firing_for`,
//!    hysteresis and flap detection give each (rule, series) alert its life — firing,
//!    resolved, or held back as flapping (one notice, no action);
//! 2. hands fired and resolved alerts to the **dispatcher** ([`dispatch`]): silences,
//!    inhibition, grouping by labels with `group_wait` / `group_interval` /
//!    `repeat_interval`, as Alertmanager does;
//! 3. puts each due notification into the delivery **outbox** ([`outbox`], durable in
//!    `state_dir`) and **executes** it on each of the rule's receivers ([`receiver`],
//!    [`command`]) behind the same **guards** ([`guard`], layers around the receiver): an
//!    idempotency key claimed, then marked delivered (notifications are at least once under
//!    that key; a remediation runs at most once per episode), a cooldown per (receiver,
//!    group), rate limits per receiver and overall, a circuit breaker that stops a failing
//!    receiver and escalates to a person, and retries with error classification (4xx never,
//!    except 408 and 429 with its `Retry-After`; 5xx and timeouts with exponential backoff and
//!    jitter). A notification whose tries all failed goes to the receiver's fallback, or
//!    stays in the outbox and is tried again with backoff until `max_delivery_age`; then it
//!    is escalated and dead-lettered with its whole body: never silently dropped;
//! 4. writes an **audit log** ([`audit`]) linking trigger → decision → execution → result.
//!
//! A batch is acknowledged once its alert changes are in the (synced) audit log and the
//! notifications that fell due are in the outbox (and were tried once). If the audit log or
//! the outbox cannot be written, the batch is nacked. Notifications that fall due later
//! (`group_wait`) and retries are sent by a background ticker; at shutdown every pending
//! group goes into the outbox, and what is still undelivered when the process stops is sent
//! after the restart.
//!
//! With a `state_dir` (the pipeline's `[runtime] state_dir`) the engine's state (alert states,
//! groups, silences added at run time, suggestions) is kept in a [`journal`]: what a batch
//! changed is committed durably before the batch is acknowledged, and restored at start. After
//! a restart, alerts that fired before are firing again (their resolution is notified), `for`
//! timers continue, and a group waiting for `group_wait` is notified when its wait ends.
//!
//! ```
//! use smartcloudops_core::decision::{DecisionConfig, DecisionEngine};
//!
//! let config: DecisionConfig = toml::from_str(r#"
//!     idempotency = { store = "memory" }   # the default is a file, for restarts
//!
//!     [[rule]]
//!     name = "cpu-high"
//!     metric = "cpu_*"
//!     min_score = 0.9
//!     resolve_score = 0.6
//!     for = "2m"
//!     group_by = ["alertname", "service"]
//!     receivers = ["oncall"]
//!
//!     [[receiver]]
//!     name = "oncall"
//!     type = "slack"
//!     url = "https://hooks.slack.com/services/T0ACME/B0ONCALL/s3cr3tt0ken"
//! "#).unwrap();
//! let engine = DecisionEngine::new(config).unwrap();
//! assert!(engine.firing().is_empty());
//! ```

//! The engine is split by responsibility: [`config`] (`[decision]` and its checks),
//! [`notification`] (the model), [`clock`], the engine itself (`engine`: rules, groups, the
//! ticker), its durable state ([`journal`]) and the execution of one notification
//! (`execute`).

pub mod audit;
pub mod clock;
pub mod config;
pub mod dispatch;
mod engine;
mod execute;
pub mod guard;
pub mod journal;
mod matcher;
pub mod notification;
pub mod outbox;
pub mod receiver;
pub mod rule;
mod store;

pub use self::clock::{Clock, ManualClock, SystemClock};
pub use self::config::{DecisionConfig, IdempotencyBackend, IdempotencyConfig};
pub use self::engine::{DecisionEngine, DecisionStats, EngineOptions, Suggestion};
pub use self::notification::{AlertRecord, AlertStatus, Notification, NotificationKind};
pub use self::receiver::command;
pub use self::receiver::{GuardConfig, ReceiverConfig, ReceiverKind, ReceiverSettings};
