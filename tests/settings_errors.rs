//! Bad settings stop the binary with exit code 2 and name the key.

mod common;

use common::{Harness, database_url, run_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_price_exits_2() {
    let harness = Harness::database_only("negprice").await;
    let directory = std::env::temp_dir().join(format!("sc-settings-{}", harness.database_name()));
    std::fs::create_dir_all(&directory).expect("create a settings directory");
    let file = directory.join("negative.toml");
    std::fs::write(&file, "[models.gpt-4o]\ninput_per_million = -5\n").expect("write settings");
    let url = database_url(harness.database_name());

    let output = run_binary(
        &["--config", file.to_str().expect("UTF-8 path"), "migrate"],
        &[("STREAM_CREDITS__DATABASE__URL", url.as_str())],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("models.gpt-4o.input_per_million"),
        "stderr: {stderr}"
    );

    let _ = std::fs::remove_dir_all(&directory);
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_url_typo_exits_2() {
    let harness = Harness::database_only("amqpurl").await;
    let url = database_url(harness.database_name());

    // The colon after the scheme is missing.
    let typo = "amqp//guest:typo-password@127.0.0.1:5672/%2f";
    let output = run_binary(
        &["migrate"],
        &[
            ("STREAM_CREDITS__DATABASE__URL", url.as_str()),
            ("STREAM_CREDITS__AMQP__URL", typo),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("amqp.url"), "stderr: {stderr}");
    assert!(
        !stderr.contains("typo-password"),
        "stderr shows the password: {stderr}"
    );

    harness.finish().await;
}
