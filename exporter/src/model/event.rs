//! Events: what happened to an executable, and what went wrong in the agent.

use super::Sha256;

/// Kinds of events; also the `kind` label of `fleetsnitch_journal_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    NewExecutable,
    NewHash,
    Modified,
    VirusTotal,
    AgentError,
    /// A program known for longer than the learning period talked to a
    /// domain, country or AS it never talked to on this host.
    NewDestination,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        Self::NewExecutable,
        Self::NewHash,
        Self::Modified,
        Self::VirusTotal,
        Self::AgentError,
        Self::NewDestination,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewExecutable => "new_executable",
            Self::NewHash => "new_hash",
            Self::Modified => "modified",
            Self::VirusTotal => "virustotal",
            Self::AgentError => "agent_error",
            Self::NewDestination => "new_destination",
        }
    }

    /// Kinds the journal finds itself, by comparing a sighting with what it
    /// knew: they reach the other sinks once the journal has written them.
    pub fn is_found_by_journal(self) -> bool {
        matches!(
            self,
            Self::NewExecutable | Self::NewHash | Self::Modified | Self::NewDestination
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unix seconds.
    pub time: i64,
    pub kind: EventKind,
    pub exe: Option<String>,
    pub sha256: Option<Sha256>,
    pub detail: Option<String>,
}
