//! Small helpers every stage uses.

pub mod backoff;
pub mod build_info;
mod invalid;
pub mod logging;
pub mod node;
pub mod raw_text;

pub use invalid::{InvalidValue, check_duration, check_range, check_ring_buffer};

/// Unix time now, in whole seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs() as i64)
        .unwrap_or_default()
}

/// An error and its causes on one line: top-level messages (aya's, reqwest's)
/// often omit the errno or the transport failure that explains them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded: a cyclic source chain must not hang the agent.
    for _ in 0..16 {
        let Some(cause) = source else { break };
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
    }
}
