//! Whether the resolver's view of the node's pods is current: the gauge
//! `fleetsnitch_kubernetes_api_up`, the `kubernetes` failure class
//! (`agent_error` events) and one warning per outage in the log.
//!
//! Every success and every failure is reported to [`Failures`], not only the
//! changes: it journals a recovery only once the failure's event is
//! [`crate::model::EVENT_INTERVAL`] old, so it must go on hearing of
//! successes after a short outage ended, or that outage would stay "failing"
//! in the journal for ever.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};

use crate::{
    model::{FailureClass, Failures},
    support::error_chain,
};

/// Shared by the watch task (lists, events, failures) and the client's
/// request layer (a watch the server accepted); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ApiHealth {
    /// 0 until the first list: the view is not current before it.
    up: Gauge,
    failures: Failures,
    /// A failure was logged and nothing worked since.
    failing: Arc<AtomicBool>,
}

impl ApiHealth {
    /// Failures become `agent_error` events through `failures`.
    pub fn new(failures: Failures) -> Self {
        Self {
            failures,
            ..Self::default()
        }
    }

    /// Exports `fleetsnitch_kubernetes_api_up`. Only where pods are
    /// attributed (in a cluster): outside Kubernetes there is no API to be
    /// down, and a 0 there would fire the alert on every plain host.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kubernetes_api_up",
            "1 while the agent's view of its node's pods is current (the last list or watch request succeeded), 0 from a failed one until the next success",
            self.up.clone(),
        );
    }

    /// Whether the last list or watch request succeeded.
    pub fn is_up(&self) -> bool {
        self.up.get() == 1
    }

    /// A list or watch failed; `what` names the request, `pause` is the
    /// back-off before the next one.
    pub(super) fn failed(&self, what: &str, err: &dyn std::error::Error, pause: Duration) {
        let err = error_chain(err);
        self.up.set(0);
        self.failures.failed(
            FailureClass::Kubernetes,
            format_args!("{what} failed: {err}"),
        );
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!("{what} failed again: {err}; retrying in {pause:?}");
        } else {
            tracing::warn!("{what} failed: {err}; retrying in {pause:?}");
        }
    }

    /// The resolver could not start (in a cluster, but its settings or
    /// credentials are unusable): pods stay unnamed until the agent restarts.
    pub(super) fn not_started(&self, err: &dyn std::error::Error) {
        self.up.set(0);
        self.failures.failed(
            FailureClass::Kubernetes,
            format_args!("the pod resolver cannot start: {}", error_chain(err)),
        );
        self.failing.store(true, Ordering::Relaxed);
    }

    /// A list ended, a watch was accepted or brought an event.
    pub(super) fn succeeded(&self) {
        self.up.set(1);
        self.failures.succeeded(FailureClass::Kubernetes);
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the Kubernetes API answers again");
        }
    }
}
