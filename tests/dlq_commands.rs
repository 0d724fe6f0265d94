//! `stream-credits dlq list`, `show`, `replay` and `purge` against the
//! test's topology and database. A chunk that arrives before its stream's
//! start is dead-lettered as `unknown_stream`. After the start, replaying
//! it counts its tokens once, however often the same dead letter is
//! replayed. Further tests check that `list` keeps one order, that
//! `show` prints every property and header, that `replay` and `purge`
//! fail on ids they cannot find, that broker letters with one body but
//! other properties get ids of their own, and that `list` against a
//! prefix no worker declared names the missing queue and creates
//! nothing, and that `list` takes no id from a body with a repeated key
//! while `show` prints that body as sent.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, broker_dead_letter, chunk, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-dlq";
const STREAM: &str = "s-dlq";
const EARLY_CHUNK_ID: &str = "s-dlq-c0";
const BALANCE: i64 = 10_000;

/// Round-price hold: 10 prompt tokens + 2 * 100 output tokens.
const PROMPT_TOKENS: u64 = 10;
const MAX_OUTPUT_TOKENS: u64 = 100;
const RESERVED: i64 = 210;

/// Tokens of the chunk that came too early. The completed end without
/// usage charges 10 + 2 * 7 = 24.
const CHUNK_TOKENS: u64 = 7;
const CHARGE: i64 = 24;

/// Exit code of a runtime failure, such as an id not found.
const RUNTIME_FAILURE: i32 = 1;
/// Exit code of bad usage.
const USAGE_ERROR: i32 = 2;

/// Runs a command that must succeed and returns its standard output.
async fn run_ok(harness: &Harness, args: &[&str]) -> String {
    let output = harness.run_cli(args).await;
    assert!(
        output.status.success(),
        "{args:?} exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the output is UTF-8")
}

