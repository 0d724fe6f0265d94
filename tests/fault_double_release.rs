//! Expiry racing a cancellation: each stream's `stream.ended` is published
//! around the moment its hold becomes eligible for the expiry sweep. Either
//! the end settles the hold, or the sweep expires it and the end adjusts
//! the charge. Both never settle it: each hold has one charge entry and one
//! `reservation.settled` event, and a lost race adds exactly one
//! `reservation.adjusted` event and one adjustment entry.

mod common;

use std::time::Duration;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use futures_util::future::join_all;
use stream_credits::messages::EndStatus;

const USER: &str = "u-race";
const STREAMS: usize = 20;
const BALANCE: i64 = 10_000;
const TTL_SECONDS: u64 = 1;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// One 5-token chunk per stream, so expiry charges 10 + 2 * 5 = 20.
const CHUNK_TOKENS: u64 = 5;
const EXPIRY_CHARGE: i64 = 20;

/// The cancellation carries provider usage: 10 + 2 * 8 = 26.
const END_USAGE: (u64, u64) = (10, 8);
const END_CHARGE: i64 = 26;

/// Pause between two streams' starts, so their holds become eligible at
/// different points of the sweep's 1 s cycle.
const START_SPACING: Duration = Duration::from_millis(50);

/// Delay from a stream's grant to its end: from 0.7 s, before any hold
/// can expire, to 2.125 s, after the first sweep that can expire it, in
/// 75 ms steps, spread over the streams in a scrambled order.
fn end_delay(index: usize) -> Duration {
    let step = (index * 7) % STREAMS;
    Duration::from_millis(700 + 75 * step as u64)
}

/// Makes each expiry charge take 100 ms longer. The sweep locks every hold
/// it selects until it commits, so an end that arrives meanwhile waits for
/// the hold's row lock and then finds it expired. So the test runs the
/// race itself, not only its two outcomes.
const SLOW_EXPIRY: &str = "
CREATE FUNCTION test_slow_expiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.1);
    RETURN NEW;
END
$$;
CREATE TRIGGER test_slow_expiry BEFORE INSERT ON ledger FOR EACH ROW
    WHEN (NEW.kind = 'charge' AND NEW.reason = 'expired')
    EXECUTE FUNCTION test_slow_expiry();
";

fn stream_id(index: usize) -> String {
    format!("s-race-{index:02}")
}

