//! A stream cancelled without provider usage is charged for the prompt
//! counted at start plus the tokens of its chunks.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use stream_credits::messages::EndStatus;

const USER: &str = "u-cancel";
const BALANCE: i64 = 5000;
const MAX_OUTPUT_TOKENS: u64 = 500;

const DELTAS: [&str; 10] = [
    "Quick",
    "sort",
    " picks",
    " a pivot",
    ",",
    " partitions the",
    " array around",
    " it, and",
    " recurses on",
    " both halves.",
];

/// Publishes a start, ten chunks and a cancelled end without usage, and
/// returns the settlement event.
async fn run_cancelled_stream(
    harness: &Harness,
    stream: &str,
    prompt_tokens: u64,
    tokens: Option<u64>,
) -> serde_json::Value {
    let reply = harness
        .request(
            &start(
                USER,
                stream,
                &format!("{stream}-start"),
                ROUND_MODEL,
                prompt_tokens,
                MAX_OUTPUT_TOKENS,
            ),
            stream,
        )
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");

    let mut messages: Vec<Outbound> = DELTAS
        .iter()
        .enumerate()
        .map(|(seq, delta)| Outbound::json(&chunk(USER, stream, seq as u64, delta, tokens)))
        .collect();
    let ended = end(
        USER,
        stream,
        &format!("{stream}-end"),
        EndStatus::Cancelled,
        None,
    );
    messages.push(Outbound::json(&ended));
    harness.publish_all(&messages).await;
    harness.event("reservation.settled", stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_charges_counted_deltas() {
    let harness = Harness::start("cancelcount", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    let bpe = tiktoken_rs::o200k_base_singleton();
    let completion_tokens: usize = DELTAS
        .iter()
        .map(|delta| bpe.encode_ordinary(delta).len())
        .sum();
    let completion_tokens = completion_tokens as i64;
    let prompt_tokens = 30;
    // Round-price model: 1 credit per prompt token, 2 per completion token.
    let reserved = prompt_tokens + 2 * MAX_OUTPUT_TOKENS as i64;
    let cost = prompt_tokens + 2 * completion_tokens;

    let settled = run_cancelled_stream(&harness, "s-text", prompt_tokens as u64, None).await;
    assert_eq!(settled["status"], "cancelled", "{settled}");
    assert_eq!(settled["usage_source"], "counted", "{settled}");
    assert_eq!(settled["prompt_tokens"], prompt_tokens, "{settled}");
    assert_eq!(
        settled["counted_completion_tokens"], completion_tokens,
        "{settled}"
    );
    assert_eq!(settled["completion_tokens"], completion_tokens, "{settled}");
    assert_eq!(settled["reserved"], reserved, "{settled}");
    assert_eq!(settled["cost"], cost, "{settled}");
    assert_eq!(settled["charged"], cost, "{settled}");
    assert_eq!(settled["refunded"], reserved - cost, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - cost, "{settled}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - cost);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_charges_stated_tokens() {
    let harness = Harness::start("canceltokens", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    // Every chunk states 3 tokens, whatever its text counts to.
    let stated_tokens = 3;
    let completion_tokens = 3 * DELTAS.len() as i64;
    let bpe = tiktoken_rs::o200k_base_singleton();
    let text_tokens: usize = DELTAS
        .iter()
        .map(|delta| bpe.encode_ordinary(delta).len())
        .sum();
    assert_ne!(
        text_tokens as i64, completion_tokens,
        "the stated counts must differ from a count of the text to show which one is used"
    );
    let prompt_tokens = 25;
    let reserved = prompt_tokens + 2 * MAX_OUTPUT_TOKENS as i64;
    let cost = prompt_tokens + 2 * completion_tokens;

    let settled = run_cancelled_stream(
        &harness,
        "s-tokens",
        prompt_tokens as u64,
        Some(stated_tokens),
    )
    .await;
    assert_eq!(settled["status"], "cancelled", "{settled}");
    assert_eq!(settled["usage_source"], "counted", "{settled}");
    assert_eq!(
        settled["counted_completion_tokens"], completion_tokens,
        "{settled}"
    );
    assert_eq!(settled["cost"], cost, "{settled}");
    assert_eq!(settled["charged"], cost, "{settled}");
    assert_eq!(settled["refunded"], reserved - cost, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - cost, "{settled}");

    let charge: i64 =
        sqlx::query_scalar("SELECT amount FROM ledger WHERE user_id = $1 AND kind = 'charge'")
            .bind(USER)
            .fetch_one(&harness.pool)
            .await
            .expect("read the charge entry");
    assert_eq!(charge, -cost);

    harness.finish().await;
}
