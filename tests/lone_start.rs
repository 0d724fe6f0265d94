//! A start that arrives alone is granted by one statement outside any
//! transaction. A start that this statement cannot grant is left
//! unchanged for the batch's transaction to apply.

mod common;

use chrono::{DateTime, Utc};
use common::{Harness, grant, start};
use serde_json::Value;
use sqlx::Row;
use stream_credits::ledger::{Applied, Destination, Ledger, ReplyTo};
use stream_credits::messages::{self, Inbound, StreamStarted};

const USER: &str = "u-lone";

/// gpt-4o-mini: ceil((10 * 150,000 + 100 * 600,000) / 1,000,000) = 62.
const HOLD_COST: i64 = 62;

fn as_start(message: &Inbound) -> &StreamStarted {
    match message {
        Inbound::StreamStarted(start) => start,
        other => panic!("not a start: {other:?}"),
    }
}

fn reply_to(correlation_id: &str) -> ReplyTo {
    ReplyTo {
        queue: Some("replies".to_owned()),
        correlation_id: Some(correlation_id.to_owned()),
    }
}

/// Sizes a start of a priced model and places its hold with the lone
/// statement, on a connection outside any transaction.
async fn grant_alone(harness: &Harness, ledger: &Ledger, message: &Inbound, correlation_id: &str) -> Option<Applied> {
    let stream_start = as_start(message);
    let mut conn = harness.pool.acquire().await.expect("a connection");
    let sized = ledger
        .size_start(&mut conn, stream_start)
        .await
        .expect("the start is sized")
        .expect("the model has a price");
    ledger
        .start_alone(&mut conn, stream_start, &sized, &reply_to(correlation_id))
        .await
        .expect("the statement runs")
}

fn expires_at(grant: &Value) -> DateTime<Utc> {
    grant["expires_at"]
        .as_str()
        .expect("expires_at is text")
        .parse()
        .expect("expires_at is RFC 3339")
}

fn ttl(harness: &Harness) -> chrono::Duration {
    chrono::Duration::seconds(harness.settings.reservations.ttl_seconds as i64)
}

