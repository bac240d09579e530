//! The two text formats a scraper can ask for, and which one it asked for.
//!
//! prometheus-client encodes OpenMetrics only. Exporters are expected to serve
//! the classic Prometheus text format (0.0.4) unless the scraper asks for
//! OpenMetrics, as the Go exporters do: `curl`, `promtool check metrics` and
//! many scrapers read the classic format. The two differ in what matters here:
//!
//! | | OpenMetrics 1.0 | classic 0.0.4 |
//! | --- | --- | --- |
//! | counter `x` | `# HELP x`, `# TYPE x counter`, sample `x_total` | `# HELP x_total`, `# TYPE x_total counter`, sample `x_total` |
//! | info `x` | `# TYPE x info`, sample `x_info` | `# TYPE x_info gauge`, sample `x_info` |
//! | unknown | `unknown` | `untyped` |
//! | `# UNIT`, `# EOF`, exemplars (` # {..}` after a sample) | yes | none |
//!
//! So the classic page is the OpenMetrics page rewritten line by line:
//! descriptors renamed and retyped, `# UNIT`/`# EOF` and exemplars dropped,
//! samples kept as they are (label values are escaped alike in both formats,
//! and prometheus-client writes no sample timestamps, whose units differ).

use std::fmt::Write as _;

use prometheus_client::{encoding::text, registry::Registry};

/// The classic format's content type.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics' content type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Classic,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Classic => CLASSIC_CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for: the acceptable media range with
    /// the highest quality, the more specific one on a tie, the first one on
    /// a tie of both. OpenMetrics only when that range is
    /// `application/openmetrics-text` (version 1.0.0, 0.0.1 or none); the
    /// classic format otherwise, including when nothing offered is acceptable
    /// (a page the client may refuse beats an empty 406).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Classic;
        };
        let mut best: Option<(f32, u8, Self)> = None;
        for range in accept.split(',') {
            let mut parameters = range.split(';');
            let media = parameters.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut quality = 1.0_f32;
            let mut version = None;
            for parameter in parameters {
                let Some((key, value)) = parameter.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    "q" => quality = value.parse().unwrap_or(0.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
            let (specificity, format) = match (media.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => {
                    (2, Self::OpenMetrics)
                }
                ("text/plain", None | Some("0.0.4")) => (2, Self::Classic),
                ("text/*", _) => (1, Self::Classic),
                ("*/*", _) => (0, Self::Classic),
                _ => continue,
            };
            if quality.is_nan() || quality <= 0.0 {
                continue;
            }
            let better = best.is_none_or(|(best_quality, best_specificity, _)| {
                quality > best_quality
                    || (quality == best_quality && specificity > best_specificity)
            });
            if better {
                best = Some((quality, specificity, format));
            }
        }
        best.map_or(Self::Classic, |(_, _, format)| format)
    }
}

/// `registries`, one after the other, as one page in `format`.
pub fn encode(registries: &[&Registry], format: Format) -> String {
    let mut openmetrics = String::with_capacity(16 << 10);
    for registry in registries {
        text::encode_registry(&mut openmetrics, registry).expect("writing to a String cannot fail");
    }
    match format {
        Format::OpenMetrics => {
            text::encode_eof(&mut openmetrics).expect("writing to a String cannot fail");
            openmetrics
        }
        Format::Classic => to_classic(&openmetrics),
    }
}

