//! Provider usage above the hold is debited in full or capped at the
//! hold, as `reservations.overrun` sets.

mod common;

use common::{Harness, ROUND_MODEL, end, start};
use stream_credits::messages::EndStatus;
use stream_credits::settings::Overrun;

const USER: &str = "u-overrun";
const STREAM: &str = "s-overrun";
const BALANCE: i64 = 100;

/// Round-price hold: 10 prompt tokens + 2 * 20 output tokens = 50.
const RESERVED: i64 = 50;

/// Provider usage 10 prompt + 100 completion tokens: 10 + 2 * 100 = 210.
const COST: i64 = 210;
const OVERRUN: i64 = COST - RESERVED;

/// Runs one stream whose provider usage costs more than its hold and
/// returns the settlement event.
async fn settle_over_hold(harness: &Harness) -> serde_json::Value {
    harness.fund(USER, "g-1", BALANCE).await;
    let reply = harness
        .request(
            &start(USER, STREAM, "m-start", ROUND_MODEL, 10, 20),
            "c-start",
        )
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_eq!(reply["reserved"], RESERVED, "{reply}");

    let usage = Some((10, 100));
    harness
        .publish(&end(USER, STREAM, "m-end", EndStatus::Completed, usage))
        .await;
    harness.event("reservation.settled", STREAM).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_charges_full_cost() {
    let harness = Harness::start("debit", |settings| {
        settings.reservations.overrun = Overrun::Debit;
    })
    .await;

    let settled = settle_over_hold(&harness).await;
    assert_eq!(settled["usage_source"], "provider", "{settled}");
    assert_eq!(settled["reserved"], RESERVED, "{settled}");
    assert_eq!(settled["cost"], COST, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    assert_eq!(settled["refunded"], 0, "{settled}");
    assert_eq!(settled["overrun"], OVERRUN, "{settled}");
    assert_eq!(settled["forgiven"], 0, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - COST, "{settled}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - COST);
    assert_eq!(account.available, BALANCE - COST);

    // A user below zero is denied even the smallest hold until topped up.
    let denied = harness
        .request(
            &start(USER, "s-small", "m-small", ROUND_MODEL, 0, 1),
            "c-small",
        )
        .await;
    assert_eq!(denied["type"], "reservation.denied", "{denied}");
    assert_eq!(denied["reason"], "insufficient_credits", "{denied}");
    assert_eq!(denied["available"], BALANCE - COST, "{denied}");
    assert_eq!(denied["requested"], 2, "{denied}");

    harness.fund(USER, "g-2", 200).await;
    let granted = harness
        .request(
            &start(USER, "s-small", "m-small-2", ROUND_MODEL, 0, 1),
            "c-small-2",
        )
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");
    assert_eq!(
        granted["available_after"],
        BALANCE - COST + 200 - 2,
        "{granted}"
    );

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_forgives_overrun() {
    let harness = Harness::start("cap", |settings| {
        settings.reservations.overrun = Overrun::Cap;
    })
    .await;

    let settled = settle_over_hold(&harness).await;
    assert_eq!(settled["usage_source"], "provider", "{settled}");
    assert_eq!(settled["reserved"], RESERVED, "{settled}");
    assert_eq!(settled["cost"], COST, "{settled}");
    assert_eq!(settled["charged"], RESERVED, "{settled}");
    assert_eq!(settled["refunded"], 0, "{settled}");
    assert_eq!(settled["overrun"], OVERRUN, "{settled}");
    assert_eq!(settled["forgiven"], OVERRUN, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - RESERVED, "{settled}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - RESERVED);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}
