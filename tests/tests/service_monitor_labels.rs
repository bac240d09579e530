//! Issue #17 item 3: the agent's `pod` and `namespace` labels (the workload's)
//! survive prometheus-operator. A real Prometheus scrapes an agent page with
//! the scrape configuration the operator generates for the chart's rendered
//! ServiceMonitor: what Kubernetes service discovery would give the agent's
//! pod (its `__meta_kubernetes_*` labels, from the rendered Service and
//! DaemonSet) as static labels, then the operator's relabelings, then the
//! ServiceMonitor's own, translated field by field. A field of the
//! ServiceMonitor this file does not reproduce fails the test, so a chart
//! change cannot slip past it.
//!
//! The page is recorded, in the agent's format (labels as
//! `sinks/metrics/labels.rs` writes them, empty for a host process): a
//! workload's series with its pod and namespace, a host process's, and
//! self-metrics without either. No root needed.
//!
//! Operator facts, from prometheus-operator's generator
//! (pkg/prometheus/promcfg.go and its golden files): per endpoint one job
//! `serviceMonitor/<namespace>/<name>/<index>`, `honor_labels` from the
//! endpoint (default false, or forced false by the Prometheus's
//! `overrideHonorLabels`), the selector and port as `keep` rules, the target
//! labels `node`/`pod` (endpoint address target), `namespace`, `service`,
//! `pod`, `container`, a `drop` of finished pods, `job` (the Service's name),
//! `endpoint` (the port), then the endpoint's `relabelings`, then sharding
//! (one shard here: left out); `metricRelabelings` become
//! `metric_relabel_configs`.

use std::{collections::BTreeMap, fs, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    TempDir, chart,
    dashboards::expressions_of,
    servers::{MetricsPages, Prometheus, rules_at_global_interval},
    skip, wait_until, workspace_root,
};
use serde_json::{Value, json};

/// The agent's pod as Kubernetes names it, and its node.
const AGENT_POD: &str = "fleetsnitch-x7k2p";
const NODE: &str = "node-a";
/// A workload on that node, as the agent labels its traffic.
const WORKLOAD_POD: &str = "web-6d8f7b9c4-q2x7m";
const WORKLOAD_NAMESPACE: &str = "shop";
const WORKLOAD_CONTAINER: &str = "web";
const WORKLOAD_EXE: &str = "/usr/local/bin/web";
/// A process of the node itself: no container, no pod.
const HOST_EXE: &str = "/usr/sbin/sshd";
/// The job the shipped rules select (serviceMonitor.jobLabel's default).
const JOB: &str = "fleetsnitch";

/// The agent's /metrics as the chart configures it (bytes_labels: user,
/// remote_port, container_name, pod, namespace): every configured label on
/// every bytes series, empty where it does not apply.
fn agent_page() -> String {
    let bytes = |exe: &str, direction: &str, user: &str, port: &str, k8s: [&str; 3], value| {
        format!(
            "fleetsnitch_bytes_total{{exe=\"{exe}\",direction=\"{direction}\",user=\"{user}\",\
             remote_port=\"{port}\",container_name=\"{}\",pod=\"{}\",namespace=\"{}\"}} {value}\n",
            k8s[0], k8s[1], k8s[2]
        )
    };
    let workload = [WORKLOAD_CONTAINER, WORKLOAD_POD, WORKLOAD_NAMESPACE];
    let host = ["", "", ""];
    let mut page = String::from(
        "# HELP fleetsnitch_bytes_total Application payload bytes sent and received by each executable.\n\
         # TYPE fleetsnitch_bytes_total counter\n",
    );
    page += &bytes(WORKLOAD_EXE, "sent", "app", "443", workload, 18_300);
    page += &bytes(WORKLOAD_EXE, "received", "app", "443", workload, 250_114);
    page += &bytes(HOST_EXE, "sent", "root", "22", host, 48_213);
    page += &bytes(HOST_EXE, "received", "root", "22", host, 9_120);
    page += &format!(
        "# HELP fleetsnitch_executable_info The executables seen, one series per version.\n\
         # TYPE fleetsnitch_executable_info gauge\n\
         fleetsnitch_executable_info{{exe=\"{WORKLOAD_EXE}\",sha256=\"{0}\"}} 1\n\
         fleetsnitch_executable_info{{exe=\"{HOST_EXE}\",sha256=\"{1}\"}} 1\n\
         # HELP fleetsnitch_executable_first_seen_timestamp_seconds Unix time each (executable, sha256) was first seen on this host.\n\
         # TYPE fleetsnitch_executable_first_seen_timestamp_seconds gauge\n\
         fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{WORKLOAD_EXE}\",sha256=\"{0}\",\
         user=\"app\",container_id=\"{2}\",container_name=\"{WORKLOAD_CONTAINER}\",\
         pod=\"{WORKLOAD_POD}\",namespace=\"{WORKLOAD_NAMESPACE}\"}} 1764926000\n\
         fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{HOST_EXE}\",sha256=\"{1}\",\
         parent=\"/usr/lib/systemd/systemd\",user=\"root\"}} 1764920000\n\
         # HELP fleetsnitch_start_time_seconds When the agent started, seconds since the epoch.\n\
         # TYPE fleetsnitch_start_time_seconds gauge\n\
         fleetsnitch_start_time_seconds 1764926400\n\
         # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes 31457280\n",
        "a".repeat(64),
        "b".repeat(64),
        "c".repeat(64),
    );
    page
}

