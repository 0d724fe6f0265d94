//! Batches of different users in one shard are applied side by side, and
//! each user's messages stay in order.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, Outbound, ROUND_MODEL, grant, start};

/// Round-price hold of each start: 10 + 2 * 100 = 210.
const RESERVED: i64 = 210;

/// `worker.batch_linger_ms` of the test whose second batch waits for more
/// deliveries while the first is in flight.
const LINGER: Duration = Duration::from_millis(1_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_user_does_not_hold_up_another() {
    let harness = Harness::start("sidebyside", |settings| {
        settings.topology.shards = 1;
        settings.worker.batches_in_flight = 2;
    })
    .await;
    let (blocked, free) = ("u-blocked", "u-free");
    harness.fund(blocked, "g-0", 1).await;
    harness.fund(free, "g-0", 1000).await;

    // The test locks the blocked user's account row, so the worker's
    // batch that tops that user up waits on the lock.
    let lock = harness.lock_account(blocked).await;

    harness
        .publish_all(&[
            Outbound::json(&grant(blocked, "g-1", 1000)),
            Outbound::request(&start(blocked, "s-blocked", "m-blocked", ROUND_MODEL, 10, 100), "c-blocked"),
        ])
        .await;
    // Let the blocked user's batch reach the lock before the other
    // user's start arrives, so the two cannot share a batch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    harness
        .publish_all(&[Outbound::request(&start(free, "s-free", "m-free", ROUND_MODEL, 10, 100), "c-free")])
        .await;

    let free_reply = tokio::time::timeout(Duration::from_secs(10), harness.reply("c-free"))
        .await
        .expect("the other user's reply arrived while the first user's batch waited");
    assert_eq!(free_reply["type"], "reservation.granted", "{free_reply}");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), harness.reply("c-blocked")).await.is_err(),
        "the blocked user's reply arrived before its top-up was applied"
    );

    lock.rollback().await.expect("release the lock");
    let blocked_reply = harness.reply("c-blocked").await;
    assert_eq!(
        blocked_reply["type"], "reservation.granted",
        "the start was applied after the top-up before it: {blocked_reply}"
    );
    assert_eq!(harness.account(blocked).await.reserved, RESERVED);
    assert_eq!(harness.account(free).await.reserved, RESERVED);

    harness.finish().await;
}

/// A batch that waits for more deliveries keeps the batches in flight
/// running: the blocked user's batch finishes as soon as its lock is
/// released, not when the other user's batch stops waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_batch_finishes_while_next_waits() {
    let harness = Harness::start("lingerpoll", |settings| {
        settings.topology.shards = 1;
        settings.worker.batches_in_flight = 2;
        settings.worker.batch_linger_ms = LINGER.as_millis() as u64;
    })
    .await;
    let (blocked, free) = ("u-blocked", "u-free");
    harness.fund(blocked, "g-0", 1000).await;
    harness.fund(free, "g-0", 1000).await;

    let lock = harness.lock_account(blocked).await;

    // The start requests a reply, so its batch is applied at once and
    // waits on the lock.
    harness
        .publish_all(&[Outbound::request(&start(blocked, "s-blocked", "m-blocked", ROUND_MODEL, 10, 100), "c-blocked")])
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The top-up requests no reply, so its batch waits out the linger.
    harness.publish_all(&[Outbound::json(&grant(free, "g-1", 5))]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    lock.rollback().await.expect("release the lock");
    let released = Instant::now();
    let blocked_reply = harness.reply("c-blocked").await;
    let waited = released.elapsed();
    assert_eq!(blocked_reply["type"], "reservation.granted", "{blocked_reply}");
    assert!(
        waited < LINGER / 2,
        "the reply took {waited:?} after the lock was released, as if the lingering batch held it up"
    );

    harness.finish().await;
}
