//! A message whose effect fails after the duplicate check is applied
//! exactly once and never dead-lettered. A trigger in the test's database
//! makes the insert of one message's row fail a planned number of times:
//!
//! - SQLSTATE 40001 (serialization failure) is retryable, and the worker
//!   retries the whole batch in place.
//! - An ordinary exception (P0001) is final for the batch, which the worker
//!   then applies one message per transaction. When that fails too, the
//!   message is retried in place, alone, up to `topology.delivery_limit`
//!   times, so later messages of the same user never overtake it.

mod common;

use std::time::Duration;

use common::{Harness, Outbound, ROUND_MODEL, WAIT, chunk, end, grant, start};
use stream_credits::messages::EndStatus;

const BASE_GRANT: i64 = 1_000;

/// Grants published in one batch around the failing one.
const BEFORE: i64 = 10;
const TARGET: i64 = 2_000;
const AFTER: i64 = 300;
const BATCH_TOTAL: i64 = BEFORE + TARGET + AFTER;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// SQLSTATE of a serialization failure, which the ledger treats as
/// retryable.
const SERIALIZATION_FAILURE: &str = "40001";

/// SQLSTATE of a PL/pgSQL `RAISE EXCEPTION` without a code, which the
/// ledger treats as final.
const RAISE_EXCEPTION: &str = "P0001";

/// Counts the ledger rows written for `message_id`.
async fn ledger_rows_of(harness: &Harness, message_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&harness.pool)
        .await
        .expect("count ledger rows")
}

/// Waits until a ledger row for `message_id` exists.
async fn wait_ledger_row(harness: &Harness, message_id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while ledger_rows_of(harness, message_id).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ledger row for {message_id} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes three grants in one call, the middle one failing as planned
/// on its ledger insert, and checks that each is applied exactly once.
/// Returns how often the worker tried to insert the failing grant's row.
async fn grant_batch_with_failure(
    harness: &Harness,
    user_id: &str,
    sqlstate: &str,
    failures: i64,
) -> i64 {
    harness.install_fault("ledger", "message_id").await;
    harness.fund(user_id, "g-base", BASE_GRANT).await;
    harness
        .plan_failures("g-target", sqlstate, Some(failures))
        .await;

    let batch = [
        Outbound::json(&grant(user_id, "g-before", BEFORE)),
        Outbound::json(&grant(user_id, "g-target", TARGET)),
        Outbound::json(&grant(user_id, "g-after", AFTER)),
    ];
    harness.publish_all(&batch).await;
    // A barrier alone is not enough: it can share the batch and overtake
    // the failing grant once that is returned to the queue.
    wait_ledger_row(harness, "g-target").await;
    harness.barrier(user_id).await;

    for message_id in ["g-before", "g-target", "g-after"] {
        assert_eq!(
            ledger_rows_of(harness, message_id).await,
            1,
            "ledger rows of {message_id}"
        );
    }
    assert_eq!(
        harness.ledger_rows(user_id, "grant").await,
        4,
        "grant rows of the user"
    );
    let account = harness.account(user_id).await;
    assert_eq!(account.balance, BASE_GRANT + BATCH_TOTAL);
    assert_eq!(account.reserved, 0);
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");

    harness.fault_attempts("g-target").await
}

/// Four failures in a row with a delivery limit of 1: a worker that
/// returned the message to its queue instead of retrying in place would
/// see it dead-lettered after two deliveries of two attempts each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failure_retries_in_place() {
    const FAILURES: i64 = 4;

    let harness = Harness::start("effretry", |settings| {
        settings.topology.delivery_limit = 1;
    })
    .await;

    let attempts =
        grant_batch_with_failure(&harness, "u-retry", SERIALIZATION_FAILURE, FAILURES).await;
    assert_eq!(
        attempts,
        FAILURES + 1,
        "insert attempts of the failing grant"
    );

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_failure_applies_per_message() {
    let harness = Harness::start("efffinal", |_| {}).await;

    let attempts = grant_batch_with_failure(&harness, "u-final", RAISE_EXCEPTION, 1).await;
    // One failed batch, then the message in a transaction of its own.
    assert_eq!(attempts, 2, "insert attempts of the failing grant");

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_failure_retries_alone() {
    let harness = Harness::start("effrequeue", |_| {}).await;

    let attempts = grant_batch_with_failure(&harness, "u-requeue", RAISE_EXCEPTION, 2).await;
    // The batch and the first transaction of its own fail, and the
    // retry in place applies it.
    assert_eq!(attempts, 3, "insert attempts of the failing grant");

    harness.finish().await;
}

/// The failure comes after the whole effect of a start (hold, account,
/// outbox) when its processed-message row is inserted, so the rollback
/// must take the hold and the reply back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_replies_once() {
    const USER: &str = "u-start-fail";
    const STREAM: &str = "s-start-fail";

    let harness = Harness::start("effstart", |_| {}).await;
    harness
        .install_fault("processed_messages", "message_id")
        .await;
    harness.fund(USER, "g-base", BASE_GRANT).await;
    harness
        .plan_failures("m-start", RAISE_EXCEPTION, Some(2))
        .await;

    let started = start(
        USER,
        STREAM,
        "m-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let batch = [
        Outbound::json(&grant(USER, "g-before", BEFORE)),
        Outbound::request(&started, "c-start"),
        Outbound::json(&grant(USER, "g-after", AFTER)),
    ];
    harness.publish_all(&batch).await;
    let reply = harness.reply("c-start").await;
    harness.barrier(USER).await;

    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_eq!(reply["reserved"], RESERVED, "{reply}");
    let replies = harness.replies("c-start", 1).await;
    assert_eq!(replies.len(), 1, "replies to the start: {replies:?}");
    let granted = harness.events("reservation.granted", STREAM);
    assert_eq!(granted.len(), 1, "granted events: {granted:?}");
    assert_eq!(granted[0]["event_id"], reply["event_id"]);
    assert_eq!(
        harness.fault_attempts("m-start").await,
        3,
        "processed-row inserts of the start"
    );

    let hold_count: i64 = sqlx::query_scalar("SELECT count(*) FROM holds WHERE user_id = $1")
        .bind(USER)
        .fetch_one(&harness.pool)
        .await
        .expect("count holds");
    assert_eq!(hold_count, 1, "holds of the user");
    let outbox: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'reservation.granted' \
         AND destination = 'reply'",
    )
    .fetch_one(&harness.pool)
    .await
    .expect("count stored replies");
    assert_eq!(outbox, 1, "stored grant replies");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BASE_GRANT + BEFORE + AFTER);
    assert_eq!(account.reserved, RESERVED);
    assert_eq!(account.available, BASE_GRANT + BEFORE + AFTER - RESERVED);
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");

    harness.finish().await;
}

