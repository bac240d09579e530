//! The HTTP endpoints: Prometheus metrics, a health check and a landing page.
//!
//! As operators expect of any exporter: `/` links the telemetry path and
//! `/healthz`; the telemetry path serves the classic text format unless the
//! scraper asks for OpenMetrics (`Accept`); any response is gzipped when the
//! client accepts it (`Accept-Encoding`); every other path is 404.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tower_http::compression::CompressionLayer;

use super::health::Health;
use crate::{
    support::build_info,
    telemetry::{
        self,
        exposition::{self, Format},
    },
};

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    /// `process_*` and `fleetsnitch_build_info`.
    own: Arc<Registry>,
    health: Arc<Health>,
    /// Older than this, the last drain means the collector is stuck.
    max_drain_age: Duration,
}

pub fn router(
    telemetry_path: &str,
    registry: Arc<Registry>,
    health: Arc<Health>,
    drain_interval: Duration,
) -> Router {
    let state = AppState {
        registry,
        own: Arc::new(telemetry::self_registry()),
        health,
        max_drain_age: drain_interval * 5 + Duration::from_secs(1),
    };
    let mut router = Router::new()
        .route(telemetry_path, get(serve_metrics))
        .route("/healthz", get(healthz));
    // A telemetry path of `/` is the page itself.
    if telemetry_path != "/" {
        let page = landing_page(telemetry_path);
        router = router.route("/", get(move || std::future::ready(Html(page.clone()))));
    }
    router
        .with_state(state)
        .layer(CompressionLayer::new().gzip(true))
}

async fn serve_metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            // Caches between the scraper and the agent keep one page per format.
            (header::VARY, "Accept"),
        ],
        exposition::encode(&[&state.registry, &state.own], format),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_fresh(state.max_drain_age) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "in-kernel counters have not been drained recently\n",
        )
    }
}

/// The page `/` answers: what runs, and links to what it serves. Links are
/// relative, so the page works behind a reverse proxy that adds a prefix.
fn landing_page(telemetry_path: &str) -> String {
    let metrics = html_escape(telemetry_path.trim_start_matches('/'));
    format!(
        "<!DOCTYPE html>\n\
         <html lang=\"en\">\n\
         <head><meta charset=\"utf-8\"><title>fleetsnitch</title></head>\n\
         <body>\n\
         <h1>fleetsnitch</h1>\n\
         <p>Per-executable network accounting agent, version {version} \
         (revision {revision}).</p>\n\
         <ul>\n\
         <li><a href=\"./{metrics}\">Metrics</a> ({path})</li>\n\
         <li><a href=\"./healthz\">Health</a> (/healthz)</li>\n\
         </ul>\n\
         </body>\n\
         </html>\n",
        version = html_escape(build_info::VERSION),
        revision = html_escape(build_info::REVISION),
        path = html_escape(telemetry_path),
    )
}

fn html_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use axum::body::{Body, to_bytes};
    use http::Request;
    use tower_service::Service as _;

    use super::*;

    fn app(telemetry_path: &str) -> Router {
        let mut registry = telemetry::registry();
        registry.register(
            "requests",
            "Requests",
            prometheus_client::metrics::counter::Counter::<u64>::default(),
        );
        router(
            telemetry_path,
            Arc::new(registry),
            Arc::new(Health::default()),
            Duration::from_secs(1),
        )
    }

    async fn get(
        router: &mut Router,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = router
            .call(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), 64 << 20).await.unwrap();
        (status, headers, body.to_vec())
    }

    #[tokio::test]
    async fn metrics_default_to_the_classic_format_and_openmetrics_on_request() {
        let mut router = app("/metrics");
        let (status, headers, body) = get(&mut router, "/metrics", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            exposition::CLASSIC_CONTENT_TYPE
        );
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("# HELP fleetsnitch_requests_total Requests."),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("fleetsnitch_build_info{version="), "{text}");
        assert!(!text.contains("# EOF"), "{text}");

        let (_, headers, body) = get(
            &mut router,
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
        )
        .await;
        assert_eq!(
            headers[header::CONTENT_TYPE],
            exposition::OPENMETRICS_CONTENT_TYPE
        );
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("# TYPE fleetsnitch_requests counter"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn gzip_only_when_accepted() {
        let mut router = app("/metrics");
        let (_, headers, plain) = get(&mut router, "/metrics", &[]).await;
        assert!(headers.get(header::CONTENT_ENCODING).is_none());
        let (_, headers, compressed) =
            get(&mut router, "/metrics", &[("accept-encoding", "gzip")]).await;
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
        let mut inflated = String::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_string(&mut inflated)
            .unwrap();
        let plain = String::from_utf8(plain).unwrap();
        // CPU seconds and memory move between two scrapes: compare the names.
        let names = |text: &str| -> Vec<String> {
            text.lines()
                .map(|line| line.split([' ', '{']).next().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(names(&inflated), names(&plain));
        assert!(
            compressed.len() < plain.len(),
            "{} vs {}",
            compressed.len(),
            plain.len()
        );
    }

    #[tokio::test]
    async fn landing_page_links_metrics_and_health_and_other_paths_are_404() {
        let mut router = app("/custom<path>");
        let (status, headers, body) = get(&mut router, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{headers:?}"
        );
        let page = String::from_utf8(body).unwrap();
        assert!(page.contains("href=\"./custom&lt;path&gt;\""), "{page}");
        assert!(page.contains("href=\"./healthz\""), "{page}");
        assert!(page.contains(build_info::VERSION), "{page}");
        for path in ["/nothing", "/metrics", "/index.html"] {
            let (status, _, _) = get(&mut router, path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
        // The telemetry path may be `/` itself.
        let mut router = app("/");
        let (status, headers, _) = get(&mut router, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            exposition::CLASSIC_CONTENT_TYPE
        );
    }
}
