//! Where records go: Prometheus metrics, the journal, OTLP, the connection
//! log and VirusTotal.

pub mod connection_log;
pub mod fanout;
pub mod journal;
pub mod metrics;
pub mod otlp;
pub mod virustotal;