/// Runs `dlq list --json` and returns its entries.
async fn list(harness: &Harness) -> Vec<Value> {
    let stdout = run_ok(harness, &["dlq", "list", "--json"]).await;
    serde_json::from_str(&stdout).expect("dlq list --json prints a JSON array")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_work() {
    let harness = Harness::start("dlqcli", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    // A chunk before its stream's start, and a body that is not JSON.
    let early_chunk = chunk(USER, STREAM, 0, "early words", Some(CHUNK_TOKENS));
    let not_json = Outbound {
        routing_key: USER.to_owned(),
        body: b"{\"type\": \"chunk.emitted\", ".to_vec(),
        message_id: Some("not-json".to_owned()),
        correlation_id: None,
    };
    harness
        .publish_all(&[Outbound::json(&early_chunk), not_json])
        .await;
    harness.barrier(USER).await;
    harness.wait_dead_letter_count(2).await;

    // list: ids, reasons and routing keys.
    let listed = list(&harness).await;
    assert_eq!(listed.len(), 2, "listed: {listed:?}");
    let unknown = listed
        .iter()
        .find(|letter| letter["reason"] == "unknown_stream")
        .unwrap_or_else(|| panic!("no unknown_stream letter in {listed:?}"));
    assert_eq!(unknown["routing_key"], USER, "{unknown}");
    assert_eq!(unknown["message_type"], "chunk.emitted", "{unknown}");
    assert_eq!(unknown["message_id"], EARLY_CHUNK_ID, "{unknown}");
    let unknown_id = unknown["id"]
        .as_str()
        .expect("a dead letter has a string id")
        .to_owned();
    let invalid = listed
        .iter()
        .find(|letter| letter["reason"] == "invalid_json")
        .unwrap_or_else(|| panic!("no invalid_json letter in {listed:?}"));
    assert_eq!(invalid["routing_key"], USER, "{invalid}");
    assert_eq!(invalid["message_id"], "not-json", "the AMQP property names it: {invalid}");
    assert_ne!(invalid["id"], unknown_id.as_str(), "{listed:?}");

    // show: the original body.
    let show_output: Value =
        serde_json::from_str(&run_ok(&harness, &["dlq", "show", &unknown_id]).await)
            .expect("dlq show prints JSON");
    assert_eq!(show_output["body"], early_chunk, "{show_output}");
    assert_eq!(
        show_output["dead_letter"]["id"],
        unknown_id.as_str(),
        "{show_output}"
    );
    assert_eq!(
        show_output["dead_letter"]["reason"], "unknown_stream",
        "{show_output}"
    );
    let output = harness.run_cli(&["dlq", "show", "no-such-letter"]).await;
    assert!(!output.status.success(), "show of an unknown id exited 0");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-letter"), "stderr: {stderr}");
    harness.wait_dead_letter_count(2).await;

    let reply = harness
        .request(
            &start(
                USER,
                STREAM,
                "m-start",
                ROUND_MODEL,
                PROMPT_TOKENS,
                MAX_OUTPUT_TOKENS,
            ),
            "c-start",
        )
        .await;
    assert_eq!(reply["type"], "reservation.granted", "{reply}");
    assert_eq!(reply["reserved"], RESERVED, "{reply}");
    assert_eq!(harness.hold_counts(USER, STREAM).await, (0, 0), "counted before any replay");

    // replay --dry-run: names both letters and changes nothing.
    let stdout = run_ok(&harness, &["dlq", "replay", "--all", "--dry-run"]).await;
    assert!(stdout.contains(&unknown_id), "dry-run output: {stdout}");
    assert_eq!(stdout.lines().count(), 2, "dry-run output: {stdout}");
    harness.barrier(USER).await;
    harness.wait_dead_letter_count(2).await;
    assert_eq!(harness.hold_counts(USER, STREAM).await, (0, 0), "counted after a dry run");

    // A copy of the letter, as a replay that published but did not remove
    // it would leave behind.
    let copy = harness
        .peek_dead_letters()
        .await
        .into_iter()
        .find(|letter| letter.dead_letter_id.as_deref() == Some(unknown_id.as_str()))
        .expect("the unknown_stream letter is still queued");
    harness.wait_dead_letter_count(2).await;

    // replay --reason: only the unknown_stream letter, now counted.
    let stdout = run_ok(&harness, &["dlq", "replay", "--reason", "unknown_stream"]).await;
    assert!(stdout.contains(&unknown_id), "replay output: {stdout}");
    harness.barrier(USER).await;
    assert_eq!(
        harness.hold_counts(USER, STREAM).await,
        (CHUNK_TOKENS as i64, 1),
        "counted after the replay"
    );
    harness.wait_dead_letter_count(1).await;
    let listed = list(&harness).await;
    assert_eq!(listed.len(), 1, "listed after the replay: {listed:?}");
    assert_eq!(listed[0]["reason"], "invalid_json", "{listed:?}");

    // The same letter replayed again changes nothing.
    harness.publish_dead_letter_copy(&copy).await;
    harness.wait_dead_letter_count(2).await;
    run_ok(&harness, &["dlq", "replay", "--id", &unknown_id]).await;
    harness.barrier(USER).await;
    assert_eq!(
        harness.hold_counts(USER, STREAM).await,
        (CHUNK_TOKENS as i64, 1),
        "counted after replaying the same letter again"
    );
    harness.wait_dead_letter_count(1).await;

    let output = harness
        .run_cli(&["dlq", "replay", "--reason", "no_such_reason"])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(USAGE_ERROR),
        "replay with an unknown reason: {stderr}"
    );
    assert!(stderr.contains("expected one of invalid_json, "), "{stderr}");

    // purge: refused without --yes, then removes everything.
    let output = harness.run_cli(&["dlq", "purge", "--all"]).await;
    assert_eq!(
        output.status.code(),
        Some(USAGE_ERROR),
        "purge without --yes: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--yes"), "stderr: {stderr}");
    harness.wait_dead_letter_count(1).await;
    run_ok(&harness, &["dlq", "purge", "--all", "--yes"]).await;
    harness.wait_dead_letter_count(0).await;

    harness
        .publish(&end(USER, STREAM, "m-end", EndStatus::Completed, None))
        .await;
    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(
        settled["counted_completion_tokens"], CHUNK_TOKENS,
        "{settled}"
    );
    assert_eq!(settled["charged"], CHARGE, "{settled}");
    assert_eq!(settled["balance_after"], BALANCE - CHARGE, "{settled}");
    harness.barrier(USER).await;

    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    let processed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_messages WHERE user_id = $1 AND message_id = $2",
    )
    .bind(USER)
    .bind(EARLY_CHUNK_ID)
    .fetch_one(&harness.pool)
    .await
    .expect("count processed messages");
    assert_eq!(processed, 1, "processed rows of the replayed chunk");
    let account = harness.account(USER).await;
    assert_eq!(account.balance, BALANCE - CHARGE);
    assert_eq!(account.reserved, 0);

    harness.finish().await;
}

