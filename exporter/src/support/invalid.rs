//! The one error every configuration section reports a bad value with.

use std::fmt::Display;

/// A configuration value out of its range or of the wrong form: names the
/// key, the value given and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {key} ({value}): {reason}")]
pub struct InvalidValue {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl InvalidValue {
    pub fn new(key: &'static str, value: impl Display, reason: impl Into<String>) -> Self {
        Self {
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// `value` of `key` within `min..=max`, or the error saying so.
pub fn check_range<T>(key: &'static str, value: T, min: T, max: T) -> Result<(), InvalidValue>
where
    T: PartialOrd + Display,
{
    if min <= value && value <= max {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            &value,
            format!("must be between {min} and {max}"),
        ))
    }
}

/// A duration within `min..=max`, reported in humantime form (`5s`, `100ms`).
pub fn check_duration(
    key: &'static str,
    value: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
    reason: &str,
) -> Result<(), InvalidValue> {
    if min <= value && value <= max {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            humantime::format_duration(value),
            reason,
        ))
    }
}

/// A ring buffer size: a power of two between 64 KiB and 256 MiB.
pub fn check_ring_buffer(key: &'static str, bytes: u32) -> Result<(), InvalidValue> {
    if bytes.is_power_of_two() && (64 << 10..=256 << 20).contains(&bytes) {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            bytes,
            "must be a power of two between 65536 and 268435456",
        ))
    }
}
