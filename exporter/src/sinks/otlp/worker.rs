//! The bounded queue in front of the OTLP exporter and the thread that drains it.
//!
//! Callers only take a mutex for the time of a few `VecDeque` pushes: they never
//! wait for the network. The queue holds at most `max_queued_records`,
//! counting the batch being sent; past that, new records are dropped and
//! counted. The worker thread runs a single-threaded tokio runtime (the
//! tonic and reqwest clients need one) and sends batches one at a time; a batch
//! that fails is kept and retried with exponential back-off until it is
//! delivered, rejected for good (non-retryable status: dropped and counted), or
//! the agent shuts down (what is left then is dropped and counted). So, at any
//! quiet moment: records handed to [`Shared::push`] = exported + dropped + queued.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{InstrumentationScope, logs::Logger as _};
use opentelemetry_sdk::{
    error::OTelSdkError,
    logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider},
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::Notify;

use super::record::{Queued, fill_sdk_record};
use crate::{
    model::{FailureClass, Failures, Window},
    support::backoff::Backoff,
};

/// What the exporter counts, as `fleetsnitch_otlp_*`. Shared with the worker.
#[derive(Debug, Clone, Default)]
pub struct OtlpCounters {
    exported: Counter,
    dropped: Counter,
    export_errors: Counter,
    queued: Gauge,
}

impl OtlpCounters {
    /// Exports these counters from `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "otlp_exported",
            "Log records the OTLP collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "otlp_dropped",
            "Log records dropped: the queue (otlp.max_queued_records) was full or the collector rejected them",
            self.dropped.clone(),
        );
        registry.register(
            "otlp_export_errors",
            "Failed OTLP export attempts (retried with back-off)",
            self.export_errors.clone(),
        );
        registry.register(
            "otlp_queued",
            "Log records waiting for the OTLP collector",
            self.queued.clone(),
        );
    }

    /// Records the collector acknowledged (`fleetsnitch_otlp_exported_total`).
    pub fn exported_total(&self) -> u64 {
        self.exported.get()
    }

    /// Records dropped: queue full, rejected for good by the collector, or
    /// still queued when the agent stopped (`fleetsnitch_otlp_dropped_total`).
    pub fn dropped_total(&self) -> u64 {
        self.dropped.get()
    }

    /// Export attempts that failed, each retry counted (`fleetsnitch_otlp_export_errors_total`).
    pub fn export_errors_total(&self) -> u64 {
        self.export_errors.get()
    }

    /// Records held right now, the batch being sent included (at most `max_queued_records`).
    pub fn queued(&self) -> u64 {
        self.queued.get().max(0) as u64
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Records taken out of `queue` by the worker and not yet delivered or dropped.
    in_flight: usize,
    /// When the oldest record now in `queue` was queued.
    oldest: Option<Instant>,
    /// Set by shutdown: deliver what can be delivered until then, drop the rest.
    deadline: Option<Instant>,
    /// A drop was logged and no export succeeded since.
    drop_logged: bool,
}

impl State {
    fn held(&self) -> usize {
        self.queue.len() + self.in_flight
    }
}

#[derive(Debug)]
pub(super) struct Shared {
    state: Mutex<State>,
    wake: Notify,
    pub(super) counters: Arc<OtlpCounters>,
    max_queued: usize,
}

