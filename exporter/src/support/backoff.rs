//! Exponential back-off with jitter, for every retry loop of the agent
//! (Kubernetes API, OTLP export, VirusTotal rate limits).
//!
//! Each pause is drawn from `[current x (1 - jitter), current]` (never below
//! `min`), then `current` doubles up to `max`. The jitter keeps a fleet of
//! agents that failed together (a collector or API server restarting) from
//! retrying in step.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    /// Fraction of the pause that is random: 0 for none, 0.5 for "half to all".
    jitter: f64,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    /// Pauses from `min` doubling to `max`, each cut by up to `jitter` (0..=1) at random.
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
            jitter: jitter.clamp(0.0, 1.0),
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The shortest pause.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.current;
        self.current = (current * 2).min(self.max);
        self.draws += 1;
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        let fraction = (hasher.finish() % 1001) as f64 / 1000.0;
        let low = current.mul_f64(1.0 - self.jitter).max(self.min);
        low + (current - low).mul_f64(fraction)
    }

    /// After a success: the next pause is `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_within_bounds_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut backoff = Backoff::new(min, max, 0.2);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            let pause = backoff.next_delay();
            let ceiling = ceilings
                .last()
                .map_or(min, |c: &Duration| (*c * 2).min(max));
            assert!(
                pause <= ceiling && pause >= ceiling.mul_f64(0.8).max(min),
                "{pause:?} outside [0.8 x {ceiling:?}, {ceiling:?}]"
            );
            ceilings.push(ceiling);
        }
        assert_eq!(*ceilings.last().unwrap(), max);
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }

    #[test]
    fn half_jitter_stays_within_half_and_all() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(2), 0.5);
        for _ in 0..100 {
            let pause = backoff.next_delay();
            assert!(pause >= Duration::from_secs(1) && pause <= Duration::from_secs(2));
        }
    }

    #[test]
    fn no_jitter_is_exact() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(4), 0.0);
        let pauses: Vec<u64> = (0..4).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 4]);
    }
}