/// Dead-letters one `unknown_stream` chunk for each of `streams` and waits
/// until the queue contains them all.
async fn dead_letter_chunks(harness: &Harness, streams: &[&str]) {
    harness.fund(USER, "g-1", BALANCE).await;
    let chunks: Vec<Outbound> = streams
        .iter()
        .map(|stream| Outbound::json(&chunk(USER, stream, 0, "words", Some(1))))
        .collect();
    harness.publish_all(&chunks).await;
    harness.barrier(USER).await;
    harness.wait_dead_letter_count(streams.len() as u32).await;
}

fn ids(listed: &[Value]) -> Vec<String> {
    listed
        .iter()
        .map(|letter| letter["id"].as_str().expect("a string id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_order_is_stable() {
    let harness = Harness::start("dlqorder", |_| {}).await;
    let streams = ["s-a", "s-b", "s-c", "s-d", "s-e", "s-f"];
    dead_letter_chunks(&harness, &streams).await;

    let first = ids(&list(&harness).await);
    assert_eq!(first.len(), streams.len(), "{first:?}");
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(first, sorted, "dlq list is not sorted by id");
    for _ in 0..3 {
        harness.wait_dead_letter_count(streams.len() as u32).await;
        let again = ids(&list(&harness).await);
        assert_eq!(again, first, "dlq list changed its order");
    }

    harness.wait_dead_letter_count(streams.len() as u32).await;
    let stdout = run_ok(&harness, &["dlq", "list", "--json", "--limit", "2"]).await;
    let limited: Vec<Value> = serde_json::from_str(&stdout).expect("a JSON array");
    assert_eq!(ids(&limited), first[..2], "--limit keeps the first ids");
    harness.wait_dead_letter_count(streams.len() as u32).await;
    harness.finish().await;
}

/// Runs `dlq show ID` and returns its JSON output.
async fn show(harness: &Harness, id: &str) -> Value {
    let stdout = run_ok(harness, &["dlq", "show", id]).await;
    serde_json::from_str(&stdout).expect("dlq show prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_show_prints_headers() {
    let harness = Harness::start("dlqshow", |_| {}).await;
    harness.fund(USER, "g-1", BALANCE).await;

    // A start without a model, which the worker denies and dead-letters.
    let mut invalid = start(USER, STREAM, "m-invalid", ROUND_MODEL, 1, 1);
    invalid
        .as_object_mut()
        .expect("a start is an object")
        .remove("model");
    let reply = harness.request(&invalid, "c-invalid").await;
    assert_eq!(reply["reason"], "invalid_request", "{reply}");
    harness.wait_dead_letter_count(1).await;
    harness
        .publish_dead_letter_copy(&broker_dead_letter(USER, "m-broker", br#"{"type": "chunk.emitted"}"#))
        .await;
    harness.wait_dead_letter_count(2).await;

    let listed = list(&harness).await;
    let ours = listed
        .iter()
        .find(|letter| letter["reason"] == "invalid_field")
        .unwrap_or_else(|| panic!("no invalid_field letter in {listed:?}"));
    let ours_id = ours["id"].as_str().expect("a string id").to_owned();
    let theirs = listed
        .iter()
        .find(|letter| letter["reason"] == "retries_exhausted")
        .unwrap_or_else(|| panic!("no retries_exhausted letter in {listed:?}"));
    let theirs_id = theirs["id"].as_str().expect("a string id").to_owned();

    harness.wait_dead_letter_count(2).await;
    let shown = show(&harness, &ours_id).await;
    let properties = &shown["properties"];
    assert_eq!(properties["correlation_id"], "c-invalid", "{shown}");
    assert_eq!(properties["message_id"], "m-invalid", "{shown}");
    assert_eq!(properties["content_type"], "application/json", "{shown}");
    assert_eq!(properties["delivery_mode"], 2, "{shown}");
    assert!(properties["reply_to"].is_string(), "{shown}");
    assert!(properties.get("type").is_none(), "{shown}");
    let headers = &shown["headers"];
    assert_eq!(
        headers["x-stream-credits-error"], "invalid_field",
        "{shown}"
    );
    assert_eq!(headers["x-stream-credits-routing-key"], USER, "{shown}");
    assert_eq!(
        headers["x-stream-credits-dead-letter-id"],
        ours_id.as_str(),
        "{shown}"
    );
    assert!(headers["x-stream-credits-detail"].is_string(), "{shown}");
    assert_eq!(shown["body"], invalid, "{shown}");

    harness.wait_dead_letter_count(2).await;
    let shown = show(&harness, &theirs_id).await;
    let properties = &shown["properties"];
    assert_eq!(properties["type"], "chunk.emitted", "{shown}");
    assert_eq!(properties["message_id"], "m-broker", "{shown}");
    assert_eq!(properties["delivery_mode"], 2, "{shown}");
    assert!(properties.get("reply_to").is_none(), "{shown}");
    let headers = &shown["headers"];
    let death = &headers["x-death"][0];
    assert_eq!(death["count"], 3, "{shown}");
    assert_eq!(death["reason"], "delivery_limit", "{shown}");
    assert_eq!(death["time"], 1_700_000_000, "{shown}");
    assert_eq!(death["routing-keys"], serde_json::json!([USER]), "{shown}");
    assert_eq!(headers["x-first-death-reason"], "delivery_limit", "{shown}");
    let names: Vec<&String> = headers.as_object().expect("an object").keys().collect();
    assert!(
        !names
            .iter()
            .any(|name| name.starts_with("x-stream-credits-")),
        "show added headers to a broker letter: {names:?}"
    );

    harness.wait_dead_letter_count(2).await;
    harness.finish().await;
}

/// Runs a command that must fail with `code` and returns its standard
/// error.
async fn run_failing(harness: &Harness, args: &[&str], code: i32) -> String {
    let output = harness.run_cli(args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_unknown_ids_fail() {
    let harness = Harness::start("dlqids", |_| {}).await;
    dead_letter_chunks(&harness, &["s-kept", "s-purged"]).await;
    let listed = list(&harness).await;
    let purged = listed
        .iter()
        .find(|letter| letter["message_id"] == "s-purged-c0")
        .and_then(|letter| letter["id"].as_str())
        .unwrap_or_else(|| panic!("no letter of s-purged in {listed:?}"))
        .to_owned();

    harness.wait_dead_letter_count(2).await;
    let args = [
        "dlq",
        "replay",
        "--dry-run",
        "--id",
        &purged,
        "--id",
        "nope-1",
    ];
    let stderr = run_failing(&harness, &args, RUNTIME_FAILURE).await;
    assert!(
        stderr.contains("1 dead letter would be replayed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: dead letter `nope-1` not found"),
        "{stderr}"
    );

    harness.wait_dead_letter_count(2).await;
    let args = ["dlq", "replay", "--id", "nope-1"];
    let stderr = run_failing(&harness, &args, RUNTIME_FAILURE).await;
    assert!(stderr.contains("0 dead letters replayed"), "{stderr}");
    assert!(stderr.contains("`nope-1` not found"), "{stderr}");

    harness.wait_dead_letter_count(2).await;
    let purge = [
        "dlq", "purge", "--id", &purged, "--id", "nope-2", "--id", "nope-3",
    ];
    let stderr = run_failing(&harness, &purge, USAGE_ERROR).await;
    assert!(
        stderr.starts_with("error: purge removes 1 dead letter for good"),
        "{stderr}"
    );

    harness.wait_dead_letter_count(2).await;
    let mut confirmed = purge.to_vec();
    confirmed.push("--yes");
    let stderr = run_failing(&harness, &confirmed, RUNTIME_FAILURE).await;
    assert!(stderr.contains("purged 1 dead letter\n"), "{stderr}");
    assert!(
        stderr.contains("error: dead letters `nope-2`, `nope-3` not found"),
        "{stderr}"
    );

    // The letter found was purged although other ids were not found.
    harness.wait_dead_letter_count(1).await;
    let left = list(&harness).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["message_id"], "s-kept-c0", "{left:?}");
    harness.wait_dead_letter_count(1).await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_without_topology_names_queue() {
    let harness = Harness::database_only("dlqnotopology").await;
    let missing = format!("queue `{}` does not exist", harness.names.dead);

    // A second run fails the same way only if the first declared nothing.
    for run in 1..=2 {
        let output = harness.run_cli(&["dlq", "list"]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(RUNTIME_FAILURE), "run {run}: {stderr}");
        assert!(stderr.contains(&missing), "run {run}: {stderr}");
        assert!(stderr.contains("stream-credits run"), "run {run}: {stderr}");
        assert!(!stderr.contains("lapin"), "run {run}: the library's own log lines: {stderr}");
    }

    harness.finish().await;
}

/// Two broker letters with the same body and death time, as a start sent
/// twice with other correlation ids would give, are purged one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_letters_differing_in_properties_have_own_ids() {
    let harness = Harness::start("dlqbrokerids", |_| {}).await;
    let body = br#"{"type": "chunk.emitted"}"#;
    for message_id in ["m-first", "m-second"] {
        harness
            .publish_dead_letter_copy(&broker_dead_letter(USER, message_id, body))
            .await;
    }
    harness.wait_dead_letter_count(2).await;

    let listed = list(&harness).await;
    let ids: Vec<&str> = listed.iter().filter_map(|letter| letter["id"].as_str()).collect();
    assert_eq!(ids.len(), 2, "{listed:?}");
    assert_ne!(ids[0], ids[1], "{listed:?}");

    let output = harness.run_cli(&["dlq", "purge", "--id", ids[0], "--yes"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("purged 1 dead letter"), "{stderr}");
    harness.wait_dead_letter_count(1).await;

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_escapes_control_characters() {
    let harness = Harness::start("dlq_escape", |_| {}).await;
    let id = "m-\u{1b}[2J-\u{202e}1";
    let mut invalid = common::grant(USER, id, 5);
    invalid["amount"] = Value::from(-5);
    harness.publish_all(&[Outbound::json(&invalid)]).await;
    harness.wait_dead_letter_count(1).await;

    let table = run_ok(&harness, &["dlq", "list"]).await;
    assert!(!table.contains('\u{1b}'), "the table holds a raw escape: {table:?}");
    assert!(!table.contains('\u{202e}'), "the table holds a raw override: {table:?}");
    assert!(table.contains("m-\\u{1b}[2J-\\u{202e}1"), "{table}");
    let listed = list(&harness).await;
    assert_eq!(listed[0]["message_id"], id, "JSON keeps the id as sent");

    // JSON output writes those characters as escapes: the same value to a
    // parser, nothing hidden on a terminal.
    let raw_list = run_ok(&harness, &["dlq", "list", "--json"]).await;
    let letter_id = listed[0]["id"].as_str().expect("a dead letter has a string id");
    let raw_show = run_ok(&harness, &["dlq", "show", letter_id]).await;
    for raw in [&raw_list, &raw_show] {
        assert!(!raw.contains('\u{202e}'), "the JSON holds a raw override: {raw}");
        assert!(raw.contains(r"m-\u001b[2J-\u202e1"), "{raw}");
    }
    let shown: Value = serde_json::from_str(&raw_show).expect("dlq show prints JSON");
    assert_eq!(shown["body"]["message_id"], id, "the body keeps the id as sent");

    // An id the operator typed comes back escaped in the error.
    let output = harness.run_cli(&["dlq", "show", "x-\u{1b}[2J"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "show of an unknown id exited 0");
    assert!(stderr.contains("`x-\\u{1b}[2J` not found"), "{stderr:?}");
    harness.finish().await;
}

/// A body that names two message ids was rejected for it, so `list` takes
/// neither: it falls back to the AMQP property, as for a body that is not
/// JSON. `show` prints such a body as text, both keys in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_takes_no_id_from_a_repeated_key() {
    let harness = Harness::start("dlq_repeated", |_| {}).await;
    let body = format!(
        r#"{{"type": "credits.granted", "message_id": "m-first", "message_id": "m-second", "user_id": "{USER}", "amount": 5}}"#
    );
    let repeated = Outbound {
        routing_key: USER.to_owned(),
        body: body.clone().into_bytes(),
        message_id: Some("m-property".to_owned()),
        correlation_id: None,
    };
    harness.publish_all(&[repeated]).await;
    harness.wait_dead_letter_count(1).await;

    let listed = list(&harness).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["reason"], "invalid_json", "{listed:?}");
    assert_eq!(listed[0]["message_id"], "m-property", "{listed:?}");
    assert_eq!(listed[0]["message_type"], Value::Null, "{listed:?}");

    // show gives the body as sent, as text, both ids in it.
    let id = listed[0]["id"].as_str().expect("a dead letter has a string id");
    let shown = show(&harness, id).await;
    assert_eq!(shown["body"], Value::from(body), "{shown}");
    harness.finish().await;
}
