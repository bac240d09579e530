// What the rendered manifests must say for each ci variant: each value the chart
// offers changes the objects the way README.md says (schema validation alone
// would pass a value that is silently ignored).
//   node expect.mjs CHART_DIR OUT_DIR
// OUT_DIR holds NAME.yaml (manifests) and NAME.notes.txt for NAME in default,
// all-on, extras, volumes.
import assert from "node:assert/strict";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";

const [chart, out] = process.argv.slice(2);
const dashboardsDir = path.resolve(chart, "../../grafana-dashboards");
const load = (name) => YAML.parseAllDocuments(fs.readFileSync(path.join(out, `${name}.yaml`), "utf8"))
  .map((d) => d.toJS()).filter(Boolean);
const notes = (name) => fs.readFileSync(path.join(out, `${name}.notes.txt`), "utf8");
const daemonSet = (objs) => objs.find((o) => o.kind === "DaemonSet");
const container = (objs) => daemonSet(objs).spec.template.spec.containers[0];
const volume = (objs, name) => daemonSet(objs).spec.template.spec.volumes.find((v) => v.name === name);
const mount = (objs, name) => container(objs).volumeMounts.find((m) => m.name === name);
const configMap = (objs) => objs.find((o) => o.kind === "ConfigMap" && o.data?.["fleetsnitch.yaml"] !== undefined);
const agentConfig = (objs) => YAML.parse(configMap(objs).data["fleetsnitch.yaml"]);
const dashboards = (objs) => objs.filter((o) => o.kind === "ConfigMap" && o.metadata.name.includes("-dashboard-"));
const dashboardFiles = fs.readdirSync(dashboardsDir).filter((f) => f.endsWith(".json")).sort();
const serviceMonitor = (objs) => objs.find((o) => o.kind === "ServiceMonitor");
const ruleGroups = (objs) => objs.find((o) => o.kind === "PrometheusRule").spec.groups;
const rulesFile = YAML.parse(fs.readFileSync(path.join(chart, "rules/fleetsnitch.rules.yml"), "utf8"));
// The PrometheusRule: the rules file's groups (expectJob), then the drift thresholds.
const expectRules = (objs, share, hosts) => {
  const groups = ruleGroups(objs);
  assert.deepEqual(groups.at(-1), {
    name: "fleetsnitch.fleet.thresholds",
    rules: [
      { record: "fleetsnitch:drift_max_host_share", expr: `vector(${share})` },
      { record: "fleetsnitch:drift_min_group_hosts", expr: `vector(${hosts})` },
    ],
  });
};

// The PrometheusRule follows serviceMonitor.jobLabel: the rules file with its
// one job selector, job="fleetsnitch", set to that job, and nothing else changed.
const expectJob = (objs, job) => {
  const groups = ruleGroups(objs);
  const selecting = JSON.stringify(groups).match(/job=\\"[^"\\]*\\"/g);
  assert.deepEqual(selecting, [`job=\\"${job}\\"`], "the rendered rules select the configured job, once");
  const shipped = JSON.parse(JSON.stringify(groups.slice(0, -1)).replaceAll(`job=\\"${job}\\"`, 'job=\\"fleetsnitch\\"'));
  assert.deepEqual(shipped, rulesFile.groups);
  const agentDown = groups.flatMap((g) => g.rules).find((r) => r.alert === "FleetsnitchAgentDown");
  assert.equal(agentDown.expr.trim(), `up{job="${job}"} == 0`);
};
// The ServiceMonitor's endpoint: honorLabels, then the operator's target labels
// naming the agent's pod dropped before the chart's own relabelings.
const expectEndpoint = (objs, honorLabels, job) => {
  const endpoint = serviceMonitor(objs).spec.endpoints[0];
  assert.equal(endpoint.honorLabels, honorLabels);
  assert.deepEqual(endpoint.relabelings.slice(0, 3), [
    { action: "labeldrop", regex: "(pod|namespace|container)" },
    { targetLabel: "job", replacement: job },
    { sourceLabels: ["__meta_kubernetes_pod_node_name"], targetLabel: "host" },
  ]);
  return endpoint;
};

// The dashboards select the job through their $job variable only (whatever
// serviceMonitor.jobLabel is, they show it).
const dashboardJobs = () => {
  for (const file of dashboardFiles) {
    const text = fs.readFileSync(path.join(dashboardsDir, file), "utf8");
    const selectors = text.match(/job\s*(=~|!=|!~|=)\s*\\"[^"\\]*\\"/g) ?? [];
    const fixed = selectors.filter((s) => !/^job=~\\"\$job\\"$/.test(s));
    assert.deepEqual(fixed, [], `${file} selects a job other than $job`);
    assert.ok(selectors.length > 0, `${file}: no job selector at all`);
  }
};

