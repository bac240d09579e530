//! What an operator expects of any Prometheus exporter, checked on a running
//! agent: a landing page at `/`; the classic text format by default (clean
//! under `promtool check metrics`), OpenMetrics when asked for, both scraped
//! by a real Prometheus; gzip on request; `fleetsnitch_build_info` and the
//! standard `process_*` metrics, compared with what /proc says of the agent;
//! logfmt or JSON logs without escape codes; SIGHUP that never kills it; the
//! response headers of a node_exporter web configuration.
//! Needs root (the agent loads eBPF); skips otherwise.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    Sample, Testbed, parse_samples,
    process::run_bounded,
    require_root,
    servers::{Prometheus, url_encode},
    wait_until, workspace_root,
};

/// What curl saw: status, response headers (lower-case names), body bytes.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `curl` with `extra` options; the body is kept as bytes (gzip stays gzip).
fn curl(dir: &Path, addr: SocketAddr, path: &str, extra: &[&str]) -> Result<Answer> {
    let head = dir.join("curl-head");
    let body = dir.join("curl-body");
    let out = run_bounded(
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "-D"])
            .arg(&head)
            .arg("-o")
            .arg(&body)
            .args(extra)
            .arg(format!("http://{addr}{path}")),
        Duration::from_secs(20),
    )?;
    ensure!(out.status.success(), "curl {path}: {}", out.stderr);
    let head = fs::read_to_string(&head)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: fs::read(&body)?,
    })
}

fn value_of(samples: &[Sample], what: &str) -> Result<f64> {
    match samples {
        [sample] => Ok(sample.value),
        other => bail!("{what}: expected one sample, got {other:?}"),
    }
}

