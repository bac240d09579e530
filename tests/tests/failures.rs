//! Failures that leave the operator blind, caused for real, each seen three
//! ways: its counter on `/metrics`, an `agent_error` event in the journal
//! (read back with the sqlite3 shell), and its alert from a real Prometheus
//! evaluating the shipped rules (`for:` shortened in a copy).
//!
//! One agent lives through all of them at once:
//! - fanotify unavailable: the agent runs without CAP_SYS_ADMIN (`setpriv
//!   --bounding-set -sys_admin`, as a pod whose securityContext leaves it
//!   out), which fanotify_init needs;
//! - a corrupt GeoIP database: the fixture with its data section overwritten
//!   (it opens, every lookup of the peer's address fails);
//! - an OTLP collector that stays down: a loopback port nobody listens on;
//! - a connection log that becomes unwritable: its own 64 KiB tmpfs, filled
//!   once the agent runs;
//! - VirusTotal errors: a local server speaking HTTP that answers 500;
//! - the Kubernetes API unreachable: a stand-in API server on loopback that
//!   answers every request 500 (a `Status`, as the API server does), then
//!   heals: the agent's view is current again, the alert resolves.
//!
//! The agent keeps running and counting through all of it.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    TempDir, Testbed,
    agent::free_port,
    filesystems::{Mounts, copy_executable},
    query_journal, require_root, run_client,
    servers::Prometheus,
    skip, workspace_root,
};

/// An HTTP answer: the status line's code and reason, and a JSON body.
fn json_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// VirusTotal's answer: 500 to everything.
fn virustotal_answer(_request_line: &str, _healthy: bool) -> String {
    json_response(
        "500 Internal Server Error",
        r#"{"error":{"code":"InternalError","message":"test"}}"#,
    )
}

/// The Kubernetes API server's answer: a 500 `Status` while failing; once
/// healthy, an empty pod list, and watches that end at once (the agent opens
/// the next one, paced by its back-off).
fn kubernetes_answer(request_line: &str, healthy: bool) -> String {
    if !healthy {
        return json_response(
            "500 Internal Server Error",
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcdserver: request timed out","reason":"InternalError","code":500}"#,
        );
    }
    if request_line.contains("watch=true") {
        // No length: the (empty) stream of events ends when the connection closes.
        return "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
            .to_owned();
    }
    json_response(
        "200 OK",
        r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}"#,
    )
}

/// A loopback HTTP server answering each request with `answer(request line,
/// healthy)`, counting them; it starts failing (`healthy` false).
struct FailingServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl FailingServer {
    fn start(answer: fn(&str, bool) -> String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (counted, healing, stopping) = (requests.clone(), healthy.clone(), stop.clone());
        thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                // The request's head (GET: no body), then the answer.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                counted.fetch_add(1, Ordering::Relaxed);
                let head = String::from_utf8_lossy(&head);
                let request_line = head.lines().next().unwrap_or_default();
                let _ = stream
                    .write_all(answer(request_line, healing.load(Ordering::Relaxed)).as_bytes());
            }
        });
        Ok(Self {
            addr,
            requests,
            healthy,
            stop,
        })
    }

    fn heal(&self) {
        self.healthy.store(true, Ordering::Relaxed);
    }
}

impl Drop for FailingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The GeoLite2-Country fixture with its data section overwritten: the
/// metadata is intact, so it opens, and every record fails to decode.
fn corrupt_geoip(dir: &Path) -> Result<PathBuf> {
    let original = workspace_root().join("exporter/tests/data/GeoLite2-Country.mmdb");
    let mut bytes = fs::read(&original)?;
    let reader = maxminddb::Reader::open_readfile(&original)?;
    let metadata = reader.metadata();
    let tree = metadata.node_count as usize * metadata.record_size as usize / 4;
    const MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
    let metadata_start = bytes
        .windows(MARKER.len())
        .rposition(|window| window == MARKER)
        .context("metadata marker")?;
    for byte in &mut bytes[tree + 16..metadata_start] {
        *byte = 0xff;
    }
    let path = dir.join("GeoLite2-Country.mmdb");
    fs::write(&path, bytes)?;
    Ok(path)
}

