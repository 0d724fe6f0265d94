//! With hold growth off, `usage.over_reservation` is sent once, when the
//! counted usage first costs more than the hold. tests/growing_holds.rs
//! covers the signal of a hold that cannot grow.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-over";
const STREAM: &str = "s-over";
const BALANCE: i64 = 1000;

/// Round-price hold: 10 prompt tokens + 2 * 20 output tokens = 50.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 20;
const RESERVED: i64 = 50;

/// Running cost after each chunk: 30, 50 (equal to the hold, not above),
/// 52 (first above), 62, 72.
const CHUNK_TOKENS: [u64; 5] = [10, 10, 1, 5, 5];
const FIRST_OVER_COST: i64 = 52;
const FIRST_OVER_TOKENS: u64 = 21;
const FINAL_COST: i64 = 72;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_reservation_sent_once() {
    let harness = Harness::start("overres", |settings| {
        settings.reservations.growth = false;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;

    let reply = harness
        .request(
            &start(
                USER,
                STREAM,
                "m-start",
                ROUND_MODEL,
                PROMPT_TOKENS,
                MAX_OUTPUT_TOKENS,
            ),
            "c-start",
        )
        .await;
    assert_eq!(reply["reserved"], RESERVED, "{reply}");

    let mut messages: Vec<Outbound> = CHUNK_TOKENS
        .into_iter()
        .enumerate()
        .map(|(seq, tokens)| Outbound::json(&chunk(USER, STREAM, seq as u64, "text", Some(tokens))))
        .collect();
    messages.push(Outbound::json(&end(
        USER,
        STREAM,
        "m-end",
        EndStatus::Completed,
        None,
    )));
    harness.publish_all(&messages).await;

    // The worker publishes one shard's events in order, so the signal of
    // an earlier chunk arrives before the settlement.
    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["cost"], FINAL_COST, "{settled}");
    assert_eq!(settled["overrun"], FINAL_COST - RESERVED, "{settled}");

    let signals = harness.events("usage.over_reservation", STREAM);
    assert_eq!(signals.len(), 1, "over-reservation events: {signals:?}");
    let signal = &signals[0];
    assert_eq!(
        signal["reservation_id"], reply["reservation_id"],
        "{signal}"
    );
    assert_eq!(signal["reserved"], RESERVED, "{signal}");
    assert_eq!(signal["cost_so_far"], FIRST_OVER_COST, "{signal}");
    assert_eq!(signal["prompt_tokens"], PROMPT_TOKENS, "{signal}");
    assert_eq!(
        signal["counted_completion_tokens"], FIRST_OVER_TOKENS,
        "{signal}"
    );

    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'usage.over_reservation'",
    )
    .fetch_one(&harness.pool)
    .await
    .expect("count stored signals");
    assert_eq!(stored, 1, "stored over-reservation events");

    harness.finish().await;
}
