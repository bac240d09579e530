//! `/healthz`'s one question: were the in-kernel counters drained recently?

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// When the counters were last drained; the collector marks it, the web
/// server reads it.
#[derive(Debug, Default)]
pub struct Health {
    last_drain_unix_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    pub fn mark_drained(&self) {
        self.last_drain_unix_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Healthy once a drain succeeded within `max_age`.
    pub fn is_fresh(&self, max_age: Duration) -> bool {
        let last = self.last_drain_unix_ms.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) <= max_age.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_only_after_a_drain_within_the_age() {
        let health = Health::default();
        assert!(!health.is_fresh(Duration::from_secs(60)), "never drained");
        health.mark_drained();
        assert!(health.is_fresh(Duration::from_secs(60)));
        health
            .last_drain_unix_ms
            .store(now_ms() - 10_000, Ordering::Relaxed);
        assert!(!health.is_fresh(Duration::from_secs(5)));
    }
}
