//! Helpers of the decision-layer hardening tests: scored input rows, an engine on a manual
//! clock, the audit outcomes, and a webhook receiver on loopback that records bodies.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

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

/// A scored batch of `cpu` rows (score 1 when anomalous, else 0).
pub fn input(rows: &[Row]) -> ActionInput {
    let mut b = MetricsBatchBuilder::default();
    let mut s = ScoreColumnsBuilder::with_capacity(rows.len());
    for (host, service, t, anomalous) in rows {
        b.push(
            T0 + t * 1000,
            "cpu",
            &[("host", *host), ("service", *service)],
            if *anomalous { 99.0 } else { 40.0 },
        );
        s.push(Verdict {
            score: if *anomalous { 1.0 } else { 0.0 },
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

/// A webhook receiver on 127.0.0.1 that records (path, JSON body) and answers 200.
#[derive(Clone, Default)]
pub struct Hook {
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Hook {
    pub async fn spawn() -> (Self, std::net::SocketAddr) {
        let hook = Hook::default();
        let state = hook.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
            let state = state.clone();
            async move {
                let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
                state
                    .requests
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), value));
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (hook, addr)
    }

    /// The bodies posted to `path`.
    pub fn bodies(&self, path: &str) -> Vec<Value> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }
}
