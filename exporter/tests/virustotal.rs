//! The VirusTotal checker against a local server that speaks the v3 files API
//! (the real service cannot be reached from here): found, unknown, uploaded,
//! rate-limited and malformed answers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use fleetsnitch::{
    config::VirusTotalConfig,
    model::{Activity, Sha256},
    sinks::virustotal::{self, Check, VirusTotalMetrics},
    telemetry,
};
use prometheus_client::registry::Registry;

const MALICIOUS: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const UNKNOWN: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const LIMITED: &str = "3333333333333333333333333333333333333333333333333333333333333333";
const MALFORMED: &str = "4444444444444444444444444444444444444444444444444444444444444444";

#[derive(Default)]
struct Server {
    /// (path of the request, time, api key) in arrival order.
    requests: Vec<(String, Instant, Option<String>)>,
    rate_limited_once: bool,
    uploads: Vec<usize>,
}

type Shared = Arc<Mutex<Server>>;

async fn file(
    State(server): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let mut server = server.lock().unwrap();
    let key = headers
        .get("x-apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    server
        .requests
        .push((format!("/files/{id}"), Instant::now(), key));
    match id.as_str() {
        MALICIOUS => (
            StatusCode::OK,
            r#"{"data":{"type":"file","id":"1111","attributes":{"last_analysis_stats":
               {"malicious":5,"suspicious":2,"harmless":0,"undetected":60,"timeout":0}}}}"#
                .to_owned(),
        ),
        LIMITED if !server.rate_limited_once => {
            server.rate_limited_once = true;
            (
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"code":"QuotaExceededError","message":"Quota exceeded"}}"#.to_owned(),
            )
        }
        LIMITED => (
            StatusCode::OK,
            r#"{"data":{"attributes":{"last_analysis_stats":{"malicious":0,"undetected":70}}}}"#
                .to_owned(),
        ),
        MALFORMED => (StatusCode::OK, r#"{"data": "#.to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"NotFoundError","message":"File not found"}}"#.to_owned(),
        ),
    }
}

async fn upload(State(server): State<Shared>, body: Bytes) -> impl IntoResponse {
    let mut server = server.lock().unwrap();
    server
        .requests
        .push(("/files (upload)".into(), Instant::now(), None));
    server.uploads.push(body.len());
    (
        StatusCode::OK,
        r#"{"data":{"type":"analysis","id":"analysis-1"}}"#,
    )
}

async fn start_server() -> (String, Shared) {
    let shared = Shared::default();
    let app = Router::new()
        .route("/api/v3/files/{id}", get(file))
        .route("/api/v3/files", post(upload))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/api/v3"), shared)
}

/// The checker's metrics, registered in a registry of their own.
fn metrics() -> (Registry, VirusTotalMetrics) {
    let mut registry = telemetry::registry();
    let metrics = VirusTotalMetrics::register(&mut registry);
    (registry, metrics)
}

fn lookups(registry: &Registry) -> HashMap<String, u64> {
    let text = telemetry::encode(registry);
    text.lines()
        .filter_map(|line| line.strip_prefix("fleetsnitch_virustotal_lookups_total{result=\""))
        .filter_map(|rest| {
            let (result, value) = rest.split_once("\"} ")?;
            Some((result.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn wait_until(
    metrics: &Registry,
    done: impl Fn(&HashMap<String, u64>) -> bool,
) -> HashMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = lookups(metrics);
        if done(&seen) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(base_url: String, upload_unknown: bool) -> VirusTotalConfig {
    VirusTotalConfig {
        api_key: Some("test-key".into()),
        base_url,
        request_interval: Duration::from_millis(200),
        upload_unknown,
        ..VirusTotalConfig::default()
    }
}

/// The clock verdicts expire by: a day, as by default.
fn activity() -> Activity {
    Activity::new(Duration::from_secs(86_400))
}

#[tokio::test]
async fn verdicts_rate_limits_and_bad_answers_are_handled_and_counted() {
    let (base_url, server) = start_server().await;
    let (registry, metrics) = metrics();
    let handle = virustotal::spawn(&config(base_url, false), metrics, None, activity())
        .unwrap()
        .expect("an API key enables the checker");
    for sha256 in [MALICIOUS, UNKNOWN, LIMITED, MALFORMED] {
        handle.check(Check {
            path: format!("/opt/{}", &sha256[..4]),
            sha256: Sha256::from_hex(sha256).unwrap(),
        });
    }
    let seen = wait_until(&registry, |seen| {
        seen.get("malformed") == Some(&3) && seen.get("found") == Some(&2)
    })
    .await;
    assert_eq!(seen.get("found"), Some(&2), "{seen:?}");
    assert_eq!(seen.get("not_found"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("rate_limited"), Some(&1), "{seen:?}");
    assert_eq!(
        seen.get("malformed"),
        Some(&3),
        "given up after 3 attempts: {seen:?}"
    );

    let text = telemetry::encode(&registry);
    assert!(
        text.contains(&format!(
            "fleetsnitch_virustotal_detections{{exe=\"/opt/1111\",sha256=\"{MALICIOUS}\"}} 7"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fleetsnitch_virustotal_detections{{exe=\"/opt/3333\",sha256=\"{LIMITED}\"}} 0"
        )),
        "{text}"
    );

    let server = server.lock().unwrap();
    assert!(server.uploads.is_empty(), "uploads are off by default");
    assert!(
        server
            .requests
            .iter()
            .all(|(_, _, key)| key.as_deref() == Some("test-key"))
    );
    // One request per interval at most; after the 429 the pause doubles.
    for pair in server.requests.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= Duration::from_millis(190),
            "requests {gap:?} apart: {:?}",
            server.requests
        );
    }
    let after_limit = server
        .requests
        .iter()
        .position(|(path, ..)| path.ends_with(LIMITED))
        .unwrap();
    let gap = server.requests[after_limit + 1].1 - server.requests[after_limit].1;
    assert!(
        gap >= Duration::from_millis(390),
        "no back-off after 429: {gap:?}"
    );
}

#[tokio::test]
async fn unknown_file_is_uploaded_only_when_enabled() {
    let (base_url, server) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool");
    let content = b"#!/bin/sh\necho unknown tool\n";
    std::fs::write(&path, content).unwrap();
    use sha2::Digest;
    let sha256 = Sha256::from_digest(&sha2::Sha256::digest(content));

    let (registry, metrics) = metrics();
    let handle = virustotal::spawn(&config(base_url, true), metrics, None, activity())
        .unwrap()
        .unwrap();
    handle.check(Check {
        path: path.to_string_lossy().into_owned(),
        sha256,
    });
    // Every result is exported from the start, at zero: wait for the count.
    let seen = wait_until(&registry, |seen| {
        seen.get("uploaded").is_some_and(|n| *n > 0)
    })
    .await;
    assert_eq!(seen.get("uploaded"), Some(&1), "{seen:?}");
    let server = server.lock().unwrap();
    assert_eq!(server.uploads.len(), 1);
    assert!(
        server.uploads[0] > content.len(),
        "multipart body carries the file"
    );
}

#[test]
fn no_api_key_means_no_checker() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let handle = virustotal::spawn(
        &VirusTotalConfig::default(),
        VirusTotalMetrics::default(),
        None,
        activity(),
    )
    .unwrap();
    assert!(handle.is_none());
}
