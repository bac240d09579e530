//! Minimal HTTP GET and a Prometheus text-format parser for `fleetsnitch_bytes_total`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The byte counter the agent exports.
pub const BYTES_METRIC: &str = "fleetsnitch_bytes_total";

/// Largest response body accepted.
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// Status and body of an HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body (chunked transfer encoding already decoded).
    pub body: String,
}

/// `GET path` over plain HTTP/1.1 with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut raw)
        .with_context(|| format!("read response of GET {path}"))?;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of HTTP headers in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..split]).context("HTTP headers are not UTF-8")?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                let len: usize = v.parse().context("bad Content-Length")?;
                body = &body[..len.min(body.len())];
            } else if k == "content-encoding" && !v.eq_ignore_ascii_case("identity") {
                bail!("unexpected Content-Encoding {v}");
            }
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8(body).context("HTTP body is not UTF-8")?,
    })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let size_str = std::str::from_utf8(&data[..eol])?;
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("chunk size {size_str:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(data.len() >= size, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// One sample of a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Label names to (unescaped) values.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Parses every sample of metric `name` in Prometheus text exposition format.
/// Lines of other metrics (including `name_created` and the like) are ignored.
pub fn parse_samples(text: &str, name: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with([' ', '\t'])) {
            continue; // another metric sharing the prefix
        }
        let s = parse_sample_rest(rest).with_context(|| format!("line {}: {line:?}", i + 1))?;
        out.push(s);
    }
    Ok(out)
}

fn parse_sample_rest(rest: &str) -> Result<Sample> {
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    let mut value_start = 0;
    if rest.starts_with('{') {
        chars.next();
        loop {
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            match chars.peek() {
                Some((i, '}')) => {
                    value_start = i + 1;
                    break;
                }
                Some(_) => {}
                None => bail!("unterminated label set"),
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| c.is_ascii_alphanumeric() || *c == '_')
            {
                key.push(c);
            }
            ensure!(!key.is_empty(), "empty label name");
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            ensure!(
                chars.next().map(|(_, c)| c) == Some('='),
                "expected '=' after {key}"
            );
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            ensure!(
                chars.next().map(|(_, c)| c) == Some('"'),
                "expected '\"' for {key}"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, c)) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => bail!("unterminated escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            labels.insert(key, value);
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => {
                    value_start = i + 1;
                    break;
                }
                other => bail!("expected ',' or '}}', got {other:?}"),
            }
        }
    }
    let mut fields = rest[value_start..].split_whitespace();
    let v = fields.next().ok_or_else(|| anyhow!("missing value"))?;
    let value = match v {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v.parse().with_context(|| format!("bad value {v:?}"))?,
    };
    Ok(Sample { labels, value })
}

