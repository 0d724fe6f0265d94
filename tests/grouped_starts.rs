//! A batch places the holds of starts of different users together, in
//! one statement. The outcome must be what applying each message alone,
//! in order, gives: the same grants and denials, the same balances, and
//! each user's messages in their order. The statement must also find its
//! rows by key however much the tables have grown.

mod common;

use common::{Harness, chunk, grant, start};
use serde_json::Value;
use sqlx::Row;
use stream_credits::ledger::{Applied, Ledger, Outcome, ReplyTo};
use stream_credits::messages::Inbound;

/// gpt-4o-mini: ceil((10 * 150,000 + 100 * 600,000) / 1,000,000) = 62.
const HOLD_COST: i64 = 62;

/// Returns the batch: funding, then starts of several users. Among them
/// are a second start of one user, a start without credits, a chunk of a
/// start placed in the same batch, a repeated start and a start of a
/// model without a price.
fn messages() -> Vec<(Value, Option<&'static str>)> {
    vec![
        (grant("u-a", "g-a", 1_000), None),
        (grant("u-b", "g-b", 100), None),
        (start("u-a", "s-1", "m-a1", "gpt-4o-mini", 10, 100), Some("c-a1")),
        (start("u-b", "s-1", "m-b1", "gpt-4o-mini", 10, 100), Some("c-b1")),
        (start("u-c", "s-1", "m-c1", "gpt-4o-mini", 10, 100), Some("c-c1")),
        (start("u-d", "s-1", "m-d1", "no-such-model", 10, 100), Some("c-d1")),
        (start("u-b", "s-2", "m-b2", "gpt-4o-mini", 10, 100), Some("c-b2")),
        (chunk("u-a", "s-1", 0, "words", Some(5)), None),
        (start("u-e", "s-1", "m-e1", "gpt-4o-mini", 10, 100), Some("c-e1")),
        (start("u-a", "s-1", "m-a1", "gpt-4o-mini", 10, 100), Some("c-a1-again")),
        (start("u-a", "s-2", "m-a2", "gpt-4o-mini", 10, 100), Some("c-a2")),
        (grant("u-e", "g-e", 500), None),
        (start("u-e", "s-2", "m-e2", "gpt-4o-mini", 10, 100), Some("c-e2")),
    ]
}

fn reply_to(correlation_id: Option<&str>) -> ReplyTo {
    ReplyTo {
        queue: correlation_id.map(|_| "replies".to_owned()),
        correlation_id: correlation_id.map(str::to_owned),
    }
}

/// Describes what a caller sees of a message's result: its outcome, and
/// for each reply its correlation id, type, reason and amounts. Ids and
/// times differ between runs, so they are left out.
fn seen(applied: &Applied) -> String {
    let outcome = match &applied.outcome {
        Outcome::Applied => "applied".to_owned(),
        Outcome::Duplicate => "duplicate".to_owned(),
        Outcome::Dropped(reason) => format!("dropped {}", reason.code()),
        Outcome::DeadLetter(rejection) => format!("dead letter {rejection}"),
    };
    let replies: Vec<String> = applied
        .outgoing
        .iter()
        .map(|out| {
            let body = &out.body;
            format!(
                "{:?} {:?} {} {} reserved={} available_after={} requested={} available={}",
                out.destination,
                out.correlation_id,
                body["type"],
                body["reason"],
                body["reserved"],
                body["available_after"],
                body["requested"],
                body["available"],
            )
        })
        .collect();
    format!("{outcome}: {}", replies.join("; "))
}

