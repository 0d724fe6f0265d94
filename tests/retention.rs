//! The retention job deletes the records of chunks that no later copy
//! needs and keeps the rest: a copy of a settled stream's chunk whose
//! record is gone changes nothing, and an open stream's chunks are still
//! recognised as copies.

mod common;

use std::time::Duration;

use common::{Harness, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;
use stream_credits::retention;

const USER: &str = "u-retention";
const SETTLED: &str = "s-settled";
const OPEN: &str = "s-open";
const BALANCE: i64 = 10_000;
/// Chunks of each stream, one stated token each.
const SETTLED_CHUNKS: u64 = 3;
const OPEN_CHUNKS: u64 = 2;

/// Places a hold on `stream` and sends `chunks` chunks of one token.
async fn stream_with_chunks(harness: &Harness, stream: &str, chunks: u64) {
    let reply = harness
        .request(&start(USER, stream, &format!("{stream}-start"), ROUND_MODEL, 10, 100), stream)
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    for seq in 0..chunks {
        harness.publish(&chunk(USER, stream, seq, "word", Some(1))).await;
    }
}

/// Funds the user and runs the settled stream from start to settlement.
async fn fund_and_settle_a_stream(harness: &Harness) {
    harness.fund(USER, "g-1", BALANCE).await;
    stream_with_chunks(harness, SETTLED, SETTLED_CHUNKS).await;
    harness
        .publish(&end(USER, SETTLED, "s-settled-end", EndStatus::Completed, None))
        .await;
    harness.event("reservation.settled", SETTLED).await;
}

async fn execute(harness: &Harness, statement: &'static str) {
    sqlx::query(statement)
        .execute(&harness.pool)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_no_copy_needs() {
    let mut harness = Harness::start("retention", |settings| {
        settings.retention.interval_seconds = 0;
    })
    .await;
    fund_and_settle_a_stream(&harness).await;
    stream_with_chunks(&harness, OPEN, OPEN_CHUNKS).await;
    harness.barrier(USER).await;
    harness.stop_worker().await;

    // Ages as a long-running worker would leave them: the settled stream's
    // chunks counted well before the open hold was placed, and the grant
    // and the settled stream's start and end two days ago. The open
    // stream's records carry a time five minutes before its hold's, which
    // is inside the margin kept for a batch whose transaction began before
    // the hold's.
    execute(&harness, "UPDATE processed_messages SET processed_at = now() - interval '3 hours' \
                       WHERE message_id LIKE 's-settled-c%'").await;
    execute(&harness, "UPDATE holds SET opened_at = now() - interval '2 hours' WHERE stream_id = 's-open'").await;
    execute(&harness, "UPDATE processed_messages SET processed_at = now() - interval '125 minutes' \
                       WHERE message_id LIKE 's-open-%'").await;
    execute(&harness, "UPDATE processed_messages SET processed_at = now() - interval '2 days' \
                       WHERE message_id IN ('g-1', 's-settled-start', 's-settled-end')").await;
    let records = harness.count("SELECT count(*) FROM processed_messages").await;

    let removed = retention::remove_once(&harness.pool, 10_000)
        .await
        .expect("run the retention job");
    assert_eq!(removed, SETTLED_CHUNKS);
    assert_eq!(
        harness.count("SELECT count(*) FROM processed_messages WHERE message_id LIKE 's-settled-c%'").await,
        0
    );
    assert_eq!(
        harness.count("SELECT count(*) FROM processed_messages").await,
        records - SETTLED_CHUNKS as i64,
        "records other than the settled stream's chunks were deleted"
    );
    let again = retention::remove_once(&harness.pool, 10_000)
        .await
        .expect("run the retention job again");
    assert_eq!(again, 0);

    // Copies of a chunk of each stream, and a new chunk of the open one.
    let balance = harness.account(USER).await.balance;
    harness.restart_worker().await;
    harness.publish(&chunk(USER, SETTLED, 1, "word", Some(1))).await;
    harness.publish(&chunk(USER, OPEN, 1, "word", Some(1))).await;
    harness.publish(&chunk(USER, OPEN, OPEN_CHUNKS, "word", Some(1))).await;
    harness.barrier(USER).await;
    assert_eq!(harness.hold_counts(USER, SETTLED).await, (SETTLED_CHUNKS as i64, SETTLED_CHUNKS as i64));
    assert_eq!(
        harness.hold_counts(USER, OPEN).await,
        (OPEN_CHUNKS as i64 + 1, OPEN_CHUNKS as i64 + 1),
        "the copy of the open stream's chunk was counted, or the new chunk was not"
    );
    assert_eq!(harness.account(USER).await.balance, balance);
    assert!(harness.take_dead_letters().await.is_empty());
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_retention_on_its_interval() {
    let harness = Harness::start("retention_interval", |settings| {
        settings.retention.interval_seconds = 1;
    })
    .await;
    fund_and_settle_a_stream(&harness).await;
    execute(&harness, "UPDATE processed_messages SET processed_at = now() - interval '2 hours'").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let chunk_records = harness
            .count("SELECT count(*) FROM processed_messages WHERE kind = 'chunk.emitted'")
            .await;
        if chunk_records == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{chunk_records} chunk records left 10 s after they passed retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Records of messages other than chunks are kept.
    assert_eq!(
        harness.count("SELECT count(*) FROM processed_messages WHERE message_id IN \
                       ('g-1', 's-settled-start', 's-settled-end')").await,
        3
    );
    harness.finish().await;
}
