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
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    config::VirusTotalConfig,
    sinks::journal::{Event, EventKind, Input, JournalHandle, unix_now},
    sinks::metrics::{ExecutableLabels, Metrics, ResultLabels},
};

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
    pub sha256: String,
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
/// API key is configured.
pub fn spawn(
    config: &VirusTotalConfig,
    metrics: Arc<Metrics>,
    journal: Option<JournalHandle>,
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
        journal,
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
    metrics: Arc<Metrics>,
    journal: Option<JournalHandle>,
}

impl Checker {
    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Check>) {
        let mut queue: VecDeque<(Check, u32)> = VecDeque::new();
        let mut queued: HashSet<String> = HashSet::new();
        let mut backoff = 1;
        loop {
            if queue.is_empty() {
                match receiver.recv().await {
                    Some(check) => {
                        if queued.insert(check.sha256.clone()) {
                            queue.push_back((check, 0));
                        }
                    }
                    None => return,
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
                    backoff = 1;
                    self.record(&check, &verdict);
                }
                Err(LookupError::RateLimited) => {
                    self.count("rate_limited");
                    backoff = (backoff * 2).min(MAX_BACKOFF_FACTOR);
                    tracing::warn!(backoff = ?self.interval * backoff, "VirusTotal rate limit hit; slowing down");
                    queue.push_front((check, attempts));
                }
                Err(error) => {
                    self.count(error.label());
                    if attempts + 1 < MAX_ATTEMPTS {
                        queue.push_back((check, attempts + 1));
                    } else {
                        tracing::warn!(exe = ?check.path, sha256 = %check.sha256, %error, "VirusTotal check given up");
                        self.journal_event(&check, format!("error: {error}"));
                    }
                }
            }
            tokio::time::sleep(self.interval * backoff).await;
        }
    }

    async fn examine(&self, check: &Check) -> Result<Verdict, LookupError> {
        let verdict = self.client.lookup(&check.sha256).await?;
        if verdict != Verdict::NotFound || !self.upload_unknown {
            return Ok(verdict);
        }
        let content = read_for_upload(
            PathBuf::from(&check.path),
            check.sha256.clone(),
            self.max_upload_bytes,
        )
        .await?;
        let name = check.path.rsplit('/').next().unwrap_or("executable");
        self.client.upload(name, content).await
    }

    fn record(&self, check: &Check, verdict: &Verdict) {
        let labels = ExecutableLabels {
            exe: check.path.clone().into(),
            sha256: check.sha256.clone(),
        };
        let detail = match verdict {
            Verdict::Found(stats) => {
                self.count("found");
                self.metrics
                    .virustotal_detections
                    .get_or_create(&labels)
                    .set(i64::from(stats.detections()));
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
        if let Some(journal) = &self.journal {
            journal.send(Input::Event(Event {
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
            .virustotal_lookups
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }
}

/// Reads the file for upload, refusing one that is too large or is no longer
/// the file that was hashed.
async fn read_for_upload(
    path: PathBuf,
    sha256: String,
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
        let actual = format!("{:x}", sha2::Sha256::digest(&content));
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
