//! Idle holds expire at counted usage, busy ones do not, a late
//! `stream.ended` corrects the expired charge, and a hold that cannot be
//! settled does not keep the others from expiring.

mod common;

use std::time::Duration;

use common::{Harness, Outbound, ROUND_MODEL, WAIT, chunk, end, free_local_address, metric_value, start};
use stream_credits::worker::SWEEP_BATCH_MAX;
use stream_credits::messages::EndStatus;

const USER: &str = "u-expiry";
const SILENT: &str = "s-silent";
const BUSY: &str = "s-busy";
const BALANCE: i64 = 10_000;
const TTL_SECONDS: u64 = 2;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Tokens stated by the silent stream's chunks, 12 in all, so expiry
/// charges 10 + 2 * 12 = 34.
const SILENT_CHUNK_TOKENS: [u64; 3] = [3, 4, 5];
const EXPIRY_CHARGE: i64 = 34;

/// The busy stream sends one 1-token chunk every 500 ms for 5 s, so its
/// completed end charges 10 + 2 * 10 = 30.
const BUSY_CHUNKS: u64 = 10;
const BUSY_CHUNK_INTERVAL: Duration = Duration::from_millis(500);
const BUSY_CHARGE: i64 = 30;

/// Late provider usage of the silent stream: 10 + 2 * 40 = 90.
const LATE_USAGE: (u64, u64) = (10, 40);
const LATE_CHARGE: i64 = 90;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hold_expires_and_adjusts() {
    let harness = Harness::start("expiry", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;

    for stream in [SILENT, BUSY] {
        let body = start(
            USER,
            stream,
            &format!("{stream}-start"),
            ROUND_MODEL,
            PROMPT_TOKENS,
            MAX_OUTPUT_TOKENS,
        );
        let reply = harness.request(&body, stream).await;
        assert_eq!(reply["type"], "reservation.granted", "{reply}");
        assert_eq!(reply["reserved"], RESERVED, "{reply}");
    }
    let silent_chunks: Vec<Outbound> = SILENT_CHUNK_TOKENS
        .into_iter()
        .enumerate()
        .map(|(seq, tokens)| {
            Outbound::json(&chunk(USER, SILENT, seq as u64, "words", Some(tokens)))
        })
        .collect();
    harness.publish_all(&silent_chunks).await;

    // The pauses only pace the busy stream, and no assertion depends on
    // their length.
    for seq in 0..BUSY_CHUNKS {
        harness
            .publish(&chunk(USER, BUSY, seq, "more", Some(1)))
            .await;
        tokio::time::sleep(BUSY_CHUNK_INTERVAL).await;
    }
    harness.barrier(USER).await;
    assert!(
        harness.events("reservation.settled", BUSY).is_empty(),
        "a stream sending chunks within the ttl was settled"
    );
    let busy_open: bool = sqlx::query_scalar(
        "SELECT settled_at IS NULL FROM holds WHERE user_id = $1 AND stream_id = $2",
    )
    .bind(USER)
    .bind(BUSY)
    .fetch_one(&harness.pool)
    .await
    .expect("read the busy hold");
    assert!(busy_open, "the busy stream's hold is no longer open");

    let expired = harness.event("reservation.settled", SILENT).await;
    assert_eq!(expired["status"], "expired", "{expired}");
    assert_eq!(expired["usage_source"], "counted", "{expired}");
    assert_eq!(expired["prompt_tokens"], PROMPT_TOKENS, "{expired}");
    assert_eq!(expired["counted_completion_tokens"], 12, "{expired}");
    assert_eq!(expired["charged"], EXPIRY_CHARGE, "{expired}");
    assert_eq!(expired["refunded"], RESERVED - EXPIRY_CHARGE, "{expired}");

    harness
        .publish(&end(USER, BUSY, "busy-end", EndStatus::Completed, None))
        .await;
    let busy = harness.event("reservation.settled", BUSY).await;
    assert_eq!(busy["status"], "completed", "{busy}");
    assert_eq!(busy["charged"], BUSY_CHARGE, "{busy}");

    harness
        .publish(&end(
            USER,
            SILENT,
            "silent-end",
            EndStatus::Completed,
            Some(LATE_USAGE),
        ))
        .await;
    let adjusted = harness.event("reservation.adjusted", SILENT).await;
    let final_balance = BALANCE - BUSY_CHARGE - LATE_CHARGE;
    assert_eq!(
        adjusted["reservation_id"], expired["reservation_id"],
        "{adjusted}"
    );
    assert_eq!(adjusted["status"], "completed", "{adjusted}");
    assert_eq!(adjusted["usage_source"], "provider", "{adjusted}");
    assert_eq!(adjusted["previously_charged"], EXPIRY_CHARGE, "{adjusted}");
    assert_eq!(adjusted["charged"], LATE_CHARGE, "{adjusted}");
    assert_eq!(
        adjusted["difference"],
        LATE_CHARGE - EXPIRY_CHARGE,
        "{adjusted}"
    );
    assert_eq!(adjusted["prompt_tokens"], LATE_USAGE.0, "{adjusted}");
    assert_eq!(adjusted["completion_tokens"], LATE_USAGE.1, "{adjusted}");
    assert_eq!(adjusted["balance_after"], final_balance, "{adjusted}");

    let adjustment: i64 =
        sqlx::query_scalar("SELECT amount FROM ledger WHERE user_id = $1 AND kind = 'adjustment'")
            .bind(USER)
            .fetch_one(&harness.pool)
            .await
            .expect("read the adjustment entry");
    assert_eq!(adjustment, -(LATE_CHARGE - EXPIRY_CHARGE));
    assert_eq!(
        harness.ledger_rows(USER, "adjustment").await,
        1,
        "adjustment rows"
    );
    assert_eq!(
        harness.events("reservation.settled", SILENT).len(),
        1,
        "settled events of the silent stream"
    );

    let account = harness.account(USER).await;
    assert_eq!(account.balance, final_balance);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}

/// Counts the open holds of every user but `except`.
async fn open_holds(harness: &Harness, except: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM holds WHERE settled_at IS NULL AND user_id <> $1")
        .bind(except)
        .fetch_one(&harness.pool)
        .await
        .expect("count open holds")
}

/// Holds whose expiry fails for good stay open and are tried again at
/// every sweep, while another user's idle hold expires. They fill more
/// than one page of the sweep, so a sweep that only moved on after a page
/// expired something would never reach the other hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_expiry_leaves_other_holds_to_expire() {
    const STUCK_USERS: usize = 4;
    let stuck_holds = SWEEP_BATCH_MAX as usize + STUCK_USERS;
    let stuck_users: Vec<String> = (0..STUCK_USERS).map(|user| format!("u-stuck-{user}")).collect();
    let other = "u-other";
    let harness = Harness::start("expiryfault", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
        settings.reservations.max_active_per_user = stuck_holds as u32;
        settings.http.listen = free_local_address();
    })
    .await;
    for user in stuck_users.iter().map(String::as_str).chain([other]) {
        harness.fund(user, &format!("{user}-grant"), BALANCE * stuck_holds as i64).await;
    }
    // Every ledger row of the stuck users fails with an error that no
    // retry cures (numeric value out of range), as a charge past the
    // 64-bit balance would. Placing a hold writes no ledger row.
    harness.install_fault("ledger", "user_id").await;
    for user in &stuck_users {
        harness.plan_failures(user, "22003", None).await;
    }

    let starts: Vec<Outbound> = (0..stuck_holds)
        .map(|index| {
            let user = &stuck_users[index % STUCK_USERS];
            let stream = format!("s-stuck-{index}");
            Outbound::json(&start(user, &stream, &format!("{stream}-start"), ROUND_MODEL, PROMPT_TOKENS, MAX_OUTPUT_TOKENS))
        })
        .collect();
    harness.publish_all(&starts).await;
    for user in &stuck_users {
        harness.barrier(user).await;
    }
    let body = start(other, other, "other-start", ROUND_MODEL, PROMPT_TOKENS, MAX_OUTPUT_TOKENS);
    let reply = harness.request(&body, other).await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");

    let expired = harness.event("reservation.settled", other).await;
    assert_eq!(expired["status"], "expired", "{expired}");
    assert_eq!(expired["charged"], PROMPT_TOKENS, "{expired}");
    assert_eq!(harness.account(other).await.reserved, 0);

    assert_eq!(open_holds(&harness, other).await, stuck_holds as i64, "stuck holds still open");
    let failures = metric_value(&harness.metrics().await, "stream_credits_expiry_failures_total");
    assert!(failures.unwrap_or(0.0) >= stuck_holds as f64, "failures counted: {failures:?}");

    for user in &stuck_users {
        harness.clear_failures(user).await;
    }
    // A sweep under way when the faults were cleared passes over the
    // holds that failed in it, and the next one expires them.
    let deadline = tokio::time::Instant::now() + WAIT;
    while open_holds(&harness, other).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "stuck holds still open after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = harness.event("reservation.settled", "s-stuck-0").await;
    assert_eq!(expired["status"], "expired", "{expired}");
    for user in &stuck_users {
        assert_eq!(harness.account(user).await.reserved, 0, "{user}");
    }

    harness.finish().await;
}