/// Sum of the samples whose `exe` and `direction` labels match, over every other label.
/// `None` if no sample matches.
pub fn bytes_for(samples: &[Sample], exe: &str, direction: &str) -> Option<f64> {
    let mut found = None;
    for s in samples {
        if s.labels.get("exe").map(String::as_str) == Some(exe)
            && s.labels.get("direction").map(String::as_str) == Some(direction)
        {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// How closely `/metrics` must agree with what a program counted itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accuracy {
    /// The program and the agent count the return values of the same calls: equal.
    Exact,
    /// Within `fraction` of the expected value either way, because of `why` (a cause
    /// that makes the two count different things; the smallest bound it needs).
    Within { fraction: f64, why: &'static str },
}

impl Accuracy {
    /// Whether `seen` (absent: 0) is acceptable for `expected`. An expected 0 must
    /// be 0 or absent, whatever the bound.
    pub fn accepts(self, expected: u64, seen: Option<f64>) -> bool {
        let seen = seen.unwrap_or(0.0);
        let expected = expected as f64;
        match self {
            Self::Exact => seen == expected,
            Self::Within { fraction, .. } => (seen - expected).abs() <= fraction * expected,
        }
    }

    /// `exact`, or `±0.5%` for a bound.
    pub fn label(self) -> String {
        match self {
            Self::Exact => "exact".to_owned(),
            Self::Within { fraction, .. } => format!("±{}%", fraction * 100.0),
        }
    }
}

/// `expected 100, seen 98, diff -2` (an absent series is `seen absent, diff -100`).
pub fn difference(expected: u64, seen: Option<f64>) -> String {
    let diff = seen.unwrap_or(0.0) - expected as f64;
    let seen = seen.map_or_else(|| "absent".to_owned(), |v| format!("{v:.0}"));
    format!("expected {expected}, seen {seen}, diff {diff:+.0}")
}

/// Scrapes an agent's telemetry endpoint.
#[derive(Debug, Clone)]
pub struct MetricsClient {
    /// Listen address of the agent.
    pub addr: SocketAddr,
    /// Telemetry path.
    pub path: String,
}

impl MetricsClient {
    /// A scraper for `http://addr/metrics`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            path: "/metrics".to_owned(),
        }
    }

    /// Fetches and parses `fleetsnitch_bytes_total`.
    /// The whole `/metrics` page.
    pub fn text(&self) -> Result<String> {
        Ok(http_get(self.addr, "/metrics", Duration::from_secs(10))?.body)
    }

    /// Samples of `name` for executable `exe` (and `direction`, if given).
    pub fn samples_for(
        &self,
        name: &str,
        exe: &Path,
        direction: Option<&str>,
    ) -> Result<Vec<Sample>> {
        Ok(parse_samples(&self.text()?, name)?
            .into_iter()
            .filter(|s| {
                s.labels.get("exe").map(String::as_str) == exe.to_str()
                    && direction
                        .is_none_or(|d| s.labels.get("direction").map(String::as_str) == Some(d))
            })
            .collect())
    }

    pub fn scrape(&self) -> Result<Vec<Sample>> {
        let resp = http_get(self.addr, &self.path, Duration::from_secs(5))?;
        ensure!(
            resp.status == 200,
            "GET {} answered {}",
            self.path,
            resp.status
        );
        parse_samples(&resp.body, BYTES_METRIC)
    }

    /// Current value for `exe` / `direction` (`None` if absent).
    pub fn bytes(&self, exe: &Path, direction: &str) -> Result<Option<f64>> {
        Ok(bytes_for(
            &self.scrape()?,
            &exe.to_string_lossy(),
            direction,
        ))
    }

    /// Polls every 200 ms for up to 30 s until the value for `exe` / `direction` is
    /// exactly `expected` (0 or absent when `expected` is 0); fails with expected, seen
    /// and the difference otherwise. The bound is generous (the agent promises 2 s) so
    /// that a machine shared with other heavy runs does not fail a wait; it costs time
    /// only when the value is wrong.
    pub fn wait_for_bytes(&self, exe: &Path, direction: &str, expected: u64) -> Result<()> {
        let bound = Duration::from_secs(30);
        let seen = self.settle_bytes(exe, direction, expected, Accuracy::Exact, bound)?;
        ensure!(
            Accuracy::Exact.accepts(expected, seen),
            "{BYTES_METRIC}{{exe=\"{}\",direction=\"{direction}\"}} after {bound:?}: {}",
            exe.display(),
            difference(expected, seen)
        );
        Ok(())
    }

    /// Polls every 200 ms for up to `bound` until `accuracy` accepts the value for
    /// `exe` / `direction`; returns the last value seen (`None`: absent), accepted or not.
    /// Fails only if no scrape succeeded.
    pub fn settle_bytes(
        &self,
        exe: &Path,
        direction: &str,
        expected: u64,
        accuracy: Accuracy,
        bound: Duration,
    ) -> Result<Option<f64>> {
        let deadline = Instant::now() + bound;
        let mut last: Option<Result<Option<f64>>> = None;
        loop {
            let v = self.bytes(exe, direction);
            if let Ok(v) = &v
                && accuracy.accepts(expected, *v)
            {
                return Ok(*v);
            }
            // Keep the last successful value over a later scrape error.
            if v.is_ok() || !matches!(last, Some(Ok(_))) {
                last = Some(v);
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        last.unwrap_or_else(|| Err(anyhow!("no scrape attempted")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP fleetsnitch_bytes_total Bytes.
# TYPE fleetsnitch_bytes_total counter
fleetsnitch_bytes_total{exe="/usr/bin/curl",direction="sent",port="443"} 100
fleetsnitch_bytes_total{exe="/usr/bin/curl",direction="sent",port="80"} 23
fleetsnitch_bytes_total{direction="received",exe="/usr/bin/curl"} 1.5e3 1700000000000
fleetsnitch_bytes_total{exe="/tmp/we\"ird\\pa\nth", direction = "sent" ,} 7
fleetsnitch_bytes_total_created{exe="/usr/bin/curl",direction="sent"} 1.7e9
fleetsnitch_bytes_totalx{exe="/usr/bin/curl",direction="sent"} 99
fleetsnitch_bytes_total 5
other_metric{exe="/usr/bin/curl",direction="sent"} 1
"#;

    #[test]
    fn parses_and_sums_over_other_labels() {
        let s = parse_samples(TEXT, BYTES_METRIC).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(bytes_for(&s, "/usr/bin/curl", "sent"), Some(123.0));
        assert_eq!(bytes_for(&s, "/usr/bin/curl", "received"), Some(1500.0));
        assert_eq!(bytes_for(&s, "/tmp/we\"ird\\pa\nth", "sent"), Some(7.0));
        assert_eq!(bytes_for(&s, "/usr/bin/wget", "sent"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_samples("fleetsnitch_bytes_total{exe=\"x} 1", BYTES_METRIC).is_err());
        assert!(parse_samples("fleetsnitch_bytes_total{exe=\"x\"}", BYTES_METRIC).is_err());
        assert!(parse_samples("fleetsnitch_bytes_total{exe=x} 1", BYTES_METRIC).is_err());
    }

    #[test]
    fn exact_means_equal_and_a_bound_means_at_most_its_fraction() {
        let exact = Accuracy::Exact;
        assert!(exact.accepts(0, None));
        assert!(exact.accepts(0, Some(0.0)));
        assert!(!exact.accepts(0, Some(1.0)));
        assert!(exact.accepts(1000, Some(1000.0)));
        assert!(!exact.accepts(1000, Some(999.0)));
        assert!(!exact.accepts(1000, Some(1001.0)));
        assert!(!exact.accepts(1000, None));
        let bound = Accuracy::Within {
            fraction: 0.01,
            why: "test",
        };
        assert!(bound.accepts(1000, Some(990.0)));
        assert!(bound.accepts(1000, Some(1010.0)));
        assert!(!bound.accepts(1000, Some(1011.0)));
        assert!(!bound.accepts(0, Some(1.0)));
        assert_eq!(bound.label(), "±1%");
    }

    #[test]
    fn differences_name_expected_seen_and_diff() {
        assert_eq!(
            difference(100, Some(98.0)),
            "expected 100, seen 98, diff -2"
        );
        assert_eq!(difference(5, Some(7.0)), "expected 5, seen 7, diff +2");
        assert_eq!(difference(5, None), "expected 5, seen absent, diff -5");
    }

    #[test]
    fn http_plain_and_chunked() {
        let r =
            parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello!!").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "hello world");
        let r = parse_http_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\n").unwrap();
        assert_eq!(r.status, 503);
    }
}
