//! Start-up, steady state and shutdown of the agent: each stage is started
//! with its own configuration section and registers its own metrics; the
//! collector thread then runs the pipeline until SIGINT or SIGTERM.

pub mod collector;

use std::{
    sync::{Arc, atomic::AtomicBool},
    thread,
};

use aya::EbpfError;
use collector::{Collector, CollectorError, CollectorMetrics, Parts};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::net::TcpListener;

use crate::{
    config::Config,
    enrichment::{
        dns::{DnsCache, DnsCacheConfig, DnsCounters},
        flows::Enricher,
        geoip::GeoIp,
        kubernetes::PodResolver,
        users::UserNames,
    },
    host::{
        preflight::{self, PreflightError},
        privileges,
    },
    identity::{
        containers,
        execs::ExecHoldMetrics,
        hashing::{HashMetrics, Hasher},
        processes::{IdentityMetrics, IdentityTable},
    },
    kernel::{
        self,
        dns_capture::{DnsCapture, DnsCaptureError, DnsCaptureMetrics, DnsObject},
        probes::{self, NoModeFits, ProbeMetrics},
        stats::KernelStatsMetrics,
        traffic::TrafficMap,
    },
    model::{Activity, Failures},
    sinks::{
        connection_log::ConnectionLog,
        fanout::{self, Fanout, RecordPolicy, Sinks},
        journal::{self, Journal, JournalMetrics},
        metrics::TrafficMetrics,
        otlp::{OtlpExporter, ResourceInfo},
        virustotal::{self, VirusTotalMetrics},
    },
    support::{InvalidValue, error_chain, unix_now},
    telemetry,
    web::{
        health::Health,
        http, listen,
        server::{self, WebConfigMetrics},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error("cannot read the kernel's BTF from {}: {source}", preflight::BTF_PATH)]
    Btf { source: aya::BtfError },
    #[error(
        "the kernel refused to load fleetsnitch's maps or programs: {detail}. BPF may be \
         restricted here (kernel.unprivileged_bpf_disabled, lockdown=confidentiality, a \
         seccomp profile or a container without CAP_BPF/CAP_PERFMON)"
    )]
    BpfRefused { detail: String },
    #[error(transparent)]
    NoProbe(#[from] NoModeFits),
    #[error(transparent)]
    Collector(#[from] CollectorError),
    #[error(transparent)]
    Config(#[from] InvalidValue),
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("GeoIP (geoip.country_database / geoip.asn_database): {0}")]
    GeoIp(#[from] crate::enrichment::geoip::GeoIpError),
    #[error("OTLP (otlp.*): {0}")]
    Otlp(#[from] crate::sinks::otlp::OtlpError),
    #[error("connection log (connection_log.*): {0}")]
    ConnectionLog(#[from] crate::sinks::connection_log::ConnectionLogError),
    #[error("VirusTotal: {0}")]
    VirusTotal(String),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    WebConfig(#[from] crate::web::config::WebConfigError),
    #[error(transparent)]
    Privileges(#[from] crate::host::privileges::PrivilegeError),
}

/// Hands the memory freed after loading (kernel BTF, object file, relocation
/// tables) back to the system: glibc keeps freed heap otherwise, and the
/// agent's resident size would carry its start-up peak for ever.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    // First: from here on SIGHUP reloads (or is logged) instead of killing
    // the agent, also while it loads its programs.
    let hangup = server::hangup_signal();
    preflight::check()?;
    preflight::raise_memlock_limit();

    // Bind first: a port in use is the cheapest failure to report.
    let listening = listen::bind(config.web.listen_address()?)?;
    let (address, families) = (listening.address, listening.families);
    let listener = TcpListener::from_std(listening.listener)
        .map_err(|source| AgentError::Listen(listen::ListenError { address, source }))?;
    let web_settings = match &config.web.config_file {
        Some(path) => Some((path, server::WebState::load(path)?)),
        None => None,
    };

    let geoip = open_geoip(&config)?;
    // The DNS object is loaded here and attached further down.
    let kernel::Objects {
        main: mut ebpf,
        dns: dns_object,
    } = kernel::load_objects(&config.collector, &config.exec).map_err(|error: EbpfError| {
        AgentError::BpfRefused {
            detail: error_chain(&error),
        }
    })?;
    // The first counting table goes in before any program can count.
    let traffic = TrafficMap::new(&mut ebpf, config.collector.traffic_map_entries)
        .map_err(CollectorError::from)?;
    // Parsed only now: the loader parses the kernel's BTF for itself and
    // frees it when loading is done; two parsed copies at once would set the
    // agent's peak memory for its whole life (VmHWM).
    let btf = kernel::btf::parse().map_err(|source| AgentError::Btf { source })?;
    // Exec tracking off: its probe is not attached (nor reported).
    let left_out: &[&str] = if config.exec.enabled {
        &[]
    } else {
        &[probes::EXEC_PROBE]
    };
    let outcomes = probes::attach_all(&mut ebpf, &btf, &config.probes.disabled_modes, left_out)?;
    // The parsed kernel BTF is some 12 MiB and only needed to attach. Handed
    // back at once: glibc would keep it while the ring buffers are mapped and
    // the threads start, and that sum would be the agent's peak (VmHWM).
    drop(btf);
    release_freed_memory();

    let mut registry = telemetry::registry();
    register_start_time(&mut registry);
    // When each executable was last seen: per-executable series expire by it.
    let activity = Activity::new(config.metrics.executable_expiry);
    let probe_metrics = ProbeMetrics::register(&mut registry);
    probe_metrics.export(&outcomes);
    let health = Arc::new(Health::default());

    // Sinks: everything records reach through the fan-out's queue.
    let journal_metrics = JournalMetrics::register(&mut registry);
    let (outbox, records) = fanout::outbox(journal_metrics.dropped.clone());
    // Failures that leave the operator blind become agent_error events.
    let failures = Failures::new(Some(outbox.clone()));
    let sinks = Sinks {
        otlp: start_otlp(&config, &mut registry, &failures)?,
        connection_log: start_connection_log(&config, &mut registry, &failures)?,
        virustotal: virustotal::spawn(
            &config.virustotal,
            VirusTotalMetrics::register(&mut registry).reporting_to(failures.clone()),
            Some(outbox.clone()),
            activity.clone(),
            known_verdicts(&config),
        )
        .map_err(|error| AgentError::VirusTotal(error.to_string()))?,
    };
    let journal_config = config.journal.clone();
    let journal_activity = activity.clone();
    let fanout = Fanout::spawn(
        records,
        move || Journal::open(journal_config, journal_metrics, journal_activity),
        sinks,
        RecordPolicy::new(&config.journal, config.metrics.ephemeral_range()?),
        config.journal.write_interval,
    )
    .map_err(AgentError::Thread)?;

    // Identity and enrichment.
    let hasher = Hasher::spawn(
        HashMetrics::register(&mut registry).reporting_to(failures.clone()),
        Some(outbox.clone()),
        activity.clone(),
    )
    .map_err(AgentError::Thread)?;
    let geoip = geoip.map(|geoip| geoip.reporting_to(failures.clone()));
    if let Some(geoip) = &geoip {
        geoip.register(&mut registry);
    }
    let enricher = Enricher {
        geoip,
        domains: DnsCache::new(DnsCacheConfig::default())
            .with_counters(DnsCounters::register(&mut registry)),
        pods: PodResolver::spawn(&config.kubernetes, &mut registry, failures.clone()),
        users: UserNames::default(),
    };
    let dns = start_dns_capture(
        dns_object,
        &probe_metrics,
        DnsCaptureMetrics::register(&mut registry),
    );

    let parts = Parts {
        traffic,
        identities: {
            let table = IdentityTable::new(IdentityMetrics::register(&mut registry));
            if config.journal.record_command_lines {
                table.with_command_lines(config.journal.command_line_max_bytes)
            } else {
                table
            }
        },
        hasher,
        enricher,
        dns,
        traffic_metrics: TrafficMetrics::register(
            &mut registry,
            &config.metrics,
            activity.clone(),
        )?,
        outbox,
        metrics: CollectorMetrics::register(&mut registry),
        stats: KernelStatsMetrics::register(&mut registry),
        health: health.clone(),
        drain_interval: config.collector.drain_interval,
        activity,
    };
    let exec_metrics = ExecHoldMetrics::register(&mut registry);
    let collector = Collector::new(&mut ebpf, parts)?;
    let collector = if config.exec.enabled {
        tracing::info!("exec tracking on: every executed program is journaled");
        collector.with_exec(
            &mut ebpf,
            config.exec.max_open_files as usize,
            config.exec.record_command_lines,
            exec_metrics,
        )?
    } else {
        collector
    };

    release_freed_memory();

    let stop = Arc::new(AtomicBool::new(false));
    let collector_thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("fleetsnitch-collector".into())
            .spawn(move || collector.run(stop))
            .map_err(AgentError::Thread)?
    };

    // Everything that needs more is loaded, attached, opened and bound.
    let kept = privileges::drop_to_runtime_set()?;
    tracing::info!(
        kept = %privileges::names(kept),
        "capabilities beyond the run-time set dropped in every thread"
    );

    let web_metrics = WebConfigMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    tracing::info!(
        %address,
        %families,
        telemetry_path = %config.web.telemetry_path,
        "fleetsnitch is counting; serving metrics"
    );
    let router = http::router(
        &config.web.telemetry_path,
        registry,
        health,
        config.collector.drain_interval,
    );
    let web_state =
        web_settings.map(|(path, settings)| server::WebState::new(path, settings, web_metrics));
    server::spawn_reloader(web_state.clone(), hangup);
    let served = match web_state {
        Some(state) => server::serve(listener, router, state, shutdown_signal()).await,
        None => http::serve(listener, router, shutdown_signal()).await,
    };

    tracing::info!("shutting down: final drain, then detaching every probe");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if collector_thread.join().is_err() {
        tracing::error!("the collector thread panicked");
    }
    // The collector's last drain is queued, and its hasher finished the
    // sightings it was given (dropping it waits for that): the sinks deliver
    // everything and stop.
    fanout.stop();
    // Dropping the object detaches every link and unloads every program.
    drop(ebpf);
    served.map_err(AgentError::Http)
}

/// `fleetsnitch_start_time_seconds`.
fn register_start_time(registry: &mut Registry) {
    let start_time = Gauge::<i64>::default();
    start_time.set(unix_now());
    registry.register_with_unit(
        "start_time",
        "Unix time the agent started; executables first seen after it are new in this run",
        prometheus_client::registry::Unit::Seconds,
        start_time,
    );
}

/// The journal's VirusTotal verdicts, when checks are on: after a restart
/// they are exported again without asking. An unreadable journal only costs
/// the requests (the journal's own errors are reported when it is opened).
fn known_verdicts(config: &Config) -> virustotal::KnownVerdicts {
    if config.virustotal.api_key.is_none() && config.virustotal.api_key_file.is_none() {
        return virustotal::KnownVerdicts::new();
    }
    match journal::virustotal_events(&config.journal.path) {
        Ok(events) => {
            let known = virustotal::known_verdicts(events);
            tracing::info!(
                verdicts = known.len(),
                "VirusTotal verdicts read from the journal"
            );
            known
        }
        Err(error) => {
            tracing::warn!(%error, "VirusTotal verdicts not read from the journal: every hash is asked again");
            virustotal::KnownVerdicts::new()
        }
    }
}

/// Starts the OTLP exporter, when enabled.
fn start_otlp(
    config: &Config,
    registry: &mut Registry,
    failures: &Failures,
) -> Result<Option<OtlpExporter>, AgentError> {
    if !config.otlp.enabled {
        // Exported at zero all the same: dashboards and rules see the family.
        crate::sinks::otlp::OtlpCounters::default().register(registry);
        return Ok(None);
    }
    let mut resource = ResourceInfo::detect();
    resource.k8s_node_name = config
        .kubernetes
        .node_name
        .clone()
        .or_else(|| std::env::var(&config.kubernetes.node_name_env).ok())
        .filter(|name| !name.is_empty());
    // In the chart's pod the kernel's host name is the pod's (its own UTS
    // namespace); the node's name is what the records are about.
    if let Some(node) = &resource.k8s_node_name {
        resource.host_name = Some(node.clone());
    }
    let exporter = OtlpExporter::start_reporting(&config.otlp, &resource, failures.clone())?;
    exporter.counters().register(registry);
    tracing::info!("OTLP log export enabled");
    Ok(Some(exporter))
}

/// Starts the local connection log, when enabled.
fn start_connection_log(
    config: &Config,
    registry: &mut Registry,
    failures: &Failures,
) -> Result<Option<ConnectionLog>, AgentError> {
    if !config.connection_log.enabled {
        crate::sinks::connection_log::ConnectionLogCounters::default().register(registry);
        return Ok(None);
    }
    let log = ConnectionLog::start_reporting(&config.connection_log, failures.clone())?;
    log.counters().register(registry);
    Ok(Some(log))
}

/// Starts DNS capture with `object` (loaded earlier); without it the agent
/// runs, with empty domains.
fn start_dns_capture(
    object: Result<DnsObject, DnsCaptureError>,
    probes: &ProbeMetrics,
    metrics: DnsCaptureMetrics,
) -> Option<DnsCapture> {
    let started = match containers::cgroup2_mount() {
        Some(root) => DnsCapture::start(&root, object, metrics).map_err(|error| error.to_string()),
        None => Err("no cgroup v2 hierarchy is mounted: DNS answers cannot be captured".into()),
    };
    match started {
        Ok((capture, outcomes)) => {
            for outcome in outcomes {
                probes.set(
                    outcome.probe,
                    outcome.error.is_none().then_some(outcome.mode),
                );
            }
            Some(capture)
        }
        Err(error) => {
            tracing::warn!(%error, "DNS capture unavailable: domains stay empty");
            for probe in ["dns_owners", "dns_answers"] {
                probes.set(probe, None);
            }
            None
        }
    }
}

/// Opens the configured GeoIP databases; a configured file that cannot be
/// read stops the agent (an operator asked for it).
fn open_geoip(config: &Config) -> Result<Option<GeoIp>, AgentError> {
    if !config.geoip.is_enabled() {
        return Ok(None);
    }
    let geoip = GeoIp::open(
        config.geoip.country_database.as_deref(),
        config.geoip.asn_database.as_deref(),
    )?;
    for database in geoip.databases() {
        tracing::info!(
            path = %database.path().display(),
            database_type = database.database_type(),
            "GeoIP database open"
        );
    }
    Ok(Some(geoip))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}
