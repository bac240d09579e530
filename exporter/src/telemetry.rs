//! Prometheus plumbing every stage shares: the registry they register their
//! own metric families in, and the label types they use.
//!
//! Each concern owns its metrics as a small struct next to the code that
//! updates them, with a `register` function that adds them to the registry
//! (see `KernelStats`, `HashMetrics`, `JournalMetrics`, ...). The agent
//! composes those at start-up; nothing copies a counter from one place to
//! another.
//!
//! Beside them, what every exporter says about itself ([`self_registry`]):
//! `fleetsnitch_build_info` and the standard `process_*` metrics
//! ([`process`]). [`exposition`] writes the page in the format the scraper
//! asked for.

pub mod exposition;
pub mod process;

use std::fmt::Write;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::support::build_info;

/// Prefix of every metric the agent exports.
pub const PREFIX: &str = "fleetsnitch";

/// An empty registry with the agent's prefix.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// The metrics an exporter serves about itself: `process_*` (no prefix, as
/// every client library names them) and `fleetsnitch_build_info`.
pub fn self_registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(process::ProcessCollector));
    register_build_info(registry.sub_registry_with_prefix(PREFIX));
    registry
}

/// `fleetsnitch_build_info`'s labels, as the Go exporters' `<name>_build_info`
/// (`goversion` is `rustversion` here, `goos`/`goarch` the target triple).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfoLabels {
    pub version: String,
    pub revision: String,
    pub branch: String,
    pub rustversion: String,
    pub target: String,
}

impl BuildInfoLabels {
    /// This binary's.
    pub fn current() -> Self {
        Self {
            version: build_info::VERSION.to_owned(),
            revision: build_info::REVISION.to_owned(),
            branch: build_info::BRANCH.to_owned(),
            rustversion: build_info::rustc_version_number().to_owned(),
            target: build_info::TARGET.to_owned(),
        }
    }
}

/// `fleetsnitch_build_info`: 1, labelled with what was built (the
/// Prometheus convention, so it joins onto any series of the same target).
fn register_build_info(registry: &mut Registry) {
    let info = Family::<BuildInfoLabels, Gauge>::default();
    info.get_or_create(&BuildInfoLabels::current()).set(1);
    registry.register(
        "build_info",
        "A metric with a constant '1' value labeled by version, revision, branch, \
         rustversion and target from which fleetsnitch was built",
        info,
    );
}

/// A label value taken from the outside world (a path, a name), escaped as the
/// exposition format requires. prometheus-client writes label values verbatim,
/// so a quote or newline in an executable's path would otherwise break the page.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text(pub String);

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                other => encoder.write_char(other)?,
            }
        }
        Ok(())
    }
}

impl From<String> for Text {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Text {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Sent, Direction::Received];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Label value of `sha256` when the executable could not be hashed.
pub const UNAVAILABLE: &str = "unavailable";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutableLabels {
    pub exe: Text,
    /// Hex sha256, or [`UNAVAILABLE`] when hashing failed (see `fleetsnitch_hash_failures_total`).
    pub sha256: String,
}

impl ExecutableLabels {
    pub fn new(exe: &str, sha256: Option<&str>) -> Self {
        Self {
            exe: exe.into(),
            sha256: sha256.unwrap_or(UNAVAILABLE).to_owned(),
        }
    }
}

/// An executable version (`exe`, `sha256`) and who ran it when it was first
/// seen on this host: `parent`, `user`, `container_id`, `container_name`,
/// `pod`, `namespace`, each left out where unknown.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FirstSeenLabels {
    pub version: ExecutableLabels,
    pub context: Vec<(&'static str, Text)>,
}

impl EncodeLabelSet for FirstSeenLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_label_pair(encoder, "exe", &self.version.exe)?;
        encode_label_pair(encoder, "sha256", &self.version.sha256)?;
        for (name, value) in &self.context {
            encode_label_pair(encoder, name, value)?;
        }
        Ok(())
    }
}

/// Writes one `key="value"` pair of a label set whose keys are chosen at run time.
pub fn encode_label_pair<V: EncodeLabelValue>(
    encoder: &mut LabelSetEncoder<'_>,
    key: &str,
    value: &V,
) -> Result<(), std::fmt::Error> {
    let mut label = encoder.encode_label();
    let mut key_encoder = label.encode_label_key()?;
    key_encoder.write_str(key)?;
    let mut value_encoder = key_encoder.encode_label_value()?;
    value.encode(&mut value_encoder)?;
    value_encoder.finish()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExeLabels {
    pub exe: Text,
}

impl ExeLabels {
    pub fn new(exe: &str) -> Self {
        Self { exe: exe.into() }
    }
}

/// An executable and a kind of destination (`domain`, `country`, `asn`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExeKindLabels {
    pub exe: Text,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

impl ResultLabels {
    pub fn new(result: &str) -> Self {
        Self {
            result: result.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    exposition::encode(&[registry], exposition::Format::OpenMetrics)
}
