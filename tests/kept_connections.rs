//! A shard keeps its database connection from one batch to the next. A
//! kept connection that the server closes in between costs the next batch
//! a retry on a new connection, and loses and repeats nothing.

mod common;

use common::{Harness, ROUND_MODEL, free_local_address, metric_value, start};

const USER: &str = "u-kept";

/// Round-price hold: 10 prompt tokens + 2 * 50 output tokens = 110.
const RESERVED: i64 = 110;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_granted_after_connection_lost() {
    let harness = Harness::start("kept", |settings| {
        settings.http.listen = free_local_address();
    })
    .await;
    harness.fund(USER, "g-1", 1_000).await;
    let first = harness
        .request(&start(USER, "s-1", "m-1", ROUND_MODEL, 10, 50), "c-1")
        .await;
    assert_eq!(first["type"], "reservation.granted", "{first}");

    // Every other session on the test's database ends, the worker's kept
    // connection among them.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&harness.pool)
    .await
    .expect("end the other sessions");
    assert!(ended.iter().any(|&ended| ended), "no session of the worker was found to end");

    let second = harness
        .request(&start(USER, "s-2", "m-2", ROUND_MODEL, 10, 50), "c-2")
        .await;
    assert_eq!(second["type"], "reservation.granted", "{second}");
    assert_eq!(second["available_after"], 1_000 - 2 * RESERVED, "{second}");

    let account = harness.account(USER).await;
    assert_eq!(account.reserved, 2 * RESERVED);
    assert_eq!(account.balance, 1_000);
    assert_eq!(harness.count("SELECT count(*) FROM holds").await, 2);
    let page = harness.metrics().await;
    let errors = metric_value(&page, "stream_credits_database_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "the closed connection was not noticed: {errors}");
    harness.finish().await;
}
