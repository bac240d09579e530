//! fleetsnitch: per-executable network accounting for Linux fleets.
//!
//! The folders follow the data, one way:
//!
//! ```text
//! kernel ──▶ identity ──▶ enrichment ──▶ model ◀── sinks
//! (probes,    (processes,   (DNS, GeoIP,    (one flow   (metrics, journal,
//!  maps,       hashes,       containers,     record,     OTLP, connection log,
//!  rings)      fanotify)     pods, users)    events)     VirusTotal)
//! ```
//!
//! [`agent`] wires the stages together and runs the collector thread; [`web`]
//! serves what the sinks registered, [`host`] checks what the host allows.

pub mod agent;
pub mod cli;
pub mod config;
pub mod enrichment;
pub mod host;
pub mod identity;
pub mod kernel;
pub mod model;
pub mod sinks;
pub mod support;
pub mod telemetry;
pub mod web;
