//! Optional VirusTotal checks of every new executable hash (v3 files API).
//!
//! Off unless an API key is configured. Lookups go out one at a time, at most
//! one per `virustotal.request_interval` (the public API allows four a
//! minute); a 429 answer puts the hash back at the front of the queue and
//! doubles the interval until a lookup succeeds. Unknown files are uploaded
//! only when `virustotal.upload_unknown` is set. Every answer, including
//! malformed ones, is data: it is counted, journaled and never trusted
//! beyond the numbers it carries.

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    model::{Activity, Event, EventKind, FailureClass, Failures, Outbox, Record, Sha256, Touched},
    support::{InvalidValue, backoff::Backoff, unix_now},
    telemetry::{ExecutableLabels, ResultLabels},
};

/// The `virustotal:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VirusTotalConfig {
    /// API key; checks are off without one. Prefer `api_key_file`.
    pub api_key: Option<String>,
    /// File holding the API key (surrounding whitespace ignored).
    pub api_key_file: Option<PathBuf>,
    /// Base URL of the v3 API.
    pub base_url: String,
    /// Minimum time between two requests (the public API allows 4 a minute).
    #[serde(with = "humantime_serde")]
    pub request_interval: Duration,
    /// Upload executables VirusTotal does not know. Off: uploading sends the file away.
    pub upload_unknown: bool,
    /// Larger files are never uploaded (32 MiB is the API's limit for a plain upload).
    pub max_upload_bytes: u64,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for VirusTotalConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            api_key_file: None,
            base_url: "https://www.virustotal.com/api/v3".to_owned(),
            request_interval: Duration::from_secs(15),
            upload_unknown: false,
            max_upload_bytes: 32 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

impl VirusTotalConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if self.request_interval < Duration::from_millis(10) {
            return Err(InvalidValue::new(
                "virustotal.request_interval",
                humantime::format_duration(self.request_interval),
                "must be at least 10ms",
            ));
        }
        if !(self.base_url.starts_with("https://") || self.base_url.starts_with("http://")) {
            return Err(InvalidValue::new(
                "virustotal.base_url",
                &self.base_url,
                "must be an http(s) URL",
            ));
        }
        Ok(())
    }

    /// The API key from `api_key` or `api_key_file`, if any.
    pub fn api_key(&self) -> Result<Option<String>, LookupError> {
        if let Some(key) = self
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            return Ok(Some(key.to_owned()));
        }
        let Some(path) = &self.api_key_file else {
            return Ok(None);
        };
        let key = std::fs::read_to_string(path).map_err(|err| {
            LookupError::File(format!("virustotal.api_key_file {}: {err}", path.display()))
        })?;
        Ok(Some(key.trim().to_owned()).filter(|k| !k.is_empty()))
    }
}

/// What the checker exports.
#[derive(Debug, Clone, Default)]
pub struct VirusTotalMetrics {
    detections: Family<ExecutableLabels, Gauge>,
    lookups: Family<ResultLabels, Counter>,
    /// Told when lookups fail and work again (`agent_error` events).
    failures: Failures,
}

impl VirusTotalMetrics {
    /// Failed lookups (HTTP errors, 429, transport, malformed answers) are
    /// reported to `failures`, and the next successful one too.
    pub fn reporting_to(mut self, failures: Failures) -> Self {
        self.failures = failures;
        self
    }

    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "virustotal_detections",
            "Engines that flag the executable as malicious or suspicious on VirusTotal",
            metrics.detections.clone(),
        );
        registry.register(
            "virustotal_lookups",
            "VirusTotal requests by result (found, not_found, uploaded, rate_limited, http_error, malformed, transport_error, file_error)",
            metrics.lookups.clone(),
        );
        // Every result exported from the start, at zero: the first failure
        // is then an increase the alert rule sees.
        for result in [
            "found",
            "not_found",
            "uploaded",
            "rate_limited",
            "http_error",
            "malformed",
            "transport_error",
            "file_error",
        ] {
            let _ = metrics.lookups.get_or_create(&ResultLabels::new(result));
        }
        metrics
    }
}