fn proc_status_field(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

#[test]
fn landing_page_formats_gzip_build_info_and_process_metrics() -> Result<()> {
    require_root!("the agent loads eBPF");
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let mut bed = Testbed::setup("fsn-conventions")?.start()?;
    let addr = bed.addr();
    let dir = bed.dir().to_owned();

    // `/`: a page linking what the agent serves; anything unknown: 404.
    let landing = curl(&dir, addr, "/", &[])?;
    ensure!(landing.status == 200, "GET / answered {}", landing.status);
    ensure!(
        landing
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "GET / content type {:?}",
        landing.header("content-type")
    );
    let page = landing.text();
    for link in ["href=\"./metrics\"", "href=\"./healthz\""] {
        ensure!(
            page.contains(link),
            "no {link} in the landing page:\n{page}"
        );
    }
    let missing = curl(&dir, addr, "/no-such-page", &[])?;
    ensure!(
        missing.status == 404,
        "GET /no-such-page answered {}",
        missing.status
    );

    // Default: the classic format, which promtool accepts without a remark.
    let classic = curl(&dir, addr, "/metrics", &[])?;
    ensure!(
        classic.header("content-type") == Some("text/plain; version=0.0.4; charset=utf-8"),
        "default content type {:?}",
        classic.header("content-type")
    );
    let text = classic.text();
    let page_file = dir.join("metrics.txt");
    fs::write(&page_file, &text)?;
    let check = run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg("promtool check metrics < \"$0\"")
            .arg(&page_file),
        Duration::from_secs(30),
    )?;
    ensure!(
        check.status.success() && check.stdout.trim().is_empty() && check.stderr.trim().is_empty(),
        "promtool check metrics ({}):\n{}{}",
        check.status,
        check.stdout,
        check.stderr
    );
    ensure!(
        text.contains("# HELP process_cpu_seconds_total ")
            && text.contains("# TYPE process_cpu_seconds_total counter"),
        "counter descriptors without _total:\n{text}"
    );
    ensure!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "OpenMetrics lines in:\n{text}"
    );

    // OpenMetrics when asked for.
    let openmetrics = curl(
        &dir,
        addr,
        "/metrics",
        &["-H", "Accept: application/openmetrics-text; version=1.0.0"],
    )?;
    ensure!(
        openmetrics.header("content-type")
            == Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "OpenMetrics content type {:?}",
        openmetrics.header("content-type")
    );
    let om = openmetrics.text();
    ensure!(om.ends_with("# EOF\n"), "no # EOF at the end:\n{om}");
    ensure!(om.contains("# TYPE process_cpu_seconds counter"), "{om}");

    // gzip only when accepted, and what it inflates to is the page.
    ensure!(classic.header("content-encoding").is_none(), "gzip unasked");
    let gzipped = curl(&dir, addr, "/metrics", &["-H", "Accept-Encoding: gzip"])?;
    ensure!(
        gzipped.header("content-encoding") == Some("gzip"),
        "Content-Encoding {:?}",
        gzipped.header("content-encoding")
    );
    ensure!(gzipped.body.starts_with(&[0x1f, 0x8b]), "not gzip data");
    let gz_file = dir.join("metrics.gz");
    fs::write(&gz_file, &gzipped.body)?;
    let inflated = run_bounded(
        Command::new("gzip").arg("-dc").arg(&gz_file),
        Duration::from_secs(10),
    )?;
    ensure!(inflated.status.success(), "gzip -dc: {}", inflated.stderr);
    ensure!(
        inflated
            .stdout
            .contains("# TYPE fleetsnitch_build_info gauge"),
        "inflated page:\n{}",
        inflated.stdout
    );
    ensure!(
        gzipped.body.len() * 2 < inflated.stdout.len(),
        "gzip saved little: {} of {} bytes",
        gzipped.body.len(),
        inflated.stdout.len()
    );

    // fleetsnitch_build_info: 1, with what `--version` of the same binary says.
    let info = parse_samples(&text, "fleetsnitch_build_info")?;
    ensure!(value_of(&info, "fleetsnitch_build_info")? == 1.0);
    let labels = &info[0].labels;
    let version = run_bounded(
        Command::new(fleetsnitch_e2e::agent_binary()?).arg("--version"),
        Duration::from_secs(10),
    )?
    .stdout;
    let field = |name: &str| -> String {
        version
            .lines()
            .find_map(|line| line.trim().strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    ensure!(
        labels.get("version").map(String::as_str) == Some(env!("CARGO_PKG_VERSION")),
        "{labels:?}"
    );
    ensure!(
        labels.get("revision") == Some(&field("revision")),
        "{labels:?} vs\n{version}"
    );
    ensure!(labels.get("branch") == Some(&field("branch")), "{labels:?}");
    ensure!(
        field("rustc").starts_with(&format!("rustc {} ", labels["rustversion"])),
        "{labels:?} vs\n{version}"
    );
    if workspace_root().join(".git").exists() {
        let revision = &labels["revision"];
        let known = run_bounded(
            Command::new("git").arg("-C").arg(workspace_root()).args([
                "cat-file",
                "-e",
                &format!("{revision}^{{commit}}"),
            ]),
            Duration::from_secs(10),
        )?;
        ensure!(
            known.status.success(),
            "revision {revision} is no commit of this checkout"
        );
    }

    // process_*: what /proc says of the agent's process.
    let pid = bed.agent.pid();
    let sample = |name: &str| -> Result<f64> { value_of(&parse_samples(&text, name)?, name) };
    let rss = sample("process_resident_memory_bytes")?;
    let vm_rss = proc_status_field(pid, "VmRSS:")? as f64 * 1024.0;
    ensure!(
        (rss - vm_rss).abs() < vm_rss * 0.5,
        "resident memory {rss} vs VmRSS {vm_rss}"
    );
    let virtual_bytes = sample("process_virtual_memory_bytes")?;
    ensure!(
        virtual_bytes >= rss,
        "virtual {virtual_bytes} < resident {rss}"
    );
    let open = sample("process_open_fds")?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64;
    ensure!(
        (open - fds).abs() <= 16.0,
        "open fds {open} vs {fds} in /proc"
    );
    let limits = fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft: f64 = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .context("no Max open files limit")?;
    ensure!(sample("process_max_fds")? == soft, "max fds vs {soft}");
    let start = sample("process_start_time_seconds")?;
    ensure!(
        (start - started).abs() < 30.0,
        "start time {start}, test started the agent at {started}"
    );
    let threads = sample("process_threads")?;
    let status_threads = proc_status_field(pid, "Threads:")? as f64;
    ensure!(
        (threads - status_threads).abs() <= 4.0,
        "threads {threads} vs {status_threads}"
    );
    let cpu = sample("process_cpu_seconds_total")?;
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() - started;
    let cores = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    ensure!(
        cpu > 0.0 && cpu <= elapsed * cores + 1.0,
        "cpu seconds {cpu} over {elapsed} s"
    );
    Ok(())
}

/// A reverse proxy that asks the agent for the classic format, as Prometheus
/// 2.49 and later do with `scrape_protocols: [PrometheusText0.0.4]` (the
/// Debian Prometheus here, 2.42, always prefers OpenMetrics). One request per
/// connection; the content type of every answer is recorded.
struct ClassicAsker {
    addr: SocketAddr,
    content_types: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ClassicAsker {
    fn start(agent: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let content_types = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let content_types = content_types.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if let Ok(content_type) = relay(client, agent) {
                                content_types.lock().unwrap().push(content_type);
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            content_types,
            stop,
            thread: Some(thread),
        })
    }

    fn content_types(&self) -> Vec<String> {
        self.content_types.lock().unwrap().clone()
    }
}

impl Drop for ClassicAsker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Forwards one GET with `Accept` replaced; returns the answer's content type.
fn relay(mut client: TcpStream, agent: SocketAddr) -> Result<String> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 64 << 10, "request head too long");
        ensure!(client.read(&mut byte)? == 1, "client closed mid-request");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head)?;
    let mut request = String::new();
    for line in head.split("\r\n").filter(|line| !line.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "accept" && name != "connection" {
            request.push_str(line);
            request.push_str("\r\n");
        }
    }
    request.push_str("Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\nConnection: close\r\n\r\n");
    let mut upstream = TcpStream::connect_timeout(&agent, Duration::from_secs(5))?;
    upstream.set_read_timeout(Some(Duration::from_secs(10)))?;
    upstream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    upstream.take(64 << 20).read_to_end(&mut response)?;
    client.write_all(&response)?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let response_head = String::from_utf8_lossy(&response[..end]);
    Ok(response_head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default())
}

