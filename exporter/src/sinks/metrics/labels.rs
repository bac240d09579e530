//! The labels of `fleetsnitch_bytes_total` beyond `exe` and `direction`: which
//! dimensions are exported, and caps that keep their cardinality bounded.
//!
//! Each dimension admits values up to its cap; later values fold into
//! `other` and are counted (once per distinct value) in
//! `fleetsnitch_label_overflow_total{label}`. The family as a whole is capped
//! too: past `metrics.max_series`, new combinations fold every optional
//! dimension into `other`. When an executable's series expire
//! ([`LabelPolicy::forget_exe`]) its `exe` value and every value no other
//! series uses give their places back. Memory stays bounded whatever the
//! traffic.

use std::{
    collections::{HashMap, HashSet, hash_map::DefaultHasher},
    fmt,
    hash::{Hash, Hasher},
    ops::RangeInclusive,
    str::FromStr,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::Deserialize;

use crate::{
    model::FlowRecord,
    telemetry::{Direction, Text, UNAVAILABLE, encode_label_pair},
};

/// Value of a folded label.
pub const OTHER: &str = "other";
/// Value of `remote_port` for ports in the ephemeral range.
pub const EPHEMERAL: &str = "ephemeral";
/// Distinct folded values remembered per dimension to count each once; past
/// this the overflow counter counts every fold (and says so in the log).
const MAX_REMEMBERED_FOLDS: usize = 1 << 20;

/// An optional label of `fleetsnitch_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Parent,
    User,
    Uid,
    RemotePort,
    Transport,
    Domain,
    Country,
    Asn,
    ContainerId,
    ContainerName,
    Pod,
    Namespace,
    Sha256,
}

impl Dimension {
    pub const ALL: [Dimension; 13] = [
        Dimension::Parent,
        Dimension::User,
        Dimension::Uid,
        Dimension::RemotePort,
        Dimension::Transport,
        Dimension::Domain,
        Dimension::Country,
        Dimension::Asn,
        Dimension::ContainerId,
        Dimension::ContainerName,
        Dimension::Pod,
        Dimension::Namespace,
        Dimension::Sha256,
    ];

    /// The label name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Parent => "parent",
            Self::User => "user",
            Self::Uid => "uid",
            Self::RemotePort => "remote_port",
            Self::Transport => "transport",
            Self::Domain => "domain",
            Self::Country => "country",
            Self::Asn => "asn",
            Self::ContainerId => "container_id",
            Self::ContainerName => "container_name",
            Self::Pod => "pod",
            Self::Namespace => "namespace",
            Self::Sha256 => "sha256",
        }
    }

    /// Default cap of distinct values.
    pub fn default_cap(self) -> usize {
        match self {
            Self::Transport => 16,
            Self::Country => 250,
            Self::Namespace => 100,
            Self::User | Self::Uid => 200,
            Self::RemotePort => 200,
            Self::Parent | Self::Domain | Self::Asn => 500,
            Self::ContainerId | Self::ContainerName | Self::Pod => 500,
            // As many as executables: one per version that ran.
            Self::Sha256 => 5_000,
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dimension {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|dimension| dimension.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|d| d.name()).collect();
                format!("unknown label {name:?}; known labels: {}", known.join(", "))
            })
    }
}

impl<'de> Deserialize<'de> for Dimension {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Labels of one `fleetsnitch_bytes_total` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficLabels {
    pub exe: Text,
    pub direction: Direction,
    pub extra: Vec<(Dimension, Text)>,
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), fmt::Error> {
        encode_label_pair(encoder, "exe", &self.exe)?;
        encode_label_pair(encoder, "direction", &self.direction)?;
        for (dimension, value) in &self.extra {
            encode_label_pair(encoder, dimension.name(), value)?;
        }
        Ok(())
    }
}

/// Admits values of one dimension up to its cap.
#[derive(Debug)]
struct Folder {
    cap: usize,
    /// Each admitted value, with the number of live series that use it.
    admitted: HashMap<String, usize>,
    folded: HashSet<u64>,
    /// `fleetsnitch_label_overflow_total` of this dimension.
    folded_total: Counter,
}

impl Folder {
    fn new(cap: usize, folded_total: Counter) -> Self {
        Self {
            cap,
            admitted: HashMap::new(),
            folded: HashSet::new(),
            folded_total,
        }
    }

