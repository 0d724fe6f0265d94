//! Checks the committed JSON Schemas in `schemas/` against the wire types
//! they are generated from, and the wire contract's example messages
//! against those schemas and the decoder.
//!
//! `UPDATE_SCHEMAS=1 cargo test --test schemas` rewrites the schema files
//! from the types instead of comparing them.

use std::path::PathBuf;

use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};
use stream_credits::accounts::AccountDetail;
use stream_credits::messages::{
    self, ChunkEmitted, CreditsGranted, EndStatus, Inbound, PromptInput, ReservationAdjusted,
    ReservationDenied, ReservationExtended, ReservationGranted, ReservationSettled, StreamEnded,
    StreamStarted, UsageOverReservation,
};
use stream_credits::settings::Settings;

fn schema_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(format!("{name}.json"))
}

fn update_requested() -> bool {
    std::env::var("UPDATE_SCHEMAS").is_ok_and(|value| value == "1")
}

/// Generates the schema of `T` with schemars' default settings
/// (JSON Schema draft 2020-12).
fn generated_schema<T: JsonSchema>() -> Value {
    schema_for!(T).to_value()
}

/// Compares `schemas/{name}.json` with the schema generated for `T`, or
/// writes the file when `UPDATE_SCHEMAS=1` is set.
fn check_schema_file<T: JsonSchema>(name: &str) {
    let path = schema_path(name);
    let generated = generated_schema::<T>();

    if update_requested() {
        let mut text = serde_json::to_string_pretty(&generated).expect("a schema serialises");
        text.push('\n');
        std::fs::write(&path, text)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", path.display()));
        return;
    }

    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "failed to read {}: {error}; create it with `UPDATE_SCHEMAS=1 cargo test --test schemas`",
            path.display()
        )
    });
    let committed: Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid JSON: {error}", path.display()));
    assert_eq!(
        committed,
        generated,
        "{} differs from the schema generated from the Rust type; if the type change is \
         intended, rewrite the file with `UPDATE_SCHEMAS=1 cargo test --test schemas` and \
         review the diff",
        path.display()
    );
}