/// Starts stream `index`, sends one chunk and cancels it after
/// [`end_delay`].
async fn run_stream(harness: &Harness, index: usize) {
    let stream = stream_id(index);
    tokio::time::sleep(START_SPACING * index as u32).await;
    let started = start(
        USER,
        &stream,
        &format!("{stream}-start"),
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let first_chunk = chunk(USER, &stream, 0, "words", Some(CHUNK_TOKENS));
    harness
        .publish_all(&[
            Outbound::request(&started, &stream),
            Outbound::json(&first_chunk),
        ])
        .await;
    let reply = harness.reply(&stream).await;
    assert_eq!(reply["type"], "reservation.granted", "{stream}: {reply}");
    assert_eq!(reply["reserved"], RESERVED, "{stream}: {reply}");

    tokio::time::sleep(end_delay(index)).await;
    let cancelled = end(
        USER,
        &stream,
        &format!("{stream}-end"),
        EndStatus::Cancelled,
        Some(END_USAGE),
    );
    harness.publish(&cancelled).await;
}

/// Reads, for one stream, its hold's status, charge, charge entries and
/// adjustment amounts.
async fn hold_record(harness: &Harness, stream: &str) -> (String, i64, i64, Vec<i64>) {
    sqlx::query_as(
        "SELECT h.settle_status, h.charged, \
         (SELECT count(*) FROM ledger l WHERE l.reservation_id = h.reservation_id \
          AND l.kind = 'charge'), \
         ARRAY(SELECT l.amount FROM ledger l WHERE l.reservation_id = h.reservation_id \
          AND l.kind = 'adjustment') \
         FROM holds h WHERE h.user_id = $1 AND h.stream_id = $2",
    )
    .bind(USER)
    .bind(stream)
    .fetch_one(&harness.pool)
    .await
    .expect("read the hold")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_cancel_settle_once() {
    let harness = Harness::start("race", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
        settings.reservations.max_active_per_user = STREAMS as u32;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;
    sqlx::raw_sql(SLOW_EXPIRY)
        .execute(&harness.pool)
        .await
        .expect("slow down expiry charges");

    join_all((0..STREAMS).map(|index| run_stream(&harness, index))).await;
    harness.barrier(USER).await;

    let mut expired_first = 0;
    let mut cancelled_first = 0;
    for index in 0..STREAMS {
        let stream = stream_id(index);
        let settled = harness.event("reservation.settled", &stream).await;
        let (status, charged, charge_rows, adjustments) = hold_record(&harness, &stream).await;
        assert_eq!(charge_rows, 1, "{stream}: charge entries");
        assert_eq!(charged, END_CHARGE, "{stream}: charged in the end");
        assert_eq!(settled["status"], status, "{stream}: {settled}");
        assert_eq!(settled["reserved"], RESERVED, "{stream}: {settled}");

        match status.as_str() {
            "expired" => {
                expired_first += 1;
                assert_eq!(settled["charged"], EXPIRY_CHARGE, "{stream}: {settled}");
                assert_eq!(
                    settled["refunded"],
                    RESERVED - EXPIRY_CHARGE,
                    "{stream}: {settled}"
                );
                let adjusted = harness.event("reservation.adjusted", &stream).await;
                assert_eq!(adjusted["status"], "cancelled", "{stream}: {adjusted}");
                assert_eq!(
                    adjusted["previously_charged"], EXPIRY_CHARGE,
                    "{stream}: {adjusted}"
                );
                assert_eq!(adjusted["charged"], END_CHARGE, "{stream}: {adjusted}");
                assert_eq!(
                    adjusted["difference"],
                    END_CHARGE - EXPIRY_CHARGE,
                    "{stream}: {adjusted}"
                );
                assert_eq!(
                    adjustments,
                    [-(END_CHARGE - EXPIRY_CHARGE)],
                    "{stream}: adjustment entries"
                );
            }
            "cancelled" => {
                cancelled_first += 1;
                assert_eq!(settled["charged"], END_CHARGE, "{stream}: {settled}");
                assert_eq!(
                    settled["refunded"],
                    RESERVED - END_CHARGE,
                    "{stream}: {settled}"
                );
                assert!(
                    adjustments.is_empty(),
                    "{stream}: adjustments {adjustments:?}"
                );
            }
            other => panic!("{stream}: unexpected settle status {other}"),
        }
    }

    // Every event the ends caused was published before the barrier's
    // reply; one more barrier gives the collector time to see a repeat.
    harness.barrier(USER).await;
    for index in 0..STREAMS {
        let stream = stream_id(index);
        let settled = harness.events("reservation.settled", &stream);
        assert_eq!(settled.len(), 1, "{stream}: settled events {settled:?}");
        let adjusted = harness.events("reservation.adjusted", &stream);
        let expected = usize::from(settled[0]["status"] == "expired");
        assert_eq!(
            adjusted.len(),
            expected,
            "{stream}: adjusted events {adjusted:?}"
        );
    }
    eprintln!("{expired_first} holds expired before their end, {cancelled_first} were cancelled");
    assert!(
        expired_first > 0,
        "no end lost the race; the latest end comes {:?} after its grant",
        end_delay(STREAMS - 1)
    );
    assert!(cancelled_first > 0, "every hold expired before its end");

    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - END_CHARGE * STREAMS as i64);
    assert_eq!(account.reserved, 0);
    assert_eq!(
        harness.ledger_rows(USER, "charge").await,
        STREAMS as i64,
        "charge entries of the user"
    );
    assert_eq!(
        harness.ledger_rows(USER, "adjustment").await,
        expired_first,
        "adjustment entries of the user"
    );

    harness.finish().await;
}
