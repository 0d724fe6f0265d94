//! A message whose application panics fails its batch's attempt, not the
//! worker: the batch's other messages are applied one by one, and the
//! message that panics is retried in place `topology.delivery_limit`
//! times and dead-lettered by the worker as `retries_exhausted`. The panic
//! here comes from a hold row whose encoding was changed behind the
//! worker's back, which the chunk's count then cannot find.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, grant, start};

const DELIVERY_LIMIT: u32 = 3;
const USER: &str = "u-panic";
const OTHER_USER: &str = "u-panic-other";
const STREAM: &str = "s-panic";
const BALANCE: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_message_is_dead_lettered() {
    let harness = Harness::start("faultpanic", |settings| {
        settings.topology.delivery_limit = DELIVERY_LIMIT;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;
    let reply = harness
        .request(&start(USER, STREAM, "m-start", ROUND_MODEL, 10, 100), STREAM)
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    sqlx::query("UPDATE holds SET encoding = 'no-such-encoding' WHERE stream_id = $1")
        .bind(STREAM)
        .execute(&harness.pool)
        .await
        .expect("change the hold's encoding");

    // The chunk has no token count, so counting it needs the encoding.
    harness
        .publish_all(&[
            Outbound::json(&chunk(USER, STREAM, 0, "some words", None)),
            Outbound::json(&grant(OTHER_USER, "g-other", 500)),
        ])
        .await;
    harness.wait_dead_letter_count(1).await;

    let letters = harness.take_dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].error.as_deref(), Some("retries_exhausted"), "{letters:?}");
    let detail = letters[0].detail.as_deref().unwrap_or_default();
    assert_eq!(detail, format!("applying panicked {DELIVERY_LIMIT} times in a row"));
    let body: serde_json::Value = serde_json::from_slice(&letters[0].body).expect("the body is JSON");
    assert_eq!(body["message_id"], format!("{STREAM}-c0"), "{body}");

    // The other user's grant, published with the chunk, was applied, and the
    // worker goes on applying messages.
    harness.barrier(OTHER_USER).await;
    assert_eq!(harness.account(OTHER_USER).await.balance, 500);
    harness.fund(USER, "g-2", 1).await;
    assert_eq!(harness.account(USER).await.balance, BALANCE + 1);
    harness.finish().await;
}
