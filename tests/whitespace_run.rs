//! A run of about a million spaces, which a 1 MiB body can hold, is more
//! than tiktoken-rs's o200k encoder can split into words: it panics. The
//! worker counts such a run in parts, so a chunk or a prompt made of it is
//! counted and settled like any other instead of stopping the shard.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-spaces";
const BALANCE: i64 = 100_000;
const MAX_OUTPUT_TOKENS: u64 = 10_000;

/// Spaces in the long delta and prompt: 7,812 runs of 128 spaces, one
/// token each in o200k, and 63 more, one token.
const SPACES: usize = 999_999;
const SPACE_TOKENS: i64 = 7_813;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_counts_million_spaces() {
    let harness = Harness::start("spaces", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;
    let spaces = " ".repeat(SPACES);

    // A chunk of spaces, then a word, on a stream ended without usage.
    let reply = harness
        .request(&start(USER, "s-chunk", "s-chunk-start", ROUND_MODEL, 10, MAX_OUTPUT_TOKENS), "s-chunk")
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    harness
        .publish_all(&[
            Outbound::json(&chunk(USER, "s-chunk", 0, &spaces, None)),
            Outbound::json(&chunk(USER, "s-chunk", 1, "done", None)),
            Outbound::json(&end(USER, "s-chunk", "s-chunk-end", EndStatus::Completed, None)),
        ])
        .await;
    let settled = harness.event("reservation.settled", "s-chunk").await;
    let word_tokens = tiktoken_rs::o200k_base_singleton().encode_ordinary("done").len() as i64;
    assert_eq!(settled["counted_completion_tokens"], SPACE_TOKENS + word_tokens, "{settled}");
    assert_eq!(settled["usage_source"], "counted", "{settled}");

    // A start whose prompt is the spaces: the hold covers them.
    let mut prompt_start = start(USER, "s-prompt", "s-prompt-start", ROUND_MODEL, 0, MAX_OUTPUT_TOKENS);
    let fields = prompt_start.as_object_mut().expect("a start is an object");
    fields.remove("prompt_tokens");
    fields.insert("prompt".to_owned(), Value::from(spaces));
    let reply = harness.request(&prompt_start, "s-prompt").await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    // Round-price model: 1 credit per prompt token, 2 per output token.
    assert_eq!(reply["reserved"], SPACE_TOKENS + 2 * MAX_OUTPUT_TOKENS as i64, "{reply}");
    harness.finish().await;
}
