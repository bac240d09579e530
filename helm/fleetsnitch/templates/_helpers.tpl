{{- define "fleetsnitch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetsnitch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "fleetsnitch.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "fleetsnitch.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetsnitch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetsnitch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleetsnitch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fleetsnitch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fleetsnitch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetsnitch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /*
The agent's configuration file: .Values.config, with config.geoip's database
paths set from .Values.geoip when the chart mounts the databases.
*/ -}}
{{- define "fleetsnitch.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $geoip := dict -}}
{{- if hasKey $config "geoip" -}}
{{- $geoip = $config.geoip | default dict -}}
{{- end -}}
{{- $mount := trimSuffix "/" .Values.geoip.mountPath -}}
{{- with .Values.geoip.countryDatabase -}}
{{- $_ := set $geoip "country_database" (printf "%s/%s" $mount .) -}}
{{- end -}}
{{- with .Values.geoip.asnDatabase -}}
{{- $_ := set $geoip "asn_database" (printf "%s/%s" $mount .) -}}
{{- end -}}
{{- if $geoip -}}
{{- $_ := set $config "geoip" $geoip -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{- /* Whether the agent writes a connection log (config.connection_log.enabled). */ -}}
{{- define "fleetsnitch.connectionLogEnabled" -}}
{{- if dig "connection_log" "enabled" false (.Values.config | default dict) -}}true{{- end -}}
{{- end -}}

{{- /* The directory of the connection log, where its volume is mounted. */ -}}
{{- define "fleetsnitch.connectionLogDir" -}}
{{- $path := dig "connection_log" "path" "/var/log/fleetsnitch/connections.jsonl" (.Values.config | default dict) -}}
{{- if not (isAbs $path) -}}
{{- fail (printf "config.connection_log.path must be absolute in the chart's pod, got %q" $path) -}}
{{- end -}}
{{- $dir := dir $path -}}
{{- if has $dir (list "/" "/etc/fleetsnitch" "/var/lib/fleetsnitch" "/sys/fs/bpf" "/sys/fs/cgroup" "/sys/kernel/btf" "/sys/kernel/tracing") -}}
{{- fail (printf "config.connection_log.path %q: its directory %s is already a mount of the chart; choose a directory of its own, e.g. /var/log/fleetsnitch" $path $dir) -}}
{{- end -}}
{{- $dir -}}
{{- end -}}

{{- /* What the probes ask: /healthz, or only the port when every path needs credentials. */ -}}
{{- define "fleetsnitch.probeHandler" -}}
{{- if .Values.webConfig.existingSecret -}}
# /healthz asks for the same credentials as /metrics.
tcpSocket:
  port: metrics
{{- else -}}
httpGet:
  path: /healthz
  port: metrics
{{- end -}}
{{- end -}}