/// Reads the accounts, holds and outbox size, without ids and times.
async fn state(harness: &Harness) -> (Vec<String>, Vec<String>, i64) {
    let accounts = sqlx::query("SELECT user_id, balance, reserved, holds_open FROM accounts ORDER BY user_id")
        .fetch_all(&harness.pool)
        .await
        .expect("accounts")
        .iter()
        .map(|row| {
            format!(
                "{} {} {} {}",
                row.get::<String, _>("user_id"),
                row.get::<i64, _>("balance"),
                row.get::<i64, _>("reserved"),
                row.get::<i32, _>("holds_open")
            )
        })
        .collect();
    let holds = sqlx::query(
        "SELECT user_id, stream_id, reserved, counted_completion_tokens, chunks, \
         grant_reply->>'available_after' AS available_after FROM holds ORDER BY user_id, stream_id",
    )
    .fetch_all(&harness.pool)
    .await
    .expect("holds")
    .iter()
    .map(|row| {
        format!(
            "{} {} {} {} {} {:?}",
            row.get::<String, _>("user_id"),
            row.get::<String, _>("stream_id"),
            row.get::<i64, _>("reserved"),
            row.get::<i64, _>("counted_completion_tokens"),
            row.get::<i64, _>("chunks"),
            row.get::<Option<String>, _>("available_after"),
        )
    })
    .collect();
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&harness.pool)
        .await
        .expect("outbox rows");
    (accounts, holds, outbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_starts_match_one_by_one() {
    let together = Harness::database_only("grouped_batch").await;
    let alone = Harness::database_only("grouped_alone").await;
    let ledger = Ledger::new(together.settings.clone());
    let bodies = messages();

    // All in one batch, as the worker applies a shard's deliveries.
    let decoded_together: Vec<(Inbound, ReplyTo)> = bodies
        .iter()
        .map(|(body, correlation_id)| (together.decoded(body), reply_to(*correlation_id)))
        .collect();
    let batch: Vec<(&Inbound, &ReplyTo)> = decoded_together.iter().map(|(message, reply)| (message, reply)).collect();
    let mut tx = together.pool.begin().await.expect("a transaction");
    let grouped = ledger.apply_batch(&mut tx, &batch).await.expect("the batch applies");
    tx.commit().await.expect("the batch commits");

    // Each message in a transaction of its own, in order.
    let mut one_by_one = Vec::new();
    for (body, correlation_id) in &bodies {
        let message = alone.decoded(body);
        let mut tx = alone.pool.begin().await.expect("a transaction");
        let applied = ledger
            .apply(&mut tx, &message, &reply_to(*correlation_id))
            .await
            .expect("the message applies");
        tx.commit().await.expect("the message commits");
        one_by_one.push(applied);
    }

    assert_eq!(grouped.len(), bodies.len(), "one result per message");
    for (index, (grouped, alone)) in grouped.iter().zip(&one_by_one).enumerate() {
        assert_eq!(seen(grouped), seen(alone), "message {index}: {:?}", bodies[index].0);
    }
    assert_eq!(state(&together).await, state(&alone).await);

    // The cases the batch was built for came out as intended.
    let expected = [
        (2, format!("available_after={}", 1_000 - HOLD_COST)),
        (3, format!("available_after={}", 100 - HOLD_COST)),
        (4, "\"insufficient_credits\"".to_owned()),
        (5, "\"unknown_model\"".to_owned()),
        (6, format!("requested={HOLD_COST} available={}", 100 - HOLD_COST)),
        (8, "\"insufficient_credits\"".to_owned()),
        (10, format!("available_after={}", 1_000 - 2 * HOLD_COST)),
        (12, format!("available_after={}", 500 - HOLD_COST)),
    ];
    for (index, text) in expected {
        let shown = seen(&grouped[index]);
        assert!(shown.contains(&text), "message {index}: {shown}");
    }
    assert!(seen(&grouped[7]).starts_with("applied"), "the chunk of a placed start counts");
    assert!(seen(&grouped[9]).starts_with("duplicate"), "a repeated start is a duplicate");
    assert!(seen(&grouped[9]).contains("\"c-a1-again\""), "its grant goes to the new reply address");
    let (_, holds, _) = state(&together).await;
    assert!(holds.contains(&format!("u-a s-1 {HOLD_COST} 5 1 Some(\"{}\")", 1_000 - HOLD_COST)), "{holds:?}");

    together.finish().await;
    alone.finish().await;
}

/// Rows each table grows by before the last batches: more than all the
/// rows the batches before could have read by scanning.
const GROWN_ROWS: i64 = 30_000;

/// Starts of three users, each after a grant that funds it.
fn funded_starts(batch: usize) -> Vec<Value> {
    let users: Vec<String> = (0..3).map(|index| format!("u-{batch}-{index}")).collect();
    let grants = users.iter().map(|user| grant(user, &format!("g-{user}"), 1_000));
    let starts = users
        .iter()
        .map(|user| start(user, "s-1", &format!("m-{user}"), "gpt-4o-mini", 10, 100));
    grants.chain(starts).collect()
}

/// Rows read by sequential scans of `table`, once the statistics of
/// closed sessions have arrived.
async fn scanned_rows(harness: &Harness, table: &str) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&harness.pool)
        .await
        .expect("clear the statistics snapshot");
    sqlx::query_scalar("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = $1")
        .bind(table)
        .fetch_one(&harness.pool)
        .await
        .expect("read table statistics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_starts_never_scan_grown_tables() {
    let harness = Harness::database_only("grouped_plans").await;
    let ledger = Ledger::new(harness.settings.clone());
    let mut conn = harness.pool.acquire().await.expect("a connection").detach();
    let apply = async |conn: &mut sqlx::PgConnection, batch: usize| {
        let decoded: Vec<(Inbound, ReplyTo)> = funded_starts(batch)
            .iter()
            .map(|body| (harness.decoded(body), ReplyTo::default()))
            .collect();
        let messages: Vec<(&Inbound, &ReplyTo)> = decoded.iter().map(|(message, reply)| (message, reply)).collect();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("a transaction");
        let applied = ledger.apply_batch(&mut tx, &messages).await.expect("the batch applies");
        tx.commit().await.expect("the batch commits");
        for (index, result) in applied.iter().enumerate().skip(3) {
            let reply = &result.outgoing[0].body;
            assert_eq!(reply["type"], "reservation.granted", "batch {batch}, start {index}: {reply}");
        }
    };

    // More batches than the five after which PostgreSQL may keep a
    // generic plan, all on one connection and on small tables.
    for batch in 0..8 {
        apply(&mut conn, batch).await;
    }
    let grow = [
        "INSERT INTO accounts (user_id, balance) SELECT 'grown-' || n, 1 FROM generate_series(1, $1) AS n",
        "INSERT INTO processed_messages (user_id, message_id, kind) \
         SELECT 'grown-' || n, 'm', 'stream.started' FROM generate_series(1, $1) AS n",
        "INSERT INTO holds (reservation_id, user_id, stream_id, model, input_per_million, output_per_million, \
         encoding, reserved, initial_reserved, prompt_tokens, max_output_tokens, last_event_at, opened_at, \
         grant_reply) SELECT gen_random_uuid(), 'grown-' || n, 's', 'gpt-4o-mini', 1, 1, 'o200k_base', 0, 0, \
         0, 1, now(), now(), '{}' FROM generate_series(1, $1) AS n",
    ];
    for statement in grow {
        sqlx::query(statement)
            .bind(GROWN_ROWS as i32)
            .execute(&harness.pool)
            .await
            .expect("grow the table");
    }
    for batch in 8..12 {
        apply(&mut conn, batch).await;
    }
    sqlx::Connection::close(conn).await.expect("close the connection");

    // A closed session's statistics arrive shortly after it ends, so a
    // count below the limit is read again for up to two seconds.
    for table in ["accounts", "processed_messages", "holds"] {
        let mut scanned = scanned_rows(&harness, table).await;
        for _ in 0..20 {
            if scanned >= GROWN_ROWS {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            scanned = scanned_rows(&harness, table).await;
        }
        assert!(scanned < GROWN_ROWS, "{table}: {scanned} rows read by sequential scans");
    }

    // The rows added above break the ledger's invariants on purpose.
    for table in ["holds", "processed_messages", "accounts"] {
        let statement = format!("DELETE FROM {table} WHERE user_id LIKE 'grown-%'");
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&harness.pool)
            .await
            .expect("remove the added rows");
    }
    harness.finish().await;
}