const checks = {
  default(objs, text) {
    const c = container(objs);
    assert.deepEqual(c.args, ["--config.file=/etc/fleetsnitch/fleetsnitch.yaml", "--web.listen-address=[::]:9941",
      "--journal.path=/var/lib/fleetsnitch/journal.db", "--log.level=info", "--path.rootfs=/host"]);
    assert.deepEqual(c.env.map((e) => e.name), ["NODE_NAME"]);
    // The node's / for user names and the files of exited processes.
    assert.deepEqual(volume(objs, "host-root"), { name: "host-root", hostPath: { path: "/", type: "Directory" } });
    assert.deepEqual(mount(objs, "host-root"), { name: "host-root", mountPath: "/host", readOnly: true, mountPropagation: "HostToContainer" });
    assert.deepEqual(c.startupProbe, { httpGet: { path: "/healthz", port: "metrics" }, periodSeconds: 5, failureThreshold: 60, timeoutSeconds: 3 });
    assert.equal(c.livenessProbe.initialDelaySeconds, undefined, "the startup probe replaces the liveness delay");
    assert.equal(volume(objs, "connection-log"), undefined);
    assert.equal(volume(objs, "geoip"), undefined);
    assert.equal(agentConfig(objs).geoip, undefined);
    assert.equal(dashboards(objs).length, 0);
    // The pods roll when the rendered configuration changes (geoip paths included).
    const rendered = configMap(objs).data["fleetsnitch.yaml"].replace(/\n$/, "");
    assert.equal(daemonSet(objs).spec.template.metadata.annotations["checksum/config"],
      crypto.createHash("sha256").update(rendered).digest("hex"));
    assert.match(text, /rollout status daemonset\/fleetsnitch/);
    assert.match(text, /No ServiceMonitor was created/);
  },
  "all-on"(objs, text) {
    const c = container(objs);
    assert.deepEqual(c.startupProbe.tcpSocket, { port: "metrics" }, "under webConfig the probes check the port only");
    assert.equal(c.startupProbe.httpGet, undefined);
    assert.match(text, /ServiceMonitor fleetsnitch \(job="fleetsnitch"\)/);
    assert.match(text, /PrometheusRule fleetsnitch/);
    expectRules(objs, 0.1, 10);
    expectJob(objs, "fleetsnitch");
    const endpoint = expectEndpoint(objs, true, "fleetsnitch");
    assert.equal(endpoint.relabelings.length, 3);
    assert.equal(endpoint.metricRelabelings, undefined);
    assert.equal(serviceMonitor(objs).spec.endpoints[0].relabelings.find((r) => r.targetLabel === "fleet_group"), undefined);
    assert.match(text, /curl -k https:/);
  },
  extras(objs, text) {
    const c = container(objs);
    assert.deepEqual(c.args.slice(-2), ["--web.telemetry-path=/metrics", "--log.level=fleetsnitch=debug"]);
    assert.deepEqual(c.env.map((e) => e.name), ["NODE_NAME", "RUST_BACKTRACE", "POD_NAME"]);
    assert.deepEqual(volume(objs, "extra-ca"), { name: "extra-ca", configMap: { name: "corporate-ca" } });
    assert.deepEqual(mount(objs, "extra-ca"), { name: "extra-ca", mountPath: "/etc/ssl/corporate", readOnly: true });
    assert.deepEqual(volume(objs, "connection-log"), { name: "connection-log", hostPath: { path: "/var/log/fleetsnitch", type: "DirectoryOrCreate" } });
    assert.deepEqual(mount(objs, "connection-log"), { name: "connection-log", mountPath: "/var/log/fleetsnitch" });
    assert.deepEqual(volume(objs, "geoip"), { name: "geoip", hostPath: { path: "/usr/share/GeoIP", type: "Directory" } });
    assert.deepEqual(mount(objs, "geoip"), { name: "geoip", mountPath: "/usr/share/GeoIP", readOnly: true });
    assert.deepEqual(agentConfig(objs).geoip, { country_database: "/usr/share/GeoIP/GeoLite2-Country.mmdb", asn_database: "/usr/share/GeoIP/GeoLite2-ASN.mmdb" });
    assert.equal(agentConfig(objs).connection_log.enabled, true);
    assert.deepEqual(c.startupProbe, { httpGet: { path: "/healthz", port: "metrics" }, periodSeconds: 10, failureThreshold: 30, timeoutSeconds: 5 });
    // One ConfigMap per dashboard file, byte for byte the JSON of grafana-dashboards/.
    const maps = dashboards(objs);
    assert.deepEqual(maps.map((m) => Object.keys(m.data)[0]).sort(), dashboardFiles);
    for (const map of maps) {
      const [file, json] = Object.entries(map.data)[0];
      assert.deepEqual(JSON.parse(json), JSON.parse(fs.readFileSync(path.join(dashboardsDir, file), "utf8")), file);
      assert.equal(map.metadata.labels.grafana_dashboard_fleetsnitch, "yes");
      assert.equal(map.metadata.labels.team, "observability");
      assert.deepEqual(map.metadata.annotations, { grafana_folder: "fleetsnitch" });
      assert.equal(map.metadata.namespace, "monitoring");
    }
    assert.match(text, /Connection log: \/var\/log\/fleetsnitch\/connections\.jsonl in the pods, \/var\/log\/fleetsnitch on each node/);
    assert.match(text, /GeoIP databases are read from \/usr\/share\/GeoIP \(GeoLite2-Country\.mmdb, GeoLite2-ASN\.mmdb\)/);
    assert.match(text, /grafana_dashboard_fleetsnitch=yes/);
    expectRules(objs, 0.25, 5);
    expectJob(objs, "fleetsnitch-web");
    const endpoint = expectEndpoint(objs, false, "fleetsnitch-web");
    assert.deepEqual(endpoint.relabelings.slice(3), [
      { targetLabel: "fleet_group", replacement: "web" },
      { sourceLabels: ["__meta_kubernetes_pod_node_name"], targetLabel: "node" },
    ]);
    assert.deepEqual(endpoint.metricRelabelings, [{ action: "drop", sourceLabels: ["__name__"], regex: "process_.*" }]);
    assert.match(text, /ServiceMonitor fleetsnitch \(job="fleetsnitch-web"\)/);
    // The rendered rules, for promtool (check.sh): ci/fleet-thresholds.test.yml.
    fs.writeFileSync(path.join(out, "extras.rules.yml"), YAML.stringify({ groups: ruleGroups(objs) }));
  },
  volumes(objs, text) {
    const c = container(objs);
    assert.deepEqual(volume(objs, "connection-log"), { name: "connection-log", emptyDir: { sizeLimit: "2Gi" } });
    assert.deepEqual(mount(objs, "connection-log"), { name: "connection-log", mountPath: "/var/log/flows" });
    assert.deepEqual(volume(objs, "geoip"), { name: "geoip", persistentVolumeClaim: { claimName: "geoip", readOnly: true } });
    assert.equal(mount(objs, "geoip").mountPath, "/var/lib/geoip/");
    const config = agentConfig(objs);
    assert.deepEqual(config.geoip, { asn_database: "/srv/asn.mmdb", country_database: "/var/lib/geoip/country/dbip-country-lite.mmdb" });
    assert.deepEqual(config.connection_log, { enabled: true, path: "/var/log/flows/fleetsnitch.jsonl", max_files: 3 });
    assert.equal(c.startupProbe, undefined);
    assert.equal(c.livenessProbe.initialDelaySeconds, 60, "without a startup probe liveness waits");
    assert.equal(volume(objs, "host-root"), undefined);
    assert.equal(mount(objs, "host-root"), undefined);
    assert.ok(!c.args.some((a) => a.startsWith("--path.rootfs")), "no --path.rootfs without the mount");
    const maps = dashboards(objs);
    assert.equal(maps.length, dashboardFiles.length);
    for (const map of maps) {
      assert.equal(map.metadata.namespace, "grafana");
      assert.equal(map.metadata.labels.grafana_dashboard, "1");
    }
    assert.match(text, /on the volume connectionLog\.volume/);
  },
};

let bad = 0;
for (const [name, check] of Object.entries(checks)) {
  const text = notes(name);
  try {
    assert.doesNotMatch(text, /<no value>|%!|map\[/, "NOTES.txt renders every value");
    check(load(name), text);
    console.log(`expectations ok: ${name}`);
  } catch (e) {
    console.log(`expectations FAILED: ${name}: ${e.message}`);
    bad++;
  }
}
try {
  dashboardJobs();
  console.log("expectations ok: dashboards select the job by $job only");
} catch (e) {
  console.log(`expectations FAILED: dashboards: ${e.message}`);
  bad++;
}
process.exit(bad ? 1 : 0);
