//! The HTTP endpoints and their security settings.

pub mod config;
pub mod http;
pub mod server;
