#!/usr/bin/env python3
"""Stand-in Kubernetes API server for scripts/kubernetes-memory.sh: PORT, PODS
(pods of node-a, two containers each, ~3.3 KiB of JSON); lists in limit/continue
pages, watches held open (chunked, no events) for timeoutSeconds. Token: test-token."""
import json, sys, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
PORT = int(sys.argv[1])

def pod(i):
    name = f"app-{i:04d}-7d9c-x2x4z"
    uid = f"{i:08x}-1111-4222-8333-444455556666"
    cs = []
    for j, c in enumerate(["app", "envoy"]):
        cid = (f"{i:04x}{j:02x}" * 11)[:64]
        cs.append({"name": c, "image": f"registry.example/{c}:1.0", "imageID": f"registry.example/{c}@sha256:" + "e" * 64,
                   "containerID": f"containerd://{cid}", "ready": True, "restartCount": 0, "started": True,
                   "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}}})
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": f"ns-{i % 20}", "uid": uid, "resourceVersion": str(1000 + i),
                         "creationTimestamp": "2024-05-01T09:59:58Z", "labels": {"app": name, "pod-template-hash": "7d9c"},
                         "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-05-01T09:00:00Z"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name[:-6], "uid": "11111111-2222-4333-8444-555555555555", "controller": True, "blockOwnerDeletion": True}],
                         "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2024-05-01T10:00:01Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}}}}]},
            "spec": {"nodeName": "node-a", "restartPolicy": "Always", "serviceAccountName": "default", "dnsPolicy": "ClusterFirst",
                     "containers": [{"name": c, "image": f"registry.example/{c}:1.0", "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                     "env": [{"name": "MODE", "value": "production"}], "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                                     "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}],
                                     "terminationMessagePath": "/dev/termination-log", "imagePullPolicy": "IfNotPresent"} for c in ["app", "envoy"]],
                     "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}]},
            "status": {"phase": "Running", "hostIP": "10.0.0.5", "podIP": f"10.244.{i // 250}.{i % 250}", "podIPs": [{"ip": f"10.244.{i // 250}.{i % 250}"}],
                       "qosClass": "Burstable", "startTime": "2024-05-01T09:59:58Z",
                       "conditions": [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": "2024-05-01T10:00:01Z"} for t in ["Initialized", "Ready", "ContainersReady", "PodScheduled"]],
                       "containerStatuses": cs}}

PODS = [pod(i) for i in range(N)]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        sys.stderr.write("%s\n" % self.requestline)
    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        if u.path != "/api/v1/pods" or self.headers.get("Authorization") != "Bearer test-token":
            body = b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":401,"reason":"Unauthorized"}'
            self.send_response(401); self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body); return
        if q.get("watch") in ("1", "true"):
            self.send_response(200); self.send_header("Content-Type", "application/json"); self.send_header("Transfer-Encoding", "chunked"); self.end_headers(); self.wfile.flush()
            time.sleep(min(int(q.get("timeoutSeconds", "290")), 3600))
            self.wfile.write(b"0\r\n\r\n"); return
        limit = int(q.get("limit", "0") or 0) or N
        start = int(q.get("continue", "0") or 0)
        items = PODS[start:start + limit]
        meta = {"resourceVersion": "5000"}
        if start + limit < N:
            meta["continue"] = str(start + limit)
        body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