/// Asserts that `instance` is valid against the schema generated for `T`,
/// with `format` checked (`date-time`, `uuid`), and lists every error
/// otherwise.
fn assert_valid<T: JsonSchema>(name: &str, instance: &Value) {
    let schema = generated_schema::<T>();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|error| panic!("schema {name} is not a valid JSON Schema: {error}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|error| format!("at `{}`: {error}", error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "example {name} is invalid against its schema: {errors:#?}"
    );
}

/// Decodes `body` with the default limits, as the worker does.
fn decode(body: &Value) -> Inbound {
    let limits = Settings::default().limits;
    messages::decode(body.to_string().as_bytes(), &limits)
        .unwrap_or_else(|rejection| panic!("decoder rejected the example: {rejection}"))
}

// The inbound examples of the wire contract, with the elided `occurred_at`
// values filled in with real RFC 3339 times.

fn credits_granted_example() -> Value {
    json!({"type": "credits.granted", "message_id": "g-1", "user_id": "u-1",
           "amount": 50000, "reason": "purchase", "occurred_at": "2026-12-04T10:00:00Z"})
}

fn stream_started_example() -> Value {
    json!({"type": "stream.started", "message_id": "m-1", "user_id": "u-1",
           "stream_id": "s-1", "model": "gpt-4o-mini",
           "messages": [{"role": "user", "content": "Explain quicksort"}],
           "max_output_tokens": 1024, "occurred_at": "2026-12-04T10:00:01Z"})
}

fn chunk_emitted_example() -> Value {
    json!({"type": "chunk.emitted", "message_id": "m-2", "user_id": "u-1",
           "stream_id": "s-1", "seq": 0, "delta": "Quick",
           "occurred_at": "2026-12-04T10:00:02Z"})
}

fn stream_ended_example() -> Value {
    json!({"type": "stream.ended", "message_id": "m-9", "user_id": "u-1",
           "stream_id": "s-1", "status": "completed",
           "usage": {"prompt_tokens": 12, "completion_tokens": 340},
           "occurred_at": "2026-12-04T10:00:09Z"})
}

/// Builds the contract's `reservation.settled` example, with the elided
/// ids filled in with real UUIDs.
fn reservation_settled_example() -> Value {
    json!({"type": "reservation.settled",
           "event_id": "0193a1b2-7c4d-7e5f-8a6b-9c0d1e2f3a4b", "user_id": "u-1",
           "stream_id": "s-1", "reservation_id": "0193a1b2-6b3c-7d4e-9f5a-6b7c8d9e0f1a",
           "status": "completed",
           "reserved": 1830, "cost": 212, "charged": 212, "refunded": 1618,
           "overrun": 0, "forgiven": 0, "prompt_tokens": 12,
           "completion_tokens": 340, "counted_completion_tokens": 338,
           "usage_source": "provider", "balance_after": 49788})
}

#[test]
fn credits_granted_schema_matches_file() {
    check_schema_file::<CreditsGranted>("credits.granted");
}

#[test]
fn stream_started_schema_matches_file() {
    check_schema_file::<StreamStarted>("stream.started");
}

#[test]
fn chunk_emitted_schema_matches_file() {
    check_schema_file::<ChunkEmitted>("chunk.emitted");
}

#[test]
fn stream_ended_schema_matches_file() {
    check_schema_file::<StreamEnded>("stream.ended");
}

#[test]
fn reservation_granted_schema_matches_file() {
    check_schema_file::<ReservationGranted>("reservation.granted");
}

#[test]
fn reservation_denied_schema_matches_file() {
    check_schema_file::<ReservationDenied>("reservation.denied");
}

#[test]
fn reservation_settled_schema_matches_file() {
    check_schema_file::<ReservationSettled>("reservation.settled");
}

#[test]
fn reservation_adjusted_schema_matches_file() {
    check_schema_file::<ReservationAdjusted>("reservation.adjusted");
}

#[test]
fn usage_over_reservation_schema_matches_file() {
    check_schema_file::<UsageOverReservation>("usage.over_reservation");
}

#[test]
fn reservation_extended_schema_matches_file() {
    check_schema_file::<ReservationExtended>("reservation.extended");
}

#[test]
fn account_view_schema_matches_file() {
    check_schema_file::<AccountDetail>("account");
}

#[test]
fn credits_granted_example_is_valid() {
    let example = credits_granted_example();
    assert_valid::<CreditsGranted>("credits.granted", &example);

    let Inbound::CreditsGranted(granted) = decode(&example) else {
        panic!("credits.granted example decoded as another type");
    };
    assert_eq!(granted.amount, 50000);
    assert_eq!(granted.reason.as_deref(), Some("purchase"));
}

#[test]
fn stream_started_example_is_valid() {
    let example = stream_started_example();
    assert_valid::<StreamStarted>("stream.started", &example);

    let Inbound::StreamStarted(started) = decode(&example) else {
        panic!("stream.started example decoded as another type");
    };
    assert_eq!(started.model, "gpt-4o-mini");
    assert_eq!(started.max_output_tokens, Some(1024));
    assert!(matches!(
        started.prompt_input(),
        PromptInput::Messages(messages) if messages.len() == 1
    ));
}

#[test]
fn chunk_emitted_example_is_valid() {
    let example = chunk_emitted_example();
    assert_valid::<ChunkEmitted>("chunk.emitted", &example);

    let Inbound::ChunkEmitted(chunk) = decode(&example) else {
        panic!("chunk.emitted example decoded as another type");
    };
    assert_eq!(chunk.seq, 0);
    assert_eq!(chunk.delta, "Quick");
    assert_eq!(chunk.tokens, None);
}

#[test]
fn stream_ended_example_is_valid() {
    let example = stream_ended_example();
    assert_valid::<StreamEnded>("stream.ended", &example);

    let Inbound::StreamEnded(ended) = decode(&example) else {
        panic!("stream.ended example decoded as another type");
    };
    assert_eq!(ended.status, EndStatus::Completed);
    let usage = ended.usage.expect("the example carries usage");
    assert_eq!(usage.prompt_tokens, 12);
    assert_eq!(usage.completion_tokens, 340);
    assert_eq!(usage.cached_prompt_tokens, None);
}

/// Checks the contract's `reservation.settled` example (names, types and
/// enum values). The example omits `model` and `cached_prompt_tokens`,
/// which the worker adds to every settlement, so they are filled in.
#[test]
fn settled_example_plus_omitted_fields_valid() {
    let mut example = reservation_settled_example();
    example["model"] = json!("gpt-4o-mini");
    example["cached_prompt_tokens"] = json!(0);
    assert_valid::<ReservationSettled>("reservation.settled", &example);
}

/// Checks that the schemas reject a sample of messages that the decoder
/// rejects, so that the example tests above can fail.
#[test]
fn invalid_inbound_fails_schema() {
    let mut zero_amount = credits_granted_example();
    zero_amount["amount"] = json!(0);
    let mut unknown_status = stream_ended_example();
    unknown_status["status"] = json!("paused");
    let mut bad_time = chunk_emitted_example();
    bad_time["occurred_at"] = json!("yesterday");
    let mut missing_stream = stream_started_example();
    missing_stream.as_object_mut().unwrap().remove("stream_id");

    let cases = [
        (
            "credits.granted amount 0",
            generated_schema::<CreditsGranted>(),
            zero_amount,
        ),
        (
            "stream.ended status paused",
            generated_schema::<StreamEnded>(),
            unknown_status,
        ),
        (
            "chunk.emitted occurred_at yesterday",
            generated_schema::<ChunkEmitted>(),
            bad_time,
        ),
        (
            "stream.started without stream_id",
            generated_schema::<StreamStarted>(),
            missing_stream,
        ),
    ];
    for (case, schema, instance) in cases {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("generated schemas are valid JSON Schemas");
        assert!(!validator.is_valid(&instance), "schema accepted {case}");

        let body = instance.to_string();
        let decoded = messages::decode(body.as_bytes(), &Settings::default().limits);
        assert!(decoded.is_err(), "decoder accepted {case}");
    }
}
