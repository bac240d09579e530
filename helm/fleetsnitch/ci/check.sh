#!/usr/bin/env bash
# Renders the chart (default values and the ci/*.values.yaml variants) with a small
# Go program that uses Helm's own template stack (text/template + sprig + include,
# toYaml, .Files.Get/Glob, symbolic links followed as Helm's loader does), then:
# - validates the merged values of each variant against values.schema.json (ajv,
#   draft-07, as Helm does before rendering), and checks that every
#   ci/invalid/*.values.yaml is refused with the message its first line names
#   (`# expect-schema:` by the schema, `# expect-render:` by a template `fail`);
# - validates every object against the Kubernetes and prometheus-operator schemas
#   of the npm packages kubernetes-models and @kubernetes-models/prometheus-operator;
# - checks what the manifests and NOTES.txt say for each variant (ci/expect.mjs)
#   and that README.md has a row for every value (ci/values.mjs).
# No helm binary is needed.
# Installs (only when missing): Debian's golang-go, golang-github-masterminds-sprig-dev,
# golang-k8s-sigs-yaml-dev, nodejs/npm; the npm packages go to a cache directory.
set -euo pipefail
chart="$(cd "$(dirname "$0")/.." && pwd)"
work="${FSN_CHART_CHECK_DIR:-$(cd "$chart/../.." && pwd)/.cache/chart-check}"
rm -rf "$work/out"
mkdir -p "$work/out/invalid"
need=()
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || need+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/sigs.k8s.io/yaml ] || need+=(golang-k8s-sigs-yaml-dev)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" go build -o "$work/render" "$chart/ci/render.go"
if [ ! -d "$work/node/node_modules/kubernetes-models" ] || [ ! -d "$work/node/node_modules/ajv" ]; then
  mkdir -p "$work/node"
  (cd "$work/node" && { [ -f package.json ] || npm init -y >/dev/null; } &&
    npm install --silent kubernetes-models @kubernetes-models/prometheus-operator yaml ajv@8)
fi
cp "$chart"/ci/*.mjs "$work/node/"
render() { # NAME [VALUES.yaml]: manifests, merged values and NOTES.txt of one variant
  local name="$1"
  shift
  "$work/render" -values-out "$work/out/$name.values.json" -notes-out "$work/out/$name.notes.txt" \
    "$chart" "$@" > "$work/out/$name.yaml"
}
render default
outs=("$work/out/default.yaml")
for values in "$chart"/ci/*.values.yaml; do
  name="$(basename "$values" .values.yaml)"
  render "$name" "$values"
  outs+=("$work/out/$name.yaml")
done
failed=0
for values in "$chart"/ci/invalid/*.values.yaml; do
  name="$(basename "$values" .values.yaml)"
  "$work/render" -values-only -values-out "$work/out/invalid/$name.values.json" "$chart" "$values"
  if ! grep -qE '^# expect-(schema|render): .' "$values"; then
    echo "invalid/$name: no '# expect-schema: MESSAGE' or '# expect-render: MESSAGE' line"; failed=1
  fi
  expect="$(sed -n 's/^# expect-render: //p' "$values")"
  [ -n "$expect" ] || continue
  if "$work/render" "$chart" "$values" > /dev/null 2> "$work/out/invalid/$name.err"; then
    echo "render SUCCEEDED but must fail: invalid/$name"; failed=1
  elif grep -qF -- "$expect" "$work/out/invalid/$name.err"; then
    echo "render refused as expected: invalid/$name: $expect"
  else
    echo "render failed for another reason: invalid/$name: expected \"$expect\", got: $(cat "$work/out/invalid/$name.err")"; failed=1
  fi
done
(cd "$work/node" && node values.mjs "$chart" "$work/out") || failed=1
(cd "$work/node" && node validate.mjs "${outs[@]}") || failed=1
(cd "$work/node" && node expect.mjs "$chart" "$work/out") || failed=1
# The extras variant's PrometheusRule (drift thresholds from values: 25 %, 5
# hosts; job fleetsnitch-web), as Prometheus would load it: promtool checks it
# and runs ci/fleet-thresholds.test.yml on it (a drift the default thresholds
# ignore) and ci/job-selector.test.yml (the agent-down alert of that job only).
if [ -f "$work/out/extras.rules.yml" ]; then
  promtool check rules "$work/out/extras.rules.yml" || failed=1
  sed "s|@RULES@|$work/out/extras.rules.yml|" "$chart/ci/fleet-thresholds.test.yml" > "$work/out/fleet-thresholds.test.yml"
  promtool test rules "$work/out/fleet-thresholds.test.yml" || failed=1
  # Its serviceMonitor.jobLabel (fleetsnitch-web) in FleetsnitchAgentDown.
  sed "s|@RULES@|$work/out/extras.rules.yml|" "$chart/ci/job-selector.test.yml" > "$work/out/job-selector.test.yml"
  promtool test rules "$work/out/job-selector.test.yml" || failed=1
else
  echo "no extras.rules.yml: the PrometheusRule of the extras variant was not checked"; failed=1
fi
echo "rendered manifests: ${outs[*]}"
exit "$failed"
