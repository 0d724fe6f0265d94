//! `stream-credits dlq list`, `show`, `replay` and `purge` against the
//! test's topology and database. A chunk that arrives before its stream's
//! start is dead-lettered as `unknown_stream`. After the start, replaying
//! it counts its tokens once, however often the same dead letter is
//! replayed.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
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

/// Reads the stream's counted completion tokens and chunk count.
async fn counted(harness: &Harness) -> (i64, i64) {
    sqlx::query_as(
        "SELECT counted_completion_tokens, chunks FROM holds \
         WHERE user_id = $1 AND stream_id = $2",
    )
    .bind(USER)
    .bind(STREAM)
    .fetch_one(&harness.pool)
    .await
    .expect("read the hold")
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
    assert_eq!(counted(&harness).await, (0, 0), "counted before any replay");

    // replay --dry-run: names both letters and changes nothing.
    let stdout = run_ok(&harness, &["dlq", "replay", "--all", "--dry-run"]).await;
    assert!(stdout.contains(&unknown_id), "dry-run output: {stdout}");
    assert_eq!(stdout.lines().count(), 2, "dry-run output: {stdout}");
    harness.barrier(USER).await;
    harness.wait_dead_letter_count(2).await;
    assert_eq!(counted(&harness).await, (0, 0), "counted after a dry run");

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
        counted(&harness).await,
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
        counted(&harness).await,
        (CHUNK_TOKENS as i64, 1),
        "counted after replaying the same letter again"
    );
    harness.wait_dead_letter_count(1).await;

    let output = harness
        .run_cli(&["dlq", "replay", "--reason", "no_such_reason"])
        .await;
    assert_eq!(
        output.status.code(),
        Some(USAGE_ERROR),
        "replay with an unknown reason: {}",
        String::from_utf8_lossy(&output.stderr)
    );

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
