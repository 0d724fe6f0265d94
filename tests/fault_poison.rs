//! A valid message that keeps failing for a reason other than its input
//! (here a trigger that rejects its hold every time) is retried in place,
//! alone, `topology.delivery_limit` times, and then dead-lettered by the
//! worker as `retries_exhausted`. Meanwhile other users' messages on the
//! same shard are applied, and `dlq list` shows the message with its
//! original routing key.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, Outbound, ROUND_MODEL, WAIT, chunk, end, start};
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::Value;
use stream_credits::messages::EndStatus;

const DELIVERY_LIMIT: u32 = 3;

const POISONED_USER: &str = "u-poisoned";
const POISON_STREAM: &str = "s-poison";
const POISON_MESSAGE: &str = "m-poison";
const OTHER_USERS: [&str; 3] = ["u-other-1", "u-other-2", "u-other-3"];
const BALANCE: i64 = 10_000;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Each other stream sends one 4-token chunk and completes without usage:
/// 10 + 2 * 4 = 18.
const CHUNK_TOKENS: u64 = 4;
const CHARGE: i64 = 18;

/// SQLSTATE of a PL/pgSQL `RAISE EXCEPTION` without a code, which the
/// ledger treats as final.
const RAISE_EXCEPTION: &str = "P0001";

fn hold_start(user_id: &str, stream_id: &str, message_id: &str) -> Value {
    start(
        user_id,
        stream_id,
        message_id,
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    )
}

/// Counts the holds of `stream_id`.
async fn hold_count(harness: &Harness, stream_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM holds WHERE stream_id = $1")
        .bind(stream_id)
        .fetch_one(&harness.pool)
        .await
        .expect("count holds")
}