impl Shared {
    pub(super) fn new(max_queued: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            counters: Arc::new(OtlpCounters::default()),
            max_queued,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent queue: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_queued(&self, state: &State) {
        self.counters.queued.set(state.held() as i64);
    }

    /// Queues a window's records without waiting; returns how many were dropped.
    /// Events go first: when little room is left, alerts win over traffic.
    pub(super) fn push(&self, window: &Window) -> usize {
        let records = window
            .events
            .iter()
            .map(|event| Queued::Event(event.clone()))
            .chain(window.flows.iter().map(|record| Queued::Connection {
                window_start: window.start,
                window_seconds: window.seconds,
                record: Box::new(record.clone()),
            }));
        let total = window.len();
        let (dropped, first_drop, held) = {
            let mut state = self.lock();
            let room = if state.deadline.is_some() {
                0
            } else {
                self.max_queued.saturating_sub(state.held())
            };
            let accepted = total.min(room);
            state.queue.extend(records.take(accepted));
            if accepted > 0 && state.oldest.is_none() {
                state.oldest = Some(Instant::now());
            }
            let dropped = total - accepted;
            let first_drop = dropped > 0 && !state.drop_logged;
            state.drop_logged |= dropped > 0;
            self.publish_queued(&state);
            (dropped, first_drop, state.held())
        };
        if dropped > 0 {
            self.counters.dropped.inc_by(dropped as u64);
        }
        if first_drop {
            tracing::warn!(
                held,
                max_queued_records = self.max_queued,
                "OTLP queue full: new log records are dropped until the collector accepts records again; counted in fleetsnitch_otlp_dropped_total"
            );
        }
        if total > dropped {
            self.wake.notify_one();
        }
        dropped
    }

    /// Starts the shutdown: the worker delivers what it can until `deadline`.
    pub(super) fn begin_shutdown(&self, deadline: Instant) {
        {
            let mut state = self.lock();
            state.deadline = Some(state.deadline.map_or(deadline, |d| d.min(deadline)));
        }
        self.wake.notify_one();
    }

    fn deadline(&self) -> Option<Instant> {
        self.lock().deadline
    }

    fn delivered(&self, count: usize) {
        {
            let mut state = self.lock();
            state.in_flight -= count;
            state.drop_logged = false;
            self.publish_queued(&state);
        }
        self.counters.exported.inc_by(count as u64);
    }

    /// Drops `in_flight` records of the batch being sent and, with `everything`,
    /// all that is queued; returns how many.
    fn discard(&self, in_flight: usize, everything: bool) -> usize {
        let count = {
            let mut state = self.lock();
            state.in_flight -= in_flight;
            let mut count = in_flight;
            if everything {
                count += state.queue.len() + state.in_flight;
                state.queue.clear();
                state.in_flight = 0;
                state.oldest = None;
            }
            self.publish_queued(&state);
            count
        };
        self.counters.dropped.inc_by(count as u64);
        count
    }
}

/// What the worker thread owns.
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) exporter: opentelemetry_otlp::LogExporter,
    /// Only makes SDK log records; it has no processor.
    pub(super) logger: SdkLogger,
    pub(super) provider: SdkLoggerProvider,
    pub(super) scope: InstrumentationScope,
    pub(super) endpoint: String,
    pub(super) max_batch: usize,
    pub(super) batch_delay: Duration,
    pub(super) timeout: Duration,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    /// Told when export fails and works again (`agent_error` events).
    pub(super) failures: Failures,
}

enum Attempt {
    Delivered,
    Retry(String),
    Rejected(String),
}

