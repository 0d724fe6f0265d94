//! A start without `max_output_tokens` holds an allowance sized from the
//! completions of the user's recent streams, else of the model's across
//! users, else the model's maximum; the grant says which. A user at the
//! stream limit is told when to retry.

mod common;

use common::{Harness, ROUND_MODEL, ROUND_MODEL_MAX_OUTPUT, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;
use stream_credits::settings::Settings;

const PROMPT_TOKENS: u64 = 10;
const BALANCE: i64 = 1_000_000;

/// Completion sizes of the streams that make up a history. With the
/// tests' 60th percentile, `percentile_disc` picks 30.
const COMPLETIONS: [u64; 5] = [50, 10, 40, 20, 30];
const PERCENTILE_60_TOKENS: u64 = 30;

fn history_settings(settings: &mut Settings) {
    settings.reservations.history_percentile = 60;
    settings.reservations.history_streams_min = 5;
    settings.reservations.history_streams = 50;
}

/// Runs one stream to completion with provider usage of `completion_tokens`.
async fn complete_stream(harness: &Harness, user: &str, stream: &str, completion_tokens: u64) {
    let reply = harness
        .request(
            &start(
                user,
                stream,
                &format!("{stream}-start"),
                ROUND_MODEL,
                PROMPT_TOKENS,
                100,
            ),
            &format!("{stream}-request"),
        )
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    let usage = Some((PROMPT_TOKENS, completion_tokens));
    harness
        .publish(&end(
            user,
            stream,
            &format!("{stream}-end"),
            EndStatus::Completed,
            usage,
        ))
        .await;
    let settled = harness.event("reservation.settled", stream).await;
    assert_eq!(settled["completion_tokens"], completion_tokens, "{settled}");
}

/// Asks for a hold without `max_output_tokens` and returns the reply.
async fn start_unsized(harness: &Harness, user: &str, stream: &str) -> Value {
    let mut body = start(
        user,
        stream,
        &format!("{stream}-start"),
        ROUND_MODEL,
        PROMPT_TOKENS,
        1,
    );
    body.as_object_mut()
        .expect("a start is an object")
        .remove("max_output_tokens");
    harness.request(&body, &format!("{stream}-request")).await
}

/// Ends a stream as failed without usage, which charges nothing and adds
/// nothing to any history.
async fn fail_stream(harness: &Harness, user: &str, stream: &str) {
    harness
        .publish(&end(
            user,
            stream,
            &format!("{stream}-end"),
            EndStatus::Failed,
            None,
        ))
        .await;
    harness.event("reservation.settled", stream).await;
}

fn assert_sized(reply: &Value, sized_by: &str, output_tokens: u64) {
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_eq!(reply["sized_by"], sized_by, "{reply}");
    assert_eq!(reply["max_output_tokens"], output_tokens, "{reply}");
    // Round prices: 1 credit per prompt token, 2 per output token.
    let reserved = PROMPT_TOKENS as i64 + 2 * output_tokens as i64;
    assert_eq!(reply["reserved"], reserved, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_history_holds_model_default() {
    let harness = Harness::start("hist_none", history_settings).await;
    harness.fund("u-new", "g-1", BALANCE).await;

    let reply = start_unsized(&harness, "u-new", "s-new").await;
    assert_sized(&reply, "model_default", ROUND_MODEL_MAX_OUTPUT);

    let explicit = harness
        .request(
            &start(
                "u-new",
                "s-explicit",
                "m-explicit",
                ROUND_MODEL,
                PROMPT_TOKENS,
                7,
            ),
            "c-explicit",
        )
        .await;
    assert_sized(&explicit, "max_output_tokens", 7);

    let sized_by: Vec<Option<String>> =
        sqlx::query_scalar("SELECT sized_by FROM holds ORDER BY opened_at")
            .fetch_all(&harness.pool)
            .await
            .expect("read the holds");
    let expected = ["model_default", "max_output_tokens"].map(|code| Some(code.to_owned()));
    assert_eq!(sized_by, expected);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_history_sizes_the_hold() {
    const USER: &str = "u-hist";
    let harness = Harness::start("hist_user", history_settings).await;
    harness.fund(USER, "g-1", BALANCE).await;

    // Four completed streams are one short of a history.
    for (index, tokens) in COMPLETIONS[..4].iter().enumerate() {
        complete_stream(&harness, USER, &format!("s-{index}"), *tokens).await;
    }
    let short = start_unsized(&harness, USER, "s-short").await;
    assert_sized(&short, "model_default", ROUND_MODEL_MAX_OUTPUT);
    fail_stream(&harness, USER, "s-short").await;

    complete_stream(&harness, USER, "s-4", COMPLETIONS[4]).await;
    let sized = start_unsized(&harness, USER, "s-sized").await;
    assert_sized(&sized, "user_history", PERCENTILE_60_TOKENS);

    // A user with no streams of their own is sized from the model's.
    harness.fund("u-other", "g-2", BALANCE).await;
    let other = start_unsized(&harness, "u-other", "s-other").await;
    assert_sized(&other, "model_history", PERCENTILE_60_TOKENS);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_by_model_maximum() {
    const USER: &str = "u-long";
    let harness = Harness::start("hist_max", history_settings).await;
    harness.fund(USER, "g-1", BALANCE).await;
    for index in 0..5 {
        complete_stream(
            &harness,
            USER,
            &format!("s-{index}"),
            10 * ROUND_MODEL_MAX_OUTPUT,
        )
        .await;
    }

    let reply = start_unsized(&harness, USER, "s-sized").await;
    assert_sized(&reply, "user_history", ROUND_MODEL_MAX_OUTPUT);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizing_off_holds_model_default() {
    const USER: &str = "u-off";
    let harness = Harness::start("hist_off", |settings| {
        history_settings(settings);
        settings.reservations.size_from_history = false;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;
    for (index, tokens) in COMPLETIONS.iter().enumerate() {
        complete_stream(&harness, USER, &format!("s-{index}"), *tokens).await;
    }

    let reply = start_unsized(&harness, USER, "s-unsized").await;
    assert_sized(&reply, "model_default", ROUND_MODEL_MAX_OUTPUT);

    harness.finish().await;
}

/// Moves the open hold of `stream` so it looks `age_seconds` old and idle
/// for `idle_seconds`.
async fn age_open_hold(harness: &Harness, stream: &str, age_seconds: i64, idle_seconds: i64) {
    sqlx::query(
        "UPDATE holds SET opened_at = now() - make_interval(secs => $2), \
         last_event_at = now() - make_interval(secs => $3) WHERE stream_id = $1",
    )
    .bind(stream)
    .bind(age_seconds as f64)
    .bind(idle_seconds as f64)
    .execute(&harness.pool)
    .await
    .expect("age the open hold");
}

/// Asks for a second stream, which the limit of one denies, and returns
/// its `retry_after_seconds`.
async fn denied_retry_after(harness: &Harness, user: &str, attempt: &str) -> u64 {
    let reply = harness
        .request(
            &start(user, attempt, attempt, ROUND_MODEL, PROMPT_TOKENS, 10),
            attempt,
        )
        .await;
    assert_eq!(reply["type"], "reservation.denied", "{reply}");
    assert_eq!(reply["reason"], "too_many_active_streams", "{reply}");
    reply["retry_after_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retry_after_seconds in {reply}"))
}

fn assert_near(actual: u64, expected: u64) {
    // The test's statements and the worker's read the clock a moment
    // apart, so a second either way is allowed.
    assert!(
        actual.abs_diff(expected) <= 1,
        "retry_after_seconds is {actual}, expected {expected} ± 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_denial_says_when_to_retry() {
    const USER: &str = "u-busy";
    const TTL_SECONDS: u64 = 3600;
    let harness = Harness::start("hist_retry", |settings| {
        history_settings(settings);
        settings.reservations.max_active_per_user = 1;
        settings.reservations.ttl_seconds = TTL_SECONDS;
    })
    .await;
    harness.fund(USER, "g-1", BALANCE).await;

    // Without history the only bound is the open hold's expiry.
    harness
        .request(
            &start(USER, "s-open-0", "m-open-0", ROUND_MODEL, PROMPT_TOKENS, 10),
            "c-open-0",
        )
        .await;
    assert_near(
        denied_retry_after(&harness, USER, "m-try-0").await,
        TTL_SECONDS,
    );
    fail_stream(&harness, USER, "s-open-0").await;

    // Five completed streams that each took 60 seconds.
    for (index, tokens) in COMPLETIONS.iter().enumerate() {
        complete_stream(&harness, USER, &format!("s-{index}"), *tokens).await;
    }
    sqlx::query(
        "UPDATE holds SET opened_at = settled_at - interval '60 seconds' \
         WHERE user_id = $1 AND settle_status = 'completed'",
    )
    .bind(USER)
    .execute(&harness.pool)
    .await
    .expect("set the stream durations");

    // The open stream is 20 seconds old, so it should end in 40.
    harness
        .request(
            &start(USER, "s-open-1", "m-open-1", ROUND_MODEL, PROMPT_TOKENS, 10),
            "c-open-1",
        )
        .await;
    age_open_hold(&harness, "s-open-1", 20, 0).await;
    assert_near(denied_retry_after(&harness, USER, "m-try-1").await, 40);

    // A stream past the typical duration may end any moment.
    age_open_hold(&harness, "s-open-1", 90, 0).await;
    assert_eq!(denied_retry_after(&harness, USER, "m-try-2").await, 1);

    // A hold that expires in 10 seconds frees its slot by then at the
    // latest.
    let idle = TTL_SECONDS as i64 - 10;
    age_open_hold(&harness, "s-open-1", 20, idle).await;
    assert_near(denied_retry_after(&harness, USER, "m-try-3").await, 10);

    harness.finish().await;
}