/// Prometheus's label-name sanitising of Kubernetes label keys.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A ServiceMonitor relabeling (camelCase) as a Prometheus relabel config;
/// the operator lower-cases the action.
fn relabel_config(relabeling: &Value) -> Result<Value> {
    let fields = relabeling
        .as_object()
        .with_context(|| format!("relabeling {relabeling} is not an object"))?;
    let mut config = serde_json::Map::new();
    for (key, value) in fields {
        let (name, value) = match key.as_str() {
            "sourceLabels" => ("source_labels", value.clone()),
            "targetLabel" => ("target_label", value.clone()),
            "separator" | "regex" | "replacement" | "modulus" => (key.as_str(), value.clone()),
            "action" => (
                "action",
                Value::from(value.as_str().context("action")?.to_lowercase()),
            ),
            other => bail!("relabeling field {other} ({relabeling}) is not reproduced here"),
        };
        config.insert(name.to_owned(), value);
    }
    Ok(Value::Object(config))
}

/// The scrape job prometheus-operator generates for the chart's ServiceMonitor
/// (first endpoint), with the agent's pod discovered through the rendered
/// Service and DaemonSet at `pages`. `override_honor_labels`: the Prometheus
/// resource's `overrideHonorLabels: true`. Test-only departures: the target's
/// address and path are the recorded page's, and the interval is 1 s.
fn operator_scrape_job(
    objects: &[Value],
    pages: &MetricsPages,
    override_honor_labels: bool,
) -> Result<Value> {
    let monitor = chart::object(objects, "ServiceMonitor")?;
    let service = chart::object(objects, "Service")?;
    let daemon_set = chart::object(objects, "DaemonSet")?;
    let spec = &monitor["spec"];
    for key in spec.as_object().context("ServiceMonitor spec")?.keys() {
        ensure!(
            ["selector", "namespaceSelector", "endpoints"].contains(&key.as_str()),
            "ServiceMonitor spec.{key} is not reproduced here: teach this test what the operator makes of it"
        );
    }
    let endpoints = spec["endpoints"].as_array().context("endpoints")?;
    ensure!(
        endpoints.len() == 1,
        "one endpoint expected, the chart has {}",
        endpoints.len()
    );
    let endpoint = &endpoints[0];
    for key in endpoint.as_object().context("endpoint")?.keys() {
        ensure!(
            [
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "honorLabels",
                "relabelings",
                "metricRelabelings"
            ]
            .contains(&key.as_str()),
            "ServiceMonitor endpoint field {key} is not reproduced here"
        );
    }
    ensure!(
        endpoint["path"] == "/metrics",
        "endpoint path {} (the agent serves /metrics)",
        endpoint["path"]
    );
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .context("Service namespace")?;
    let watched = spec["namespaceSelector"]["matchNames"]
        .as_array()
        .context("namespaceSelector.matchNames")?;
    ensure!(
        watched.iter().any(|n| n == namespace),
        "the ServiceMonitor watches {watched:?}, the Service is in {namespace}"
    );
    let port = endpoint["port"].as_str().context("endpoint port")?;

    // What the endpoints role of Kubernetes SD gives the agent's pod: one
    // target per port of the Service, on the container that has that port.
    let pod_spec = &daemon_set["spec"]["template"]["spec"];
    let mut targets = Vec::new();
    for service_port in service["spec"]["ports"].as_array().context("ports")? {
        let target_port = &service_port["targetPort"];
        let container = pod_spec["containers"]
            .as_array()
            .context("containers")?
            .iter()
            .find(|c| {
                c["ports"]
                    .as_array()
                    .is_some_and(|ports| ports.iter().any(|p| &p["name"] == target_port))
            })
            .with_context(|| format!("no container has the port {target_port}"))?;
        let mut labels = BTreeMap::from([
            (
                "__meta_kubernetes_namespace".to_owned(),
                namespace.to_owned(),
            ),
            (
                "__meta_kubernetes_service_name".to_owned(),
                service["metadata"]["name"]
                    .as_str()
                    .context("name")?
                    .to_owned(),
            ),
            (
                "__meta_kubernetes_endpoint_port_name".to_owned(),
                service_port["name"].as_str().unwrap_or("").to_owned(),
            ),
            (
                "__meta_kubernetes_endpoint_address_target_kind".to_owned(),
                "Pod".to_owned(),
            ),
            (
                "__meta_kubernetes_endpoint_address_target_name".to_owned(),
                AGENT_POD.to_owned(),
            ),
            (
                "__meta_kubernetes_pod_name".to_owned(),
                AGENT_POD.to_owned(),
            ),
            (
                "__meta_kubernetes_pod_node_name".to_owned(),
                NODE.to_owned(),
            ),
            (
                "__meta_kubernetes_pod_phase".to_owned(),
                "Running".to_owned(),
            ),
            ("__meta_kubernetes_pod_ready".to_owned(), "true".to_owned()),
            (
                "__meta_kubernetes_pod_container_name".to_owned(),
                container["name"]
                    .as_str()
                    .context("container name")?
                    .to_owned(),
            ),
        ]);
        for (key, value) in service["metadata"]["labels"]
            .as_object()
            .context("Service labels")?
        {
            let key = sanitize(key);
            labels.insert(
                format!("__meta_kubernetes_service_label_{key}"),
                value.as_str().context("label value")?.to_owned(),
            );
            labels.insert(
                format!("__meta_kubernetes_service_labelpresent_{key}"),
                "true".to_owned(),
            );
        }
        targets.push(json!({"targets": [pages.addr.to_string()], "labels": labels}));
    }

    let mut relabel =
        vec![json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"})];
    let selector = &spec["selector"];
    for key in selector.as_object().context("selector")?.keys() {
        ensure!(
            key == "matchLabels",
            "selector.{key} is not reproduced here"
        );
    }
    for (key, value) in selector["matchLabels"].as_object().context("matchLabels")? {
        let key = sanitize(key);
        relabel.push(json!({
            "action": "keep",
            "source_labels": [
                format!("__meta_kubernetes_service_label_{key}"),
                format!("__meta_kubernetes_service_labelpresent_{key}"),
            ],
            "regex": format!("({});true", value.as_str().context("selector value")?),
        }));
    }
    let kind_and_name = [
        "__meta_kubernetes_endpoint_address_target_kind",
        "__meta_kubernetes_endpoint_address_target_name",
    ];
    relabel.extend([
        json!({"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": port}),
        json!({"source_labels": kind_and_name, "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"}),
        json!({"source_labels": kind_and_name, "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
        json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}),
        json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"}),
        json!({"target_label": "endpoint", "replacement": port}),
    ]);
    for relabeling in endpoint["relabelings"].as_array().into_iter().flatten() {
        relabel.push(relabel_config(relabeling)?);
    }
    let metric_relabel = endpoint["metricRelabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(relabel_config)
        .collect::<Result<Vec<_>>>()?;
    let honor_labels = !override_honor_labels && endpoint["honorLabels"] == true;
    Ok(json!({
        "job_name": format!("serviceMonitor/{namespace}/{}/0", monitor["metadata"]["name"].as_str().context("name")?),
        "honor_labels": honor_labels,
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "metrics_path": MetricsPages::path(0),
        "static_configs": targets,
        "relabel_configs": relabel,
        "metric_relabel_configs": metric_relabel,
    }))
}

/// A series' labels, `__name__` included.
fn labels(series: &Value) -> BTreeMap<String, String> {
    series["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Prometheus started with the operator's scrape job for the rendered chart
/// and the shipped rules, once the agent's page has been scraped twice.
fn scraping_as_the_operator_would(
    objects: &[Value],
    pages: &MetricsPages,
    override_honor_labels: bool,
) -> Result<Prometheus> {
    let job = operator_scrape_job(objects, pages, override_honor_labels)?;
    let rules_dir = TempDir::new("fsn-operator-rules")?;
    let rules = rules_at_global_interval(rules_dir.path())?;
    // JSON is YAML: the configuration as Prometheus reads it.
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules],
        "scrape_configs": [job],
    });
    let config = serde_json::to_string_pretty(&config)?;
    let prometheus = Prometheus::start(&config)?;
    wait_until(
        Duration::from_secs(30),
        "two scrapes of the agent's page",
        || {
            Ok(prometheus
                .query(&format!("count_over_time(up{{job=\"{JOB}\"}}[1m]) >= 2"))?
                .len()
                == 1)
        },
    )
    .with_context(|| {
        format!(
            "scrape configuration:\n{config}\nPrometheus log:\n{}",
            prometheus.log_tail(20)
        )
    })?;
    Ok(prometheus)
}

/// Every check of the labels, on a Prometheus scraping as the operator would.
fn workload_and_host_labels_are_kept_apart(prometheus: &Prometheus) -> Result<()> {
    let mut failures = Vec::new();

    // Every scraped series of the job (recording rules' aggregates aside):
    // the target is the agent (instance, host, job, service, endpoint); no
    // label renamed exported_*, none names the agent's pod, no container
    // target label.
    let all = prometheus.query(&format!("{{job=\"{JOB}\",__name__!~\".*:.*\"}}"))?;
    ensure!(!all.is_empty(), "no series of job {JOB}");
    for series in &all {
        let labels = labels(series);
        let mut wrong = Vec::new();
        if labels.keys().any(|k| k.starts_with("exported_")) {
            wrong.push("an exported_* label");
        }
        if labels.values().any(|v| v == AGENT_POD) {
            wrong.push("the agent's own pod");
        }
        if labels.contains_key("container") {
            wrong.push("the operator's container label");
        }
        if labels.get("host").map(String::as_str) != Some(NODE) {
            wrong.push("no host label naming the node");
        }
        if labels.get("service").map(String::as_str) != Some("fleetsnitch") {
            wrong.push("no service label");
        }
        if !wrong.is_empty() {
            failures.push(format!("{labels:?}: {}", wrong.join(", ")));
        }
    }

    // The workload's series keep its pod and namespace; the host process's
    // and the self-metrics have none.
    let expect = |selector: &str,
                  pod: Option<&str>,
                  namespace: Option<&str>|
     -> Result<Vec<String>> {
        let found = prometheus.query(selector)?;
        let mut failures = Vec::new();
        if found.is_empty() {
            failures.push(format!("{selector}: no series"));
        }
        for series in &found {
            let labels = labels(series);
            let seen = (
                labels.get("pod").map(String::as_str),
                labels.get("namespace").map(String::as_str),
            );
            if seen != (pod, namespace) {
                failures.push(format!(
                    "{selector}: expected pod {pod:?}, namespace {namespace:?}; seen {seen:?} in {labels:?}"
                ));
            }
        }
        Ok(failures)
    };
    failures.extend(expect(
        &format!("fleetsnitch_bytes_total{{exe=\"{WORKLOAD_EXE}\"}}"),
        Some(WORKLOAD_POD),
        Some(WORKLOAD_NAMESPACE),
    )?);
    failures.extend(expect(
        &format!("fleetsnitch_bytes_total{{exe=\"{HOST_EXE}\"}}"),
        None,
        None,
    )?);
    // The first sightings: who ran each version, the workload's in its pod.
    failures.extend(expect(
        &format!("fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{WORKLOAD_EXE}\"}}"),
        Some(WORKLOAD_POD),
        Some(WORKLOAD_NAMESPACE),
    )?);
    failures.extend(expect(
        &format!("fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{HOST_EXE}\"}}"),
        None,
        None,
    )?);
    for self_metric in [
        "fleetsnitch_start_time_seconds",
        "process_resident_memory_bytes",
        "up",
    ] {
        failures.extend(expect(
            &format!("{self_metric}{{job=\"{JOB}\"}}"),
            None,
            None,
        )?);
    }

    // The host drill-down's "By container" panel: the workload under its pod,
    // the host process as "(host)".
    let drilldown = workspace_root().join("grafana-dashboards/fleetsnitch-host-drilldown.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(&drilldown)?)?;
    let by_container = expressions_of("host drill-down", &dashboard)?
        .into_iter()
        .find(|e| e.place.contains("/ By container /"))
        .context("the host drill-down has no \"By container\" panel")?;
    let mut rows: Vec<(String, String)> = prometheus
        .query(&by_container.promql)?
        .iter()
        .map(|series| {
            let labels = labels(series);
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            (get("pod"), get("namespace"))
        })
        .collect();
    rows.sort();
    let expected = vec![
        ("(host)".to_owned(), String::new()),
        (WORKLOAD_POD.to_owned(), WORKLOAD_NAMESPACE.to_owned()),
    ];
    if rows != expected {
        failures.push(format!(
            "\"By container\" ({}): expected (pod, namespace) {expected:?}, seen {rows:?}",
            by_container.promql
        ));
    }

    // The dashboards' namespace variable offers the workload's namespace only.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let namespaces = prometheus.label_values(
        "namespace",
        &format!("fleetsnitch_bytes_total{{job=~\"{JOB}\"}}"),
        now - 300.0,
        now,
    )?;
    if namespaces != [Value::from(WORKLOAD_NAMESPACE)] {
        failures.push(format!(
            "namespace variable: expected [{WORKLOAD_NAMESPACE:?}], seen {namespaces:?}"
        ));
    }

    // The shipped rules' per-namespace aggregate, as the fleet overview reads it.
    let recorded = "job_namespace_exe_direction:fleetsnitch_bytes:rate5m";
    wait_until(Duration::from_secs(30), recorded, || {
        Ok(prometheus.query(recorded)?.len() == 4)
    })?;
    failures.extend(expect(
        &format!("{recorded}{{exe=\"{WORKLOAD_EXE}\"}}"),
        None,
        Some(WORKLOAD_NAMESPACE),
    )?);
    failures.extend(expect(
        &format!("{recorded}{{exe=\"{HOST_EXE}\"}}"),
        None,
        None,
    )?);

    ensure!(
        failures.is_empty(),
        "{} label problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// The chart's defaults with the ServiceMonitor and rules on.
fn rendered_chart() -> Result<Option<Vec<Value>>> {
    chart::render("serviceMonitor: {enabled: true}\nprometheusRule: {enabled: true}\n")
}

#[test]
fn workload_labels_survive_the_operators_target_labels() -> Result<()> {
    let Some(objects) = rendered_chart()? else {
        return Ok(());
    };
    if skip::program("prometheus", "prometheus")?.is_none() {
        return Ok(());
    }
    let pages = MetricsPages::serve(vec![agent_page()])?;
    let prometheus = scraping_as_the_operator_would(&objects, &pages, false)?;
    workload_and_host_labels_are_kept_apart(&prometheus)
}

/// A Prometheus resource with `overrideHonorLabels: true` makes the operator
/// ignore the endpoint's honorLabels: the chart's drop of the target labels
/// keeps the workload's labels all the same.
#[test]
fn workload_labels_survive_a_prometheus_that_overrides_honor_labels() -> Result<()> {
    let Some(objects) = rendered_chart()? else {
        return Ok(());
    };
    if skip::program("prometheus", "prometheus")?.is_none() {
        return Ok(());
    }
    let pages = MetricsPages::serve(vec![agent_page()])?;
    let prometheus = scraping_as_the_operator_would(&objects, &pages, true)?;
    workload_and_host_labels_are_kept_apart(&prometheus)
}