/// Lookups of one hash that failed for reasons other than rate limiting
/// before it is given up.
const MAX_ATTEMPTS: u32 = 3;
/// Upper bound of the back-off after repeated 429 answers.
const MAX_BACKOFF_FACTOR: u32 = 16;

/// What VirusTotal knows of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Found(AnalysisStats),
    NotFound,
    /// Submitted for analysis; the identifier of the analysis.
    Uploaded(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct AnalysisStats {
    #[serde(default)]
    pub malicious: u32,
    #[serde(default)]
    pub suspicious: u32,
    #[serde(default)]
    pub harmless: u32,
    #[serde(default)]
    pub undetected: u32,
}

impl AnalysisStats {
    /// Engines that flagged the file.
    pub fn detections(&self) -> u32 {
        self.malicious + self.suspicious
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("rate limited (HTTP 429)")]
    RateLimited,
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("cannot read the file to upload: {0}")]
    File(String),
}

impl LookupError {
    fn label(&self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Status(_) => "http_error",
            Self::Malformed(_) => "malformed",
            Self::Transport(_) => "transport_error",
            Self::File(_) => "file_error",
        }
    }
}

#[derive(Deserialize)]
struct FileObject {
    data: FileData,
}

#[derive(Deserialize)]
struct FileData {
    attributes: FileAttributes,
}

#[derive(Deserialize)]
struct FileAttributes {
    last_analysis_stats: AnalysisStats,
}

#[derive(Deserialize)]
struct UploadAnswer {
    data: UploadData,
}

#[derive(Deserialize)]
struct UploadData {
    id: String,
}

/// A thin client of the endpoints fleetsnitch uses.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl Client {
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Self, LookupError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("fleetsnitch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| LookupError::Transport(err.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
        })
    }

    /// `GET /files/{sha256}`.
    pub async fn lookup(&self, sha256: &str) -> Result<Verdict, LookupError> {
        if !sha256.bytes().all(|b| b.is_ascii_hexdigit()) || sha256.len() != 64 {
            return Err(LookupError::Malformed(format!("not a sha256: {sha256:?}")));
        }
        let response = self
            .http
            .get(format!("{}/files/{sha256}", self.base_url))
            .header("x-apikey", &self.api_key)
            .send()
            .await
            .map_err(|err| LookupError::Transport(err.to_string()))?;
        if response.status().as_u16() == 404 {
            return Ok(Verdict::NotFound);
        }
        let object: FileObject = read_json(response).await?;
        Ok(Verdict::Found(object.data.attributes.last_analysis_stats))
    }

    /// `POST /files` with the file's content.
    pub async fn upload(&self, name: &str, content: Vec<u8>) -> Result<Verdict, LookupError> {
        let part = reqwest::multipart::Part::bytes(content).file_name(name.to_owned());
        let form = reqwest::multipart::Form::new().part("file", part);
        let response = self
            .http
            .post(format!("{}/files", self.base_url))
            .header("x-apikey", &self.api_key)
            .multipart(form)
            .send()
            .await
            .map_err(|err| LookupError::Transport(err.to_string()))?;
        let answer: UploadAnswer = read_json(response).await?;
        Ok(Verdict::Uploaded(answer.data.id))
    }
}

/// The JSON body of a 200 answer; 429 and other statuses are errors.
async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, LookupError> {
    match response.status().as_u16() {
        200 => {}
        429 => return Err(LookupError::RateLimited),
        status => return Err(LookupError::Status(status)),
    }
    let body = response
        .bytes()
        .await
        .map_err(|err| LookupError::Transport(err.to_string()))?;
    parse_answer(&body)
}

/// Only typed fields (numbers) are taken from an answer; the rest is ignored.
fn parse_answer<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, LookupError> {
    serde_json::from_slice(body)
        // serde_json quotes offending values in its messages: escaped, so an
        // answer cannot put a newline or terminal escape into the log.
        .map_err(|err| LookupError::Malformed(err.to_string().escape_debug().to_string()))
}

/// An executable to check.
#[derive(Debug, Clone)]
pub struct Check {
    pub path: String,
    pub sha256: Sha256,
}

/// The producers' side of the checker.
#[derive(Clone)]
pub struct VirusTotalHandle {
    sender: mpsc::UnboundedSender<Check>,
}

