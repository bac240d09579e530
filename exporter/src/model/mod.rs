//! What the agent observed, as one set of types every sink reads.
//!
//! The collector and the hasher produce these records; sinks map them to
//! their own format (Prometheus labels, SQLite rows, OTLP attributes, JSON
//! lines) and nothing else. A new field is one edit here, then one line in
//! each sink's mapping: sinks destructure records without `..`, so the
//! compiler names every sink that has not decided what to do with it.

mod activity;
mod event;
mod executable;
mod failures;
mod flow;
mod outbox;
mod sha256;

pub use activity::{Activity, Touched};
pub use event::{Event, EventKind};
pub use executable::{ExeKey, ExecutableSighting};
pub use failures::{EVENT_INTERVAL, FailureClass, Failures};
pub use flow::{Bytes, FlowRecord, FlowTotals, Peer, Program, Window, Workload, executable_name};
pub use outbox::{Outbox, Record};
pub use sha256::Sha256;
