//! Real Prometheus and Alertmanager servers, and a webhook receiver, all on
//! loopback, each stopped and cleaned up when dropped.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    TempDir,
    agent::free_port,
    metrics::http_get,
    process::{ProcessGuard, file_tail},
};

/// Percent-encodes a query-string value.
pub fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn wait_ready(name: &str, process: &mut ProcessGuard, addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.child_mut().try_wait()? {
            bail!("{name} exited ({status}):\n{}", file_tail(log, 30));
        }
        if http_get(addr, "/-/ready", Duration::from_secs(2)).is_ok_and(|r| r.status == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} not ready within 60 s:\n{}", file_tail(log, 30));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `program` from `PATH`, or an error naming it and its Debian package.
fn installed(program: &str, package: &str) -> Result<Command> {
    let path = crate::skip::find_in_path(program).with_context(|| {
        format!("{program} is not in PATH (Debian package {package}; scripts/setup.sh installs it)")
    })?;
    Ok(Command::new(path))
}

fn spawn_logged(name: &str, command: &mut Command, log: &Path) -> Result<ProcessGuard> {
    let out = fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    ProcessGuard::spawn(name, command, Duration::from_secs(10))
}

/// The fleet groups' evaluation interval, as the shipped rules file sets it.
const FLEET_GROUP_INTERVAL: &str = "\n    interval: 1m\n";

/// The shipped rules file (`helm/fleetsnitch/rules/fleetsnitch.rules.yml`)
/// copied into `dir`, with the fleet groups' own `interval: 1m` removed so
/// that they run at the global evaluation interval like the other groups: a
/// test evaluates every second and cannot wait minutes for a recorded series.
pub fn rules_at_global_interval(dir: &Path) -> Result<std::path::PathBuf> {
    let shipped = crate::workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let text =
        fs::read_to_string(&shipped).with_context(|| format!("read {}", shipped.display()))?;
    ensure!(
        text.contains(FLEET_GROUP_INTERVAL),
        "{} has no group with `interval: 1m` any more: update rules_at_global_interval",
        shipped.display()
    );
    let path = dir.join("fleetsnitch.rules.yml");
    fs::write(&path, text.replace(FLEET_GROUP_INTERVAL, "\n"))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A Prometheus server with its own configuration and storage.
pub struct Prometheus {
    process: ProcessGuard,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and waits until it is ready.
    pub fn start(config: &str) -> Result<Self> {
        let dir = TempDir::new("fsn-prometheus")?;
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let log = dir.path().join("prometheus.log");
        let mut process = spawn_logged(
            "prometheus",
            installed("prometheus", "prometheus")?
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-lifecycle"),
            &log,
        )?;
        wait_ready("prometheus", &mut process, addr, &log)?;
        Ok(Self {
            process,
            addr,
            log,
            _dir: dir,
        })
    }

    /// Runs an instant query; returns the `data.result` array.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        self.query_within(promql, Duration::from_secs(10))
    }

    /// [`Prometheus::query`], waiting up to `timeout` for the answer.
    pub fn query_within(&self, promql: &str, timeout: Duration) -> Result<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let response = http_get(self.addr, &path, timeout)?;
        let body: serde_json::Value = serde_json::from_str(&response.body)
            .with_context(|| format!("query {promql}: {}", response.body))?;
        ensure!(
            body["status"] == "success",
            "query {promql} failed: {}",
            response.body
        );
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Runs a range query over `[start, end]` (Unix seconds) at `step`
    /// seconds; returns the `data.result` array.
    pub fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<serde_json::Value>> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(promql)
        );
        let response = http_get(self.addr, &path, Duration::from_secs(120))?;
        let body: serde_json::Value = serde_json::from_str(&response.body)
            .with_context(|| format!("query_range {promql}: {}", response.body))?;
        ensure!(
            body["status"] == "success",
            "query_range {promql} failed: {}",
            response.body
        );
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The values of `label` among the series `selector` matches over
    /// `[start, end]` (the labels API, as Grafana's `label_values` asks).
    pub fn label_values(
        &self,
        label: &str,
        selector: &str,
        start: f64,
        end: f64,
    ) -> Result<Vec<serde_json::Value>> {
        let path = format!(
            "/api/v1/label/{label}/values?match[]={}&start={start:.3}&end={end:.3}",
            url_encode(selector)
        );
        let response = http_get(self.addr, &path, Duration::from_secs(120))?;
        let body: serde_json::Value = serde_json::from_str(&response.body)
            .with_context(|| format!("label values {label} of {selector}: {}", response.body))?;
        ensure!(
            body["status"] == "success",
            "label values {label} of {selector} failed: {}",
            response.body
        );
        Ok(body["data"].as_array().cloned().unwrap_or_default())
    }

    /// Every active alert as Prometheus evaluates it now (the alerts API),
    /// with its current annotations: a notification keeps the annotations
    /// of the evaluation that first sent it.
    pub fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let response = http_get(self.addr, "/api/v1/alerts", Duration::from_secs(30))?;
        let body: serde_json::Value = serde_json::from_str(&response.body)
            .with_context(|| format!("alerts: {}", response.body))?;
        ensure!(
            body["status"] == "success",
            "alerts failed: {}",
            response.body
        );
        Ok(body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every rule's last evaluation time in seconds, by rule name (the rules API).
    pub fn rule_evaluation_times(&self) -> Result<Vec<(String, f64)>> {
        let response = http_get(self.addr, "/api/v1/rules", Duration::from_secs(30))?;
        let body: serde_json::Value = serde_json::from_str(&response.body)
            .with_context(|| format!("rules: {}", response.body))?;
        let mut times = Vec::new();
        for group in body["data"]["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                times.push((
                    rule["name"].as_str().unwrap_or("?").to_owned(),
                    rule["evaluationTime"].as_f64().unwrap_or(0.0),
                ));
            }
        }
        Ok(times)
    }

    /// The server's own `/metrics` page (rule evaluation, head series).
    pub fn own_metrics(&self) -> Result<String> {
        Ok(http_get(self.addr, "/metrics", Duration::from_secs(30))?.body)
    }

    pub fn pid(&mut self) -> u32 {
        self.process.child_mut().id()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }
}