impl VirusTotalHandle {
    pub fn check(&self, check: Check) {
        let _ = self.sender.send(check);
    }
}

/// Starts the checker on the current tokio runtime, or returns `None` when no
/// API key is configured. Verdicts of executables `activity` has not seen
/// for its expiry leave `/metrics` (the journal keeps them).
pub fn spawn(
    config: &VirusTotalConfig,
    metrics: VirusTotalMetrics,
    outbox: Option<Outbox>,
    activity: Activity,
) -> Result<Option<VirusTotalHandle>, LookupError> {
    let Some(api_key) = config.api_key()? else {
        return Ok(None);
    };
    let client = Client::new(&config.base_url, &api_key, config.timeout)?;
    let (sender, receiver) = mpsc::unbounded_channel();
    let checker = Checker {
        client,
        interval: config.request_interval,
        upload_unknown: config.upload_unknown,
        max_upload_bytes: config.max_upload_bytes,
        metrics,
        outbox,
        activity,
        touched: Touched::default(),
    };
    tokio::spawn(checker.run(receiver));
    tracing::info!(
        interval = ?config.request_interval,
        upload_unknown = config.upload_unknown,
        "VirusTotal checks enabled"
    );
    Ok(Some(VirusTotalHandle { sender }))
}

struct Checker {
    client: Client,
    interval: Duration,
    upload_unknown: bool,
    max_upload_bytes: u64,
    metrics: VirusTotalMetrics,
    outbox: Option<Outbox>,
    activity: Activity,
    touched: Touched<ExecutableLabels>,
}

