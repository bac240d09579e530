//! placeholder
pub mod scenarios;
