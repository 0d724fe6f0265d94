//! The HTTP endpoint while the database is unreachable: `/healthz` responds
//! and `/readyz` reports what the worker waits for.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{free_local_address, http_get};
use stream_credits::settings::{SecretUrl, Settings};
use stream_credits::worker;
use tokio_util::sync::CancellationToken;

/// Maximum wait for the endpoint to accept connections.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_answers_while_database_unreachable() {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let address = free_local_address();
    // Nothing listens there, so the worker keeps retrying the database.
    let closed = free_local_address();
    let mut settings = Settings::default();
    settings.database.url = SecretUrl::new(format!("postgres://{closed}/sc_t_unready"));
    settings.topology.prefix = format!("t-unready-{tag}");
    settings.http.listen = address.clone();

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker::run(Arc::new(settings), shutdown.clone()));
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    let healthz = loop {
        match http_get(&address, "/healthz").await {
            Ok(answer) => break answer,
            Err(error) if tokio::time::Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("/healthz did not answer within {LISTEN_WAIT:?}: {error}"),
        }
    };
    assert_eq!(healthz.0, 200);
    let (status, body) = http_get(&address, "/readyz").await.expect("GET /readyz");
    assert_eq!(status, 503);
    assert_eq!(body, "database unreachable\n");

    shutdown.cancel();
    running
        .await
        .unwrap()
        .expect("the worker stops cleanly during its database retries");
}
