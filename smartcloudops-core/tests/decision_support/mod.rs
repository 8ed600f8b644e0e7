//! Helpers of the decision-layer hardening tests: scored input rows, an engine on a manual
//! clock, the audit outcomes, a scripted webhook receiver on loopback, and what test
//! commands ran.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

use serde_json::Value;
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions, ManualClock};
use smartcloudops_core::detector::{ScoreColumnsBuilder, Verdict};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::{ActionInput, Alert};

/// 2025-11-25T12:00:00Z.
pub const T0: i64 = 1_764_072_000_000;

/// One scored row: host, service, event time (s), anomalous.
pub type Row<'a> = (&'a str, &'a str, i64, bool);

/// One scored row: host, service, event time (s), value, score, anomalous.
pub type ScoredRow<'a> = (&'a str, &'a str, i64, f64, f64, bool);

/// A scored batch of `cpu` rows (score 1 and value 99 when anomalous, else 0 and 40).
pub fn input(rows: &[Row]) -> ActionInput {
    let scored: Vec<ScoredRow> = rows
        .iter()
        .map(|&(host, service, t, anomalous)| {
            let (value, score) = if anomalous { (99.0, 1.0) } else { (40.0, 0.0) };
            (host, service, t, value, score, anomalous)
        })
        .collect();
    scored_input(&scored)
}

/// A scored batch of `cpu` rows with the given values and scores.
pub fn scored_input(rows: &[ScoredRow]) -> ActionInput {
    let mut b = MetricsBatchBuilder::default();
    let mut s = ScoreColumnsBuilder::with_capacity(rows.len());
    for (host, service, t, value, score, anomalous) in rows {
        b.push(
            T0 + t * 1000,
            "cpu",
            &[("host", *host), ("service", *service)],
            *value,
        );
        s.push(Verdict {
            score: *score,
            is_anomaly: *anomalous,
            expected: 40.0,
            lower: 30.0,
            upper: 50.0,
            since_ms: anomalous.then_some(T0 + t * 1000),
            ..Verdict::NONE
        });
    }
    let batch = s.finish(&b.finish(), "ewma").unwrap();
    let alerts = Alert::from_scored(&batch).unwrap();
    ActionInput::new(batch, alerts)
}

/// An engine for `toml_text` on `clock`, keys in memory, no ticker.
pub fn engine(toml_text: &str, clock: Arc<ManualClock>) -> DecisionEngine {
    let config: DecisionConfig = toml::from_str(toml_text).unwrap();
    DecisionEngine::with_options(
        config,
        EngineOptions {
            clock,
            ticker: false,
            idempotency: Some(Arc::new(MemoryIdempotency::default())),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// The outcomes of the audit records of `kind`, in order.
pub fn outcomes(engine: &DecisionEngine, kind: &str) -> Vec<String> {
    engine
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.outcome)
        .collect()
}

/// A scripted answer: status and `Retry-After`.
pub type Answer = (u16, Option<&'static str>);

/// A local HTTP receiver on 127.0.0.1: records every request (path, JSON body, when),
/// answers from a script (then 200).
#[derive(Clone, Default)]
pub struct Hook {
    requests: Arc<Mutex<Vec<(String, Value, Instant)>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Hook {
    pub async fn spawn() -> (Self, SocketAddr) {
        let receiver = Hook::default();
        let state = receiver.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
            let state = state.clone();
            async move {
                let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
                state
                    .requests
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), value, Instant::now()));
                let (status, retry_after) = state
                    .script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or((200, None));
                let mut headers = HeaderMap::new();
                if let Some(after) = retry_after {
                    headers.insert("retry-after", after.parse().unwrap());
                }
                (StatusCode::from_u16(status).unwrap(), headers, "ok").into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, addr)
    }

    /// Answers the next requests with `responses`, in order.
    pub fn answer(&self, responses: &[Answer]) {
        self.script
            .lock()
            .unwrap()
            .extend(responses.iter().copied());
    }

    /// The bodies posted to `path`.
    pub fn bodies(&self, path: &str) -> Vec<Value> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, v, _)| v.clone())
            .collect()
    }

    /// When each request to `path` arrived.
    pub fn times(&self, path: &str) -> Vec<Instant> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, _, t)| *t)
            .collect()
    }
}

/// The names of the `ran-*` files a test command left in `dir`, sorted.
pub fn ran(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ran-"))
        .collect();
    names.sort();
    names
}
