//! The Helm chart as Helm renders it, for tests that need what the chart
//! produces (a ServiceMonitor, a PrometheusRule): rendered with
//! `helm/fleetsnitch/ci/render.go`, the renderer of `ci/check.sh` (Helm's own
//! template stack; there is no helm binary here).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize as _;

use crate::{TempDir, process::run_bounded, skip, workspace_root};

/// The Debian packages of the renderer's Go libraries, where Debian puts them
/// (`ci/check.sh` installs them when missing).
const GO_LIBRARIES: &[(&str, &str)] = &[
    (
        "/usr/share/gocode/src/github.com/Masterminds/sprig",
        "golang-github-masterminds-sprig-dev",
    ),
    (
        "/usr/share/gocode/src/sigs.k8s.io/yaml",
        "golang-k8s-sigs-yaml-dev",
    ),
];

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("helm/fleetsnitch")
}

/// Builds the renderer under `target/chart-render/` (Go's build cache makes a
/// rebuild cheap). `Ok(None)`: Go or its libraries are missing, reported as a
/// skip (see [`skip::skip`]).
fn renderer() -> Result<Option<PathBuf>> {
    let Some(go) = skip::program("go", "golang-go")? else {
        return Ok(None);
    };
    for (dir, package) in GO_LIBRARIES {
        if !Path::new(dir).is_dir() {
            skip::skip(&format!(
                "{dir} is missing (Debian package {package}; helm/fleetsnitch/ci/check.sh installs it)"
            ))?;
            return Ok(None);
        }
    }
    let out = workspace_root().join("target/chart-render");
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let binary = out.join("render");
    let built = run_bounded(
        Command::new(go)
            .arg("build")
            .arg("-o")
            .arg(&binary)
            .arg(chart_dir().join("ci/render.go"))
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", out.join("gocache")),
        Duration::from_secs(300),
    )?;
    ensure!(
        built.status.success(),
        "go build helm/fleetsnitch/ci/render.go: {}",
        built.stderr
    );
    Ok(Some(binary))
}

/// Every object the chart renders with `values` (YAML, merged over
/// values.yaml as `helm install -f` would), as JSON. `Ok(None)`: the renderer
/// cannot be built here (a skip, already reported).
pub fn render(values: &str) -> Result<Option<Vec<serde_json::Value>>> {
    let Some(renderer) = renderer()? else {
        return Ok(None);
    };
    let dir = TempDir::new("fsn-chart")?;
    let values_file = dir.path().join("values.yaml");
    fs::write(&values_file, values)?;
    let rendered = run_bounded(
        Command::new(&renderer).arg(chart_dir()).arg(&values_file),
        Duration::from_secs(60),
    )?;
    ensure!(
        rendered.status.success(),
        "rendering the chart with {values:?}: {}",
        rendered.stderr
    );
    let mut objects = Vec::new();
    for document in yaml_serde::Deserializer::from_str(&rendered.stdout) {
        let object =
            serde_json::Value::deserialize(document).context("the rendered chart is not YAML")?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    if objects.is_empty() {
        bail!("the chart rendered nothing with {values:?}");
    }
    Ok(Some(objects))
}

/// The one object of `kind` among `objects`.
pub fn object<'a>(objects: &'a [serde_json::Value], kind: &str) -> Result<&'a serde_json::Value> {
    let mut found = objects.iter().filter(|o| o["kind"] == kind);
    let first = found
        .next()
        .with_context(|| format!("the chart rendered no {kind}"))?;
    ensure!(found.next().is_none(), "the chart rendered several {kind}s");
    Ok(first)
}
