//! No delivery is acknowledged twice. The load has duplicate messages,
//! invalid input that is dead-lettered, a poison message that is retried
//! and then dead-lettered, and a broker cut that returns unacknowledged
//! deliveries. Through all of it the worker acknowledges only delivery
//! tags that are outstanding on their channel, and RabbitMQ never closes
//! one of its channels, as it would with 406 PRECONDITION_FAILED
//! ("unknown delivery tag") on a second ack of a tag. Every stream
//! settles exactly once.
//!
//! The worker reaches RabbitMQ through two proxies: a tap that parses the
//! AMQP frames to track every channel's outstanding delivery tags and
//! every close the broker sends, and behind it a proxy that the test cuts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{
    AmqpTap, Load, LoadShape, TapReport, TcpProxy, assert_settled_exactly_once, shards_consumed,
};
use common::{DeadLetter, Harness, Outbound, RABBITMQ_ADDRESS, ROUND_MODEL, chunk, end, start};
use serde_json::json;
use stream_credits::messages::EndStatus;
use stream_credits::settings::SecretUrl;

const SHAPE: LoadShape = LoadShape {
    users: 12,
    chunks_per_stream: 20,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(30),
};

/// Small batches and prefetch, so the load is acknowledged in many
/// `multiple` acks with deliveries still outstanding behind each.
const BATCH_MESSAGES_MAX: usize = 16;
const PREFETCH: u16 = 64;

const DELIVERY_LIMIT: u32 = 3;

const LOAD_BEFORE: Duration = Duration::from_secs(3);
const CUT: Duration = Duration::from_secs(2);
const LOAD_AFTER: Duration = Duration::from_secs(3);

/// Maximum wait for the worker to be consuming again after the restore.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// Maximum wait for the poison message's attempts and the dead letters.
const DEAD_LETTER_WAIT: Duration = Duration::from_secs(30);

/// Maximum wait for the last streams to settle and for events that the
/// outbox relay sends about 10 to 15 s after a lost publish.
const SETTLE_WAIT: Duration = Duration::from_secs(40);

/// SQLSTATE of a PL/pgSQL `RAISE EXCEPTION` without a code, which the
/// ledger takes as final: the message is retried alone, then
/// dead-lettered.
const RAISE_EXCEPTION: &str = "P0001";

/// SQLSTATE of a serialization failure, which the ledger takes as
/// transient: the shard retries the whole batch, unacknowledged.
const SERIALIZATION_FAILURE: &str = "40001";

const SIDE_GRANT: i64 = 10_000;

/// Streams whose every message is published twice.
const DUPLICATED_USERS: [&str; 3] = ["dblack-dup-0", "dblack-dup-1", "dblack-dup-2"];
const DUPLICATED_CHUNKS: u64 = 8;
const DUPLICATED_CHUNK_TOKENS: u64 = 3;
const DUPLICATED_PROMPT_TOKENS: u64 = 10;
const DUPLICATED_MAX_OUTPUT: u64 = 100;
/// Round price: 10 prompt tokens + 2 * 8 chunks * 3 tokens.
const DUPLICATED_CHARGE: i64 = 58;

const BAD_USER: &str = "dblack-bad";
const POISON_USER: &str = "dblack-poison";
const POISON_STREAM: &str = "dblack-poison-s";
const POISON_MESSAGE: &str = "dblack-poison-start";

