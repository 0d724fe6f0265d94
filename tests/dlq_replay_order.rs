//! `dlq replay --all` republishes the letters in the order they were
//! dead-lettered. A stream whose chunks and end all came before its start
//! is dead-lettered whole as `unknown_stream`. Once the start is applied,
//! the replay applies every chunk before the end, so the stream is charged
//! its exact usage.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-replay-order";
const STREAM: &str = "s-replay-order";
const CHUNKS: u64 = 12;

/// Round-price usage: 10 prompt tokens + 2 * 12 counted tokens.
const COST: i64 = 34;

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
