//! How records travel from the threads that make them (collector, hasher,
//! VirusTotal checker) to the sinks' fan-out, which delivers them.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use prometheus_client::metrics::counter::Counter;

use super::{Event, ExecutableSighting, FlowRecord};

/// Anything a producer hands to the sinks.
#[derive(Debug, Clone)]
pub enum Record {
    /// One drain's flows.
    Flows(Vec<FlowRecord>),
    /// Boxed: a sighting (names, context) is several times an event's size.
    Executable(Box<ExecutableSighting>),
    Event(Event),
}

/// The producers' side of the fan-out queue. Sending never blocks: a full
/// queue drops the record and counts it.
#[derive(Clone)]
pub struct Outbox {
    sender: SyncSender<Record>,
    dropped: Counter,
}

impl Outbox {
    /// A queue of `capacity` records; `dropped` counts what did not fit.
    pub fn bounded(capacity: usize, dropped: Counter) -> (Self, Receiver<Record>) {
        let (sender, receiver) = mpsc::sync_channel(capacity);
        (Self { sender, dropped }, receiver)
    }

    pub fn send(&self, record: Record) {
        match self.sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
            }
            // The fan-out stopped: the agent is shutting down.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}