    /// The value to export for `value`.
    fn fold(&mut self, value: &str) -> Text {
        if value.is_empty() || self.admitted.contains_key(value) {
            return Text(value.to_owned());
        }
        if self.admitted.len() < self.cap {
            self.admitted.insert(value.to_owned(), 0);
            return Text(value.to_owned());
        }
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        let fingerprint = hasher.finish();
        if self.folded.len() >= MAX_REMEMBERED_FOLDS || self.folded.insert(fingerprint) {
            self.folded_total.inc();
        }
        Text(OTHER.to_owned())
    }

    /// A new series uses the exported `value`.
    fn hold(&mut self, value: &str) {
        if let Some(uses) = self.admitted.get_mut(value) {
            *uses += 1;
        }
    }

    /// A series that used `value` is gone; unused, the value gives its place back.
    fn release(&mut self, value: &str) {
        if let Some(uses) = self.admitted.get_mut(value) {
            *uses = uses.saturating_sub(1);
            if *uses == 0 {
                self.admitted.remove(value);
            }
        }
    }

    /// Gives back the places of values no series uses (admitted for a series
    /// that `max_series` then folded).
    fn release_unused(&mut self) {
        self.admitted.retain(|_, uses| *uses > 0);
    }
}

/// Which labels to export and how to keep them bounded.
#[derive(Debug)]
pub struct LabelPolicy {
    dimensions: Vec<Dimension>,
    ephemeral_ports: RangeInclusive<u16>,
    exe: Folder,
    /// The `exe` of `fleetsnitch_exec_total`: the same cap, its own values, so
    /// programs that only run never crowd networked ones out of the bytes.
    exec_exe: Folder,
    folders: HashMap<Dimension, Folder>,
    max_series: usize,
    /// Every series admitted, by its `exe` value.
    series: HashMap<Text, HashSet<TrafficLabels>>,
    series_len: usize,
    /// Whole series folded by `max_series` (`label="_series"`).
    series_folded: Counter,
    /// `fleetsnitch_bytes_series`.
    series_count: Gauge,
}

/// The counters a [`LabelPolicy`] counts its folds in.
#[derive(Debug, Clone, Default)]
pub struct OverflowMetrics {
    /// `fleetsnitch_label_overflow_total{label}`.
    pub overflow: Family<LabelLabels, Counter>,
    /// `fleetsnitch_bytes_series`.
    pub series: Gauge,
}

