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
    // Counts rows read by sequential scans, not the scans themselves,
    // because a migration that rebuilds an index scans the empty table.
    let scanned_rows: i64 = sqlx::query_scalar(
        "SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'processed_messages'",
    )
    .fetch_one(&harness.pool)
    .await
    .expect("read table statistics");
    assert_eq!(scanned_rows, 0, "rows of processed_messages read by sequential scans");

    harness.finish().await;
}

/// Every identifier in a primary key or a unique key that a batch probes
/// is compared byte by byte, whatever the database's own collation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probed_identifiers_compare_byte_by_byte() {
    let harness = Harness::start("bytewise", |_| {}).await;
    let columns: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, collation_name::text \
         FROM information_schema.columns \
         WHERE table_schema = current_schema() AND (table_name, column_name) IN \
             (('accounts', 'user_id'), ('holds', 'user_id'), ('holds', 'stream_id'), \
              ('ledger', 'user_id'), ('processed_messages', 'user_id'), \
              ('processed_messages', 'message_id')) \
         ORDER BY 1, 2",
    )
    .fetch_all(&harness.pool)
    .await
    .expect("read column collations");
    assert_eq!(columns.len(), 6, "{columns:?}");
    for (table, column, collation) in &columns {
        assert_eq!(collation.as_deref(), Some("C"), "{table}.{column}");
    }
    harness.finish().await;
}
