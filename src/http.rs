//! The HTTP endpoint: Prometheus `/metrics`, `/healthz` (the process is
//! up) and `/readyz` (the database and the broker both answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The dependencies `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub pool: PgPool,
    /// Set by the worker while its broker session is up.
    pub broker_connected: Arc<AtomicBool>,
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Installs the Prometheus recorder and serves the endpoint on `listen`
/// until `shutdown` is cancelled. A recorder is installed once per
/// process; a second call serves without metrics of its own.
pub async fn serve(
    listen: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);

    let state = AppState { metrics, readiness };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    let database = sqlx::query("SELECT 1").execute(&state.readiness.pool).await.is_ok();
    let broker = state.readiness.broker_connected.load(Ordering::Relaxed);
    match (database, broker) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n"),
    }
}
