//! A start that the available balance cannot cover is denied with the
//! figures that decided it.

mod common;

use common::{Harness, ROUND_MODEL, start};

const USER: &str = "u-five";
const BALANCE: i64 = 5000;

/// On the round-price model: 200 prompt tokens at 1 credit plus 400
/// output tokens at 2 credits.
const PROMPT_TOKENS: u64 = 200;
const MAX_OUTPUT_TOKENS: u64 = 400;
const HOLD_COST: i64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_hold_is_denied() {
    let harness = Harness::start("sixth", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    for index in 0..5_i64 {
        let body = start(
            USER,
            &format!("s-{index}"),
            &format!("m-{index}"),
            ROUND_MODEL,
            PROMPT_TOKENS,
            MAX_OUTPUT_TOKENS,
        );
        let reply = harness.request(&body, &format!("c-{index}")).await;
        assert_eq!(
            reply["type"], "reservation.granted",
            "start {index}: {reply}"
        );
        assert_eq!(reply["reserved"], HOLD_COST, "start {index}: {reply}");
        assert_eq!(
            reply["available_after"],
            BALANCE - HOLD_COST * (index + 1),
            "start {index}: {reply}"
        );
    }

    let body = start(
        USER,
        "s-5",
        "m-5",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let reply = harness.request(&body, "c-5").await;
    assert_eq!(reply["type"], "reservation.denied", "{reply}");
    assert_eq!(reply["reason"], "insufficient_credits", "{reply}");
    assert_eq!(reply["available"], 0, "{reply}");
    assert_eq!(reply["requested"], HOLD_COST, "{reply}");
    assert_eq!(reply["user_id"], USER, "{reply}");
    assert_eq!(reply["stream_id"], "s-5", "{reply}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE);
    assert_eq!(account.reserved, BALANCE);
    assert_eq!(account.available, 0);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_denial_has_no_amounts() {
    let harness = Harness::start("unknown_model", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    let body = start(USER, "s-1", "m-1", "no-such-model", PROMPT_TOKENS, MAX_OUTPUT_TOKENS);
    let reply = harness.request(&body, "c-1").await;
    assert_eq!(reply["type"], "reservation.denied", "{reply}");
    assert_eq!(reply["reason"], "unknown_model", "{reply}");
    assert_eq!(reply["stream_id"], "s-1", "{reply}");
    // Without a price there is no hold to request, and the balance does
    // not decide the denial.
    assert!(reply.get("requested").is_none(), "{reply}");
    assert!(reply.get("available").is_none(), "{reply}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}