/// Rewrites an OpenMetrics page (as prometheus-client writes it) in the
/// classic text format; see the module's table.
pub fn to_classic(openmetrics: &str) -> String {
    let mut classic = String::with_capacity(openmetrics.len());
    // `# HELP` comes before `# TYPE`, but its name depends on the type.
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut classic, pending_help.take());
            pending_help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, classic_kind) = match kind {
                "counter" => (counter_suffix(name), "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            match pending_help.take() {
                Some((help_name, help)) if help_name == name => {
                    let _ = writeln!(classic, "# HELP {name}{suffix} {help}");
                }
                other => flush_help(&mut classic, other),
            }
            let _ = writeln!(classic, "# TYPE {name}{suffix} {classic_kind}");
        } else if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF` and any other comment: not in the classic format.
        } else {
            flush_help(&mut classic, pending_help.take());
            classic.push_str(without_exemplar(line));
            classic.push('\n');
        }
    }
    flush_help(&mut classic, pending_help);
    classic
}

/// OpenMetrics names a counter's family without `_total`; a family already
/// named so (which OpenMetrics forbids, but a hand-written collector may do)
/// keeps its name.
fn counter_suffix(name: &str) -> &'static str {
    if name.ends_with("_total") {
        ""
    } else {
        "_total"
    }
}

fn flush_help(classic: &mut String, help: Option<(&str, &str)>) {
    if let Some((name, help)) = help {
        let _ = writeln!(classic, "# HELP {name} {help}");
    }
}

/// A sample line without its exemplar (` # {labels} value [timestamp]`), which
/// the classic format has no room for. Quotes are honoured: a label value may
/// hold ` # `.
fn without_exemplar(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut end_of_labels = match bytes.iter().position(|&b| b == b'{' || b == b' ') {
        Some(at) if bytes[at] == b'{' => None,
        Some(at) => Some(at),
        None => return line,
    };
    if end_of_labels.is_none() {
        let mut quoted = false;
        let mut escaped = false;
        for (at, &byte) in bytes.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                quoted = !quoted;
            } else if byte == b'}' && !quoted {
                end_of_labels = Some(at + 1);
                break;
            }
        }
    }
    let Some(end) = end_of_labels else {
        return line;
    };
    match line[end..].find(" # ") {
        Some(at) => &line[..end + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
        registry::Unit,
    };

    use super::*;
    use crate::telemetry::{self, PathLabels};

    #[test]
    fn without_accept_or_for_curl_the_classic_format() {
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(Format::negotiate(Some("application/json")), Format::Classic);
        assert_eq!(Format::negotiate(Some("")), Format::Classic);
    }

    #[test]
    fn prometheus_asking_for_openmetrics_gets_it() {
        // Prometheus 2.x's scrape Accept header, with and without protobuf.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        let with_protobuf = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                             encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,\
                             application/openmetrics-text;version=0.0.1;q=0.75,\
                             text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(with_protobuf)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn quality_and_specificity_decide() {
        // Prometheus >= 2.49 with scrape_protocols: [PrometheusText0.0.4].
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.4, text/plain;q=0.5")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("*/*, application/openmetrics-text")),
            Format::OpenMetrics,
            "equal quality: the specific range wins over */*"
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0, */*")),
            Format::Classic,
            "q=0 means not acceptable"
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Classic,
            "a version we do not write"
        );
    }

    fn sample_registry() -> Registry {
        let mut registry = telemetry::registry();
        let counter = Counter::<u64>::default();
        counter.inc_by(3);
        registry.register("requests", "Requests served", counter);
        let seconds = Counter::<f64>::default();
        seconds.inc_by(1.5);
        registry.register_with_unit("busy", "Time spent busy", Unit::Seconds, seconds);
        let gauge = Gauge::<i64>::default();
        gauge.set(7);
        registry.register("queue_length", "Records waiting", gauge);
        let family = Family::<PathLabels, Counter>::default();
        family
            .get_or_create(&PathLabels {
                path: "/odd \"pa # {th}\"\n".into(),
            })
            .inc();
        registry.register("opened", "Files opened", family);
        registry.register(
            "build",
            "What runs",
            Info::new(vec![("version".to_owned(), "1".to_owned())]),
        );
        registry
    }

    #[test]
    fn classic_names_counter_families_with_total_and_drops_openmetrics_only_lines() {
        let classic = encode(&[&sample_registry()], Format::Classic);
        let expected = "\
# HELP fleetsnitch_requests_total Requests served.
# TYPE fleetsnitch_requests_total counter
fleetsnitch_requests_total 3
# HELP fleetsnitch_busy_seconds_total Time spent busy.
# TYPE fleetsnitch_busy_seconds_total counter
fleetsnitch_busy_seconds_total 1.5
# HELP fleetsnitch_queue_length Records waiting.
# TYPE fleetsnitch_queue_length gauge
fleetsnitch_queue_length 7
# HELP fleetsnitch_opened_total Files opened.
# TYPE fleetsnitch_opened_total counter
fleetsnitch_opened_total{path=\"/odd \\\"pa # {th}\\\"\\n\"} 1
# HELP fleetsnitch_build_info What runs.
# TYPE fleetsnitch_build_info gauge
fleetsnitch_build_info{version=\"1\"} 1
";
        assert_eq!(classic, expected);
    }

    #[test]
    fn openmetrics_is_prometheus_clients_own_page_with_one_eof() {
        let registry = sample_registry();
        let mut other = Registry::default();
        other.register("up_time", "Other", Gauge::<i64>::default());
        let page = encode(&[&registry, &other], Format::OpenMetrics);
        assert!(
            page.contains("# TYPE fleetsnitch_requests counter\n"),
            "{page}"
        );
        assert!(
            page.contains("# UNIT fleetsnitch_busy_seconds seconds\n"),
            "{page}"
        );
        assert!(page.contains("# TYPE up_time gauge\n"), "{page}");
        assert_eq!(page.matches("# EOF").count(), 1, "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
    }

    #[test]
    fn exemplars_are_cut_outside_quotes_only() {
        assert_eq!(
            without_exemplar("a_total{x=\"1 # 2\"} 5 # {trace=\"t\"} 1.0"),
            "a_total{x=\"1 # 2\"} 5"
        );
        assert_eq!(
            without_exemplar("a_total{x=\"q\\\"}\"} 5"),
            "a_total{x=\"q\\\"}\"} 5"
        );
        assert_eq!(without_exemplar("a_total 5 # {t=\"1\"} 2"), "a_total 5");
        assert_eq!(without_exemplar("a_total 5"), "a_total 5");
    }

    #[test]
    fn other_types_become_untyped_and_a_lone_help_is_kept() {
        let classic = to_classic(
            "# HELP a Lone.\n# HELP b B.\n# TYPE b unknown\nb 1\n# TYPE c_total counter\nc_total 2\n# EOF\n",
        );
        assert_eq!(
            classic,
            "# HELP a Lone.\n# HELP b B.\n# TYPE b untyped\nb 1\n# TYPE c_total counter\nc_total 2\n"
        );
    }
}
