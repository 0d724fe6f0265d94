//! Chunks and ends of a denied stream charge nothing and are
//! dead-lettered as `unknown_stream`.

mod common;

use common::{Harness, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-denied";
const STREAM: &str = "s-denied";
const BALANCE: i64 = 100;

/// On the round-price model the hold would be 100 + 2 * 100 = 300.
const REQUESTED: i64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_stream_charges_nothing() {
    let harness = Harness::start("denied", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    let reply = harness
        .request(
            &start(USER, STREAM, "m-start", ROUND_MODEL, 100, 100),
            "c-start",
        )
        .await;
    assert_eq!(reply["type"], "reservation.denied", "{reply}");
    assert_eq!(reply["requested"], REQUESTED, "{reply}");
    assert_eq!(reply["available"], BALANCE, "{reply}");

    let chunk_body = chunk(USER, STREAM, 0, "Hello", None);
    let end_body = end(USER, STREAM, "m-end", EndStatus::Completed, Some((100, 40)));
    harness.publish(&chunk_body).await;
    harness.publish(&end_body).await;
    harness.barrier(USER).await;

    let letters = harness.take_dead_letters().await;
    assert_eq!(letters.len(), 2, "dead letters: {letters:?}");
    for expected_id in [format!("{STREAM}-c0"), "m-end".to_owned()] {
        let letter = letters
            .iter()
            .find(|letter| letter.message_id.as_deref() == Some(expected_id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for {expected_id}: {letters:?}"));
        assert_eq!(
            letter.error.as_deref(),
            Some("unknown_stream"),
            "{expected_id}"
        );
        assert_eq!(letter.routing_key.as_deref(), Some(USER), "{expected_id}");
        assert!(
            letter.dead_letter_id.is_some(),
            "{expected_id} has no dead-letter id"
        );
    }
    let chunk_letter = letters
        .iter()
        .find(|letter| letter.message_id.as_deref() == Some("s-denied-c0"))
        .expect("chunk dead letter");
    assert_eq!(
        chunk_letter.body,
        serde_json::to_vec(&chunk_body).expect("JSON values serialize"),
        "a dead letter keeps the original body"
    );

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE);
    assert_eq!(account.reserved, 0);
    assert_eq!(
        harness.ledger_rows(USER, "charge").await,
        0,
        "charge ledger rows"
    );
    assert!(harness.events("reservation.settled", STREAM).is_empty());

    harness.finish().await;
}
