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

/// A database URL where nothing listens, so a command that wrongly
/// accepts its settings fails at once with exit code 1, not 2.
const UNREACHABLE_DATABASE: &str = "postgres://root@127.0.0.1:1/x";

/// Writes `text` to a settings file in a directory of its own and returns
/// the directory and the file.
fn settings_file(name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let directory = std::env::temp_dir().join(format!("sc-settings-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("create a settings directory");
    let file = directory.join("settings.toml");
    std::fs::write(&file, text).expect("write settings");
    (directory, file)
}

/// Runs `account show u` with the file and variables, expecting exit 2,
/// and returns stderr.
async fn rejected_stderr(file: Option<&std::path::Path>, env: &[(&str, &str)]) -> String {
    let mut args = vec!["account", "show", "u"];
    if let Some(file) = file {
        args.extend(["--config", file.to_str().expect("UTF-8 path")]);
    }
    let mut env = env.to_vec();
    env.push(("STREAM_CREDITS__DATABASE__URL", UNREACHABLE_DATABASE));
    let output = run_binary(&args, &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    stderr
}

#[tokio::test]
async fn misspelt_file_section_exits_2() {
    let (directory, file) = settings_file("typo", "[reservatons]\noverrun = \"cap\"\n");

    let stderr = rejected_stderr(Some(&file), &[]).await;
    assert!(
        stderr.contains("unknown setting `reservatons.overrun`"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains(file.to_str().unwrap()), "stderr: {stderr}");
    assert!(stderr.contains("`reservations`"), "stderr: {stderr}");

    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn unknown_variable_exits_2() {
    let stderr = rejected_stderr(None, &[("STREAM_CREDITS__BOGUS__KEY", "1")]).await;
    assert!(
        stderr.contains("unknown setting `bogus.key`"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("STREAM_CREDITS__BOGUS__KEY"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn misspelt_variable_key_exits_2() {
    let variable = "STREAM_CREDITS__RESERVATIONS__OVERUN";
    let stderr = rejected_stderr(None, &[(variable, "cap")]).await;
    assert!(stderr.contains("`reservations.overun`"), "stderr: {stderr}");
    assert!(stderr.contains(variable), "stderr: {stderr}");
    assert!(
        stderr.contains("`reservations.overrun`"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn bad_enum_value_lists_accepted_values_once() {
    let variable = "STREAM_CREDITS__RESERVATIONS__OVERRUN";
    let stderr = rejected_stderr(None, &[(variable, "nope")]).await;
    let expected = "invalid value `nope` for `reservations.overrun` in environment variable \
                    STREAM_CREDITS__RESERVATIONS__OVERRUN: expected `debit` or `cap`";
    assert!(stderr.contains(expected), "stderr: {stderr}");
    assert_eq!(stderr.matches("nope").count(), 1, "stderr: {stderr}");
    assert!(
        !stderr.contains("Overrun"),
        "stderr names the Rust type: {stderr}"
    );
}

#[tokio::test]
async fn non_integer_shards_named_once() {
    let stderr = rejected_stderr(None, &[("STREAM_CREDITS__TOPOLOGY__SHARDS", "abc")]).await;
    assert!(
        stderr.contains("invalid value `abc` for `topology.shards`"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("expected an integer"), "stderr: {stderr}");
    assert_eq!(stderr.matches("abc").count(), 1, "stderr: {stderr}");
}

#[tokio::test]
async fn bad_value_in_file_names_the_file() {
    let text =
        "[reservations]\noverrun = \"capp\"\n\n[models.\"gpt-4.1\"]\noutput_per_million = 5\n";
    let (directory, file) = settings_file("enum", text);

    let stderr = rejected_stderr(Some(&file), &[]).await;
    assert!(
        stderr.contains("invalid value `capp` for `reservations.overrun`"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains(file.to_str().unwrap()), "stderr: {stderr}");

    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn broken_toml_names_line_and_column() {
    let (directory, file) = settings_file("syntax", "[topology]\nprefix = \"ok\"\nshards = \n");

    let stderr = rejected_stderr(Some(&file), &[]).await;
    assert!(stderr.contains(file.to_str().unwrap()), "stderr: {stderr}");
    assert!(stderr.contains("line 3, column 10"), "stderr: {stderr}");

    let _ = std::fs::remove_dir_all(&directory);
}
