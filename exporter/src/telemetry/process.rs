//! The standard `process_*` metrics every Prometheus client library exports
//! about its own process (CPU seconds, memory, file descriptors, start time,
//! threads), read from `/proc/self` at each scrape.
//!
//! prometheus-client has no process collector (its issue #29 is open), and
//! the crates that offer one target the `metrics` crate or an older
//! prometheus-client, so this is ours: a [`Collector`] that reads
//! `/proc/self/stat`, `/proc/self/limits` and `/proc/self/fd` when encoded.
//! What cannot be read is left out of that scrape (and logged at debug
//! level), never reported as 0.

use std::{fs, sync::OnceLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Reads `/proc/self` at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One reading of the process's own numbers; `None` where /proc did not say.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub virtual_memory_max_bytes: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<f64>,
    pub threads: Option<u64>,
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, PartialEq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessSample {
    /// Reads this process's numbers now.
    pub fn read_self() -> Self {
        let stat = read("/proc/self/stat").and_then(|text| parse_stat(&text));
        let limits = read("/proc/self/limits");
        let ticks = clock_ticks_per_second();
        let page_size = page_size();
        let open_fds = match fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is counted, as client_golang does.
            Ok(entries) => Some(entries.count() as u64),
            Err(error) => {
                tracing::debug!(%error, "cannot list /proc/self/fd");
                None
            }
        };
        Self {
            cpu_seconds: stat
                .as_ref()
                .zip(ticks)
                .map(|(stat, ticks)| (stat.utime_ticks + stat.stime_ticks) as f64 / ticks as f64),
            resident_memory_bytes: stat
                .as_ref()
                .zip(page_size)
                .map(|(stat, page)| stat.resident_pages.saturating_mul(page)),
            virtual_memory_bytes: stat.as_ref().map(|stat| stat.virtual_bytes),
            virtual_memory_max_bytes: limits
                .as_deref()
                .and_then(|text| soft_limit(text, "Max address space")),
            start_time_seconds: stat
                .as_ref()
                .zip(ticks)
                .zip(boot_time())
                .map(|((stat, ticks), boot)| boot as f64 + stat.start_ticks as f64 / ticks as f64),
            open_fds,
            max_fds: limits
                .as_deref()
                .and_then(|text| soft_limit(text, "Max open files")),
            threads: stat.as_ref().map(|stat| stat.threads),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = ProcessSample::read_self();
        if let Some(seconds) = sample.cpu_seconds {
            counter(
                &mut encoder,
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                seconds,
            )?;
        }
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            None,
            sample.open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            None,
            sample.max_fds,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory",
            "Virtual memory size in bytes.",
            Some(&Unit::Bytes),
            sample.virtual_memory_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_max",
            "Maximum amount of virtual memory available in bytes.",
            Some(&Unit::Bytes),
            sample.virtual_memory_max_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_resident_memory",
            "Resident memory size in bytes.",
            Some(&Unit::Bytes),
            sample.resident_memory_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_start_time",
            "Start time of the process since the Unix epoch in seconds.",
            Some(&Unit::Seconds),
            sample.start_time_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process.",
            None,
            sample.threads,
        )
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, MetricType::Counter)?)
}

fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Option<N>,
) -> Result<(), std::fmt::Error> {
    let Some(value) = value else {
        return Ok(());
    };
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn read(path: &str) -> Option<String> {
    fs::read_to_string(path)
        .inspect_err(|error| tracing::debug!(path, %error, "cannot read"))
        .ok()
}

/// `/proc/<pid>/stat` (proc(5)): the command name (field 2) is in parentheses
/// and may hold spaces and parentheses itself, so fields are counted from the
/// last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // proc(5) numbers fields from 1; `fields[0]` is field 3 (state).
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The soft limit of the `/proc/<pid>/limits` line named `name`;
/// `unlimited` is RLIM_INFINITY (2^64 - 1), as client_golang reports it.
fn soft_limit(limits: &str, name: &str) -> Option<f64> {
    let line = limits.lines().find(|line| line.starts_with(name))?;
    let soft = line[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX as f64)
    } else {
        soft.parse::<u64>().ok().map(|n| n as f64)
    }
}

/// `btime` of `/proc/stat`: when the system booted, in Unix seconds. It does
/// not change while the agent runs, so it is read once.
fn boot_time() -> Option<u64> {
    static BOOT_TIME: OnceLock<Option<u64>> = OnceLock::new();
    *BOOT_TIME.get_or_init(|| {
        read("/proc/stat")?
            .lines()
            .find_map(|line| line.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    })
}

fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&ticks| ticks > 0)
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&size| size > 0)
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::telemetry::exposition::{Format, encode};

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let stat = "4242 (we (ird) na me) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                utime_ticks: 250,
                stime_ticks: 50,
                threads: 7,
                start_ticks: 123456,
                virtual_bytes: 987654321,
                resident_pages: 2048,
            })
        );
        assert_eq!(parse_stat("4242 (truncated) S 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn soft_limits_are_read_by_name() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max address space         unlimited            unlimited            bytes     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024.0));
        assert_eq!(
            soft_limit(limits, "Max address space"),
            Some(u64::MAX as f64)
        );
        assert_eq!(soft_limit(limits, "Max processes"), None);
    }

    #[test]
    fn this_process_reads_as_itself() {
        let sample = ProcessSample::read_self();
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let threads: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Test threads come and go: the count is at least one.
        assert!(
            sample.threads.is_some_and(|n| n >= 1),
            "{sample:?} vs {threads}"
        );
        assert!(
            sample.resident_memory_bytes.is_some_and(|n| n > 1 << 20),
            "{sample:?}"
        );
        assert!(
            sample.virtual_memory_bytes >= sample.resident_memory_bytes,
            "{sample:?}"
        );
        assert!(sample.open_fds.is_some_and(|n| n >= 3), "{sample:?}");
        assert!(sample.max_fds.is_some_and(|n| n >= 3.0), "{sample:?}");
        let now = crate::support::unix_now() as f64;
        let start = sample.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        assert!(sample.cpu_seconds.is_some_and(|s| s >= 0.0), "{sample:?}");
    }

    #[test]
    fn encoded_under_the_standard_names_in_both_formats() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let classic = encode(&[&registry], Format::Classic);
        for line in [
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_virtual_memory_bytes gauge",
            "# TYPE process_virtual_memory_max_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
            "# TYPE process_start_time_seconds gauge",
            "# TYPE process_threads gauge",
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "{line} missing:\n{classic}"
            );
        }
        let openmetrics = encode(&[&registry], Format::OpenMetrics);
        assert!(
            openmetrics.contains("# TYPE process_cpu_seconds counter\n"),
            "{openmetrics}"
        );
        assert!(
            openmetrics.contains("\nprocess_cpu_seconds_total "),
            "{openmetrics}"
        );
    }
}
