//! Invalid deliveries are dead-lettered with their reason code, and the
//! worker goes on with the valid ones after them.

mod common;

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

    let cases: [(&str, Vec<u8>, &str); 6] = [
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
    harness.barrier(USER).await;

    let letters = harness.take_dead_letters().await;
    assert_eq!(
        letters.len(),
        cases.len() + 1,
        "dead letters: {:?}",
        letters
            .iter()
            .map(|l| (&l.message_id, &l.error))
            .collect::<Vec<_>>()
    );
    let expected = cases
        .iter()
        .map(|(case, _, reason)| (*case, *reason))
        .chain([("m-invalid", "invalid_field")]);
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

    let account = harness.account(USER).await;
    assert_eq!(account.balance, 1000, "only the valid grant is applied");
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        1,
        "grant ledger rows"
    );

    harness.finish().await;
}
