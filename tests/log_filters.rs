//! Log filters of the binary: PostgreSQL notices below WARNING stay out
//! of the logs even at `log.level = "debug"` unless `log.level` names
//! their target, `RUST_LOG` replaces the configured filter entirely, and
//! an invalid `RUST_LOG` is reported on stderr and ignored.
//!
//! Each test runs `stream-credits migrate` on a database that the harness
//! has already migrated. sqlx then creates its migrations table with
//! `CREATE TABLE IF NOT EXISTS`, and PostgreSQL sends the notice
//! `relation "_sqlx_migrations" already exists, skipping`, which sqlx
//! 0.9.1 logs at INFO under the target `sqlx::postgres::notice`.

mod common;

use std::process::Output;

use common::{Harness, database_url, run_binary};
use tracing_subscriber::EnvFilter;

/// End of the notice that PostgreSQL sends for the existing table.
const SKIP_NOTICE: &str = "already exists, skipping";

/// Start of the DEBUG event that sqlx logs for each query, in the text
/// format without colour codes, which the binary uses when stderr is not
/// a terminal.
const DEBUG_QUERY_EVENT: &str = "DEBUG sqlx::query:";

/// A `RUST_LOG` value that enables the notices and nothing else.
const NOTICES_RUST_LOG: &str = "sqlx::postgres::notice=debug";

/// A `RUST_LOG` value that `EnvFilter::try_new` rejects with "invalid
/// filter directive" (tracing-subscriber 0.3.23).
const INVALID_RUST_LOG: &str = "=[bad";

/// Runs `migrate` on the harness's database with `log.level = "debug"`,
/// adds `RUST_LOG` when `rust_log` is given, and returns the output and
/// stderr as text.
async fn migrate_again(harness: &Harness, rust_log: Option<&str>) -> (Output, String) {
    migrate_at_level(harness, "debug", rust_log).await
}

/// Runs `migrate` as `migrate_again` does, with `log.level = level`.
async fn migrate_at_level(harness: &Harness, level: &str, rust_log: Option<&str>) -> (Output, String) {
    let url = database_url(harness.database_name());
    let mut env = vec![
        ("STREAM_CREDITS__DATABASE__URL", url.as_str()),
        ("STREAM_CREDITS__LOG__LEVEL", level),
    ];
    if let Some(rust_log) = rust_log {
        env.push(("RUST_LOG", rust_log));
    }
    let output = run_binary(&["migrate"], &env).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_level_hides_skip_notices() {
    let harness = Harness::database_only("quietnotice").await;

    let (output, stderr) = migrate_again(&harness, None).await;

    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(DEBUG_QUERY_EVENT),
        "log.level = \"debug\" logged no `{DEBUG_QUERY_EVENT}` event; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(SKIP_NOTICE),
        "a PostgreSQL notice below WARNING was logged at log.level = \"debug\"; stderr:\n{stderr}"
    );

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_can_show_notices() {
    let harness = Harness::database_only("levelnotice").await;

    let (output, stderr) = migrate_at_level(&harness, "info,sqlx::postgres::notice=info", None).await;

    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(SKIP_NOTICE),
        "log.level naming sqlx::postgres::notice=info logged no `{SKIP_NOTICE}` notice; stderr:\n{stderr}"
    );

    harness.finish().await;
}

/// Control for [`debug_level_hides_skip_notices`]: the same run shows the
/// notice once `RUST_LOG` enables it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_replaces_notice_filter() {
    let harness = Harness::database_only("loudnotice").await;

    let (output, stderr) = migrate_again(&harness, Some(NOTICES_RUST_LOG)).await;

    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(SKIP_NOTICE),
        "RUST_LOG={NOTICES_RUST_LOG} logged no `{SKIP_NOTICE}` notice; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(DEBUG_QUERY_EVENT),
        "RUST_LOG={NOTICES_RUST_LOG} kept the configured log.level = \"debug\" for other \
         targets; stderr:\n{stderr}"
    );

    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rust_log_uses_log_level() {
    assert!(
        EnvFilter::try_new(INVALID_RUST_LOG).is_err(),
        "EnvFilter accepts `{INVALID_RUST_LOG}`, so this test needs another invalid value"
    );
    let harness = Harness::database_only("badrustlog").await;

    let (output, stderr) = migrate_again(&harness, Some(INVALID_RUST_LOG)).await;

    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    let warning = format!("warning: RUST_LOG `{INVALID_RUST_LOG}` is not a valid filter (");
    assert!(
        stderr.contains(&warning),
        "stderr does not contain `{warning}`; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("); using log.level\n"),
        "the warning does not say that log.level is used; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(DEBUG_QUERY_EVENT),
        "log.level = \"debug\" logged no `{DEBUG_QUERY_EVENT}` event after the invalid \
         RUST_LOG; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(SKIP_NOTICE),
        "the configured filter without RUST_LOG hides notices, but one was logged; \
         stderr:\n{stderr}"
    );

    harness.finish().await;
}