impl Worker {
    pub(super) async fn run(self) {
        // Between half and all of each pause, so that a fleet does not retry in step.
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff, 0.5);
        let mut failing: Option<u64> = None;
        while let Some(batch) = self.next_batch().await {
            let observed = SystemTime::now();
            let records: Vec<SdkLogRecord> = batch
                .iter()
                .map(|queued| {
                    let mut record = self.logger.create_log_record();
                    fill_sdk_record(&mut record, queued, observed);
                    record
                })
                .collect();
            drop(batch);
            loop {
                let deadline = self.shared.deadline();
                let now = Instant::now();
                if deadline.is_some_and(|deadline| now >= deadline) {
                    self.abandon(records.len());
                    self.finish();
                    return;
                }
                let limit = deadline.map_or(self.timeout, |deadline| {
                    self.timeout.min(deadline.saturating_duration_since(now))
                });
                match self.attempt(&records, limit).await {
                    Attempt::Delivered => {
                        self.shared.delivered(records.len());
                        self.failures.succeeded(FailureClass::Otlp);
                        if let Some(failures) = failing.take() {
                            tracing::info!(
                                endpoint = %self.endpoint,
                                failed_attempts = failures,
                                "OTLP export works again"
                            );
                        }
                        backoff.reset();
                        break;
                    }
                    Attempt::Rejected(error) => {
                        self.shared.counters.export_errors.inc_by(1);
                        self.failures.failed(
                            FailureClass::Otlp,
                            format_args!("{} rejected a batch: {error}", self.endpoint),
                        );
                        let dropped = self.shared.discard(records.len(), false);
                        tracing::warn!(
                            endpoint = %self.endpoint,
                            %error,
                            dropped,
                            "the OTLP collector rejected a batch of log records for good (not retryable); dropped and counted in fleetsnitch_otlp_dropped_total"
                        );
                        break;
                    }
                    Attempt::Retry(error) => {
                        self.shared.counters.export_errors.inc_by(1);
                        self.failures.failed(
                            FailureClass::Otlp,
                            format_args!("export to {} failed: {error}", self.endpoint),
                        );
                        match &mut failing {
                            Some(failures) => *failures += 1,
                            None => {
                                failing = Some(1);
                                tracing::warn!(
                                    endpoint = %self.endpoint,
                                    %error,
                                    "OTLP export failed; log records are kept (up to otlp.max_queued_records) and retried with back-off"
                                );
                            }
                        }
                    }
                }
                self.pause(backoff.next_delay()).await;
            }
        }
        self.finish();
    }

    async fn attempt(&self, records: &[SdkLogRecord], limit: Duration) -> Attempt {
        let pairs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
            records.iter().map(|record| (record, &self.scope)).collect();
        let export = self.exporter.export(LogBatch::new(&pairs));
        match tokio::time::timeout(limit, export).await {
            Ok(Ok(())) => Attempt::Delivered,
            Ok(Err(error)) if is_permanent(&error) => Attempt::Rejected(error.to_string()),
            Ok(Err(error)) => Attempt::Retry(error.to_string()),
            Err(_) => Attempt::Retry(format!("no answer within {limit:?}")),
        }
    }

    /// The next batch: at most `max_batch` records, once there are that many,
    /// the oldest has waited `batch_delay`, or shutdown began. `None` once
    /// shutdown began and nothing is left.
    async fn next_batch(&self) -> Option<Vec<Queued>> {
        loop {
            let wait = {
                let mut state = self.shared.lock();
                let len = state.queue.len();
                let shutting_down = state.deadline.is_some();
                let waited = state.oldest.map(|oldest| oldest.elapsed());
                if len == 0 {
                    if shutting_down {
                        return None;
                    }
                    None
                } else if shutting_down
                    || len >= self.max_batch
                    || waited.is_none_or(|waited| waited >= self.batch_delay)
                {
                    let take = len.min(self.max_batch);
                    let batch: Vec<Queued> = state.queue.drain(..take).collect();
                    state.in_flight += take;
                    state.oldest = (!state.queue.is_empty()).then(Instant::now);
                    return Some(batch);
                } else {
                    waited.map(|waited| self.batch_delay - waited)
                }
            };
            match wait {
                None => self.shared.wake.notified().await,
                Some(wait) => {
                    tokio::select! {
                        () = self.shared.wake.notified() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Sleeps `duration`, or less if shutdown begins (then until its deadline at most).
    async fn pause(&self, duration: Duration) {
        let end = Instant::now() + duration;
        loop {
            let deadline = self.shared.deadline();
            let until = deadline.map_or(end, |deadline| deadline.min(end));
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::select! {
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(until - now) => return,
            }
        }
    }

    fn abandon(&self, in_flight: usize) {
        let dropped = self.shared.discard(in_flight, true);
        if dropped > 0 {
            tracing::warn!(
                endpoint = %self.endpoint,
                dropped,
                "OTLP log records not delivered before shutdown; dropped and counted in fleetsnitch_otlp_dropped_total"
            );
        }
    }

    fn finish(&self) {
        if let Err(error) = self.exporter.shutdown() {
            tracing::debug!(%error, "OTLP exporter shutdown");
        }
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "OTLP logger provider shutdown");
        }
    }
}

/// Whether the collector refused the batch for good: OTLP says not to retry
/// these gRPC codes and HTTP 4xx statuses other than 408 and 429. The exporter
/// crate only hands back a message, so this reads it; anything unrecognised
/// is retried.
pub(crate) fn is_permanent(error: &OTelSdkError) -> bool {
    permanent_message(&error.to_string())
}

pub(crate) fn permanent_message(message: &str) -> bool {
    if let Some((_, rest)) = message.split_once("gRPC code: ") {
        let code: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        return matches!(
            code.as_str(),
            "InvalidArgument"
                | "NotFound"
                | "AlreadyExists"
                | "PermissionDenied"
                | "FailedPrecondition"
                | "Unimplemented"
                | "Unauthenticated"
        );
    }
    if let Some((_, rest)) = message.split_once("status code: ") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(status) = digits.parse::<u16>() {
            return (400..500).contains(&status) && status != 408 && status != 429;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_collector_answers() {
        assert!(permanent_message(
            "TonicLogsClient export failed with gRPC code: InvalidArgument"
        ));
        assert!(permanent_message(
            "Operation failed: TonicLogsClient export failed with gRPC code: Unauthenticated"
        ));
        assert!(!permanent_message(
            "TonicLogsClient export failed with gRPC code: Unavailable: transport error"
        ));
        assert!(!permanent_message(
            "TonicLogsClient export failed with gRPC code: ResourceExhausted"
        ));
        assert!(permanent_message(
            "HTTP export failed with status code: 400"
        ));
        assert!(permanent_message(
            "HTTP export failed with status code: 401"
        ));
        assert!(!permanent_message(
            "HTTP export failed with status code: 429"
        ));
        assert!(!permanent_message(
            "HTTP export failed with status code: 408"
        ));
        assert!(!permanent_message(
            "HTTP export failed with status code: 503"
        ));
        assert!(!permanent_message("HTTP export failed: network error"));
        assert!(!permanent_message("something else entirely"));
    }
}
