import fs from "node:fs";
import YAML from "yaml";
import * as core from "kubernetes-models/v1";
import * as apps from "kubernetes-models/apps/v1";
import * as rbac from "kubernetes-models/rbac.authorization.k8s.io/v1";
import * as mon from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const kinds = {
  "v1/ConfigMap": core.ConfigMap, "v1/Service": core.Service, "v1/ServiceAccount": core.ServiceAccount,
  "apps/v1/DaemonSet": apps.DaemonSet,
  "rbac.authorization.k8s.io/v1/ClusterRole": rbac.ClusterRole,
  "rbac.authorization.k8s.io/v1/ClusterRoleBinding": rbac.ClusterRoleBinding,
  "monitoring.coreos.com/v1/ServiceMonitor": mon.ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": mon.PrometheusRule,
};
let bad = 0;
for (const file of process.argv.slice(2)) {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"));
  for (const doc of docs) {
    if (doc.errors.length) { console.log(file, "YAML error", doc.errors); bad++; continue; }
    const obj = doc.toJS();
    if (!obj) continue;
    const key = `${obj.apiVersion}/${obj.kind}`;
    const Model = kinds[key];
    if (!Model) { console.log(file, "unknown kind", key); bad++; continue; }
    try { new Model(obj).validate(); console.log(file, "ok", key, obj.metadata.name); }
    catch (e) { console.log(file, "INVALID", key, e.message); bad++; }
    if (key === "monitoring.coreos.com/v1/PrometheusRule") console.log("  rule groups:", obj.spec.groups.map(g => g.name + "(" + g.rules.length + ")").join(" "));
  }
}
process.exit(bad ? 1 : 0);