/// Everything a start can change: the account and the rows of holds,
/// processed messages and the outbox.
async fn snapshot(harness: &Harness) -> (i64, i64, i32, i64, i64, i64) {
    let row = sqlx::query(
        "SELECT balance, reserved, holds_open, \
         (SELECT count(*) FROM holds) AS holds, \
         (SELECT count(*) FROM processed_messages) AS processed, \
         (SELECT count(*) FROM outbox) AS outbox \
         FROM accounts WHERE user_id = $1",
    )
    .bind(USER)
    .fetch_one(&harness.pool)
    .await
    .expect("the account exists");
    (
        row.get("balance"),
        row.get("reserved"),
        row.get("holds_open"),
        row.get("holds"),
        row.get("processed"),
        row.get("outbox"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_start_is_granted_by_one_statement() {
    let harness = Harness::database_only("lone_grant").await;
    let ledger = Ledger::new(harness.settings.clone());
    let funding = harness.decoded(&grant(USER, "g-1", 1_000));
    let mut tx = harness.pool.begin().await.expect("a transaction");
    ledger.apply(&mut tx, &funding, &ReplyTo::default()).await.expect("the grant applies");
    tx.commit().await.expect("the grant commits");

    let message = harness.decoded(&start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100));
    let applied = grant_alone(&harness, &ledger, &message, "c-1")
        .await
        .expect("a funded start is granted");

    // The reply comes first, then the event, both stored in the outbox.
    let destinations: Vec<Destination> = applied.outgoing.iter().map(|out| out.destination).collect();
    assert_eq!(destinations, [Destination::Reply, Destination::Event]);
    assert!(applied.outgoing.iter().all(|out| out.outbox_id.is_some()));
    let reply = &applied.outgoing[0];
    assert_eq!(reply.routing_key, "replies");
    assert_eq!(reply.correlation_id.as_deref(), Some("c-1"));
    let body = &reply.body;
    assert_eq!(body["type"], "reservation.granted", "{body}");
    assert_eq!(body["reserved"], HOLD_COST, "{body}");
    assert_eq!(body["available_after"], 1_000 - HOLD_COST, "{body}");

    // Committed without a transaction of the caller's: another connection
    // reads the debit, the hold, the processed id and the outbox rows, each
    // holding the grant as sent.
    assert_eq!(snapshot(&harness).await, (1_000, HOLD_COST, 1, 1, 2, 2));
    let hold = sqlx::query(
        "SELECT h.grant_reply, h.opened_at, h.last_event_at, p.reply, p.kind \
         FROM holds h JOIN processed_messages p ON p.user_id = h.user_id AND p.message_id = 'm-1' \
         WHERE h.user_id = $1 AND h.stream_id = 's-1'",
    )
    .bind(USER)
    .fetch_one(&harness.pool)
    .await
    .expect("the hold and its start's id are stored");
    assert_eq!(&hold.get::<Value, _>("grant_reply"), body);
    assert_eq!(&hold.get::<Value, _>("reply"), body);
    assert_eq!(hold.get::<String, _>("kind"), "stream.started");
    let stored: Vec<Value> = sqlx::query_scalar("SELECT body FROM outbox WHERE reservation_id IS NOT NULL")
        .fetch_all(&harness.pool)
        .await
        .expect("outbox rows");
    assert_eq!(stored, [body.clone(), body.clone()]);

    // The hold expires ttl_seconds after it opened, on the database clock.
    let opened_at: DateTime<Utc> = hold.get("opened_at");
    assert_eq!(hold.get::<DateTime<Utc>, _>("last_event_at"), opened_at);
    assert_eq!(expires_at(body), opened_at + ttl(&harness), "{body}");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_start_leaves_what_it_cannot_grant_unchanged() {
    let harness = Harness::database_only("lone_left").await;
    let ledger = Ledger::new(harness.settings.clone());
    let funding = harness.decoded(&grant(USER, "g-1", 100));
    let first = harness.decoded(&start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100));
    let mut tx = harness.pool.begin().await.expect("a transaction");
    ledger.apply(&mut tx, &funding, &ReplyTo::default()).await.expect("the grant applies");
    ledger.apply(&mut tx, &first, &reply_to("c-1")).await.expect("the start applies");
    tx.commit().await.expect("the batch commits");
    let before = snapshot(&harness).await;
    assert_eq!(before, (100, HOLD_COST, 1, 1, 2, 2), "one hold placed by the batch's way");

    let cases = [
        ("the same start again", start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100)),
        ("a new id for a stream that holds credits", start(USER, "s-1", "m-2", "gpt-4o-mini", 10, 100)),
        ("the id of the grant", start(USER, "s-2", "g-1", "gpt-4o-mini", 10, 100)),
        ("more than the available credits", start(USER, "s-3", "m-3", "gpt-4o-mini", 10, 100)),
    ];
    for (case, body) in cases {
        let message = harness.decoded(&body);
        let alone = grant_alone(&harness, &ledger, &message, "c-2").await;
        assert!(alone.is_none(), "{case}: granted by the lone statement: {alone:?}");
        assert_eq!(snapshot(&harness).await, before, "{case}: something changed");
    }

    let unpriced = harness.decoded(&start(USER, "s-4", "m-4", "no-such-model", 10, 100));
    let mut conn = harness.pool.acquire().await.expect("a connection");
    let sized = ledger.size_start(&mut conn, as_start(&unpriced)).await.expect("the start is sized");
    assert!(sized.is_none(), "a model without a price is sized: {sized:?}");
    drop(conn);
    harness.finish().await;
}

/// Longer than the worker's 10-second wait for a batch, so the worker
/// gives up on its first attempt while the account stays locked.
const LOCK_HELD: std::time::Duration = std::time::Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_start_behind_long_lock_opens_fresh() {
    let harness = Harness::start("lone_lock", |_| {}).await;
    harness.fund(USER, "g-1", 1_000).await;
    harness.barrier(USER).await;

    // Another session holds the account's row lock, so the statement that
    // places the hold waits for it.
    let mut locker = harness.lock_account(USER).await;
    harness
        .publish_all(&[common::Outbound::request(
            &start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100),
            "c-1",
        )])
        .await;
    tokio::time::sleep(LOCK_HELD).await;
    let released_at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *locker)
        .await
        .expect("the clock reads");
    locker.commit().await.expect("the lock is released");

    let reply = harness.reply("c-1").await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    let hold = sqlx::query("SELECT opened_at, reservation_id FROM holds WHERE user_id = $1")
        .bind(USER)
        .fetch_all(&harness.pool)
        .await
        .expect("holds read");
    assert_eq!(hold.len(), 1, "one hold for the stream");
    let reservation_id: uuid::Uuid = hold[0].get("reservation_id");
    assert_eq!(reply["reservation_id"], reservation_id.to_string(), "{reply}");

    // The server cancels a statement after 9 seconds, so the statement
    // that placed the hold started at most that long before the lock was
    // released. A statement left running by a worker that gave up would
    // have opened the hold when the start arrived, 15 seconds earlier.
    let opened_at: DateTime<Utc> = hold[0].get("opened_at");
    let staleness = released_at - opened_at;
    assert!(
        staleness < chrono::Duration::seconds(10),
        "the hold opened {staleness} before the lock was released"
    );
    assert_eq!(expires_at(&reply), opened_at + ttl(&harness), "{reply}");
    assert_eq!(harness.account(USER).await.reserved, HOLD_COST);
    assert!(harness.peek_dead_letters().await.is_empty(), "nothing is dead-lettered");
    harness.finish().await;
}