/// A stream whose start fails with a transient error until the test
/// clears it, so its shard keeps a batch unacknowledged across the cut.
const STALL_USER: &str = "dblack-stall";
const STALL_STREAM: &str = "dblack-stall-s";
/// Round price of the stall stream: 10 prompt tokens, no chunks.
const STALL_CHARGE: i64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delivery_is_acknowledged_twice() {
    let proxy = TcpProxy::start(RABBITMQ_ADDRESS).await;
    let tap = AmqpTap::start(&proxy.address().to_string()).await;
    let tap_address = tap.address();
    let harness = Harness::start("dblack", |settings| {
        settings.amqp.url = SecretUrl::new(format!("amqp://guest:guest@{tap_address}/%2f"));
        settings.amqp.prefetch = PREFETCH;
        settings.worker.batch_messages_max = BATCH_MESSAGES_MAX;
        settings.topology.delivery_limit = DELIVERY_LIMIT;
    })
    .await;
    harness.install_fault("holds", "stream_id").await;
    harness
        .plan_failures(POISON_STREAM, RAISE_EXCEPTION, None)
        .await;
    harness
        .plan_failures(STALL_STREAM, SERIALIZATION_FAILURE, None)
        .await;
    for user in DUPLICATED_USERS
        .iter()
        .chain(&[BAD_USER, POISON_USER, STALL_USER])
    {
        harness
            .fund(user, &format!("{user}-grant"), SIDE_GRANT)
            .await;
    }
    let users = Load::fund(&harness, "dblack", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);
    tokio::time::sleep(LOAD_BEFORE).await;

    // Duplicates, invalid input and a poison message while the load runs.
    publish_duplicated_streams(&harness, "a").await;
    let expected_letters = publish_bad_input(&harness).await;
    take_expected_dead_letters(&harness, &tap, &expected_letters).await;

    // A batch held unacknowledged by transient failures, then the cut.
    harness
        .publish(&start(
            STALL_USER,
            STALL_STREAM,
            &format!("{STALL_STREAM}-start"),
            ROUND_MODEL,
            DUPLICATED_PROMPT_TOKENS,
            DUPLICATED_MAX_OUTPUT,
        ))
        .await;
    wait_for_attempts(&harness, &tap, STALL_STREAM, 2).await;
    let connections_before = proxy.forwarded_connections();
    proxy.cut();
    tokio::time::sleep(CUT).await;
    proxy.restore();
    harness.clear_failures(STALL_STREAM).await;
    wait_for_reconnect(&harness, &tap, &proxy, connections_before).await;

    publish_duplicated_streams(&harness, "b").await;
    harness
        .publish(&end(
            STALL_USER,
            STALL_STREAM,
            &format!("{STALL_STREAM}-end"),
            EndStatus::Completed,
            None,
        ))
        .await;
    tokio::time::sleep(LOAD_AFTER).await;
    let published = load.finish().await;
    assert_no_ack_faults(&tap.report(), "after the load");

    assert_settled_exactly_once(&harness, &harness.pool, &published, SETTLE_WAIT).await;
    check_side_streams(&harness).await;

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
    let report = tap.report();
    eprintln!("the tap saw {report:#?}");
    assert_no_ack_faults(&report, "after the worker stopped");
    assert!(
        report.connections >= 2,
        "the worker did not reconnect after the cut: {} connections",
        report.connections
    );
    assert!(report.multiple_acks > 0, "the tap saw no multiple ack");
    assert!(
        report.redeliveries > 0,
        "the broker redelivered nothing after the cut, so the test did not probe \
         redeliveries"
    );
}

/// Fails when the tap saw a settlement of a tag that was not outstanding,
/// a close sent by the broker, or bytes that are not AMQP frames.
fn assert_no_ack_faults(report: &TapReport, when: &str) {
    assert!(
        report.unknown_tags.is_empty(),
        "{when}: the worker settled delivery tags that were not outstanding: {:#?}",
        report.unknown_tags
    );
    assert!(
        report.broker_closes.is_empty(),
        "{when}: the broker closed channels or connections of the worker: {:#?}",
        report.broker_closes
    );
    assert!(
        report.framing_errors.is_empty(),
        "{when}: the tap could not parse the traffic: {:#?}",
        report.framing_errors
    );
}

/// Publishes one stream per duplicated user, every message twice in a
/// row, with stream ids ending in `round`.
async fn publish_duplicated_streams(harness: &Harness, round: &str) {
    let mut messages = Vec::new();
    for user in DUPLICATED_USERS {
        let stream = format!("{user}-{round}");
        let mut stream_messages = vec![Outbound::request(
            &start(
                user,
                &stream,
                &format!("{stream}-start"),
                ROUND_MODEL,
                DUPLICATED_PROMPT_TOKENS,
                DUPLICATED_MAX_OUTPUT,
            ),
            &stream,
        )];
        for seq in 0..DUPLICATED_CHUNKS {
            let body = chunk(user, &stream, seq, "tok", Some(DUPLICATED_CHUNK_TOKENS));
            stream_messages.push(Outbound::json(&body));
        }
        let body = end(
            user,
            &stream,
            &format!("{stream}-end"),
            EndStatus::Completed,
            None,
        );
        stream_messages.push(Outbound::json(&body));
        for message in stream_messages {
            messages.push(message.clone());
            messages.push(message);
        }
    }
    harness.publish_all(&messages).await;
}

/// Publishes invalid messages and the poison start, and returns the
/// dead-letter reason expected for each AMQP `message_id`.
async fn publish_bad_input(harness: &Harness) -> BTreeMap<String, &'static str> {
    let raw = |message_id: &str, body: Vec<u8>| Outbound {
        routing_key: BAD_USER.to_owned(),
        body,
        message_id: Some(message_id.to_owned()),
        correlation_id: None,
    };
    let mut unknown_type = start(
        BAD_USER,
        "dblack-bad-s",
        "dblack-bad-type",
        ROUND_MODEL,
        1,
        1,
    );
    unknown_type["type"] = json!("stream.paused");
    let orphan_chunk = chunk(BAD_USER, "dblack-no-such-stream", 0, "tok", Some(1));
    let messages = vec![
        raw(
            "dblack-bad-json",
            b"{\"type\": \"chunk.emitted\", ".to_vec(),
        ),
        raw(
            "dblack-bad-type",
            serde_json::to_vec(&unknown_type).expect("serialize"),
        ),
        Outbound::json(&orphan_chunk),
        Outbound::json(&start(
            POISON_USER,
            POISON_STREAM,
            POISON_MESSAGE,
            ROUND_MODEL,
            DUPLICATED_PROMPT_TOKENS,
            DUPLICATED_MAX_OUTPUT,
        )),
    ];
    harness.publish_all(&messages).await;
    let orphan_id = orphan_chunk["message_id"]
        .as_str()
        .expect("a chunk has a message_id");
    BTreeMap::from([
        ("dblack-bad-json".to_owned(), "invalid_json"),
        ("dblack-bad-type".to_owned(), "unknown_type"),
        (orphan_id.to_owned(), "unknown_stream"),
        (POISON_MESSAGE.to_owned(), "retries_exhausted"),
    ])
}

