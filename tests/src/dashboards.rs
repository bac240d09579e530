//! The PromQL of the shipped Grafana dashboards, as a test or a benchmark runs
//! it: every panel target (rows included), annotation and template-variable
//! query, with the template variables substituted.

use anyhow::{Context, Result, bail};

/// What the dashboards' template variables become: every variable is a regex
/// matcher with "All" = `.*`; Grafana's interval variables get fixed values.
pub const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    // Before `$__range`, which it starts with.
    ("$__range_s", "300"),
    ("$__range", "5m"),
    ("$job", ".*"),
    ("$host", ".*"),
    ("$instance", ".*"),
    ("$namespace", ".*"),
    ("$exe", ".*"),
];

/// `expr` with every variable of [`SUBSTITUTIONS`] replaced (`$x` and `${x}`).
pub fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in SUBSTITUTIONS {
        out = out.replace(&format!("${{{}}}", &var[1..]), value);
        out = out.replace(var, value);
    }
    out
}

/// One expression found in a dashboard (or a rules file): where, and the PromQL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expr {
    pub place: String,
    pub promql: String,
    /// Grafana runs it as an instant query (a table's `instant: true`), not
    /// over the dashboard's range.
    pub instant: bool,
    /// For `label_values(selector, label)` variables: the label, whose values
    /// Grafana asks the labels API for (`promql` is then the selector).
    pub label: Option<String>,
}

fn collect_panels(dashboard: &str, panels: &[serde_json::Value], out: &mut Vec<Expr>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Expr {
                    place: format!("{dashboard} / {title} / {}", target["refId"]),
                    promql: substitute(expr),
                    instant: target["instant"] == true && target["range"] != true,
                    label: None,
                });
            }
        }
        if let Some(inner) = panel["panels"].as_array() {
            collect_panels(dashboard, inner, out);
        }
    }
}

/// `label_values(selector, label)` → (`selector`, `label`).
fn variable_query(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((substitute(selector.trim()), label.trim().to_owned()))
}

/// Every expression of the dashboard `dashboard` (JSON) named `name`: panel
/// targets, annotations and query variables, substituted.
pub fn expressions_of(name: &str, dashboard: &serde_json::Value) -> Result<Vec<Expr>> {
    let mut out = Vec::new();
    let panels = dashboard["panels"]
        .as_array()
        .with_context(|| format!("{name}: no panels"))?;
    collect_panels(name, panels, &mut out);
    if out.is_empty() {
        bail!("{name}: no panel expressions");
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            out.push(Expr {
                place: format!("{name} / annotation {}", annotation["name"]),
                promql: substitute(expr),
                instant: false,
                label: None,
            });
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str());
        if var["type"] == "query" {
            let query = query.context("query variable without a query")?;
            let (selector, label) =
                variable_query(query).with_context(|| format!("{name}: variable query {query}"))?;
            out.push(Expr {
                place: format!("{name} / variable {}", var["name"]),
                promql: selector,
                instant: false,
                label: Some(label),
            });
        }
    }
    Ok(out)
}
