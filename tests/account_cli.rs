//! `stream-credits account grant` and `account show` against a real
//! database.

mod common;

use common::{Harness, database_url, run_binary};

const USER: &str = "u-cli";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_work() {
    let harness = Harness::database_only("account").await;
    let url = database_url(harness.database_name());
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];

    for attempt in 1..=2 {
        let output = run_binary(
            &["account", "grant", USER, "500", "--idempotency-key", "k1"],
            &env,
        )
        .await;
        assert!(
            output.status.success(),
            "grant {attempt} exited with {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(harness.account(USER).await.balance, 500);
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        1,
        "grant ledger rows"
    );

    let output = run_binary(&["account", "show", USER, "--json"], &env).await;
    assert!(
        output.status.success(),
        "show exited with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("account show --json prints one JSON object");
    let mut keys: Vec<&str> = shown
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["available", "balance", "holds", "reserved", "user_id"]);
    assert_eq!(shown["user_id"], USER);
    assert_eq!(shown["balance"], 500);
    assert_eq!(shown["reserved"], 0);
    assert_eq!(shown["available"], 500);

    let output = run_binary(&["account", "grant", USER, "0"], &env).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "grant of 0 credits: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        harness.account(USER).await.balance,
        500,
        "balance after a rejected grant"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AMOUNT must be at least 1"), "{stderr}");

    // Errors name the command's own arguments, not the message's fields.
    let output = run_binary(&["account", "grant", USER, "5", "--idempotency-key", ""], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`--idempotency-key` must not be empty"), "{stderr}");
    assert!(!stderr.contains("message_id"), "{stderr}");

    let output = run_binary(&["account", "show", "u-nobody", "--json"], &env).await;
    assert!(!output.status.success(), "show of an unknown user exited 0");
    assert!(
        output.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("u-nobody"), "stderr: {stderr}");
    let output = run_binary(&["account", "show", "u-\u{1b}[2J"], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`u-\\u{1b}[2J` not found"), "stderr: {stderr:?}");

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_leaves_a_missing_database_missing() {
    let harness = Harness::database_only("account_missing").await;
    let missing = format!("{}_missing", harness.database_name());
    let url = database_url(&missing);
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];

    let output = run_binary(&["account", "show", USER, "--json"], &env).await;
    assert!(!output.status.success(), "show against a missing database exited 0");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&missing), "stderr: {stderr}");
    let created: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
        .bind(&missing)
        .fetch_one(&harness.pool)
        .await
        .expect("look the database up");
    assert!(!created, "account show created database {missing}");
    harness.finish().await;
}

#[tokio::test]
async fn missing_database_names_the_fix() {
    let url = database_url("sc_t_account_no_such_database");
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];
    let output = run_binary(&["account", "show", USER], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rejected the connection"), "{stderr}");
    assert!(stderr.contains("does not exist; `stream-credits migrate` creates it"), "{stderr}");
    // sqlx adds the line of PostgreSQL's own source code that raised
    // the error, which reads as a line of the user's settings.
    assert!(!stderr.contains(" at line "), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_key_with_other_amount_fails() {
    let harness = Harness::database_only("account_key").await;
    let url = database_url(harness.database_name());
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];
    let grant = |amount: &'static str| ["account", "grant", USER, amount, "--idempotency-key", "k1"];

    let output = run_binary(&grant("500"), &env).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = run_binary(&grant("700"), &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already granted 500 credits to u-cli, not 700"), "{stderr}");
    assert_eq!(harness.account(USER).await.balance, 500);
    assert_eq!(harness.ledger_rows(USER, "grant").await, 1, "grant ledger rows");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_output_escapes_ids() {
    let harness = Harness::database_only("account_escape").await;
    let url = database_url(harness.database_name());
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];
    let user = "u-\u{1b}[2J-\u{202e}";
    let grant = |amount: &'static str| ["account", "grant", user, amount, "--idempotency-key", "k-\u{1b}[31m"];

    let output = run_binary(&grant("5"), &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("granted 5 credits to u-\\u{1b}[2J-\\u{202e}"), "{stderr:?}");
    let output = run_binary(&grant("6"), &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    assert!(stderr.contains("`k-\\u{1b}[31m` already granted 5"), "{stderr:?}");
    harness.finish().await;
}

/// A key that a message of another kind used depends on what the
/// database holds, so the command fails at run time rather than as
/// bad usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_of_another_kind_fails_at_run_time() {
    let harness = Harness::database_only("account_kind").await;
    let url = database_url(harness.database_name());
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];
    sqlx::query("INSERT INTO processed_messages (user_id, message_id, kind) VALUES ($1, 'k-start', 'stream.started')")
        .bind(USER)
        .execute(&harness.pool)
        .await
        .expect("record a start's message id");

    let output = run_binary(&["account", "grant", USER, "5", "--idempotency-key", "k-start"], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`--idempotency-key` was already used by a stream.started"), "{stderr}");
    assert_eq!(harness.ledger_rows(USER, "grant").await, 0, "grant ledger rows");
    harness.finish().await;
}

/// A grant from another session takes the same key first and commits
/// while the command waits on the account's row: the command's insert of
/// the key then fails, and its retry finds the key applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_racing_same_key_applies_once() {
    let harness = Harness::database_only("account_race").await;
    let url = database_url(harness.database_name());
    let ledger = stream_credits::ledger::Ledger::new(harness.settings.clone());
    let body = common::grant(USER, "race", 300);
    let message = stream_credits::messages::decode(body.to_string().as_bytes(), &harness.settings.limits)
        .expect("a valid grant");
    let mut first = harness.pool.begin().await.expect("a transaction");
    ledger
        .apply(&mut first, &message, &Default::default())
        .await
        .expect("the first grant applies");

    let command = tokio::spawn(async move {
        let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];
        run_binary(&["account", "grant", USER, "300", "--idempotency-key", "race"], &env).await
    });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    first.commit().await.expect("the first grant commits");

    let output = command.await.expect("the command ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("already applied"), "{stderr}");
    assert_eq!(harness.account(USER).await.balance, 300);
    assert_eq!(harness.ledger_rows(USER, "grant").await, 1, "grant ledger rows");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_database_names_the_fix() {
    let harness = Harness::database_only("account_bare").await;
    let bare = format!("{}_bare", harness.database_name());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {bare}")))
        .execute(&harness.pool)
        .await
        .expect("create an empty database");
    let url = database_url(&bare);
    let env = [("STREAM_CREDITS__DATABASE__URL", url.as_str())];

    let output = run_binary(&["account", "show", USER], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("has no stream-credits tables"), "{stderr}");
    assert!(stderr.contains("`stream-credits migrate`"), "{stderr}");

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {bare}")))
        .execute(&harness.pool)
        .await
        .expect("drop the empty database");
    harness.finish().await;
}