impl Checker {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Check>) {
        let mut queue: VecDeque<(Check, u32)> = VecDeque::new();
        let mut queued: HashSet<Sha256> = HashSet::new();
        // After each 429 the pause doubles, from twice the interval up to
        // MAX_BACKOFF_FACTOR times it. No jitter: this paces one agent's
        // requests, it does not spread a fleet's retries.
        let interval = self.interval;
        let rate_limited = || {
            let mut backoff = Backoff::new(interval, interval * MAX_BACKOFF_FACTOR, 0.0);
            backoff.next_delay();
            backoff
        };
        let mut backoff = rate_limited();
        let mut pause = self.interval;
        loop {
            self.expire();
            if queue.is_empty() {
                let sweep = self.activity.sweep_interval();
                match tokio::time::timeout(sweep, receiver.recv()).await {
                    Ok(Some(check)) => {
                        if queued.insert(check.sha256.clone()) {
                            queue.push_back((check, 0));
                        }
                    }
                    Ok(None) => return,
                    Err(_) => continue,
                }
            }
            while let Ok(check) = receiver.try_recv() {
                if queued.insert(check.sha256.clone()) {
                    queue.push_back((check, 0));
                }
            }
            let Some((check, attempts)) = queue.pop_front() else {
                continue;
            };
            match self.examine(&check).await {
                Ok(verdict) => {
                    self.metrics.failures.succeeded(FailureClass::VirusTotal);
                    backoff = rate_limited();
                    pause = self.interval;
                    self.record(&check, &verdict);
                }
                Err(LookupError::RateLimited) => {
                    self.count("rate_limited");
                    self.metrics.failures.failed(
                        FailureClass::VirusTotal,
                        "rate limited (HTTP 429): lookups slowed down",
                    );
                    pause = backoff.next_delay();
                    tracing::warn!(backoff = ?pause, "VirusTotal rate limit hit; slowing down");
                    queue.push_front((check, attempts));
                }
                Err(error) => {
                    self.count(error.label());
                    self.metrics.failures.failed(
                        FailureClass::VirusTotal,
                        format_args!("{}: {error}", error.label()),
                    );
                    if attempts + 1 < MAX_ATTEMPTS {
                        queue.push_back((check, attempts + 1));
                    } else {
                        tracing::warn!(exe = ?check.path, sha256 = %check.sha256, %error, "VirusTotal check given up");
                        self.journal_event(&check, format!("error: {error}"));
                    }
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    async fn examine(&self, check: &Check) -> Result<Verdict, LookupError> {
        let verdict = self.client.lookup(check.sha256.as_str()).await?;
        if verdict != Verdict::NotFound || !self.upload_unknown {
            return Ok(verdict);
        }
        // The node's file: in the chart's pod the agent's own path is the image's.
        let content = read_for_upload(
            crate::support::node::path_on_node(std::path::Path::new(&check.path)),
            check.sha256.clone(),
            self.max_upload_bytes,
        )
        .await?;
        let name = check.path.rsplit('/').next().unwrap_or("executable");
        self.client.upload(name, content).await
    }

    /// Removes the verdicts of executables not seen for the expiry.
    fn expire(&mut self) {
        let now = unix_now();
        let activity = self.activity.clone();
        for labels in self.touched.sweep(&activity, now, |labels, at| {
            activity.is_stale(&labels.exe.0, Some(&labels.sha256), at, now)
        }) {
            self.metrics.detections.remove(&labels);
        }
    }

    fn record(&mut self, check: &Check, verdict: &Verdict) {
        let labels = ExecutableLabels::new(&check.path, Some(check.sha256.as_str()));
        let detail = match verdict {
            Verdict::Found(stats) => {
                self.count("found");
                self.metrics
                    .detections
                    .get_or_create(&labels)
                    .set(i64::from(stats.detections()));
                self.touched.touch(&labels, unix_now());
                if stats.detections() > 0 {
                    tracing::warn!(
                        exe = ?check.path,
                        sha256 = %check.sha256,
                        malicious = stats.malicious,
                        suspicious = stats.suspicious,
                        "VirusTotal flags this executable"
                    );
                }
                serde_json::json!({
                    "malicious": stats.malicious,
                    "suspicious": stats.suspicious,
                    "harmless": stats.harmless,
                    "undetected": stats.undetected,
                })
                .to_string()
            }
            Verdict::NotFound => {
                self.count("not_found");
                "not_found".to_owned()
            }
            Verdict::Uploaded(id) => {
                self.count("uploaded");
                serde_json::json!({ "uploaded": id }).to_string()
            }
        };
        self.journal_event(check, detail);
    }

    fn journal_event(&self, check: &Check, detail: String) {
        if let Some(outbox) = &self.outbox {
            outbox.send(Record::Event(Event {
                time: unix_now(),
                kind: EventKind::VirusTotal,
                exe: Some(check.path.clone()),
                sha256: Some(check.sha256.clone()),
                detail: Some(detail),
            }));
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .lookups
            .get_or_create(&ResultLabels::new(result))
            .inc();
    }
}

/// Reads the file for upload, refusing one that is too large or is no longer
/// the file that was hashed.
async fn read_for_upload(
    path: PathBuf,
    sha256: Sha256,
    limit: u64,
) -> Result<Vec<u8>, LookupError> {
    tokio::task::spawn_blocking(move || {
        let content = std::fs::read(&path).map_err(|err| LookupError::File(err.to_string()))?;
        if content.len() as u64 > limit {
            return Err(LookupError::File(format!(
                "{} is {} bytes, above virustotal.max_upload_bytes",
                path.display(),
                content.len()
            )));
        }
        use sha2::Digest;
        let actual = Sha256::from_digest(&sha2::Sha256::digest(&content));
        if actual != sha256 {
            return Err(LookupError::File(format!(
                "{} changed since it was hashed",
                path.display()
            )));
        }
        Ok(content)
    })
    .await
    .map_err(|err| LookupError::File(err.to_string()))?
}

#[cfg(test)]
mod hostile_answer_tests {
    use super::*;

    #[test]
    fn a_hostile_answer_is_an_escaped_one_line_error() {
        let body = br#"{"data":{"attributes":{"last_analysis_stats":{"malicious":"7\n\u001b[31mFORGED LOG LINE"}}}}"#;
        let Err(error) = parse_answer::<FileObject>(body) else {
            panic!("a string where a number belongs was accepted");
        };
        let error = error.to_string();
        assert!(
            !error.contains('\n') && !error.contains('\u{1b}'),
            "{error:?}"
        );
        assert!(error.contains("malformed answer"), "{error}");
    }
}
