//! Prometheus plumbing every stage shares: the registry they register their
//! own metric families in, and the label types they use.
//!
//! Each concern owns its metrics as a small struct next to the code that
//! updates them, with a `register` function that adds them to the registry
//! (see `KernelStats`, `HashMetrics`, `JournalMetrics`, ...). The agent
//! composes those at start-up; nothing copies a counter from one place to
//! another.

use std::fmt::Write;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    registry::Registry,
};

/// Prefix of every metric the agent exports.
pub const PREFIX: &str = "fleetsnitch";

/// An empty registry with the agent's prefix.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExeLabels {
    pub exe: Text,
}

impl ExeLabels {
    pub fn new(exe: &str) -> Self {
        Self { exe: exe.into() }
    }
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

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 << 10);
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}
