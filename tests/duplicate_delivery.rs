//! Every inbound message delivered twice with the same `message_id` is
//! applied once.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, grant, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-twice";
const STREAM: &str = "s-twice";
const GRANTED: i64 = 10_000;

/// On the round-price model the hold is 10 + 2 * 100 = 210 credits.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Token counts the producer states for the three chunks.
const CHUNK_TOKENS: [u64; 3] = [5, 6, 7];
const COMPLETION_TOKENS: u64 = 18;

/// 10 prompt tokens at 1 credit plus 18 completion tokens at 2 credits.
const COST: i64 = 46;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_apply_once() {
    let harness = Harness::start("twice", |_| {}).await;

    let top_up = grant(USER, "g-1", GRANTED);
    harness
        .publish_all(&[Outbound::json(&top_up), Outbound::json(&top_up)])
        .await;
    harness.barrier(USER).await;
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        1,
        "grant ledger rows"
    );
    assert_eq!(harness.account(USER).await.balance, GRANTED);

    // The second start is published after the first reply, so the two
    // deliveries are applied in separate transactions.
    let started = start(
        USER,
        STREAM,
        "m-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let first = harness.request(&started, "c-first").await;
    let second = harness.request(&started, "c-second").await;
    assert_eq!(first["type"], "reservation.granted", "{first}");
    assert_eq!(first["reserved"], RESERVED, "{first}");
    assert_eq!(second["event_id"], first["event_id"]);
    assert_eq!(second["reservation_id"], first["reservation_id"]);
    assert_eq!(
        second, first,
        "the duplicate start gets the same reply body"
    );
    assert_eq!(harness.account(USER).await.reserved, RESERVED);

    let mut deliveries = Vec::new();
    for (seq, tokens) in CHUNK_TOKENS.into_iter().enumerate() {
        let body = chunk(USER, STREAM, seq as u64, "text", Some(tokens));
        deliveries.push(Outbound::json(&body));
        deliveries.push(Outbound::json(&body));
    }
    let ended = end(USER, STREAM, "m-end", EndStatus::Completed, None);
    deliveries.push(Outbound::json(&ended));
    deliveries.push(Outbound::json(&ended));
    harness.publish_all(&deliveries).await;

    let settled = harness.event("reservation.settled", STREAM).await;
    harness.barrier(USER).await;
    assert_eq!(
        settled["counted_completion_tokens"], COMPLETION_TOKENS,
        "{settled}"
    );
    assert_eq!(settled["completion_tokens"], COMPLETION_TOKENS, "{settled}");
    assert_eq!(settled["cost"], COST, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    assert_eq!(settled["refunded"], RESERVED - COST, "{settled}");
    assert_eq!(settled["balance_after"], GRANTED - COST, "{settled}");
    assert_eq!(
        harness.events("reservation.settled", STREAM).len(),
        1,
        "settled events for the stream"
    );
    assert_eq!(
        harness.ledger_rows(USER, "charge").await,
        1,
        "charge ledger rows"
    );

    let counted = harness.hold_counts(USER, STREAM).await.0;
    assert_eq!(counted, COMPLETION_TOKENS as i64);

    // A chunk after settlement is dropped: not counted, not dead-lettered.
    let late_seq = CHUNK_TOKENS.len() as u64;
    harness
        .publish(&chunk(USER, STREAM, late_seq, "late", Some(50)))
        .await;
    harness.barrier(USER).await;
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");

    let counted = harness.hold_counts(USER, STREAM).await.0;
    assert_eq!(
        counted, COMPLETION_TOKENS as i64,
        "counted tokens after a late chunk"
    );

    let account = harness.account(USER).await;
    assert_eq!(account.balance, GRANTED - COST);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}
