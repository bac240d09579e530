//! The HTTP endpoints: Prometheus metrics and a health check.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::health::Health;
use crate::telemetry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
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
        health,
        max_drain_age: drain_interval * 5 + Duration::from_secs(1),
    };
    Router::new()
        .route(telemetry_path, get(serve_metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn serve_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        telemetry::encode(&state.registry),
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
