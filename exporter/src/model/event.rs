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
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        Self::NewExecutable,
        Self::NewHash,
        Self::Modified,
        Self::VirusTotal,
        Self::AgentError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewExecutable => "new_executable",
            Self::NewHash => "new_hash",
            Self::Modified => "modified",
            Self::VirusTotal => "virustotal",
            Self::AgentError => "agent_error",
        }
    }

    /// Kinds the journal finds itself, by comparing a sighting with what it
    /// knew: they reach the other sinks once the journal has written them.
    pub fn is_found_by_journal(self) -> bool {
        matches!(self, Self::NewExecutable | Self::NewHash | Self::Modified)
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
