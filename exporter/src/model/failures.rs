//! Failures of the agent's own machinery that leave the operator blind to
//! something (modifications, countries, the off-host copy, the local
//! connection log, verdicts, pod names), journaled as `agent_error` events.
//!
//! Each module counts its failures in its own metric (the count is there);
//! [`Failures`] only decides when a failure is worth a journal event, so a
//! persistent failure does not flood the journal: one event when a class
//! starts failing and one when it works again, and at most one event per
//! class per [`EVENT_INTERVAL`]. A class that flaps (fails, works, fails)
//! within the interval stays "failing" in the journal until it has worked for
//! a whole call after the interval; the recovery event says how many failures
//! the episode had. The journal then holds two rows per outage, whatever its
//! length, and the counters carry the rate.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Event, EventKind, Outbox, Record};
use crate::support::unix_now;

/// At most one `agent_error` event per class in this interval.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(600);

/// What failed; the `class` the events name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// fanotify unavailable, or a mark that failed: in-place modifications go unnoticed.
    Fanotify,
    /// A GeoIP database that cannot be read or decoded: countries and AS missing.
    GeoIp,
    /// OTLP export: the off-host copy is not delivered.
    Otlp,
    /// The local connection log cannot be written.
    ConnectionLog,
    /// VirusTotal lookups fail: verdicts missing.
    VirusTotal,
    /// The Kubernetes API cannot be reached: pods unnamed.
    Kubernetes,
}

impl FailureClass {
    pub const ALL: [FailureClass; 6] = [
        Self::Fanotify,
        Self::GeoIp,
        Self::Otlp,
        Self::ConnectionLog,
        Self::VirusTotal,
        Self::Kubernetes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fanotify => "fanotify",
            Self::GeoIp => "geoip",
            Self::Otlp => "otlp",
            Self::ConnectionLog => "connection_log",
            Self::VirusTotal => "virustotal",
            Self::Kubernetes => "kubernetes",
        }
    }
}

#[derive(Debug, Default)]
struct ClassState {
    /// The last call said it failed.
    failing: bool,
    /// The journal was last told it fails (and not yet that it recovered).
    journaled_failing: bool,
    /// When its last event was made.
    last_event: Option<Instant>,
    /// Failures since the journal was told it fails.
    failures: u64,
}

#[derive(Debug, Default)]
struct Inner {
    classes: HashMap<FailureClass, ClassState>,
}

/// Turns failures and successes into `agent_error` events; cheap to clone.
#[derive(Clone)]
pub struct Failures {
    inner: Arc<Mutex<Inner>>,
    outbox: Option<Outbox>,
    interval: Duration,
}

impl Default for Failures {
    fn default() -> Self {
        Self::none()
    }
}

impl fmt::Debug for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failures")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Failures {
    /// Events go to `outbox` (the journal and the other sinks); `None` only
    /// keeps the state (tests, tools).
    pub fn new(outbox: Option<Outbox>) -> Self {
        Self::with_interval(outbox, EVENT_INTERVAL)
    }

    /// [`Self::new`] with another event interval.
    pub fn with_interval(outbox: Option<Outbox>, interval: Duration) -> Self {
        Self {
            inner: Arc::default(),
            outbox,
            interval,
        }
    }

    /// Reports nowhere: for code run without an agent around it.
    pub fn none() -> Self {
        Self::new(None)
    }

    /// `class` failed; `detail` names what and why.
    pub fn failed(&self, class: FailureClass, detail: impl fmt::Display) {
        let event = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let state = inner.classes.entry(class).or_default();
            state.failing = true;
            state.failures += 1;
            if state.journaled_failing || !self.due(state) {
                return;
            }
            state.journaled_failing = true;
            state.last_event = Some(Instant::now());
            state.failures = 1;
            format!("{}: failing: {detail}", class.as_str())
        };
        tracing::warn!(class = class.as_str(), "{event}; journaled as agent_error");
        self.send(event);
    }

    /// `class` worked (call it after a success; it costs a lock).
    pub fn succeeded(&self, class: FailureClass) {
        let event = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let Some(state) = inner.classes.get_mut(&class) else {
                return;
            };
            state.failing = false;
            if !state.journaled_failing || !self.due(state) {
                return;
            }
            state.journaled_failing = false;
            state.last_event = Some(Instant::now());
            let failures = std::mem::take(&mut state.failures);
            format!(
                "{}: recovered after {failures} failure{}",
                class.as_str(),
                if failures == 1 { "" } else { "s" }
            )
        };
        tracing::info!(class = class.as_str(), "{event}");
        self.send(event);
    }

    /// Whether the last report of `class` was a failure.
    pub fn is_failing(&self, class: FailureClass) -> bool {
        self.inner
            .lock()
            .is_ok_and(|inner| inner.classes.get(&class).is_some_and(|state| state.failing))
    }

    fn due(&self, state: &ClassState) -> bool {
        state
            .last_event
            .is_none_or(|at| at.elapsed() >= self.interval)
    }

    fn send(&self, detail: String) {
        if let Some(outbox) = &self.outbox {
            outbox.send(Record::Event(Event {
                time: unix_now(),
                kind: EventKind::AgentError,
                exe: None,
                sha256: None,
                detail: Some(detail),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn details(records: &Receiver<Record>) -> Vec<String> {
        records
            .try_iter()
            .map(|record| match record {
                Record::Event(Event {
                    kind: EventKind::AgentError,
                    detail: Some(detail),
                    ..
                }) => detail,
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_persistent_failure_is_one_event_and_its_recovery_another() {
        let (outbox, records) = Outbox::bounded(100, Counter::default());
        let failures = Failures::with_interval(Some(outbox), Duration::ZERO);
        for _ in 0..50 {
            failures.failed(FailureClass::Otlp, "connection refused");
        }
        failures.succeeded(FailureClass::Otlp);
        failures.succeeded(FailureClass::Otlp);
        assert_eq!(
            details(&records),
            [
                "otlp: failing: connection refused",
                "otlp: recovered after 50 failures"
            ]
        );
        failures.succeeded(FailureClass::GeoIp);
        assert!(details(&records).is_empty(), "a success alone says nothing");
    }

    #[test]
    fn flapping_makes_at_most_one_event_per_interval_per_class() {
        let (outbox, records) = Outbox::bounded(100, Counter::default());
        let failures = Failures::with_interval(Some(outbox), Duration::from_secs(3600));
        for _ in 0..20 {
            failures.failed(FailureClass::VirusTotal, "HTTP 429");
            failures.succeeded(FailureClass::VirusTotal);
        }
        failures.failed(FailureClass::ConnectionLog, "disk full");
        assert_eq!(
            details(&records),
            [
                "virustotal: failing: HTTP 429",
                "connection_log: failing: disk full"
            ]
        );
        assert!(!failures.is_failing(FailureClass::VirusTotal));
        assert!(failures.is_failing(FailureClass::ConnectionLog));
    }
}
