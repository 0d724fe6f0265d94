//! Messages that arrive after a hold was settled. A `stream.ended` after
//! expiry settles the stream by the usual rules and charges or refunds the
//! difference to what expiry charged, once. Chunks after settlement, and a
//! second end after the adjustment, are dropped: counted in
//! `stream_credits_dropped_total`, not dead-lettered, no balance change.

mod common;

use common::{Harness, ROUND_MODEL, chunk, end, free_local_address, metric_value, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-late";
/// Its late end reports more usage than expiry counted.
const ABOVE: &str = "s-late-above";
/// Its late end reports less usage than expiry counted.
const BELOW: &str = "s-late-below";
const BALANCE: i64 = 10_000;
const TTL_SECONDS: u64 = 1;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Tokens stated by each stream's chunks, 12 in all, so expiry charges
/// 10 + 2 * 12 = 34.
const CHUNK_TOKENS: [u64; 3] = [3, 4, 5];
const EXPIRY_CHARGE: i64 = 34;

/// Late provider usage above the count: 10 + 2 * 40 = 90.
const ABOVE_USAGE: (u64, u64) = (10, 40);
const ABOVE_CHARGE: i64 = 90;

/// Late provider usage below the count: 10 + 2 * 2 = 14.
const BELOW_USAGE: (u64, u64) = (10, 2);
const BELOW_CHARGE: i64 = 14;

// One late end must charge more than expiry did and the other less.
const _: () = assert!(ABOVE_CHARGE > EXPIRY_CHARGE && BELOW_CHARGE < EXPIRY_CHARGE);

const FINAL_BALANCE: i64 = BALANCE - ABOVE_CHARGE - BELOW_CHARGE;

const CHUNKS_DROPPED: &str = r#"stream_credits_dropped_total{reason="chunk_after_settlement"}"#;
const ENDS_DROPPED: &str = r#"stream_credits_dropped_total{reason="end_after_settlement"}"#;

/// Reads the amounts of a stream's adjustment entries.
async fn adjustments(harness: &Harness, stream: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT l.amount FROM ledger l JOIN holds h USING (reservation_id) \
         WHERE h.user_id = $1 AND h.stream_id = $2 AND l.kind = 'adjustment'",
    )
    .bind(USER)
    .bind(stream)
    .fetch_all(&harness.pool)
    .await
    .expect("read adjustment entries")
}

