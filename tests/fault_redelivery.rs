//! A message redelivered after its effect committed, but before the
//! broker saw the acknowledgement, is applied once. The redelivery is
//! simulated by publishing the same body again once the first copy was
//! applied, with the AMQP `message_id` property repeated, missing, or
//! naming another message: only the body's `message_id` is the key.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, grant, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-redeliver";
const STREAM: &str = "s-redeliver";

const FIRST_GRANT: i64 = 10_000;
/// A second grant whose AMQP `message_id` property repeats the first
/// grant's id, while its body carries an id of its own.
const SECOND_GRANT: i64 = 500;
const GRANTED: i64 = FIRST_GRANT + SECOND_GRANT;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Token counts the producer states for the two chunks.
const CHUNK_TOKENS: [u64; 2] = [5, 6];
const COMPLETION_TOKENS: i64 = 11;

/// 10 prompt tokens at 1 credit plus 11 completion tokens at 2 credits.
const COST: i64 = 32;

/// Returns the copies that stand in for redeliveries of `original`: the
/// AMQP `message_id` property repeated, left out, and naming another
/// message.
fn redeliveries(original: &Outbound) -> [Outbound; 3] {
    [
        original.clone(),
        Outbound {
            message_id: None,
            ..original.clone()
        },
        Outbound {
            message_id: Some("some-other-message".to_owned()),
            ..original.clone()
        },
    ]
}

/// Counts the processed-message rows of `message_id`.
async fn processed_rows(harness: &Harness, message_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM processed_messages WHERE user_id = $1 AND message_id = $2",
    )
    .bind(USER)
    .bind(message_id)
    .fetch_one(&harness.pool)
    .await
    .expect("count processed messages")
}

/// Counts the user's holds.
async fn hold_count(harness: &Harness) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM holds WHERE user_id = $1")
        .bind(USER)
        .fetch_one(&harness.pool)
        .await
        .expect("count holds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_applies_once() {
    let harness = Harness::start("redeliver", |_| {}).await;

    // Grant: the original, then its redeliveries in a later batch.
    let first_grant = Outbound::json(&grant(USER, "g-1", FIRST_GRANT));
    harness.publish_all(std::slice::from_ref(&first_grant)).await;
    harness.barrier(USER).await;
    harness.publish_all(&redeliveries(&first_grant)).await;
    harness.barrier(USER).await;
    assert_eq!(harness.account(USER).await.balance, FIRST_GRANT);
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        1,
        "grant rows after redelivered grants"
    );

    // A new body id is a new message even when the property repeats an
    // id that was applied before.
    let second_grant = Outbound {
        message_id: Some("g-1".to_owned()),
        ..Outbound::json(&grant(USER, "g-2", SECOND_GRANT))
    };
    harness.publish_all(&[second_grant]).await;
    harness.barrier(USER).await;
    assert_eq!(harness.account(USER).await.balance, GRANTED);
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        2,
        "grant rows after a new body id with a repeated property"
    );

    // Start: every redelivery gets the first reply again and reserves
    // nothing more.
    let started = start(
        USER,
        STREAM,
        "m-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let first_reply = harness.request(&started, "c-first").await;
    assert_eq!(first_reply["type"], "reservation.granted", "{first_reply}");
    assert_eq!(first_reply["reserved"], RESERVED, "{first_reply}");
    assert_eq!(
        first_reply["available_after"],
        GRANTED - RESERVED,
        "{first_reply}"
    );
    let correlation_ids = ["c-same-property", "c-no-property", "c-other-property"];
    let copies = redeliveries(&Outbound::json(&started));
    let requests: Vec<Outbound> = copies
        .iter()
        .zip(correlation_ids)
        .map(|(copy, correlation_id)| Outbound {
            correlation_id: Some(correlation_id.to_owned()),
            ..copy.clone()
        })
        .collect();
    harness.publish_all(&requests).await;
    for correlation_id in correlation_ids {
        let reply = harness.reply(correlation_id).await;
        assert_eq!(
            reply, first_reply,
            "reply to the redelivered start {correlation_id}"
        );
    }
    harness.barrier(USER).await;
    let account = harness.account(USER).await;
    assert_eq!(account.reserved, RESERVED);
    assert_eq!(account.available, GRANTED - RESERVED);
    assert_eq!(
        hold_count(&harness).await,
        1,
        "holds after redelivered starts"
    );
    let granted_events = harness.events("reservation.granted", STREAM);
    assert_eq!(
        granted_events.len(),
        1,
        "granted events: {granted_events:?}"
    );

    // Chunks: each counted once.
    for (seq, tokens) in CHUNK_TOKENS.into_iter().enumerate() {
        let body = chunk(USER, STREAM, seq as u64, "text", Some(tokens));
        let original = Outbound::json(&body);
        harness.publish_all(std::slice::from_ref(&original)).await;
        harness.barrier(USER).await;
        harness.publish_all(&redeliveries(&original)).await;
    }
    harness.barrier(USER).await;
    assert_eq!(
        harness.hold_counts(USER, STREAM).await,
        (COMPLETION_TOKENS, CHUNK_TOKENS.len() as i64),
        "counted completion tokens and chunks after redelivered chunks"
    );

    // End: settled once.
    let ended = Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None));
    harness.publish_all(std::slice::from_ref(&ended)).await;
    let settled = harness.event("reservation.settled", STREAM).await;
    harness.publish_all(&redeliveries(&ended)).await;
    harness.barrier(USER).await;
    assert_eq!(settled["status"], "completed", "{settled}");
    assert_eq!(
        settled["counted_completion_tokens"], COMPLETION_TOKENS,
        "{settled}"
    );
    assert_eq!(settled["cost"], COST, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    assert_eq!(settled["refunded"], RESERVED - COST, "{settled}");
    assert_eq!(settled["balance_after"], GRANTED - COST, "{settled}");
    let settled_events: Vec<Value> = harness.events("reservation.settled", STREAM);
    assert_eq!(
        settled_events.len(),
        1,
        "settled events: {settled_events:?}"
    );
    assert_eq!(
        harness.ledger_rows(USER, "charge").await,
        1,
        "charge rows after redelivered ends"
    );

    for message_id in [
        "g-1",
        "g-2",
        "m-start",
        "s-redeliver-c0",
        "s-redeliver-c1",
        "m-end",
    ] {
        assert_eq!(
            processed_rows(&harness, message_id).await,
            1,
            "processed rows of {message_id}"
        );
    }
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, GRANTED - COST);
    assert_eq!(account.reserved, 0);
    assert_eq!(account.available, GRANTED - COST);

    harness.finish().await;
}