/// Time the holds table stays locked, which the reads that size a hold
/// from history wait for.
const HISTORY_LOCK_HELD: std::time::Duration = std::time::Duration::from_secs(5);

/// Time the account stays locked in the same test: released after the
/// worker's 10-second wait ended but before the server's 9-second limit
/// on the hold statement, which began once the holds table was released.
const ACCOUNT_LOCK_HELD: std::time::Duration = std::time::Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sized_lone_start_behind_locks_publishes_once() {
    let harness = Harness::start("lone_sized", |_| {}).await;
    assert!(harness.settings.reservations.size_from_history, "holds are sized from history");
    harness.fund(USER, "g-1", 1_000_000).await;
    harness.barrier(USER).await;

    // The reads that size the hold wait for the holds table, and then the
    // hold statement waits for the account. Together they take longer
    // than the worker's 10-second wait for one database call.
    let mut table_lock = harness.pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE holds IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *table_lock)
        .await
        .expect("the holds table locks");
    let account_lock = harness.lock_account(USER).await;
    let mut body = start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100);
    body.as_object_mut().expect("a start is an object").remove("max_output_tokens");
    harness.publish_all(&[common::Outbound::request(&body, "c-1")]).await;
    tokio::time::sleep(HISTORY_LOCK_HELD).await;
    table_lock.commit().await.expect("the holds table is released");
    tokio::time::sleep(ACCOUNT_LOCK_HELD - HISTORY_LOCK_HELD).await;
    account_lock.commit().await.expect("the account is released");

    let reply = harness.reply("c-1").await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_ne!(reply["sized_by"], "max_output_tokens", "{reply}");

    // The worker published the grant and its event itself, so it marks
    // both outbox rows within moments. Rows of a statement that committed
    // after the worker gave up on it wait 10 seconds for the relay, which
    // sends the producer a second grant.
    let reservation_id: uuid::Uuid = reply["reservation_id"]
        .as_str()
        .expect("reservation_id is text")
        .parse()
        .expect("reservation_id is a UUID");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let unmarked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE reservation_id = $1 AND published_at IS NULL",
        )
        .bind(reservation_id)
        .fetch_one(&harness.pool)
        .await
        .expect("outbox read");
        if unmarked == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unmarked} outbox rows of the grant are still unmarked: the worker did not publish them"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let replies = harness.replies("c-1", 1).await;
    assert_eq!(replies.len(), 1, "one grant: {replies:?}");
    harness.finish().await;
}