/// Takes dead letters until every expected one arrived, and checks that
/// each has its expected reason and that no other message was
/// dead-lettered. A message may be dead-lettered twice, because dead
/// letters are published at least once.
async fn take_expected_dead_letters(
    harness: &Harness,
    tap: &AmqpTap,
    expected: &BTreeMap<String, &'static str>,
) {
    let deadline = Instant::now() + DEAD_LETTER_WAIT;
    let mut letters: Vec<DeadLetter> = Vec::new();
    loop {
        assert_no_ack_faults(&tap.report(), "while waiting for the dead letters");
        letters.extend(harness.take_dead_letters().await);
        let seen: BTreeSet<&str> = letters
            .iter()
            .filter_map(|letter| letter.message_id.as_deref())
            .collect();
        if expected.keys().all(|id| seen.contains(id.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within {DEAD_LETTER_WAIT:?}, only {seen:?} of {:?} were dead-lettered",
            expected.keys()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for letter in &letters {
        let id = letter.message_id.as_deref().unwrap_or_default();
        let reason = expected
            .get(id)
            .unwrap_or_else(|| panic!("message {id:?} was dead-lettered: {letter:?}"));
        assert_eq!(
            letter.error.as_deref(),
            Some(*reason),
            "dead-letter reason of {id}"
        );
    }
    // The poison insert was tried in its batch, then alone up to the
    // delivery limit.
    assert_eq!(
        harness.fault_attempts(POISON_STREAM).await,
        1 + i64::from(DELIVERY_LIMIT),
        "attempts of the poison start"
    );
}

/// Waits until the insert of `key` was attempted at least `attempts`
/// times.
async fn wait_for_attempts(harness: &Harness, tap: &AmqpTap, key: &str, attempts: i64) {
    let deadline = Instant::now() + DEAD_LETTER_WAIT;
    loop {
        assert_no_ack_faults(&tap.report(), "while waiting for failed attempts");
        let attempted = harness.fault_attempts(key).await;
        if attempted >= attempts {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{attempted} of {attempts} attempts for {key} within {DEAD_LETTER_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_reconnect(
    harness: &Harness,
    tap: &AmqpTap,
    proxy: &TcpProxy,
    connections_before: usize,
) {
    let deadline = Instant::now() + RECONNECT_WAIT;
    loop {
        assert_no_ack_faults(&tap.report(), "while waiting for the reconnect");
        if proxy.forwarded_connections() > connections_before && shards_consumed(harness).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "within {RECONNECT_WAIT:?} of the restore, the worker did not consume every shard \
             through a new connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks that the duplicated streams and the stalled stream settled once
/// at their exact cost, and that the poison start reserved nothing.
async fn check_side_streams(harness: &Harness) {
    for user in DUPLICATED_USERS {
        for round in ["a", "b"] {
            let stream = format!("{user}-{round}");
            let settled = harness
                .event_within("reservation.settled", &stream, SETTLE_WAIT)
                .await;
            assert_eq!(settled["charged"], DUPLICATED_CHARGE, "{stream}: {settled}");
            let event_ids: BTreeSet<String> = harness
                .events("reservation.settled", &stream)
                .iter()
                .map(|event| event["event_id"].to_string())
                .collect();
            assert_eq!(event_ids.len(), 1, "settlement events of {stream}");
            let chunks: i64 = sqlx::query_scalar(
                "SELECT chunks FROM holds WHERE user_id = $1 AND stream_id = $2",
            )
            .bind(user)
            .bind(&stream)
            .fetch_one(&harness.pool)
            .await
            .expect("read the chunks of a duplicated stream");
            assert_eq!(
                chunks, DUPLICATED_CHUNKS as i64,
                "chunks applied to {stream}"
            );
        }
        let account = harness.account(user).await;
        assert_eq!(
            account.balance,
            SIDE_GRANT - 2 * DUPLICATED_CHARGE,
            "balance of {user}"
        );
        assert_eq!(account.reserved, 0, "reserved credits of {user}");
    }

    let settled = harness
        .event_within("reservation.settled", STALL_STREAM, SETTLE_WAIT)
        .await;
    assert_eq!(
        settled["charged"], STALL_CHARGE,
        "{STALL_STREAM}: {settled}"
    );
    let poisoned = harness.account(POISON_USER).await;
    assert_eq!(poisoned.balance, SIDE_GRANT, "balance of {POISON_USER}");
    assert_eq!(poisoned.reserved, 0, "reserved credits of {POISON_USER}");
}
