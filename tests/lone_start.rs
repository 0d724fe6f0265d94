//! A start that arrives alone is granted by one statement outside any
//! transaction. A start that this statement cannot grant is left
//! unchanged for the batch's transaction to apply.

mod common;

use chrono::{DateTime, Utc};
use common::{Harness, grant, start};
use serde_json::Value;
use sqlx::Row;
use stream_credits::ledger::{Destination, Ledger, ReplyTo};
use stream_credits::messages::{self, Inbound, StreamStarted};

const USER: &str = "u-lone";

/// gpt-4o-mini: ceil((10 * 150,000 + 100 * 600,000) / 1,000,000) = 62.
const HOLD_COST: i64 = 62;

fn decoded(harness: &Harness, body: &Value) -> Inbound {
    let bytes = serde_json::to_vec(body).expect("JSON serializes");
    messages::decode(&bytes, &harness.settings.limits).expect("a valid message")
}

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
    let funding = decoded(&harness, &grant(USER, "g-1", 1_000));
    let mut tx = harness.pool.begin().await.expect("a transaction");
    ledger.apply(&mut tx, &funding, &ReplyTo::default()).await.expect("the grant applies");
    tx.commit().await.expect("the grant commits");

    let message = decoded(&harness, &start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100));
    let mut conn = harness.pool.acquire().await.expect("a connection");
    let applied = ledger
        .start_alone(&mut conn, as_start(&message), &reply_to("c-1"))
        .await
        .expect("the statement runs")
        .expect("a funded start is granted");
    drop(conn);

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
    let expires_at: DateTime<Utc> = body["expires_at"]
        .as_str()
        .expect("expires_at is text")
        .parse()
        .expect("expires_at is RFC 3339");
    let ttl = chrono::Duration::seconds(harness.settings.reservations.ttl_seconds as i64);
    assert_eq!(expires_at, opened_at + ttl, "{body}");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_start_leaves_what_it_cannot_grant_unchanged() {
    let harness = Harness::database_only("lone_left").await;
    let ledger = Ledger::new(harness.settings.clone());
    let funding = decoded(&harness, &grant(USER, "g-1", 100));
    let first = decoded(&harness, &start(USER, "s-1", "m-1", "gpt-4o-mini", 10, 100));
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
        ("a model without a price", start(USER, "s-4", "m-4", "no-such-model", 10, 100)),
    ];
    for (case, body) in cases {
        let message = decoded(&harness, &body);
        let mut conn = harness.pool.acquire().await.expect("a connection");
        let alone = ledger
            .start_alone(&mut conn, as_start(&message), &reply_to("c-2"))
            .await
            .expect("the statement runs");
        assert!(alone.is_none(), "{case}: granted by the lone statement: {alone:?}");
        drop(conn);
        assert_eq!(snapshot(&harness).await, before, "{case}: something changed");
    }
    harness.finish().await;
}
