//! Invalid deliveries are dead-lettered with their reason code, and the
//! worker goes on with the valid ones after them.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, Outbound, ROUND_MODEL, grant, start};
use serde_json::json;

const USER: &str = "u-bad";

/// Builds an outbound message for `USER` with an AMQP `message_id` that names
/// the case, so the dead letter can be matched to it.
fn raw(case: &str, body: Vec<u8>) -> Outbound {
    Outbound {
        routing_key: USER.to_owned(),
        body,
        message_id: Some(case.to_owned()),
        correlation_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered() {
    let harness = Harness::start("badinput", |_| {}).await;

    let mut too_large = serde_json::to_vec(&grant(USER, "g-large", 5)).expect("serialize");
    too_large.resize(harness.settings.limits.message_bytes_max + 1, b' ');

    let mut unknown_type = grant(USER, "g-unknown", 5);
    unknown_type["type"] = json!("credits.revoked");

    let mut missing_field = start(USER, "s-missing", "m-missing", ROUND_MODEL, 10, 10);
    missing_field
        .as_object_mut()
        .expect("a start is an object")
        .remove("stream_id");
    missing_field["prompt"] = json!("secret-prompt-words");

    let negative_field = grant(USER, "g-negative", -5);

    // PostgreSQL cannot store a NUL in text, so these must fail in the
    // decoder rather than in a transaction that is retried.
    let mut nul_reason = grant(USER, "g-nul-reason", 5);
    nul_reason["reason"] = json!("top\u{0}up");
    let mut nul_user = grant(USER, "g-nul-user", 5);
    nul_user["user_id"] = json!("u-bad\u{0}");

    // Written by hand, because serde_json cannot build an object with a
    // key twice.
    let duplicate_key = format!(
        r#"{{"type":"credits.granted","message_id":"g-duplicate","user_id":"{USER}",
            "amount":1,"amount":1000000,"occurred_at":"2026-12-04T10:00:00Z"}}"#
    );

    let cases: [(&str, Vec<u8>, &str); 9] = [
        (
            "not-json",
            b"{\"type\": \"credits.granted\", ".to_vec(),
            "invalid_json",
        ),
        (
            "not-utf8",
            b"{\"type\": \"credits.granted\", \"user_id\": \"\xff\xfe\"}".to_vec(),
            "invalid_utf8",
        ),
        ("too-large", too_large, "too_large"),
        (
            "unknown-type",
            serde_json::to_vec(&unknown_type).expect("serialize"),
            "unknown_type",
        ),
        (
            "missing-field",
            serde_json::to_vec(&missing_field).expect("serialize"),
            "invalid_field",
        ),
        (
            "negative-field",
            serde_json::to_vec(&negative_field).expect("serialize"),
            "invalid_field",
        ),
        (
            "nul-reason",
            serde_json::to_vec(&nul_reason).expect("serialize"),
            "invalid_field",
        ),
        (
            "nul-user-id",
            serde_json::to_vec(&nul_user).expect("serialize"),
            "invalid_field",
        ),
        ("duplicate-key", duplicate_key.into_bytes(), "invalid_json"),
    ];
    let messages: Vec<Outbound> = cases
        .iter()
        .map(|(case, body, _)| raw(case, body.clone()))
        .collect();
    harness.publish_all(&messages).await;

    // Valid messages after the bad ones are still applied.
    harness.publish(&grant(USER, "g-ok", 1000)).await;
    let granted = harness
        .request(&start(USER, "s-ok", "m-ok", ROUND_MODEL, 10, 10), "c-ok")
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");
    assert_eq!(granted["reserved"], 30, "{granted}");
    assert_eq!(granted["available_after"], 970, "{granted}");

    // An invalid start with a reply address gets a denial and is
    // dead-lettered.
    let mut invalid_start = start(USER, "s-invalid", "m-invalid", ROUND_MODEL, 10, 10);
    invalid_start["max_output_tokens"] = json!(-1);
    let denied = harness.request(&invalid_start, "c-invalid").await;
    assert_eq!(denied["type"], "reservation.denied", "{denied}");
    assert_eq!(denied["reason"], "invalid_request", "{denied}");
    assert_eq!(denied["user_id"], USER, "{denied}");
    assert_eq!(denied["stream_id"], "s-invalid", "{denied}");
    assert!(denied["event_id"].is_string(), "{denied}");

    // A start whose stream id contains a NUL is denied at once, without the
    // id it could not store.
    let nul_start = start(USER, "s-nul\u{0}", "m-nul-start", ROUND_MODEL, 10, 10);
    let denied = harness.request(&nul_start, "c-nul-start").await;
    assert_eq!(denied["type"], "reservation.denied", "{denied}");
    assert_eq!(denied["reason"], "invalid_request", "{denied}");
    assert_eq!(denied["user_id"], USER, "{denied}");
    assert!(denied.get("stream_id").is_none(), "{denied}");
    let detail = denied["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("`stream_id`"), "{denied}");
    harness.barrier(USER).await;

    let letters = harness.take_dead_letters().await;
    assert_eq!(
        letters.len(),
        cases.len() + 2,
        "dead letters: {:?}",
        letters
            .iter()
            .map(|l| (&l.message_id, &l.error))
            .collect::<Vec<_>>()
    );
    let expected = cases
        .iter()
        .map(|(case, _, reason)| (*case, *reason))
        .chain([
            ("m-invalid", "invalid_field"),
            ("m-nul-start", "invalid_field"),
        ]);
    for (case, reason) in expected {
        let letter = letters
            .iter()
            .find(|letter| letter.message_id.as_deref() == Some(case))
            .unwrap_or_else(|| panic!("no dead letter for case {case}"));
        assert_eq!(letter.error.as_deref(), Some(reason), "case {case}");
        assert_eq!(letter.routing_key.as_deref(), Some(USER), "case {case}");
        let detail = letter.detail.as_deref().unwrap_or_default();
        assert!(!detail.is_empty(), "case {case} has no detail header");
        assert!(
            !detail.contains("secret"),
            "case {case} detail quotes message text: {detail}"
        );
    }
    let too_large_letter = letters
        .iter()
        .find(|letter| letter.message_id.as_deref() == Some("too-large"))
        .expect("too-large dead letter");
    assert_eq!(
        too_large_letter.body.len(),
        harness.settings.limits.message_bytes_max + 1,
        "a dead letter keeps the original body"
    );

    let detail_of = |case: &str| {
        letters
            .iter()
            .find(|letter| letter.message_id.as_deref() == Some(case))
            .and_then(|letter| letter.detail.clone())
            .unwrap_or_default()
    };
    assert!(
        detail_of("nul-reason").contains("`reason`"),
        "{}",
        detail_of("nul-reason")
    );
    assert!(
        detail_of("nul-user-id").contains("`user_id`"),
        "{}",
        detail_of("nul-user-id")
    );
    let duplicate_detail = detail_of("duplicate-key");
    assert!(duplicate_detail.contains("`amount`"), "{duplicate_detail}");
    assert!(!duplicate_detail.contains("1000000"), "{duplicate_detail}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, 1000, "only the valid grant is applied");
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        1,
        "grant ledger rows"
    );

    harness.finish().await;
}

/// Shortest time a retried message spends in the pauses between its
/// attempts (0.2 + 0.4 + 0.8 + 1.6 s with the default delivery limit),
/// which a message that is rejected at once never waits.
const RETRY_PAUSES_MIN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_field_is_dead_lettered_without_retry() {
    let harness = Harness::start("badnul", |_| {}).await;

    let mut nul_message_id = grant(USER, "g-nul", 5);
    nul_message_id["message_id"] = json!("g-\u{0}");
    let published = Instant::now();
    harness
        .publish_all(&[raw(
            "nul-message-id",
            serde_json::to_vec(&nul_message_id).unwrap(),
        )])
        .await;
    harness.wait_dead_letter_count(1).await;
    let elapsed = published.elapsed();

    let letters = harness.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error.as_deref(), Some("invalid_field"));
    let detail = letters[0].detail.as_deref().unwrap_or_default();
    assert!(detail.contains("`message_id`"), "{detail}");
    assert!(
        elapsed < RETRY_PAUSES_MIN,
        "the dead letter took {elapsed:?}"
    );
    assert_eq!(harness.ledger_rows(USER, "grant").await, 0);

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misrouted_message_is_dead_lettered() {
    let harness = Harness::start("misrouted", |_| {}).await;
    harness.fund(USER, "g-1", 1000).await;

    // A grant for USER published under another user's routing key may land
    // on another shard than USER's other messages.
    let misrouted = Outbound {
        routing_key: "u-elsewhere".to_owned(),
        body: serde_json::to_vec(&grant(USER, "g-misrouted", 5)).expect("serialize"),
        message_id: Some("g-misrouted".to_owned()),
        correlation_id: None,
    };
    harness.publish_all(&[misrouted]).await;

    harness.wait_dead_letter_count(1).await;
    let letters = harness.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error.as_deref(), Some("invalid_field"));
    assert_eq!(letters[0].routing_key.as_deref(), Some("u-elsewhere"));
    let detail = letters[0].detail.as_deref().unwrap_or_default();
    assert!(detail.contains("routing key"), "{detail}");
    assert_eq!(harness.account(USER).await.balance, 1000, "the misrouted grant is not applied");

    harness.finish().await;
}
