//! The remote-write receiver against hostile and unauthenticated clients, on 127.0.0.1:
//! ingestion limits (400/413 with the reason, a dead letter naming the client), the snappy
//! length checked before allocating, bearer and basic auth, the slowloris header timeout,
//! the connection cap, per-client rate limits, the loopback rule and TLS.

use std::sync::Arc;
use std::time::Duration;

use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::component::ComponentConfig;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::decode::DecodeLimits;
use smartcloudops_core::decode::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use smartcloudops_core::http::{AuthConfig, RateLimitConfig, ServerConfig, TlsConfig};
use smartcloudops_core::source::{RemoteWriteConfig, RemoteWriteSource};
use smartcloudops_core::{Pipeline, PipelineHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A receiver on a free loopback port, run by a pipeline that records rows and dead letters.
struct Receiver {
    url: String,
    address: std::net::SocketAddr,
    letters: Arc<MemoryDeadLetters>,
    rows: Arc<MemoryAction>,
    handle: PipelineHandle,
}

fn start(config: RemoteWriteConfig) -> Receiver {
    start_in(config, std::path::Path::new("."))
}

fn start_in(config: RemoteWriteConfig, base_dir: &std::path::Path) -> Receiver {
    let config = RemoteWriteConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let source = RemoteWriteSource::bind_in(config, base_dir).unwrap();
    let address = source.local_addr().unwrap();
    let rows = Arc::new(MemoryAction::new().every_batch());
    let letters = Arc::new(MemoryDeadLetters::default());
    let handle = Pipeline::builder(source)
        .shared_action(rows.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn();
    Receiver {
        url: format!("http://{address}/api/v1/write"),
        address,
        letters,
        rows,
        handle,
    }
}

fn label(name: &str, value: &str) -> Label {
    Label {
        name: name.into(),
        value: value.into(),
    }
}

fn one_series(labels: Vec<Label>, samples: usize) -> WriteRequest {
    WriteRequest {
        timeseries: vec![TimeSeries {
            labels,
            samples: (0..samples)
                .map(|i| Sample {
                    value: i as f64,
                    timestamp: 1_764_065_100_000 + i as i64,
                })
                .collect(),
        }],
    }
}

fn good_request() -> Vec<u8> {
    one_series(vec![label("__name__", "up"), label("job", "node")], 1).to_body()
}

async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> reqwest::Response {
    client
        .post(url)
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Asserts a refusal: its status, a reason naming `limit`, and one more dead letter whose
/// reason names it and whose origin names the client.
async fn assert_refused(r: &Receiver, body: Vec<u8>, status: u16, limit: &str, letters: usize) {
    let response = post(&reqwest::Client::new(), &r.url, body).await;
    assert_eq!(response.status(), status, "for {limit}");
    let text = response.text().await.unwrap();
    assert!(text.contains(limit), "{text:?} should name {limit}");
    let all = r.letters.letters();
    assert_eq!(all.len(), letters, "one dead letter per refusal");
    let letter = all.last().unwrap();
    assert!(letter.reason.contains(limit), "{letter:?}");
    assert!(
        letter
            .origin
            .starts_with("remote_write request from 127.0.0.1:"),
        "the dead letter names the client: {letter:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_thousand_duplicate_labels_are_answered() {
    let dup: Vec<Label> = std::iter::once(label("__name__", "cpu"))
        .chain((0..80_000).map(|i| label("dup", &format!("v{i}"))))
        .collect();
    let body = one_series(dup, 1).to_body();
    // Default limits: refused with the reason (labels are counted while read, never sorted).
    let r = start(RemoteWriteConfig::default());
    assert_refused(&r, body.clone(), 400, "max_labels", 1).await;
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
    // Limits raised: accepted, the duplicates resolved by the O(n log n) sort (last wins).
    let r = start(RemoteWriteConfig {
        limits: DecodeLimits {
            max_labels: 100_000,
            ..DecodeLimits::default()
        },
        ..RemoteWriteConfig::default()
    });
    let response = post(&reqwest::Client::new(), &r.url, body).await;
    assert_eq!(response.status(), 204);
    let batches = r.rows.batches();
    let cols = smartcloudops_core::schema::MetricsColumns::try_new(&batches[0], "t").unwrap();
    assert_eq!(cols.labels(0), vec![("dup".into(), "v79999".into())]);
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snappy_body_claiming_4_gib_is_refused_before_decompressing() {
    let r = start(RemoteWriteConfig::default());
    // A snappy block is its decompressed length as a varint, then the data: claim 4 GiB - 16.
    let mut body = Vec::new();
    let mut claimed: u64 = (4 << 30) - 16;
    while claimed >= 0x80 {
        body.push((claimed as u8) | 0x80);
        claimed >>= 7;
    }
    body.push(claimed as u8);
    body.extend_from_slice(b"\x00tiny");
    assert_refused(&r, body, 413, "max_decompressed_bytes", 1).await;
    // The receiver still serves.
    let response = post(&reqwest::Client::new(), &r.url, good_request()).await;
    assert_eq!(response.status(), 204);
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_refuses_with_its_reason_and_a_dead_letter_naming_the_client() {
    let r = start(RemoteWriteConfig {
        max_body_bytes: 64 << 10,
        limits: DecodeLimits {
            max_labels: 4,
            max_label_name_bytes: 16,
            max_label_value_bytes: 32,
            max_series: 2,
            max_samples: 10,
            max_decompressed_bytes: 32 << 10,
            max_batch_label_bytes: 1 << 20,
            ..DecodeLimits::default()
        },
        ..RemoteWriteConfig::default()
    });
    let name = || label("__name__", "m");
    let many_labels = (0..5).map(|i| label(&format!("l{i}"), "v"));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            one_series(std::iter::once(name()).chain(many_labels).collect(), 1).to_body(),
            400,
            "max_labels",
        ),
        (
            one_series(vec![name(), label(&"n".repeat(17), "v")], 1).to_body(),
            400,
            "max_label_name_bytes",
        ),
        (
            one_series(vec![name(), label("k", &"v".repeat(33))], 1).to_body(),
            400,
            "max_label_value_bytes",
        ),
        (
            WriteRequest {
                timeseries: (0..3)
                    .map(|_| one_series(vec![name()], 1).timeseries.remove(0))
                    .collect(),
            }
            .to_body(),
            400,
            "max_series",
        ),
        (one_series(vec![name()], 11).to_body(), 400, "max_samples"),
        (
            // Zeros compress well: small on the wire, over the decompressed limit.
            snap::raw::Encoder::new()
                .compress_vec(&vec![0u8; 40 << 10])
                .unwrap(),
            413,
            "max_decompressed_bytes",
        ),
        (vec![0u8; 65 << 10], 413, "length limit"),
    ];
    for (i, (body, status, limit)) in cases.into_iter().enumerate() {
        assert_refused(&r, body, status, limit, i + 1).await;
    }
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

fn token_file(dir: &tempfile::TempDir, token: &str) -> std::path::PathBuf {
    let path = dir.path().join("rw.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_and_basic_auth_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    token_file(&dir, "s3cret-token");
    let r = start_in(
        RemoteWriteConfig {
            server: ServerConfig {
                auth: Some(AuthConfig {
                    token_file: Some("rw.token".into()),
                    token_env: None,
                    username: Some("prometheus".into()),
                }),
                ..ServerConfig::default()
            },
            ..RemoteWriteConfig::default()
        },
        dir.path(),
    );
    let client = reqwest::Client::new();
    let send = |auth: Option<(&str, String)>| {
        let mut request = client
            .post(&r.url)
            .header("Content-Encoding", "snappy")
            .body(good_request());
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        request.send()
    };
    let none = send(None).await.unwrap();
    assert_eq!(none.status(), 401);
    let challenges: Vec<_> = none
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(challenges.iter().any(|c| c.starts_with("Bearer")));
    assert!(challenges.iter().any(|c| c.starts_with("Basic")));
    let wrong = send(Some(("Authorization", "Bearer s3cret-tokem".into())))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = send(Some(("Authorization", "Bearer s3cret-token".into())))
        .await
        .unwrap();
    assert_eq!(right.status(), 204);
    let basic = client
        .post(&r.url)
        .basic_auth("prometheus", Some("s3cret-token"))
        .body(good_request())
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 204);
    let basic_wrong = client
        .post(&r.url)
        .basic_auth("prometheus", Some("nope"))
        .body(good_request())
        .send()
        .await
        .unwrap();
    assert_eq!(basic_wrong.status(), 401);
    assert_eq!(
        r.rows.batches().len(),
        2,
        "only the authenticated requests got in"
    );
    r.handle.shutdown();
    let report = r.handle.wait().await.unwrap();
    let stage = report.metrics.stage("source:remote_write").unwrap();
    let gauge = |name: &str| stage.gauges.iter().find(|g| g.name == name).unwrap().value;
    assert_eq!(gauge("http_unauthorized_total"), 3.0);
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    // A generous bound: the server's timeouts below are 1 s.
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_disconnected_and_idle_connections_are_closed() {
    let r = start(RemoteWriteConfig {
        server: ServerConfig {
            header_read_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        },
        ..RemoteWriteConfig::default()
    });
    // Slowloris: part of a header, then nothing.
    let mut slow = TcpStream::connect(r.address).await.unwrap();
    slow.write_all(b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    read_to_close(&mut slow).await;
    // A kept-alive connection that goes idle after its request is closed too.
    let mut idle = TcpStream::connect(r.address).await.unwrap();
    idle.write_all(b"GET /api/v1/write HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds() {
    let r = start(RemoteWriteConfig {
        server: ServerConfig {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(60),
            ..ServerConfig::default()
        },
        ..RemoteWriteConfig::default()
    });
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(r.address).await.unwrap();
        c.write_all(b"POST /api/v1/write HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    // The two connections are accepted before the third (one accept loop, in order).
    let mut third = TcpStream::connect(r.address).await.unwrap();
    let answer = read_to_close(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // Closing one frees its slot.
    drop(held.pop());
    let client = reqwest::Client::new();
    let mut status = 0;
    for _ in 0..100 {
        match client
            .post(&r.url)
            .body(good_request())
            .send()
            .await
            .map(|r| r.status().as_u16())
        {
            Ok(204) => {
                status = 204;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(status, 204);
    drop(held);
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let r = start(RemoteWriteConfig {
        server: ServerConfig {
            rate_limit: RateLimitConfig {
                requests_per_second: 0.1,
                burst: 2,
                max_clients: 16,
            },
            ..ServerConfig::default()
        },
        ..RemoteWriteConfig::default()
    });
    let client = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(post(&client, &r.url, good_request()).await.status(), 204);
    }
    let limited = post(&client, &r.url, good_request()).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[test]
fn a_non_loopback_listener_without_auth_is_a_config_error() {
    let config: RemoteWriteConfig = toml::from_str("listen = \"0.0.0.0:9201\"").unwrap();
    let problems = config.problems();
    assert_eq!(problems.0.len(), 1, "{problems:?}");
    assert_eq!(problems.0[0].path, "server.auth");
    assert!(RemoteWriteSource::bind(config).is_err());
    let allowed: RemoteWriteConfig =
        toml::from_str("listen = \"0.0.0.0:9201\"\nserver = { allow_unauthenticated = true }")
            .unwrap();
    assert!(allowed.problems().is_empty());
    let authed: RemoteWriteConfig =
        toml::from_str("listen = \"0.0.0.0:9201\"\nserver.auth = { token_env = \"RW_TOKEN\" }")
            .unwrap();
    assert!(authed.problems().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), signing_key.serialize_pem()).unwrap();
    let r = start_in(
        RemoteWriteConfig {
            server: ServerConfig {
                tls: Some(TlsConfig {
                    cert_file: "cert.pem".into(),
                    key_file: "key.pem".into(),
                }),
                ..ServerConfig::default()
            },
            ..RemoteWriteConfig::default()
        },
        dir.path(),
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .resolve("localhost", r.address)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/v1/write", r.address.port());
    let response = post(&client, &url, good_request()).await;
    assert_eq!(response.status(), 204);
    assert_eq!(r.rows.batches().len(), 1);
    // Plain HTTP to the TLS port gets no answer.
    assert!(
        reqwest::Client::new()
            .post(&r.url)
            .body(good_request())
            .send()
            .await
            .is_err()
    );
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_get_503_and_a_slow_body_times_out() {
    let r = start(RemoteWriteConfig {
        server: ServerConfig {
            max_concurrent_requests: 1,
            body_read_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        },
        ..RemoteWriteConfig::default()
    });
    // A request whose body never finishes holds the only slot.
    let mut slow = TcpStream::connect(r.address).await.unwrap();
    slow.write_all(
        b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b",
    )
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let status = post(&client, &r.url, good_request())
            .await
            .status()
            .as_u16();
        statuses.push(status);
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    // The slow body runs out of time: the request is answered (and dead-lettered), and the
    // slot is free again.
    let answer = read_to_close_or_answer(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer:?}");
    assert!(
        r.letters
            .letters()
            .iter()
            .any(|l| l.reason.contains("body")),
        "{:?}",
        r.letters.letters()
    );
    assert_eq!(post(&client, &r.url, good_request()).await.status(), 204);
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}

/// The first bytes the server answers (or all of it, if it closes first).
async fn read_to_close_or_answer(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
        .await
        .expect("the server did not answer")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_rows_carry_the_client_that_sent_them() {
    let r = start(RemoteWriteConfig::default());
    let response = post(&reqwest::Client::new(), &r.url, good_request()).await;
    assert_eq!(response.status(), 204);
    let inputs = r.rows.inputs();
    assert_eq!(inputs.len(), 1);
    let origin = &inputs[0].origin;
    assert_eq!(origin.source, "remote_write");
    assert!(
        origin
            .client
            .as_deref()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{origin:?}"
    );
    r.handle.shutdown();
    r.handle.wait().await.unwrap();
}