/// An Alertmanager that sends every notification to `webhook`.
pub struct Alertmanager {
    _process: ProcessGuard,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Alertmanager {
    pub fn start(webhook: SocketAddr) -> Result<Self> {
        let dir = TempDir::new("fsn-alertmanager")?;
        let config_path = dir.path().join("alertmanager.yml");
        fs::write(
            &config_path,
            format!(
                "route:\n  receiver: webhook\n  group_by: [alertname, exe, sha256]\n  \
                 group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: webhook\n    webhook_configs:\n      \
                 - url: http://{webhook}/\n        send_resolved: true\n"
            ),
        )?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let log = dir.path().join("alertmanager.log");
        let mut process = spawn_logged(
            "alertmanager",
            installed("prometheus-alertmanager", "prometheus-alertmanager")?
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                // A single instance: no gossip port.
                .arg("--cluster.listen-address="),
            &log,
        )?;
        wait_ready("alertmanager", &mut process, addr, &log)?;
        Ok(Self {
            _process: process,
            addr,
            _dir: dir,
        })
    }
}

/// One notification Alertmanager posted.
#[derive(Debug, Clone)]
pub struct Notification {
    pub received: Instant,
    pub body: serde_json::Value,
}

impl Notification {
    /// The alerts it carries with the given status (`firing` or `resolved`).
    pub fn alerts(&self, status: &str) -> Vec<serde_json::Value> {
        self.body["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .filter(|alert| alert["status"] == status)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A webhook receiver that records every POST body.
pub struct Webhook {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Notification>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Webhook {
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = received.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let body = read_post(stream)
                                .ok()
                                .and_then(|body| serde_json::from_slice(&body).ok());
                            if let Some(body) = body {
                                received.lock().unwrap().push(Notification {
                                    received: Instant::now(),
                                    body,
                                });
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn notifications(&self) -> Vec<Notification> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one HTTP request's body and answers 200.
fn read_post(stream: TcpStream) -> Result<Vec<u8>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "connection closed in headers"
        );
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    ensure!(length <= 1 << 20, "body too large");
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut stream = reader.into_inner();
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(body)
}

/// What an [`HttpStub`] answers a request for a path with: status, content
/// type and body.
pub type Answer = (u16, &'static str, String);

/// A small HTTP/1.1 server for a service that cannot run here, speaking its
/// protocol: each request's path is recorded and answered by `respond`, one
/// request per connection. A few threads answer, each blocked in `accept`:
/// thousands of clients cost no polling. Stopped on drop.
pub struct HttpStub {
    pub addr: SocketAddr,
    listener: TcpListener,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

type Respond = dyn Fn(&str) -> Answer + Send + Sync;

impl HttpStub {
    const WORKERS: usize = 4;

    /// Listens on `ip` (a free port).
    pub fn start(
        ip: Ipv4Addr,
        respond: impl Fn(&str) -> Answer + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let respond: Arc<Respond> = Arc::new(respond);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(Self::WORKERS);
        for _ in 0..Self::WORKERS {
            let listener = listener.try_clone()?;
            let (respond, requests, stop) = (respond.clone(), requests.clone(), stop.clone());
            threads.push(thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = answer(stream, &*respond, &requests);
                    }
                }
            }));
        }
        Ok(Self {
            addr,
            listener,
            requests,
            stop,
            threads,
        })
    }

    /// The paths requested so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::Relaxed);
        // Shutting the listening socket down wakes every worker from `accept`
        // (with an error) to see `stop`, even once its address is gone (a
        // pod's network deleted first): a connection could not.
        // SAFETY: a valid descriptor, owned by `self.listener`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads one request's head (and its body, unread: requests here carry
/// none that matters), answers it and closes the connection.
fn answer(stream: TcpStream, respond: &Respond, requests: &Mutex<Vec<String>>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "connection closed in headers"
        );
        if line.trim_end().is_empty() {
            break;
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (status, content_type, body) = respond(&path);
    requests.lock().unwrap().push(path);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Error",
    };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// `/metrics` pages on one loopback listener: the hosts of a fleet, as many
/// as wanted, for one real Prometheus to scrape. Page `i` answers at
/// [`MetricsPages::path`]`(i)` (a target's `__metrics_path__`) with its text
/// (Prometheus text format 0.0.4), until dropped; [`MetricsPages::set`]
/// changes a page (a counter that moves on one host).
pub struct MetricsPages {
    pub addr: SocketAddr,
    pages: Arc<Mutex<Vec<String>>>,
    _server: HttpStub,
}

impl MetricsPages {
    pub fn serve(pages: Vec<String>) -> Result<Self> {
        let pages = Arc::new(Mutex::new(pages));
        let served = Arc::clone(&pages);
        let server = HttpStub::start(Ipv4Addr::LOCALHOST, move |path| {
            let pages = served
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let page = path
                .strip_prefix("/hosts/")
                .and_then(|index| index.parse::<usize>().ok())
                .and_then(|index| pages.get(index));
            match page {
                Some(page) => (
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    page.clone(),
                ),
                None => (404, "text/plain", String::new()),
            }
        })?;
        Ok(Self {
            addr: server.addr,
            pages,
            _server: server,
        })
    }

    /// Serves `page` as page `index` from now on.
    pub fn set(&self, index: usize, page: String) -> Result<()> {
        let mut pages = self
            .pages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = pages
            .get_mut(index)
            .with_context(|| format!("no page {index}"))?;
        *slot = page;
        Ok(())
    }

    /// The path page `index` answers at.
    pub fn path(index: usize) -> String {
        format!("/hosts/{index}")
    }
}