/// Publishes a chunk whose effect fails twice, together with a later chunk
/// and the stream's end. The end must not settle the stream before the
/// failed chunk is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_chunk_counts_before_end() {
    const USER: &str = "u-chunk-fail";
    const STREAM: &str = "s-chunk-fail";
    const FAILING_CHUNK: &str = "s-chunk-fail-c0";
    /// 10 prompt tokens plus 5 + 6 completion tokens at 2 credits.
    const COST: i64 = 32;

    let harness = Harness::start("effchunk", |_| {}).await;
    harness
        .install_fault("processed_messages", "message_id")
        .await;
    harness.fund(USER, "g-base", BASE_GRANT).await;
    let started = start(
        USER,
        STREAM,
        "m-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let reply = harness.request(&started, "c-start").await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    harness
        .plan_failures(FAILING_CHUNK, RAISE_EXCEPTION, Some(2))
        .await;

    let batch = [
        Outbound::json(&chunk(USER, STREAM, 0, "first", Some(5))),
        Outbound::json(&chunk(USER, STREAM, 1, "second", Some(6))),
        Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None)),
    ];
    harness.publish_all(&batch).await;
    let settled = harness.event("reservation.settled", STREAM).await;
    harness.barrier(USER).await;

    assert_eq!(settled["counted_completion_tokens"], 11, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    assert_eq!(
        harness.fault_attempts(FAILING_CHUNK).await,
        3,
        "processed-row inserts of the failing chunk"
    );
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    let account = harness.account(USER).await;
    assert_eq!(account.balance, BASE_GRANT - COST);

    harness.finish().await;
}