impl OverflowMetrics {
    fn counter(&self, label: &str) -> Counter {
        self.overflow
            .get_or_create(&LabelLabels {
                label: label.to_owned(),
            })
            .clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LabelLabels {
    pub label: String,
}

/// Name of the `exe` dimension in overflow metrics.
pub const EXE_LABEL: &str = "exe";
/// Name used in overflow metrics for whole series folded by `max_series`.
pub const SERIES_LABEL: &str = "_series";

impl LabelPolicy {
    pub fn new(
        dimensions: &[Dimension],
        caps: &HashMap<String, usize>,
        ephemeral_ports: RangeInclusive<u16>,
        max_series: usize,
        metrics: &OverflowMetrics,
    ) -> Self {
        let mut dimensions = dimensions.to_vec();
        dimensions.sort();
        dimensions.dedup();
        let cap_of = |name: &str, default: usize| caps.get(name).copied().unwrap_or(default);
        let folders = dimensions
            .iter()
            .map(|&d| {
                let folder =
                    Folder::new(cap_of(d.name(), d.default_cap()), metrics.counter(d.name()));
                (d, folder)
            })
            .collect();
        // Both exe folders count into label="exe".
        let exe_folded = metrics.counter(EXE_LABEL);
        Self {
            exe: Folder::new(cap_of(EXE_LABEL, 5_000), exe_folded.clone()),
            exec_exe: Folder::new(cap_of(EXE_LABEL, 5_000), exe_folded),
            dimensions,
            ephemeral_ports,
            folders,
            max_series,
            series: HashMap::new(),
            series_len: 0,
            series_folded: metrics.counter(SERIES_LABEL),
            series_count: metrics.series.clone(),
        }
    }

    /// The `exe` label of `fleetsnitch_exec_total`: folded under the same cap
    /// as here (`metrics.label_caps.exe`), counted in the same overflow
    /// (`label="exe"`), but with its own admitted values.
    pub fn exec_exe_label(&mut self, exe: &str) -> Text {
        self.exec_exe.fold(exe)
    }

    /// `fleetsnitch_exec_total{exe}` now exists: its value is in use.
    pub fn hold_exec_exe(&mut self, exe: &Text) {
        self.exec_exe.hold(&exe.0);
    }

    /// `fleetsnitch_exec_total{exe}` expired: its place is given back.
    pub fn forget_exec_exe(&mut self, exe: &Text) {
        self.exec_exe.release(&exe.0);
    }

    /// Takes out every series of `exe` (they expired) and gives back the
    /// places of `exe` and of each value no other series uses. Returns them,
    /// to be removed from the family.
    pub fn forget_exe(&mut self, exe: &Text) -> Vec<TrafficLabels> {
        let Some(series) = self.series.remove(exe) else {
            return Vec::new();
        };
        self.series_len -= series.len();
        self.series_count.set(self.series_len as i64);
        for labels in &series {
            self.release(labels);
        }
        series.into_iter().collect()
    }

    /// Gives back the places of values admitted for series that
    /// `max_series` folded.
    pub fn release_unused(&mut self) {
        self.exe.release_unused();
        self.exec_exe.release_unused();
        for folder in self.folders.values_mut() {
            folder.release_unused();
        }
    }

    fn hold(&mut self, labels: &TrafficLabels) {
        self.exe.hold(&labels.exe.0);
        for (dimension, value) in &labels.extra {
            if let Some(folder) = self.folders.get_mut(dimension) {
                folder.hold(&value.0);
            }
        }
    }

    fn release(&mut self, labels: &TrafficLabels) {
        self.exe.release(&labels.exe.0);
        for (dimension, value) in &labels.extra {
            if let Some(folder) = self.folders.get_mut(dimension) {
                folder.release(&value.0);
            }
        }
    }

    /// Admits `labels` as a series; false when it existed already.
    fn admit(&mut self, labels: &TrafficLabels) -> bool {
        let fresh = self
            .series
            .entry(labels.exe.clone())
            .or_default()
            .insert(labels.clone());
        if fresh {
            self.series_len += 1;
            self.series_count.set(self.series_len as i64);
            self.hold(labels);
        }
        fresh
    }

    fn contains(&self, labels: &TrafficLabels) -> bool {
        self.series
            .get(&labels.exe)
            .is_some_and(|series| series.contains(labels))
    }

    pub fn dimensions(&self) -> &[Dimension] {
        &self.dimensions
    }

    /// The labels for bytes of `flow` in `direction`.
    pub fn labels(&mut self, flow: &FlowRecord, direction: Direction) -> TrafficLabels {
        let exe = self.exe.fold(&flow.program.exe);
        let mut extra = Vec::with_capacity(self.dimensions.len());
        for index in 0..self.dimensions.len() {
            let dimension = self.dimensions[index];
            let raw = self.raw_value(dimension, flow);
            let folder = self
                .folders
                .get_mut(&dimension)
                .expect("a folder per dimension");
            extra.push((dimension, folder.fold(&raw)));
        }
        let labels = TrafficLabels {
            exe,
            direction,
            extra,
        };
        if self.contains(&labels) {
            return labels;
        }
        if self.series_len < self.max_series {
            self.admit(&labels);
            return labels;
        }
        self.series_folded.inc();
        let folded = TrafficLabels {
            extra: labels
                .extra
                .iter()
                .map(|(dimension, _)| (*dimension, Text(OTHER.to_owned())))
                .collect(),
            ..labels
        };
        self.admit(&folded);
        folded
    }

    /// The value of `dimension` for `flow`, before folding; empty when unknown.
    fn raw_value(&self, dimension: Dimension, flow: &FlowRecord) -> String {
        let FlowRecord {
            program,
            peer,
            workload,
            bytes: _,
        } = flow;
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let number = |value: Option<u32>| value.map(|n| n.to_string()).unwrap_or_default();
        match dimension {
            Dimension::Parent => text(&program.parent),
            Dimension::User => text(&program.user_name),
            Dimension::Uid => number(program.uid),
            Dimension::RemotePort => match peer.remote_port {
                Some(port) if self.ephemeral_ports.contains(&port) => EPHEMERAL.to_owned(),
                Some(port) => port.to_string(),
                None => String::new(),
            },
            Dimension::Transport => peer.transport.to_owned(),
            Dimension::Domain => text(&peer.domain),
            Dimension::Country => text(&peer.country),
            Dimension::Asn => number(peer.asn),
            Dimension::ContainerId => text(&workload.container_id),
            Dimension::ContainerName => text(&workload.container_name),
            Dimension::Pod => text(&workload.pod),
            Dimension::Namespace => text(&workload.namespace),
            // The file that sent; a file that could not be hashed is
            // "unavailable", as in fleetsnitch_executable_info.
            Dimension::Sha256 => match (&program.sha256, program.exe.starts_with('[')) {
                (Some(sha256), _) => sha256.as_str().to_owned(),
                (None, false) => UNAVAILABLE.to_owned(),
                (None, true) => String::new(),
            },
        }
    }

    /// Whether `port` is in the ephemeral range (exported as "ephemeral").
    pub fn is_ephemeral(&self, port: u16) -> bool {
        self.ephemeral_ports.contains(&port)
    }

    /// Series admitted and not expired.
    pub fn series_count(&self) -> usize {
        self.series_len
    }

    /// Whether the `sha256` label is exported: flows then wait for their hash.
    pub fn exports_sha256(&self) -> bool {
        self.dimensions.contains(&Dimension::Sha256)
    }
}

/// Parses `low-high` (inclusive), e.g. `32768-60999`.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("expected LOW-HIGH, got {text:?}"))?;
    let low: u16 = low.trim().parse().map_err(|e| format!("{low:?}: {e}"))?;
    let high: u16 = high.trim().parse().map_err(|e| format!("{high:?}: {e}"))?;
    if low > high {
        return Err(format!("{low} is above {high}"));
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::{Peer, Program};

    fn policy(
        dimensions: &[Dimension],
        caps: &[(&str, usize)],
        max_series: usize,
    ) -> (LabelPolicy, OverflowMetrics) {
        let caps = caps.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let metrics = OverflowMetrics::default();
        let policy = LabelPolicy::new(dimensions, &caps, 32768..=60999, max_series, &metrics);
        (policy, metrics)
    }

    fn flow(port: u16) -> FlowRecord {
        FlowRecord {
            program: Program {
                exe: "/bin/x".into(),
                uid: Some(0),
                user_name: Some("root".into()),
                ..Program::default()
            },
            peer: Peer {
                remote_port: Some(port),
                transport: "tcp",
                ..Peer::default()
            },
            ..FlowRecord::default()
        }
    }

    fn of(exe: &str, flow: FlowRecord) -> FlowRecord {
        FlowRecord {
            program: Program {
                exe: exe.into(),
                ..flow.program
            },
            ..flow
        }
    }

    fn overflow(metrics: &OverflowMetrics, label: &str) -> u64 {
        metrics.counter(label).get()
    }

    fn value(labels: &TrafficLabels, dimension: Dimension) -> &str {
        &labels
            .extra
            .iter()
            .find(|(d, _)| *d == dimension)
            .unwrap()
            .1
            .0
    }

    #[test]
    fn ephemeral_ports_fold_into_one_value() {
        let (mut policy, _metrics) = policy(&[Dimension::RemotePort], &[], 1000);
        let labels = policy.labels(&flow(45000), Direction::Sent);
        assert_eq!(value(&labels, Dimension::RemotePort), EPHEMERAL);
        let labels = policy.labels(&flow(443), Direction::Sent);
        assert_eq!(value(&labels, Dimension::RemotePort), "443");
    }

    #[test]
    fn values_past_the_cap_fold_and_are_counted_once_each() {
        let (mut policy, metrics) = policy(&[Dimension::RemotePort], &[("remote_port", 3)], 1000);
        for port in 1..=10u16 {
            policy.labels(&flow(port), Direction::Sent);
            policy.labels(&flow(port), Direction::Received);
        }
        let labels = policy.labels(&flow(9), Direction::Sent);
        assert_eq!(value(&labels, Dimension::RemotePort), OTHER);
        let labels = policy.labels(&flow(2), Direction::Sent);
        assert_eq!(value(&labels, Dimension::RemotePort), "2");
        assert_eq!(
            overflow(&metrics, "remote_port"),
            7,
            "ports 4..=10 folded, each counted once"
        );
    }

    #[test]
    fn executed_programs_never_crowd_networked_ones_out_of_the_exe_cap() {
        let (mut policy, metrics) = policy(&[], &[("exe", 2)], 1000);
        for index in 0..5 {
            policy.exec_exe_label(&format!("/tmp/ran{index}"));
        }
        assert_eq!(policy.exec_exe_label("/tmp/ran4").0, OTHER);
        let labels = policy.labels(&of("/usr/bin/curl", flow(443)), Direction::Sent);
        assert_eq!(labels.exe.0, "/usr/bin/curl");
        assert_eq!(
            overflow(&metrics, "exe"),
            3,
            "/tmp/ran2..4 folded in the exec family"
        );
    }

    #[test]
    fn series_cap_folds_every_optional_label() {
        let (mut policy, metrics) = policy(&[Dimension::RemotePort, Dimension::Uid], &[], 4);
        for port in 1..=10u16 {
            policy.labels(&flow(port), Direction::Sent);
        }
        assert_eq!(
            policy.series_count(),
            5,
            "4 admitted plus the folded series"
        );
        let labels = policy.labels(&flow(10), Direction::Sent);
        assert_eq!(value(&labels, Dimension::RemotePort), OTHER);
        assert_eq!(value(&labels, Dimension::Uid), OTHER);
        assert_eq!(overflow(&metrics, SERIES_LABEL), 7);
        assert_eq!(metrics.series.get(), 5);
    }

    #[test]
    fn unknown_values_stay_empty_and_are_not_capped() {
        let (mut policy, _metrics) = policy(&[Dimension::Domain], &[("domain", 1)], 1000);
        let labels = policy.labels(&FlowRecord::default(), Direction::Sent);
        assert_eq!(value(&labels, Dimension::Domain), "");
        let with_domain = FlowRecord {
            peer: Peer {
                domain: Some("example.com".into()),
                ..Peer::default()
            },
            ..FlowRecord::default()
        };
        let labels = policy.labels(&with_domain, Direction::Sent);
        assert_eq!(value(&labels, Dimension::Domain), "example.com");
    }

    #[test]
    fn user_is_the_name_the_record_carries() {
        let (mut policy, _metrics) = policy(&[Dimension::User], &[], 1000);
        let labels = policy.labels(&flow(1), Direction::Sent);
        assert_eq!(value(&labels, Dimension::User), "root");
    }

    #[test]
    fn an_expired_executable_gives_its_places_back() {
        let (mut policy, metrics) = policy(
            &[Dimension::RemotePort],
            &[("exe", 2), ("remote_port", 2)],
            1000,
        );
        policy.labels(&of("/tmp/a", flow(1)), Direction::Sent);
        policy.labels(&of("/tmp/a", flow(2)), Direction::Sent);
        policy.labels(&of("/tmp/b", flow(2)), Direction::Sent);
        assert_eq!(
            policy.labels(&of("/tmp/c", flow(2)), Direction::Sent).exe.0,
            OTHER
        );
        assert_eq!(policy.series_count(), 4);

        let gone = policy.forget_exe(&Text("/tmp/a".into()));
        assert_eq!(gone.len(), 2);
        assert_eq!(policy.series_count(), 2, "b's and other's");
        assert_eq!(metrics.series.get(), 2);
        let labels = policy.labels(&of("/tmp/c", flow(3)), Direction::Sent);
        assert_eq!(labels.exe.0, "/tmp/c", "a's place went to c");
        assert_eq!(
            value(&labels, Dimension::RemotePort),
            "3",
            "port 1 was only a's: its place went to 3"
        );
        let labels = policy.labels(&of("/tmp/c", flow(4)), Direction::Sent);
        assert_eq!(
            value(&labels, Dimension::RemotePort),
            OTHER,
            "2 and 3 in use"
        );
    }

    #[test]
    fn sha256_is_the_hash_of_the_file_that_sent() {
        let (mut policy, _metrics) = policy(&[Dimension::Sha256], &[], 1000);
        assert!(policy.exports_sha256());
        let mut hashed = of("/usr/bin/curl", flow(443));
        hashed.program.sha256 = Some(crate::model::Sha256::from_digest(&[0xab; 32]));
        let labels = policy.labels(&hashed, Direction::Sent);
        assert_eq!(value(&labels, Dimension::Sha256), "ab".repeat(32));
        let labels = policy.labels(&of("/usr/bin/curl", flow(443)), Direction::Sent);
        assert_eq!(value(&labels, Dimension::Sha256), UNAVAILABLE);
        let labels = policy.labels(&of("[kernel]", flow(443)), Direction::Sent);
        assert_eq!(value(&labels, Dimension::Sha256), "");
    }

    #[test]
    fn dimension_names_round_trip_and_unknown_names_are_listed() {
        for dimension in Dimension::ALL {
            assert_eq!(dimension.name().parse::<Dimension>().unwrap(), dimension);
        }
        let err = "color".parse::<Dimension>().unwrap_err();
        assert!(
            err.contains("color") && err.contains("remote_port"),
            "{err}"
        );
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("32768-60999").unwrap(), 32768..=60999);
        assert!(parse_port_range("60999-32768").is_err());
        assert!(parse_port_range("80").is_err());
    }
}