/// A start that the lone statement does not grant is decided in a
/// transaction with the same sizing, read once. Here the history changes
/// in between, which shows that the sizing is not read again: read again,
/// it would size a hold of 70, which the account could pay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_start_not_granted_keeps_its_sizing() {
    let harness = Harness::database_only("lone_sizing").await;
    let mut settings = (*harness.settings).clone();
    settings.models.insert(common::ROUND_MODEL.to_owned(), common::round_price());
    settings.reservations.size_from_history = true;
    settings.reservations.history_percentile = 60;
    settings.reservations.history_streams_min = 5;
    let ledger = Ledger::new(std::sync::Arc::new(settings));
    let apply = async |message: &Value, correlation_id: &str| -> Applied {
        let message = harness.decoded(message);
        let mut tx = harness.pool.begin().await.expect("a transaction");
        let applied = ledger
            .apply(&mut tx, &message, &reply_to(correlation_id))
            .await
            .expect("the message applies");
        tx.commit().await.expect("the message commits");
        applied
    };
    let without_allowance = |stream: &str| {
        let mut body = start(USER, stream, &format!("{stream}-start"), common::ROUND_MODEL, 10, 1);
        body.as_object_mut().expect("a start is an object").remove("max_output_tokens");
        body
    };
    apply(&grant(USER, "g-1", 500), "c-grant").await;

    // No history yet: the hold is the model's maximum, 10 + 2 * 100.
    let late = harness.decoded(&without_allowance("s-late"));
    let mut conn = harness.pool.acquire().await.expect("a connection");
    let sized = ledger
        .size_start(&mut conn, as_start(&late))
        .await
        .expect("the start is sized")
        .expect("the model has a price");
    drop(conn);

    // Five completed streams charge 350 and leave 150 on the account. Their
    // 60th percentile of 30 output tokens would size a hold of 70.
    for (index, completion_tokens) in [50, 10, 40, 20, 30].into_iter().enumerate() {
        let stream = format!("s-{index}");
        let body = start(USER, &stream, &format!("{stream}-start"), common::ROUND_MODEL, 10, 100);
        let granted = apply(&body, &stream).await;
        assert_eq!(granted.outgoing[0].body["type"], "reservation.granted", "{:?}", granted.outgoing);
        let ended = common::end(
            USER,
            &stream,
            &format!("{stream}-end"),
            messages::EndStatus::Completed,
            Some((10, completion_tokens)),
        );
        apply(&ended, &stream).await;
    }
    assert_eq!(snapshot(&harness).await.0, 150);

    let reply = reply_to("c-late");
    let mut conn = harness.pool.acquire().await.expect("a connection");
    let alone = ledger
        .start_alone(&mut conn, as_start(&late), &sized, &reply)
        .await
        .expect("the statement runs");
    assert!(alone.is_none(), "210 credits granted from 150: {alone:?}");
    drop(conn);
    let mut tx = harness.pool.begin().await.expect("a transaction");
    let applied = ledger
        .apply_sized_start(&mut tx, (&late, &reply), sized)
        .await
        .expect("the start applies");
    tx.commit().await.expect("the start commits");
    let denial = &applied.outgoing[0].body;
    assert_eq!(denial["type"], "reservation.denied", "{denial}");
    assert_eq!(denial["requested"], 210, "{denial}");
    assert_eq!(denial["available"], 150, "{denial}");

    // Sized now, a new start reserves 70 from the user's history.
    let granted = apply(&without_allowance("s-now"), "c-now").await;
    let body = &granted.outgoing[0].body;
    assert_eq!(body["type"], "reservation.granted", "{body}");
    assert_eq!(body["sized_by"], "user_history", "{body}");
    assert_eq!(body["reserved"], 70, "{body}");
    harness.finish().await;
}
