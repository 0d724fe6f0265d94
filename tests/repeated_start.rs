//! A new `message_id` for a stream with an open hold reuses the grant,
//! one for a denied stream is decided again, and one for a settled stream
//! is answered `invalid_request`, as is a start that reuses a grant's
//! `message_id`.

mod common;

use common::{DeadLetter, Harness, Outbound, ROUND_MODEL, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

/// Round-price hold of the held stream: 10 + 2 * 100 = 210.
const HELD_RESERVED: i64 = 210;

/// Round-price hold of the denied stream: 100 + 2 * 100 = 300.
const DENIED_REQUESTED: i64 = 300;

/// Counts the holds of `user`, open or settled.
async fn hold_count(harness: &Harness, user: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM holds WHERE user_id = $1")
        .bind(user)
        .fetch_one(&harness.pool)
        .await
        .expect("count holds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_stream_reuses_grant() {
    let harness = Harness::start("reuse", |_| {}).await;
    let user = "u-held";
    harness.fund(user, "g-1", 1000).await;

    let first = harness
        .request(&start(user, "s-1", "m-1", ROUND_MODEL, 10, 100), "c-1")
        .await;
    assert_eq!(first["type"], "reservation.granted", "{first}");
    assert_eq!(first["reserved"], HELD_RESERVED, "{first}");

    let again = harness
        .request(&start(user, "s-1", "m-2", ROUND_MODEL, 10, 100), "c-2")
        .await;
    assert_eq!(again["reservation_id"], first["reservation_id"]);
    assert_eq!(again["event_id"], first["event_id"]);
    assert_eq!(again, first, "the new message id gets the stored grant");

    let account = harness.account(user).await;
    assert_eq!(account.reserved, HELD_RESERVED);
    assert_eq!(account.available, 1000 - HELD_RESERVED);
    assert_eq!(hold_count(&harness, user).await, 1);

    harness.finish().await;
}

/// Both starts reach the worker in one batch. The first requests no
/// reply, so the shard waits for more deliveries, and the second requests
/// one and ends the wait. The batch found no hold for the stream when it
/// began; the second start must still find the hold the first placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_start_in_one_batch_reuses_grant() {
    let harness = Harness::start("reusebatch", |settings| {
        settings.worker.batch_linger_ms = 1_000;
    })
    .await;
    let user = "u-batch";
    harness.fund(user, "g-1", 1000).await;

    harness
        .publish_all(&[
            Outbound::json(&start(user, "s-1", "m-1", ROUND_MODEL, 10, 100)),
            Outbound::request(&start(user, "s-1", "m-2", ROUND_MODEL, 10, 100), "c-2"),
        ])
        .await;
    let again = harness.reply("c-2").await;
    let granted = harness.event("reservation.granted", "s-1").await;
    assert_eq!(again, granted, "the second start gets the first one's grant");

    // now() is the same for every statement of one transaction.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT processed_at) FROM processed_messages \
         WHERE user_id = $1 AND message_id IN ('m-1', 'm-2')",
    )
    .bind(user)
    .fetch_one(&harness.pool)
    .await
    .expect("read processed messages");
    assert_eq!(transactions, 1, "both starts were applied in one transaction");
    let account = harness.account(user).await;
    assert_eq!(account.reserved, HELD_RESERVED);
    assert_eq!(hold_count(&harness, user).await, 1);
    assert_eq!(harness.events("reservation.granted", "s-1").len(), 1);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_stream_granted_after_top_up() {
    let harness = Harness::start("retry", |_| {}).await;
    let user = "u-topup";
    harness.fund(user, "g-1", 100).await;

    let denied = harness
        .request(&start(user, "s-1", "m-1", ROUND_MODEL, 100, 100), "c-1")
        .await;
    assert_eq!(denied["type"], "reservation.denied", "{denied}");
    assert_eq!(denied["requested"], DENIED_REQUESTED, "{denied}");
    assert_eq!(denied["available"], 100, "{denied}");

    harness.fund(user, "g-2", 500).await;
    let granted = harness
        .request(&start(user, "s-1", "m-2", ROUND_MODEL, 100, 100), "c-2")
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");
    assert_eq!(granted["stream_id"], "s-1", "{granted}");
    assert_eq!(granted["reserved"], DENIED_REQUESTED, "{granted}");
    assert_eq!(
        granted["available_after"],
        600 - DENIED_REQUESTED,
        "{granted}"
    );

    let account = harness.account(user).await;
    assert_eq!(account.balance, 600);
    assert_eq!(account.reserved, DENIED_REQUESTED);

    harness.finish().await;
}

/// Checks that a start of stream `s-1` got an `invalid_request` denial
/// whose detail contains `detail` and was the one message dead-lettered,
/// as `invalid_field`, and returns its dead letter.
async fn check_rejected_start(harness: &Harness, reply: &Value, detail: &str) -> DeadLetter {
    assert_eq!(reply["type"], "reservation.denied", "{reply}");
    assert_eq!(reply["reason"], "invalid_request", "{reply}");
    assert_eq!(reply["stream_id"], "s-1", "{reply}");
    let stated = reply["detail"].as_str().unwrap_or_default();
    assert!(stated.contains(detail), "{reply}");

    let mut letters = harness.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error.as_deref(), Some("invalid_field"));
    letters.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_stream_start_is_answered() {
    let harness = Harness::start("resettled", |_| {}).await;
    let user = "u-settled";
    harness.fund(user, "g-1", 1000).await;

    let granted = harness
        .request(&start(user, "s-1", "m-1", ROUND_MODEL, 10, 100), "c-1")
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");
    harness
        .publish(&end(user, "s-1", "m-end", EndStatus::Completed, Some((10, 20))))
        .await;
    harness.event("reservation.settled", "s-1").await;

    let again = harness
        .request(&start(user, "s-1", "m-2", ROUND_MODEL, 10, 100), "c-2")
        .await;
    check_rejected_start(&harness, &again, "already settled").await;
    let account = harness.account(user).await;
    assert_eq!(account.reserved, 0, "the second start holds nothing");

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_a_grants_id_is_answered() {
    let harness = Harness::start("reusedid", |_| {}).await;
    let user = "u-reused-id";
    harness.fund(user, "shared-id", 1000).await;

    let reply = harness
        .request(&start(user, "s-1", "shared-id", ROUND_MODEL, 10, 100), "c-1")
        .await;
    let letter = check_rejected_start(&harness, &reply, "credits.granted").await;
    assert_eq!(letter.message_id.as_deref(), Some("shared-id"));
    let account = harness.account(user).await;
    assert_eq!(account.balance, 1000, "the grant was applied once");
    assert_eq!(account.reserved, 0, "the start holds nothing");
    assert_eq!(hold_count(&harness, user).await, 0);

    harness.finish().await;
}