/// Longer than the sweep's interval and the server's 9-second limit on a
/// statement of the worker, so a sweep that waited for the locked account
/// would be cancelled and try again without end.
const ACCOUNT_LOCKED: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_account_leaves_others_to_expire() {
    let harness = Harness::start("expiry_lock", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
    })
    .await;
    let (locked_user, other_user) = ("u-locked", "u-other");
    for user in [locked_user, other_user] {
        harness.fund(user, &format!("{user}-grant"), BALANCE).await;
        let body = start(user, &format!("{user}-s"), &format!("{user}-start"), ROUND_MODEL, PROMPT_TOKENS, MAX_OUTPUT_TOKENS);
        let reply = harness.request(&body, user).await;
        assert_eq!(reply["type"], "reservation.granted", "{reply}");
    }

    // The locked user's hold is the older one, so the sweep meets it first.
    let lock = harness.lock_account(locked_user).await;
    let locked_at = tokio::time::Instant::now();
    let settled = harness
        .event_within("reservation.settled", &format!("{other_user}-s"), ACCOUNT_LOCKED - Duration::from_secs(1))
        .await;
    assert_eq!(settled["status"], "expired", "{settled}");
    assert!(
        harness.events("reservation.settled", &format!("{locked_user}-s")).is_empty(),
        "the hold of the locked account expired while it was locked"
    );
    tokio::time::sleep(ACCOUNT_LOCKED.saturating_sub(locked_at.elapsed())).await;
    lock.commit().await.expect("the account is released");

    let settled = harness.event_within("reservation.settled", &format!("{locked_user}-s"), WAIT).await;
    assert_eq!(settled["status"], "expired", "{settled}");
    harness.finish().await;
}
