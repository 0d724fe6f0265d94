//! A batch finds its messages' processed ids through the primary key
//! however the table has grown since PostgreSQL planned the lookup. A
//! plan cached while a table was small must not scan the whole table once
//! it has grown.

mod common;

use common::{Harness, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

/// Chunks published one at a time, so that the worker applies them in
/// many batches and every connection of its pool runs the lookup more
/// than the five times after which PostgreSQL may keep a generic plan.
const CHUNKS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_batches_never_scan_processed_messages() {
    let mut harness = Harness::start("lookups", |settings| {
        settings.worker.batch_linger_ms = 0;
    })
    .await;
    let user = "u-lookups";
    harness.fund(user, "g-1", 1_000_000).await;
    let granted = harness
        .request(&start(user, "s-1", "m-start", ROUND_MODEL, 10, 100), "c-start")
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");

    for seq in 0..CHUNKS {
        harness.publish(&chunk(user, "s-1", seq, "x", Some(1))).await;
    }
    harness
        .publish(&end(user, "s-1", "m-end", EndStatus::Completed, None))
        .await;
    let settled = harness.event("reservation.settled", "s-1").await;
    assert_eq!(settled["counted_completion_tokens"], CHUNKS, "{settled}");

    harness.stop_worker().await;
    harness.wait_for_worker_sessions().await;
    let scans: i64 = sqlx::query_scalar(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'processed_messages'",
    )
    .fetch_one(&harness.pool)
    .await
    .expect("read table statistics");
    assert_eq!(scans, 0, "sequential scans of processed_messages");

    harness.finish().await;
}
