//! `dlq replay --all` republishes the letters in the order they were
//! dead-lettered. A stream whose chunks and end all came before its start
//! is dead-lettered whole as `unknown_stream`. Once the start is applied,
//! the replay applies every chunk before the end, so the stream is charged
//! its exact usage. Letters of the broker's delivery limit, which carry
//! their time in whole seconds, keep the queue's order however often the
//! commands read them.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, broker_dead_letter, chunk, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-replay-order";
const STREAM: &str = "s-replay-order";
const CHUNKS: u64 = 12;

/// Round-price usage: 10 prompt tokens + 2 * 12 counted tokens.
const COST: i64 = 34;

/// Letters the broker dead-lettered in one second, as `broker_dead_letter`
/// dates them.
const BROKER_LETTERS: usize = 60;

/// Readings of the dead-letter queue, each of which returns the letters.
const LISTINGS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_keeps_dead_letter_order() {
    let harness = Harness::start("replayorder", |_| {}).await;
    harness.fund(USER, "g-1", 1000).await;

    let mut early: Vec<Outbound> = (0..CHUNKS)
        .map(|seq| Outbound::json(&chunk(USER, STREAM, seq, "words", Some(1))))
        .collect();
    early.push(Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None)));
    harness.publish_all(&early).await;
    harness.barrier(USER).await;
    harness.wait_dead_letter_count(early.len() as u32).await;

    let reply = harness
        .request(&start(USER, STREAM, "m-start", ROUND_MODEL, 10, 50), "c-start")
        .await;
    assert!(reply["reserved"].is_i64(), "the start was not granted: {reply}");

    let output = harness.run_cli(&["dlq", "replay", "--all"]).await;
    assert!(
        output.status.success(),
        "dlq replay --all exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );

    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["counted_completion_tokens"], CHUNKS, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    harness.barrier(USER).await;
    assert_eq!(harness.dead_letter_count().await, 0, "letters left after the replay");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_keeps_broker_letter_order() {
    let harness = Harness::start("listorder", |_| {}).await;
    for index in 0..BROKER_LETTERS {
        let message_id = format!("m-limit-{index}");
        let body = format!(r#"{{"type":"chunk.emitted","message_id":"{message_id}"}}"#);
        let letter = broker_dead_letter(USER, &message_id, body.as_bytes());
        harness.publish_dead_letter_copy(&letter).await;
    }
    harness.wait_dead_letter_count(BROKER_LETTERS as u32).await;

    let expected: Vec<String> = (0..BROKER_LETTERS).map(|index| format!("m-limit-{index}")).collect();
    for listing in 0..LISTINGS {
        let output = harness.run_cli(&["dlq", "list", "--json"]).await;
        assert!(output.status.success(), "dlq list failed: {}", String::from_utf8_lossy(&output.stderr));
        let listed: Vec<Value> = serde_json::from_slice(&output.stdout).expect("a JSON array");
        let ids: Vec<String> = listed
            .iter()
            .map(|letter| letter["message_id"].as_str().expect("a message id").to_owned())
            .collect();
        assert_eq!(ids, expected, "listing {listing} is out of dead-letter order");
        harness.wait_dead_letter_count(BROKER_LETTERS as u32).await;
    }
    harness.finish().await;
}