/// Waits until the poison hold's insert was attempted `expected` times.
async fn wait_attempts(harness: &Harness, expected: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let attempts = harness.fault_attempts(POISON_STREAM).await;
        if attempts == expected {
            return;
        }
        assert!(
            attempts < expected && Instant::now() < deadline,
            "{attempts} hold insert attempts, expected {expected} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Returns the `count` of the first `x-death` record, which RabbitMQ
/// raises each time it dead-letters the same message from the same queue.
fn death_count(properties: &BasicProperties) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    match death.inner().get("count")? {
        AMQPValue::LongLongInt(count) => Some(*count),
        AMQPValue::LongInt(count) => Some(i64::from(*count)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered() {
    // One shard, so every user's messages queue behind the poison message.
    let harness = Harness::start("poison", |settings| {
        settings.topology.shards = 1;
        settings.topology.delivery_limit = DELIVERY_LIMIT;
    })
    .await;
    harness.install_fault("holds", "stream_id").await;
    harness
        .plan_failures(POISON_STREAM, RAISE_EXCEPTION, None)
        .await;
    for user_id in [POISONED_USER].iter().chain(&OTHER_USERS) {
        harness.fund(user_id, "g-1", BALANCE).await;
    }

    // The poison message first, then another stream of the same user and
    // one whole stream per other user, all in the one shard queue.
    let poison = hold_start(POISONED_USER, POISON_STREAM, POISON_MESSAGE);
    let published = Instant::now();
    let mut messages = vec![
        Outbound::json(&poison),
        Outbound::request(
            &hold_start(POISONED_USER, "s-poisoned-ok", "m-poisoned-ok"),
            "c-poisoned-ok",
        ),
    ];
    for user_id in OTHER_USERS {
        let stream = format!("s-{user_id}");
        messages.push(Outbound::request(
            &hold_start(user_id, &stream, &format!("{stream}-start")),
            &stream,
        ));
        messages.push(Outbound::json(&chunk(
            user_id,
            &stream,
            0,
            "words",
            Some(CHUNK_TOKENS),
        )));
        messages.push(Outbound::json(&end(
            user_id,
            &stream,
            &format!("{stream}-end"),
            EndStatus::Completed,
            None,
        )));
    }
    harness.publish_all(&messages).await;

    let reply = harness.reply("c-poisoned-ok").await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    for user_id in OTHER_USERS {
        let stream = format!("s-{user_id}");
        let reply = harness.reply(&stream).await;
        assert_eq!(reply["type"], "reservation.granted", "{stream}: {reply}");
        let settled = harness.event("reservation.settled", &stream).await;
        assert_eq!(settled["status"], "completed", "{stream}: {settled}");
        assert_eq!(settled["charged"], CHARGE, "{stream}: {settled}");
    }
    let others_done = published.elapsed();

    harness.wait_dead_letter_count(1).await;
    let dead_lettered = published.elapsed();
    eprintln!(
        "other users' messages were applied {others_done:?} and the poison message was \
         dead-lettered {dead_lettered:?} after publishing"
    );
    assert!(
        dead_lettered < WAIT,
        "the shard was held up for {dead_lettered:?}"
    );

    // The insert is tried once in the batch, then alone as many times as
    // the delivery limit allows, all on one delivery.
    let attempts = harness.fault_attempts(POISON_STREAM).await;
    assert_eq!(
        attempts,
        1 + i64::from(DELIVERY_LIMIT),
        "hold insert attempts"
    );
    assert_eq!(hold_count(&harness, POISON_STREAM).await, 0, "poison holds");

    let output = harness.run_cli(&["dlq", "list", "--json"]).await;
    assert!(
        output.status.success(),
        "dlq list exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Vec<Value> =
        serde_json::from_slice(&output.stdout).expect("dlq list --json prints a JSON array");
    assert_eq!(listed.len(), 1, "listed dead letters: {listed:?}");
    let letter = &listed[0];
    assert_eq!(letter["reason"], "retries_exhausted", "{letter}");
    assert_eq!(letter["routing_key"], POISONED_USER, "{letter}");
    assert_eq!(letter["message_type"], "stream.started", "{letter}");
    assert_eq!(letter["message_id"], POISON_MESSAGE, "{letter}");
    let letter_id = letter["id"]
        .as_str()
        .expect("a dead letter has a string id")
        .to_owned();
    harness.wait_dead_letter_count(1).await;

    // The id of a letter without headers of ours is derived from the
    // letter, so it names the same letter in the next command.
    let output = harness.run_cli(&["dlq", "show", &letter_id]).await;
    assert!(
        output.status.success(),
        "dlq show exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let show_output: Value = serde_json::from_slice(&output.stdout).expect("dlq show prints JSON");
    assert_eq!(show_output["body"], poison, "{show_output}");
    assert_eq!(
        show_output["dead_letter"]["id"],
        letter_id.as_str(),
        "{show_output}"
    );
    harness.wait_dead_letter_count(1).await;

    let poisoned = harness.account(POISONED_USER).await;
    assert_eq!(poisoned.balance, BALANCE);
    assert_eq!(poisoned.reserved, RESERVED, "only the second stream holds");
    for user_id in OTHER_USERS {
        let account = harness.account(user_id).await;
        assert_eq!(account.balance, BALANCE - CHARGE, "{user_id}");
        assert_eq!(account.reserved, 0, "{user_id}");
    }

    // Replayed while the cause persists, the message gets every attempt
    // again and is dead-lettered again, without a broker `x-death` record
    // because the worker, not the broker, dead-lettered it.
    let output = harness
        .run_cli(&["dlq", "replay", "--reason", "retries_exhausted"])
        .await;
    assert!(
        output.status.success(),
        "dlq replay exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    wait_attempts(&harness, 2 * attempts).await;
    harness.wait_dead_letter_count(1).await;
    let letters = harness.peek_dead_letters().await;
    assert_eq!(letters.len(), 1, "dead letters after the replay");
    assert_eq!(
        death_count(&letters[0].properties),
        None,
        "x-death count of the letter dead-lettered again"
    );
    harness.wait_dead_letter_count(1).await;

    // Once the cause is gone, replaying the dead letter applies it.
    harness.clear_failures(POISON_STREAM).await;
    let output = harness
        .run_cli(&["dlq", "replay", "--reason", "retries_exhausted"])
        .await;
    assert!(
        output.status.success(),
        "dlq replay exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    harness.barrier(POISONED_USER).await;
    assert_eq!(
        hold_count(&harness, POISON_STREAM).await,
        1,
        "poison holds after the replay"
    );
    harness.wait_dead_letter_count(0).await;
    let poisoned = harness.account(POISONED_USER).await;
    assert_eq!(poisoned.reserved, 2 * RESERVED);

    harness.finish().await;
}
