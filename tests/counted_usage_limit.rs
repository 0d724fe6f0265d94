//! Counted usage stops at `limits.tokens_max`, so a stream that states
//! more tokens than any provider produces settles instead of overflowing,
//! and reaching the limit is counted once per stream.

mod common;

use common::{Harness, Outbound, chunk, end, free_local_address, metric_value, start};
use stream_credits::messages::EndStatus;
use stream_credits::pricing::ModelPrice;

const USER: &str = "u-limit";
const STREAM: &str = "s-limit";
const MODEL: &str = "dear-output";
const TOKENS_MAX: u64 = 10_000_000;

/// The highest output price that validation accepts at `TOKENS_MAX`, so
/// the cost of `TOKENS_MAX` completion tokens fills 64 bits.
const OUTPUT_PER_MILLION: i64 = 922_337_203_685_477_580;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_usage_stops_at_limit() {
    let harness = Harness::start("limit", |settings| {
        settings.limits.tokens_max = TOKENS_MAX;
        settings.http.listen = free_local_address();
        let price = ModelPrice {
            input_per_million: 0,
            output_per_million: OUTPUT_PER_MILLION,
            cached_input_per_million: None,
            encoding: "o200k_base".to_owned(),
            max_output_tokens: 1,
        };
        assert!(price.validate(TOKENS_MAX).is_ok(), "the price is valid");
        settings.models.insert(MODEL.to_owned(), price);
    })
    .await;
    harness.fund(USER, "g-1", i64::MAX / 2).await;

    let reply = harness
        .request(&start(USER, STREAM, "m-start", MODEL, 0, 1), "c-start")
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");

    let messages = [
        Outbound::json(&chunk(USER, STREAM, 0, "a", Some(TOKENS_MAX))),
        Outbound::json(&chunk(USER, STREAM, 1, "b", Some(TOKENS_MAX))),
        Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None)),
    ];
    harness.publish_all(&messages).await;

    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["counted_completion_tokens"], TOKENS_MAX, "{settled}");
    assert_eq!(settled["completion_tokens"], TOKENS_MAX, "{settled}");
    let product = i128::from(TOKENS_MAX) * i128::from(OUTPUT_PER_MILLION);
    let cost = (product + 999_999) / 1_000_000;
    assert_eq!(settled["cost"].as_i64().map(i128::from), Some(cost), "{settled}");
    let capped = metric_value(&harness.metrics().await, "stream_credits_counted_usage_capped_total");
    assert_eq!(capped, Some(1.0), "streams whose count reached the limit");

    harness.finish().await;
}