/// The metadata Prometheus recorded for `metric` as scraped by `job`.
fn metadata(prometheus: &Prometheus, job: &str, metric: &str) -> Result<Option<(String, String)>> {
    let path = format!(
        "/api/v1/targets/metadata?match_target={}&metric={metric}",
        url_encode(&format!("{{job=\"{job}\"}}"))
    );
    let response =
        fleetsnitch_e2e::metrics::http_get(prometheus.addr, &path, Duration::from_secs(10))?;
    let body: serde_json::Value = serde_json::from_str(&response.body)
        .with_context(|| format!("metadata: {}", response.body))?;
    Ok(body["data"].as_array().and_then(|entries| {
        entries.first().map(|entry| {
            (
                entry["type"].as_str().unwrap_or_default().to_owned(),
                entry["help"].as_str().unwrap_or_default().to_owned(),
            )
        })
    }))
}

fn up(prometheus: &Prometheus, job: &str) -> Result<Option<f64>> {
    let result = prometheus.query(&format!("up{{job=\"{job}\"}}"))?;
    Ok(result
        .first()
        .and_then(|sample| sample["value"][1].as_str())
        .and_then(|v| v.parse().ok()))
}

#[test]
fn a_real_prometheus_scrapes_both_formats() -> Result<()> {
    require_root!("the agent loads eBPF");
    let bed = Testbed::setup("fsn-formats")?.start()?;
    let asker = ClassicAsker::start(bed.addr())?;
    let mut prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n\
         \x20 - job_name: openmetrics\n    static_configs:\n      - targets: ['{}']\n\
         \x20 - job_name: classic\n    static_configs:\n      - targets: ['{}']\n",
        bed.addr(),
        asker.addr
    ))?;
    let mut last = (None, None);
    wait_until(Duration::from_secs(60), "both jobs up", || {
        last = (up(&prometheus, "openmetrics")?, up(&prometheus, "classic")?);
        Ok(last == (Some(1.0), Some(1.0)))
    })
    .with_context(|| {
        format!(
            "up (openmetrics, classic) = {last:?}\n{}",
            prometheus.log_tail(20)
        )
    })?;
    prometheus.check_running()?;

    let types = asker.content_types();
    ensure!(
        !types.is_empty()
            && types
                .iter()
                .all(|t| t == "text/plain; version=0.0.4; charset=utf-8"),
        "the classic job was answered with {types:?}"
    );

    // What each parser made of the page: Prometheus keys metadata by the
    // descriptor's name, which differs between the formats for counters.
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(30), "metadata of both jobs", || {
        seen = vec![
            metadata(&prometheus, "classic", "process_cpu_seconds_total")?,
            metadata(&prometheus, "openmetrics", "process_cpu_seconds")?,
            metadata(&prometheus, "classic", "fleetsnitch_build_info")?,
        ];
        Ok(seen.iter().all(Option::is_some))
    })
    .with_context(|| format!("metadata seen: {seen:?}"))?;
    for (entry, kind) in seen.iter().zip(["counter", "counter", "gauge"]) {
        let (found, help) = entry.as_ref().expect("checked above");
        ensure!(found == kind && !help.is_empty(), "metadata {seen:?}");
    }
    ensure!(
        metadata(&prometheus, "classic", "process_cpu_seconds")?.is_none(),
        "the classic page named a counter family without _total"
    );

    for job in ["classic", "openmetrics"] {
        let info = prometheus.query(&format!(
            "fleetsnitch_build_info{{job=\"{job}\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ))?;
        ensure!(
            info.len() == 1 && info[0]["value"][1] == "1",
            "{job}: fleetsnitch_build_info = {info:?}"
        );
        let cpu = prometheus.query(&format!("process_cpu_seconds_total{{job=\"{job}\"}}"))?;
        ensure!(cpu.len() == 1, "{job}: process_cpu_seconds_total = {cpu:?}");
    }
    Ok(())
}

#[test]
fn logs_are_logfmt_or_json_lines_without_escape_codes() -> Result<()> {
    require_root!("the agent loads eBPF");
    // The harness sends the agent's stderr to a file, as a service manager does.
    let bed = Testbed::setup("fsn-logfmt")?.start()?;
    let log = fs::read_to_string(bed.agent.log_path())?;
    ensure!(log.lines().count() >= 3, "few log lines:\n{log}");
    ensure!(!log.contains('\u{1b}'), "escape codes in the log:\n{log:?}");
    for line in log.lines() {
        ensure!(
            line.starts_with("time=") && line.contains(" level=") && line.contains(" msg="),
            "not a logfmt line: {line}"
        );
    }
    drop(bed);

    let bed = Testbed::setup("fsn-jsonlog")?
        .args(&["--log.format", "json"])
        .start()?;
    let log = fs::read_to_string(bed.agent.log_path())?;
    ensure!(log.lines().count() >= 3, "few log lines:\n{log}");
    ensure!(!log.contains('\u{1b}'), "escape codes in the log:\n{log:?}");
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not one JSON object: {line}"))?;
        ensure!(
            event.is_object() && event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
    }
    ensure!(
        log.lines()
            .any(|line| line.contains("\"message\":\"fleetsnitch is counting")),
        "{log}"
    );
    Ok(())
}

#[test]
fn sighup_without_a_web_configuration_is_logged_and_survived() -> Result<()> {
    require_root!("the agent loads eBPF");
    let mut bed = Testbed::setup("fsn-sighup")?.start()?;
    for _ in 0..2 {
        bed.agent.signal(libc::SIGHUP);
    }
    wait_until(Duration::from_secs(10), "SIGHUP logged", || {
        bed.agent
            .check_running()
            .context("SIGHUP killed the agent")?;
        Ok(bed.log_tail(50).contains("SIGHUP: nothing to reload"))
    })
    .with_context(|| bed.log_tail(20))?;
    let health =
        fleetsnitch_e2e::metrics::http_get(bed.addr(), "/healthz", Duration::from_secs(5))?;
    ensure!(
        health.status == 200,
        "healthz after SIGHUP: {}",
        health.status
    );
    let page = bed.metrics().text()?;
    ensure!(
        page.contains("\nfleetsnitch_web_config_last_reload_successful 1\n"),
        "without a web configuration nothing failed to load:\n{page}"
    );
    bed.agent.signal(libc::SIGTERM);
    let status = bed
        .agent
        .wait_exit(Duration::from_secs(20))?
        .context("no exit within 20 s of SIGTERM")?;
    ensure!(status.success(), "exit after SIGHUP then SIGTERM: {status}");
    Ok(())
}

const HEADERS: &[(&str, &str)] = &[
    ("x-frame-options", "deny"),
    ("x-content-type-options", "nosniff"),
    ("strict-transport-security", "max-age=31536000"),
    ("content-security-policy", "default-src 'self'"),
];

fn headers_section() -> String {
    "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n    \
     X-Content-Type-Options: nosniff\n    Strict-Transport-Security: max-age=31536000\n    \
     Content-Security-Policy: \"default-src 'self'\"\n"
        .to_owned()
}

fn has_headers(answer: &Answer) -> Result<()> {
    for (name, value) in HEADERS {
        ensure!(
            answer.header(name) == Some(value),
            "{name}: {:?} in {:?}",
            answer.header(name),
            answer.headers
        );
    }
    Ok(())
}

#[test]
fn node_exporter_response_headers_are_sent_on_every_answer() -> Result<()> {
    require_root!("the agent loads eBPF");
    let setup = Testbed::setup("fsn-headers")?;
    let web_config = setup.dir().join("web.yml");
    fs::write(&web_config, headers_section())?;
    let bed = setup
        .args(&["--web.config.file", web_config.to_str().unwrap()])
        .start()?;
    let dir = bed.dir().to_owned();
    for path in ["/", "/metrics", "/healthz", "/no-such-page"] {
        let answer = curl(&dir, bed.addr(), path, &[])?;
        has_headers(&answer).with_context(|| format!("GET {path} ({})", answer.status))?;
    }

    // Basic auth added by a reload: refusals carry the headers too.
    let hash = bcrypt::hash("s3cret", 4)?;
    let staging = web_config.with_extension("new");
    fs::write(
        &staging,
        headers_section() + &format!("basic_auth_users:\n  prometheus: {hash}\n"),
    )?;
    fs::rename(&staging, &web_config)?;
    let mut refused = None;
    wait_until(Duration::from_secs(30), "basic auth in force", || {
        let answer = curl(&dir, bed.addr(), "/metrics", &[])?;
        let done = answer.status == 401;
        refused = Some(answer);
        Ok(done)
    })
    .with_context(|| bed.log_tail(20))?;
    has_headers(&refused.expect("set above")).context("401 answer")?;
    let answer = curl(&dir, bed.addr(), "/metrics", &["-u", "prometheus:s3cret"])?;
    ensure!(answer.status == 200, "with credentials: {}", answer.status);
    has_headers(&answer)?;
    Ok(())
}
