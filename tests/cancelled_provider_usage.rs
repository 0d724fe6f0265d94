//! A cancelled stream with provider usage is charged for that usage, not
//! for the worker's count.

mod common;

use common::{Harness, Outbound, chunk, end, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-provider";
const STREAM: &str = "s-provider";
const BALANCE: i64 = 10_000;
const MODEL: &str = "gpt-4o-mini";
const DELTA_COUNT: u64 = 40;
const PROMPT_TOKENS: u64 = 120;
const MAX_OUTPUT_TOKENS: u64 = 1000;
const USAGE_PROMPT_TOKENS: u64 = 120;
const USAGE_COMPLETION_TOKENS: u64 = 57;

/// gpt-4o-mini: 150,000 credits per million prompt tokens, 600,000 per
/// million completion tokens. Hold: ceil(120 * 0.15 + 1000 * 0.6) = 618.
const RESERVED: i64 = 618;

/// Usage 120 + 57 tokens: ceil(120 * 0.15 + 57 * 0.6) = ceil(52.2) = 53.
const COST: i64 = 53;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_usage_decides_charge() {
    let harness = Harness::start("provider", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    let reply = harness
        .request(
            &start(
                USER,
                STREAM,
                "m-start",
                MODEL,
                PROMPT_TOKENS,
                MAX_OUTPUT_TOKENS,
            ),
            "c-start",
        )
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_eq!(reply["reserved"], RESERVED, "{reply}");

    let bpe = tiktoken_rs::o200k_base_singleton();
    let mut counted = 0;
    let mut messages = Vec::new();
    for seq in 0..DELTA_COUNT {
        let delta = format!(" step {seq}");
        counted += bpe.encode_ordinary(&delta).len() as u64;
        messages.push(Outbound::json(&chunk(USER, STREAM, seq, &delta, None)));
    }
    let usage = Some((USAGE_PROMPT_TOKENS, USAGE_COMPLETION_TOKENS));
    messages.push(Outbound::json(&end(
        USER,
        STREAM,
        "m-end",
        EndStatus::Cancelled,
        usage,
    )));
    harness.publish_all(&messages).await;

    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["status"], "cancelled", "{settled}");
    assert_eq!(settled["usage_source"], "provider", "{settled}");
    assert_eq!(settled["prompt_tokens"], USAGE_PROMPT_TOKENS, "{settled}");
    assert_eq!(
        settled["completion_tokens"], USAGE_COMPLETION_TOKENS,
        "{settled}"
    );
    assert_eq!(settled["counted_completion_tokens"], counted, "{settled}");
    assert_eq!(settled["reserved"], RESERVED, "{settled}");
    assert_eq!(settled["cost"], COST, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    assert_eq!(settled["refunded"], RESERVED - COST, "{settled}");
    assert_eq!(settled["overrun"], 0, "{settled}");
    assert_eq!(settled["forgiven"], 0, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - COST, "{settled}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - COST);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}
