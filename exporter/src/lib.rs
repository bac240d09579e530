//! fleetsnitch: per-executable network accounting for Linux fleets.
//!
//! Kernel programs (`ebpf/bpf/`) count the bytes each process sends and
//! receives per socket; this crate loads them ([`probes`]), drains their
//! counters ([`collector`]), resolves who the processes are ([`identity`],
//! [`hashing`]) and serves the result to Prometheus ([`metrics`], [`http`]).

pub mod agent;
pub mod cli;
pub mod collector;
pub mod config;
pub mod connection_log;
pub mod container;
pub mod dns;
pub mod dns_capture;
pub mod exec_reader;
pub mod geoip;
pub mod hashing;
pub mod http;
pub mod identity;
pub mod journal;
pub mod kubernetes;
pub mod labels;
pub mod metrics;
pub mod modification;
pub mod otlp;
pub mod preflight;
pub mod privileges;
pub mod probes;
pub mod raw_text;
pub mod readiness;
pub mod socket;
pub mod virustotal;
pub mod web_config;
pub mod web_server;
