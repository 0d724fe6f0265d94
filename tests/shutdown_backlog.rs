//! Shutdown while the shard queues hold more than the worker's prefetch.
//! A stopping worker acknowledges what it applied and returns the rest to
//! the queue in publishing order, so the next worker applies every chunk
//! before its stream's end and each stream is charged its exact usage.
//! Each stop also waits for the broker to confirm the events it sent.

mod common;

use std::time::Duration;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

const USERS: usize = 80;
const STREAMS_PER_USER: usize = 4;

/// Streams of each user started before the backlog. The others start in
/// the backlog, so that stops come while grants, which the broker confirms
/// on reply queues, and settlement events are being sent together.
const STARTED_BEFORE: usize = 3;
const CHUNKS_PER_STREAM: u64 = 10;

/// Round-price usage of a stream: 10 prompt tokens + 2 * 10 counted tokens.
const COST: i64 = 30;

const FUNDS: i64 = 10_000;

/// Times that workers apply the backlog before each is stopped, so that
/// the stops come at different points of the batches.
const STOP_AFTER: [Duration; 3] = [
    Duration::from_millis(30),
    Duration::from_millis(60),
    Duration::from_millis(100),
];

/// Maximum wait for the last worker to settle every stream.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

fn user(index: usize) -> String {
    format!("u-backlog-{index}")
}

fn stream(user_index: usize, stream_index: usize) -> String {
    format!("s-backlog-{user_index}-{stream_index}")
}

/// Returns the (user, stream) index pairs of every stream.
fn streams() -> impl Iterator<Item = (usize, usize)> {
    (0..USERS).flat_map(|u| (0..STREAMS_PER_USER).map(move |s| (u, s)))
}

/// Builds the start of stream `s` of user `u`, which requests a reply.
fn start_request(u: usize, s: usize) -> Outbound {
    let body = start(&user(u), &stream(u, s), &format!("m-start-{u}-{s}"), ROUND_MODEL, 10, 50);
    Outbound::request(&body, &format!("c-start-{u}-{s}"))
}

async fn assert_granted(harness: &Harness, u: usize, s: usize) {
    let reply = harness.reply(&format!("c-start-{u}-{s}")).await;
    assert!(reply["reserved"].is_i64(), "start {u}-{s} was not granted: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_backlog_keeps_order() {
    let mut harness = Harness::start("backlog", |_| {}).await;
    for index in 0..USERS {
        harness.fund(&user(index), &format!("g-{index}"), FUNDS).await;
    }
    let starts: Vec<Outbound> = streams()
        .filter(|&(_, s)| s < STARTED_BEFORE)
        .map(|(u, s)| start_request(u, s))
        .collect();
    harness.publish_all(&starts).await;
    for (u, s) in streams().filter(|&(_, s)| s < STARTED_BEFORE) {
        assert_granted(&harness, u, s).await;
    }

    // The backlog: every stream's chunks and end, queued while no worker
    // consumes, more than the prefetch on each shard.
    harness.stop_worker().await;
    let mut backlog = Vec::new();
    for (u, s) in streams() {
        if s >= STARTED_BEFORE {
            backlog.push(start_request(u, s));
        }
        for seq in 0..CHUNKS_PER_STREAM {
            backlog.push(Outbound::json(&chunk(&user(u), &stream(u, s), seq, "delta", Some(1))));
        }
        backlog.push(Outbound::json(&end(
            &user(u),
            &stream(u, s),
            &format!("m-end-{u}-{s}"),
            EndStatus::Completed,
            None,
        )));
    }
    harness.publish_all(&backlog).await;

    // Workers take parts of the backlog and are stopped, then the last one
    // applies the rest.
    for pause in STOP_AFTER {
        harness.restart_worker().await;
        tokio::time::sleep(pause).await;
        harness.stop_worker().await;
        // The stop waited for the broker to confirm every settlement event
        // the worker sent, so none is left for the relay to send again.
        let unmarked = harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await;
        assert_eq!(unmarked, 0, "outbox rows left unmarked by the stop after {pause:?}");
    }
    harness.restart_worker().await;

    for (u, s) in streams().filter(|&(_, s)| s >= STARTED_BEFORE) {
        assert_granted(&harness, u, s).await;
    }
    for (u, s) in streams() {
        let settled = harness
            .event_within("reservation.settled", &stream(u, s), SETTLE_WAIT)
            .await;
        assert_eq!(
            settled["counted_completion_tokens"],
            CHUNKS_PER_STREAM,
            "stream {} was settled without some of its chunks: {settled}",
            stream(u, s)
        );
        assert_eq!(settled["charged"], COST, "{settled}");
    }
    for index in 0..USERS {
        let account = harness.account(&user(index)).await;
        assert_eq!(account.balance, FUNDS - COST * STREAMS_PER_USER as i64, "{}", user(index));
        assert_eq!(account.reserved, 0, "{}", user(index));
    }
    harness.finish().await;
}
