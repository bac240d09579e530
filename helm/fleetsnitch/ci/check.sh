#!/usr/bin/env bash
# Renders the chart (default values and the ci/*.values.yaml variants) with a small
# Go program that uses Helm's own template stack (text/template + sprig + include,
# toYaml, .Files.Get), then validates every object against the Kubernetes and
# prometheus-operator schemas of the npm packages kubernetes-models and
# @kubernetes-models/prometheus-operator. No helm binary is needed.
# Installs (only when missing): Debian's golang-go, golang-github-masterminds-sprig-dev,
# golang-k8s-sigs-yaml-dev, nodejs/npm; the npm packages go to a cache directory.
set -euo pipefail
chart="$(cd "$(dirname "$0")/.." && pwd)"
work="${FSN_CHART_CHECK_DIR:-$(cd "$chart/../.." && pwd)/.cache/chart-check}"
mkdir -p "$work/out"
need=()
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || need+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/sigs.k8s.io/yaml ] || need+=(golang-k8s-sigs-yaml-dev)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" go build -o "$work/render" "$chart/ci/render.go"
if [ ! -d "$work/node/node_modules/kubernetes-models" ]; then
  mkdir -p "$work/node"
  (cd "$work/node" && npm init -y >/dev/null && npm install --silent kubernetes-models @kubernetes-models/prometheus-operator yaml)
fi
cp "$chart/ci/validate.mjs" "$work/node/validate.mjs"
"$work/render" "$chart" > "$work/out/default.yaml"
outs=("$work/out/default.yaml")
for values in "$chart"/ci/*.values.yaml; do
  out="$work/out/$(basename "$values" .values.yaml).yaml"
  "$work/render" "$chart" "$values" > "$out"
  outs+=("$out")
done
(cd "$work/node" && node validate.mjs "${outs[@]}")
echo "rendered manifests: ${outs[*]}"