/// Reads a drop counter. A counter never incremented is absent from the
/// page and reads as 0.
async fn dropped(harness: &Harness, series: &str) -> f64 {
    metric_value(&harness.metrics().await, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_adjust_or_drop() {
    let harness = Harness::start("late", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
        settings.http.listen = free_local_address();
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;

    for stream in [ABOVE, BELOW] {
        let body = start(
            USER,
            stream,
            &format!("{stream}-start"),
            ROUND_MODEL,
            PROMPT_TOKENS,
            MAX_OUTPUT_TOKENS,
        );
        let reply = harness.request(&body, stream).await;
        assert_eq!(reply["type"], "reservation.granted", "{reply}");
        assert_eq!(reply["reserved"], RESERVED, "{reply}");
        for (seq, tokens) in CHUNK_TOKENS.into_iter().enumerate() {
            harness
                .publish(&chunk(USER, stream, seq as u64, "words", Some(tokens)))
                .await;
        }
    }

    let mut expired: Vec<Value> = Vec::new();
    for stream in [ABOVE, BELOW] {
        let settled = harness.event("reservation.settled", stream).await;
        assert_eq!(settled["status"], "expired", "{stream}: {settled}");
        assert_eq!(
            settled["counted_completion_tokens"], 12,
            "{stream}: {settled}"
        );
        assert_eq!(settled["charged"], EXPIRY_CHARGE, "{stream}: {settled}");
        assert_eq!(
            settled["refunded"],
            RESERVED - EXPIRY_CHARGE,
            "{stream}: {settled}"
        );
        expired.push(settled);
    }
    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - 2 * EXPIRY_CHARGE);
    assert_eq!(account.reserved, 0);

    // Chunks after expiry are dropped and change nothing.
    let chunks_before = dropped(&harness, CHUNKS_DROPPED).await;
    for stream in [ABOVE, BELOW] {
        harness
            .publish(&chunk(USER, stream, 3, "late words", Some(50)))
            .await;
    }
    harness.barrier(USER).await;
    for stream in [ABOVE, BELOW] {
        assert_eq!(
            harness.hold_counts(USER, stream).await,
            (12, 3),
            "{stream}: counted tokens and chunks after a late chunk"
        );
    }
    assert_eq!(
        dropped(&harness, CHUNKS_DROPPED).await - chunks_before,
        2.0,
        "chunks dropped after expiry"
    );
    assert_eq!(
        harness.account(USER).await.balance,
        BALANCE - 2 * EXPIRY_CHARGE
    );

    // Late ends: one charges the difference, one refunds it.
    let cases = [
        (ABOVE, ABOVE_USAGE, ABOVE_CHARGE),
        (BELOW, BELOW_USAGE, BELOW_CHARGE),
    ];
    for (stream, usage, _) in cases {
        harness
            .publish(&end(
                USER,
                stream,
                &format!("{stream}-end"),
                EndStatus::Completed,
                Some(usage),
            ))
            .await;
    }
    let mut balance = BALANCE - 2 * EXPIRY_CHARGE;
    for ((stream, usage, charge), expired) in cases.into_iter().zip(&expired) {
        let adjusted = harness.event("reservation.adjusted", stream).await;
        let difference = charge - EXPIRY_CHARGE;
        balance -= difference;
        assert_eq!(
            adjusted["reservation_id"], expired["reservation_id"],
            "{stream}: {adjusted}"
        );
        assert_eq!(adjusted["status"], "completed", "{stream}: {adjusted}");
        assert_eq!(adjusted["usage_source"], "provider", "{stream}: {adjusted}");
        assert_eq!(adjusted["prompt_tokens"], usage.0, "{stream}: {adjusted}");
        assert_eq!(
            adjusted["completion_tokens"], usage.1,
            "{stream}: {adjusted}"
        );
        assert_eq!(
            adjusted["previously_charged"], EXPIRY_CHARGE,
            "{stream}: {adjusted}"
        );
        assert_eq!(adjusted["charged"], charge, "{stream}: {adjusted}");
        assert_eq!(adjusted["difference"], difference, "{stream}: {adjusted}");
        assert_eq!(adjusted["balance_after"], balance, "{stream}: {adjusted}");
        assert_eq!(
            adjustments(&harness, stream).await,
            [-difference],
            "{stream}: adjustment entries"
        );
    }
    assert_eq!(balance, FINAL_BALANCE);

    // After the adjustment a chunk and a second end are dropped too.
    let ends_before = dropped(&harness, ENDS_DROPPED).await;
    let chunks_before = dropped(&harness, CHUNKS_DROPPED).await;
    for stream in [ABOVE, BELOW] {
        harness
            .publish(&chunk(USER, stream, 4, "later words", Some(50)))
            .await;
        harness
            .publish(&end(
                USER,
                stream,
                &format!("{stream}-end-again"),
                EndStatus::Completed,
                Some((10, 90)),
            ))
            .await;
    }
    harness.barrier(USER).await;
    assert_eq!(
        dropped(&harness, CHUNKS_DROPPED).await - chunks_before,
        2.0,
        "chunks dropped after the adjustment"
    );
    assert_eq!(
        dropped(&harness, ENDS_DROPPED).await - ends_before,
        2.0,
        "ends dropped after the adjustment"
    );
    for stream in [ABOVE, BELOW] {
        assert_eq!(
            harness.hold_counts(USER, stream).await,
            (12, 3),
            "{stream}: counted tokens and chunks after the adjustment"
        );
        let adjusted = harness.events("reservation.adjusted", stream);
        assert_eq!(adjusted.len(), 1, "{stream}: adjusted events {adjusted:?}");
        let settled = harness.events("reservation.settled", stream);
        assert_eq!(settled.len(), 1, "{stream}: settled events {settled:?}");
    }

    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    assert_eq!(
        harness.ledger_rows(USER, "charge").await,
        2,
        "charge entries"
    );
    assert_eq!(
        harness.ledger_rows(USER, "adjustment").await,
        2,
        "adjustment entries"
    );
    let account = harness.account(USER).await;
    assert_eq!(account.balance, FINAL_BALANCE);
    assert_eq!(account.reserved, 0);
    assert_eq!(account.available, FINAL_BALANCE);

    harness.finish().await;
}
