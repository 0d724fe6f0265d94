//! The HTTP endpoint: Prometheus `/metrics`, `/healthz` (the process is
//! up), `/readyz` (the database and the broker both respond) and the
//! read-only `GET /accounts/{user_id}` with the account's open holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Bucket bounds of the latency histograms, from a millisecond (one
/// commit on an idle database) to half a minute (the longest pause of a
/// database retry).
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Maximum wait for the database to respond to the `/readyz` check.
const READY_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The dependencies `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub pool: PgPool,
    /// Set by the worker while its broker session is up.
    pub broker_connected: Arc<AtomicBool>,
    /// Idle time after which a hold expires, to date open holds' expiry.
    pub ttl_seconds: u64,
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
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS_SECONDS)
        .expect("the bucket list is not empty")
        .build_recorder();
    let metrics = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);

    let state = AppState { metrics, readiness };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/accounts/{user_id}", get(account))
        .with_state(state);
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render_metrics(State(state): State<AppState>) -> String {
    // Open holds are counted at scrape time, so every worker process
    // reports the same figures for the shared database.
    let open = sqlx::query_as::<_, (i64, i64)>(
        "SELECT count(*), coalesce(sum(reserved), 0)::bigint FROM holds WHERE settled_at IS NULL",
    )
    .fetch_one(&state.readiness.pool)
    .await;
    match open {
        Ok((holds, credits)) => {
            metrics::gauge!("stream_credits_holds_open").set(holds as f64);
            metrics::gauge!("stream_credits_credits_held").set(credits as f64);
        }
        Err(error) => {
            metrics::counter!("stream_credits_database_errors_total").increment(1);
            tracing::warn!(%error, "cannot read open holds for /metrics");
        }
    }
    state.metrics.render()
}

async fn account(State(state): State<AppState>, Path(user_id): Path<String>) -> Response {
    // A NUL would make PostgreSQL reject the query, which is bad input
    // rather than an outage. No length limit applies here, because the
    // endpoint has no settings and a longer id than any stored gets 404.
    if let Err(rule) = crate::messages::check_id(&user_id, usize::MAX) {
        return (StatusCode::BAD_REQUEST, format!("invalid user id: it {rule}\n")).into_response();
    }
    let ttl_seconds = state.readiness.ttl_seconds;
    let result = async {
        let mut conn = state.readiness.pool.acquire().await?;
        crate::accounts::detail(&mut conn, &user_id, ttl_seconds).await
    }
    .await;
    match result {
        Ok(Some(detail)) => Json(detail).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("account `{user_id}` not found\n")).into_response(),
        Err(error) => {
            tracing::warn!(%error, user.id = %user_id, "cannot read an account");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
        }
    }
}

async fn ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    // A pool waits its whole acquire timeout for a server that refuses
    // connections, so the check gives up sooner.
    let check = sqlx::query("SELECT 1").execute(&state.readiness.pool);
    let database = matches!(tokio::time::timeout(READY_CHECK_WAIT, check).await, Ok(Ok(_)));
    let broker = state.readiness.broker_connected.load(Ordering::Relaxed);
    match (database, broker) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n"),
    }
}
