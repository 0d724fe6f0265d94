//! `stream-credits replay` sends recorded chats to a running worker. It
//! publishes nothing when no worker consumes the topology, and exits 1
//! when a start is denied. `demo` and `hold-sizing` reject a count of
//! conversations that the bundled 400 cannot supply, and `hold-sizing`
//! removes its database and queues when it fails.

mod common;

use common::{Harness, amqp_connect, run_binary};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::ExchangeKind;

const USER: &str = "u-replay";

fn capture() -> String {
    format!("{}/data/vercel-ai-fixtures/openai--openai-text.chunks.txt", env!("CARGO_MANIFEST_DIR"))
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_without_worker_declares_nothing() {
    let harness = Harness::database_only("replay_none").await;
    let capture = capture();
    let output = harness.run_cli(&["replay", &capture, "--user", USER]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("do not exist on this broker"), "{message}");
    assert!(message.contains("stream-credits run"), "{message}");

    // The events exchange was not created, so no start waits anywhere
    // for a worker that would grant it after `replay` gave up.
    let connection = amqp_connect().await;
    let channel = connection.create_channel().await.expect("open a channel");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .exchange_declare(
            harness.names.events.as_str().into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "replay declared {}", harness.names.events);
    let _ = connection.close(200, "checked".into()).await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_denied_start_exits_one() {
    let harness = Harness::start("replay_denied", |_| {}).await;
    let capture = capture();
    let output = harness.run_cli(&["replay", &capture, "--user", USER]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("denied: insufficient_credits"), "{table}");
    let message = stderr(&output);
    assert!(message.contains("1 of 1 starts were denied"), "{message}");
    assert!(message.contains(&format!("stream-credits account grant {USER} AMOUNT")), "{message}");

    harness.fund(USER, "g-1", 1_000_000).await;
    let output = harness.run_cli(&["replay", &capture, "--user", USER, "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("replay prints JSON");
    let charged = rows[0]["charged"].as_i64().expect("a charge");
    assert!(charged > 0, "{rows}");
    assert_eq!(harness.account(USER).await.balance, 1_000_000 - charged);
    harness.finish().await;
}

#[tokio::test]
async fn conversation_count_outside_bundle_is_rejected() {
    for args in [["demo", "--conversations", "401"], ["hold-sizing", "--conversations", "0"]] {
        let output = run_binary(&args, &[]).await;
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(message.contains("--conversations"), "{args:?}: {message}");
    }
}

async fn sizing_databases(harness: &Harness) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'stream\\_credits\\_sizing\\_%'")
        .fetch_one(&harness.pool)
        .await
        .expect("count databases")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hold_sizing_removes_its_database() {
    let harness = Harness::database_only("sizing_fail").await;
    let before = sizing_databases(&harness).await;
    let data = format!("{}/data", env!("CARGO_MANIFEST_DIR"));
    // A price of a million credits per output token denies every funded
    // start, which ends the first phase with an error.
    let url = common::database_url("postgres");
    let env = [
        ("STREAM_CREDITS__DATABASE__URL", url.as_str()),
        ("STREAM_CREDITS__MODELS__GPT-4O-MINI__OUTPUT_PER_MILLION", "1000000000000"),
    ];
    let output = run_binary(&["hold-sizing", "--conversations", "4", "--data", &data], &env).await;
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("was denied"), "{message}");
    assert_eq!(sizing_databases(&harness).await, before, "hold-sizing left its database behind");
    harness.finish().await;
}
