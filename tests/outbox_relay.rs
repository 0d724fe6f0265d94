//! The outbox relay clears a backlog of unpublished rows in one pass, a
//! batch after another, rather than one batch per pass.

mod common;

use std::time::{Duration, Instant};

use common::Harness;

/// Unpublished rows, more than three of the relay's batches of 200.
const BACKLOG: i64 = 700;

/// Time between the relay's passes, `RELAY_INTERVAL` in src/worker.rs.
/// With one batch per pass the backlog would take three more passes.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);

const UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_clears_backlog_in_one_pass() {
    let harness = Harness::start("relaybacklog", |_| {}).await;

    // Replies to a queue that does not exist, left unpublished a minute
    // ago, as by a worker that crashed. The broker confirms and drops them.
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, routing_key, event_type, body, created_at) \
         SELECT gen_random_uuid(), 'reply', 'no-such-reply-queue', 'reservation.granted', \
             '{\"type\": \"reservation.granted\"}'::jsonb, now() - interval '1 minute' \
         FROM generate_series(1, $1)",
    )
    .bind(BACKLOG)
    .execute(&harness.pool)
    .await
    .expect("insert the backlog");

    let inserted = Instant::now();
    let deadline = RELAY_INTERVAL * 2;
    let mut left = harness.count(UNPUBLISHED).await;
    while left > 0 && inserted.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = harness.count(UNPUBLISHED).await;
    }
    assert_eq!(left, 0, "rows still unpublished {deadline:?} after the backlog appeared");

    harness.finish().await;
}