/// The shipped rules with every `for:` shortened to 1 s.
fn rules_with_short_for(dir: &Path) -> Result<PathBuf> {
    let shipped = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let text = fs::read_to_string(&shipped)?;
    let mut shortened = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("for: ") {
            let indent = &line[..line.len() - line.trim_start().len()];
            shortened.push_str(&format!("{indent}for: 1s\n"));
        } else {
            shortened.push_str(line);
            shortened.push('\n');
        }
    }
    let path = dir.join("fleetsnitch.rules.yml");
    fs::write(&path, shortened)?;
    Ok(path)
}

/// `fleetsnitch_kubernetes_api_up`, `None` when it is not exported.
fn api_up(text: &str) -> Option<f64> {
    fleetsnitch_e2e::parse_samples(text, "fleetsnitch_kubernetes_api_up")
        .unwrap_or_default()
        .first()
        .map(|sample| sample.value)
}

/// Value of the first sample of `name` whose labels include `labels`.
fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    fleetsnitch_e2e::parse_samples(text, name)
        .unwrap_or_default()
        .into_iter()
        .find(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map_or(0.0, |sample| sample.value)
}

#[test]
fn each_blinding_failure_is_counted_journaled_and_alerted() -> Result<()> {
    require_root!("eBPF, network namespaces, mounts");
    if skip::program("setpriv", "util-linux")?.is_none() {
        return Ok(());
    }
    // Mounted before the testbed exists, so unmounted before its directory goes.
    let mounts_dir = TempDir::new("fsn-failures-mnt")?;
    let mut mounts = Mounts::default();
    let log_dir = mounts_dir.path().join("log");
    mounts.mount(
        &["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"],
        &log_dir,
    )?;

    let collector_port = free_port()?;
    let virustotal = FailingServer::start(virustotal_answer)?;
    let kubernetes = FailingServer::start(kubernetes_answer)?;
    let geoip = corrupt_geoip(mounts_dir.path())?;
    // In a cluster by configuration: a service account token, the stand-in's
    // URL and a node name (no CA file: plain HTTP).
    let token = mounts_dir.path().join("token");
    fs::write(&token, "sa-token\n")?;
    let bed = Testbed::setup("fsn-failures")?
        .config(format!(
            "journal:\n  write_interval: 500ms\n\
             geoip:\n  country_database: {geoip}\n\
             otlp:\n  enabled: true\n  protocol: http/protobuf\n  endpoint: http://127.0.0.1:{collector_port}\n  \
             timeout: 1s\n  batch_delay: 100ms\n  retry_initial_backoff: 100ms\n  retry_max_backoff: 500ms\n\
             connection_log:\n  enabled: true\n  path: {log}\n\
             virustotal:\n  api_key: test-key\n  base_url: http://{vt}/api/v3\n  request_interval: 200ms\n  timeout: 2s\n\
             kubernetes:\n  token_path: {token}\n  ca_path: {ca}\n  api_url: http://{api}\n  node_name: node-a\n  \
             backoff_min: 100ms\n  backoff_max: 1s\n",
            geoip = geoip.display(),
            log = log_dir.join("connections.jsonl").display(),
            vt = virustotal.addr,
            token = token.display(),
            ca = mounts_dir.path().join("ca.crt").display(),
            api = kubernetes.addr,
        ))
        .wrapped_in(&["setpriv", "--bounding-set", "-sys_admin", "--"])
        .peer()
        .start()?;

    // The connection log's file system fills up once the agent runs.
    let mut filler = fs::File::create(log_dir.join("filler"))?;
    let chunk = vec![0u8; 4096];
    while filler.write_all(&chunk).is_ok() {}
    drop(filler);

    let rules_dir = TempDir::new("fsn-failures-rules")?;
    let rules = rules_with_short_for(rules_dir.path())?;
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      - targets: ['{}']\n",
        rules.display(),
        bed.addr()
    ))?;

    // Traffic to the peer (198.18.0.2: a public address to GeoIP), now and
    // again while we wait, each time from a new program (a new hash that
    // VirusTotal is asked about, so its errors go on while Prometheus scrapes).
    let expected = [
        (
            "otlp",
            "fleetsnitch_otlp_export_errors_total",
            vec![],
            "FleetsnitchOtlpExportFailing",
        ),
        (
            "connection_log",
            "fleetsnitch_connection_log_errors_total",
            vec![],
            "FleetsnitchConnectionLogErrors",
        ),
        (
            "geoip",
            "fleetsnitch_geoip_lookup_errors_total",
            vec![],
            "FleetsnitchGeoIpLookupErrors",
        ),
        (
            "virustotal",
            "fleetsnitch_virustotal_lookups_total",
            vec![("result", "http_error")],
            "FleetsnitchVirusTotalErrors",
        ),
        (
            "fanotify",
            "fleetsnitch_modification_watch_errors_total",
            vec![("reason", "unavailable")],
            "FleetsnitchModificationWatchFailing",
        ),
        (
            "kubernetes",
            "fleetsnitch_kubernetes_list_errors_total",
            vec![],
            "FleetsnitchKubernetesApiUnreachable",
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<String>;
    let original = bed.copy("trafficgen", "blind")?;
    let mut exe;
    let mut runs = 0;
    loop {
        runs += 1;
        // A tag appended: a sha256 of its own (the loader ignores trailing bytes).
        exe = bed.dir().join(format!("blind-{runs}"));
        copy_executable(&original, &exe, &format!("failures run {runs}"))?;
        run_client(
            bed.net(),
            &exe,
            "tcp_upload",
            &["--bytes", "2000"],
            Duration::from_secs(30),
        )?;
        thread::sleep(Duration::from_secs(2));
        let text = bed.metrics().text()?;
        let events = query_journal(
            bed.journal(),
            "SELECT detail FROM events WHERE kind = 'agent_error' ORDER BY id",
        )?;
        let firing: Vec<String> = prometheus
            .alerts()?
            .iter()
            .filter(|alert| alert["state"] == "firing")
            .filter_map(|alert| alert["labels"]["alertname"].as_str().map(str::to_owned))
            .collect();
        missing = Vec::new();
        for (class, metric, labels, alert) in &expected {
            let value = counter(&text, metric, labels);
            if value < 1.0 {
                missing.push(format!("{metric}{labels:?} is {value}"));
            }
            let prefix = format!("{class}: failing: ");
            if !events.lines().any(|line| line.starts_with(&prefix)) {
                missing.push(format!("no agent_error event starting {prefix:?}"));
            }
            if !firing.iter().any(|name| name == alert) {
                missing.push(format!("{alert} not firing"));
            }
        }
        // A gauge, not a counter: it must be there, and 0.
        let api_up = api_up(&text);
        if api_up != Some(0.0) {
            missing.push(format!("fleetsnitch_kubernetes_api_up is {api_up:?}"));
        }
        if missing.is_empty() {
            // Deduplicated: one event per class however long it fails.
            for (class, ..) in &expected {
                let prefix = format!("{class}: failing: ");
                let count = events
                    .lines()
                    .filter(|line| line.starts_with(&prefix))
                    .count();
                ensure!(
                    count == 1,
                    "one agent_error event expected for {class}, saw {count}:\n{events}"
                );
            }
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after 90 s:\n  {}\njournal agent_error events:\n{events}\nfiring: {firing:?}\n\
                 VirusTotal requests: {}\nKubernetes API requests: {}\nagent log:\n{}",
                missing.join("\n  "),
                virustotal.requests.load(Ordering::Relaxed),
                kubernetes.requests.load(Ordering::Relaxed),
                bed.log_tail(40)
            );
        }
    }

    // The API server answers again: the gauge is 1 at the next list, and the
    // alert resolves. The recovery event waits for the class's event interval
    // (10 minutes, model/failures.rs): the journal still has the one event.
    kubernetes.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let api_up = api_up(&bed.metrics().text()?);
        let firing = prometheus
            .alerts()?
            .iter()
            .any(|alert| alert["labels"]["alertname"] == "FleetsnitchKubernetesApiUnreachable");
        if api_up == Some(1.0) && !firing {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "30 s after the API server healed: fleetsnitch_kubernetes_api_up is {api_up:?}, \
             alert still active: {firing}\nagent log:\n{}",
            bed.log_tail(40)
        );
        thread::sleep(Duration::from_millis(500));
    }
    let events = query_journal(
        bed.journal(),
        "SELECT detail FROM events WHERE kind = 'agent_error' AND detail LIKE 'kubernetes:%'",
    )?;
    ensure!(
        events.lines().count() == 1,
        "one kubernetes agent_error event expected, saw:\n{events}"
    );
    // Still counting every byte through all of it.
    bed.metrics().wait_for_bytes(&exe, "sent", 2000)?;
    Ok(())
}
