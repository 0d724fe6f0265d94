//! A shard waits up to `worker.batch_linger_ms` for more deliveries
//! before it applies a batch, unless a delivery awaits a reply, and a
//! batch takes no more once its bodies reach `worker.batch_bytes_max`.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, Outbound, ROUND_MODEL, grant, start};

const LINGER_MS: u64 = 1_000;

/// Reads when the transaction that applied `message_id` began.
async fn applied_at(harness: &Harness, user: &str, message_id: &str) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT processed_at FROM processed_messages WHERE user_id = $1 AND message_id = $2")
        .bind(user)
        .bind(message_id)
        .fetch_one(&harness.pool)
        .await
        .expect("read the processed message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_request_ends_the_wait() {
    let harness = Harness::start("lingerreply", |settings| {
        settings.worker.batch_linger_ms = LINGER_MS;
    })
    .await;
    let user = "u-linger-reply";

    // The grant requests no reply, so its shard starts waiting. The start
    // behind it requests one and ends the wait.
    let published = Instant::now();
    harness
        .publish_all(&[
            Outbound::json(&grant(user, "g-1", 1000)),
            Outbound::request(&start(user, "s-1", "m-1", ROUND_MODEL, 10, 100), "c-1"),
        ])
        .await;
    let reply = harness.reply("c-1").await;
    let waited = published.elapsed();

    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert!(
        waited < Duration::from_millis(LINGER_MS * 8 / 10),
        "the reply took {waited:?}, as if the batch waited out its {LINGER_MS} ms"
    );
    assert_eq!(
        applied_at(&harness, user, "g-1").await,
        applied_at(&harness, user, "m-1").await,
        "the grant and the start were applied in one transaction"
    );

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_without_reply_waits_for_more() {
    let harness = Harness::start("lingerwait", |settings| {
        settings.worker.batch_linger_ms = LINGER_MS;
    })
    .await;
    let user = "u-linger-wait";

    let published = Instant::now();
    harness.publish(&grant(user, "g-1", 1000)).await;
    loop {
        let balance: Option<i64> = sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&harness.pool)
            .await
            .expect("read the account");
        if balance == Some(1000) {
            break;
        }
        assert!(published.elapsed() < common::WAIT, "the grant was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = published.elapsed();
    assert!(
        waited >= Duration::from_millis(LINGER_MS * 9 / 10),
        "the grant was applied after {waited:?}, before the batch's {LINGER_MS} ms wait ended"
    );

    harness.finish().await;
}

/// Four grants of about 700 bytes each, with a limit of 1,000 bytes: the
/// first batch is full at its second grant, and the other two make the
/// next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_stops_at_its_byte_limit() {
    let harness = Harness::start("lingerbytes", |settings| {
        settings.worker.batch_linger_ms = LINGER_MS;
        settings.worker.batch_bytes_max = 1_000;
    })
    .await;
    let user = "u-linger-bytes";
    let grants: Vec<Outbound> = (1..=4)
        .map(|index| {
            let mut body = grant(user, &format!("g-{index}"), 1000);
            // The worker ignores unknown fields, so this one only makes
            // the body long.
            body["padding"] = serde_json::Value::from("x".repeat(600));
            Outbound::json(&body)
        })
        .collect();
    harness.publish_all(&grants).await;
    harness.barrier(user).await;

    let mut began = Vec::new();
    for index in 1..=4 {
        began.push(applied_at(&harness, user, &format!("g-{index}")).await);
    }
    assert_eq!(began[0], began[1], "the first two grants share a transaction: {began:?}");
    assert_ne!(began[1], began[2], "the third grant starts a new batch: {began:?}");
    assert_eq!(began[2], began[3], "the last two grants share a transaction: {began:?}");
    harness.finish().await;
}
