//! The kernel side: loading and attaching the programs, and reading what they
//! counted and announced (maps and ring buffers).

pub mod dns_capture;
pub mod exec_events;
pub mod flow;
pub mod probes;
