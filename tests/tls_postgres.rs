//! PostgreSQL over TLS. The worker and the commands reach a cluster that
//! takes TCP connections only over TLS, with `sslmode=verify-full` and a
//! CA the test made. A CA that did not sign the server's certificate is
//! rejected, and `sslmode=require` against a server without TLS fails
//! with an error that names TLS. No output contains the URL's password.
//!
//! The clusters are the test's own (`initdb` in a temporary directory),
//! because TLS settings and `pg_hba.conf` are changed on them.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::process::{
    PgCluster, ScratchDir, TestCertificates, assert_invariants_hold, database_name,
    output_without_secret, settle_brief_load,
};
use common::{Harness, run_binary};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use stream_credits::settings::SecretUrl;

/// Password put in every URL. The clusters trust loopback connections,
/// so it is never sent, but it must not show up in any output either.
const PASSWORD: &str = "SECRETPG7";

/// Returns the cluster's URL of `database` with [`PASSWORD`] and the TLS
/// parameters `sslmode` and, when given, `sslrootcert`.
fn tls_url(cluster: &PgCluster, database: &str, sslmode: &str, ca_file: Option<&Path>) -> String {
    let mut url = url::Url::parse(&cluster.url(database)).expect("the cluster URL parses");
    url.set_password(Some(PASSWORD))
        .expect("a postgres URL takes a password");
    url.query_pairs_mut().append_pair("sslmode", sslmode);
    if let Some(ca_file) = ca_file {
        url.query_pairs_mut()
            .append_pair("sslrootcert", &ca_file.display().to_string());
    }
    url.to_string()
}

/// Runs the binary with `database.url` set to `url` and returns its exit
/// code, stdout and stderr, after checking that neither output contains
/// the password.
async fn run_with_database(args: &[&str], url: &str) -> (Option<i32>, String, String) {
    let output = run_binary(args, &[("STREAM_CREDITS__DATABASE__URL", url)]).await;
    let (stdout, stderr) = output_without_secret(&args.join(" "), &output, PASSWORD);
    (output.status.code(), stdout, stderr)
}

/// Checks that a plain TCP connection to the cluster is rejected, so
/// whatever reaches it uses TLS.
async fn assert_plain_rejected(cluster: &PgCluster) {
    let plain = format!("{}?sslmode=disable", cluster.url("postgres"));
    let attempt = PgConnection::connect(&plain).await;
    assert!(
        attempt.is_err(),
        "the cluster accepted a connection without TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_settles_streams_over_verified_tls() {
    let scratch = ScratchDir::new("sc-pgtls");
    let certificates = TestCertificates::generate(scratch.path(), "postgres");
    let cluster = PgCluster::start().await;
    cluster.enable_tls(&certificates).await;
    assert_plain_rejected(&cluster).await;

    let mut worker_url = String::new();
    let harness = Harness::start("pgtls", |settings| {
        let database = database_name(settings);
        worker_url = tls_url(
            &cluster,
            &database,
            "verify-full",
            Some(&certificates.ca_file),
        );
        settings.database.url = SecretUrl::new(worker_url.clone());
    })
    .await;
    // The harness's own pool reaches the shared server, so the checks read
    // the cluster through a pool of their own, verified the same way.
    let pool = PgPool::connect(&worker_url)
        .await
        .expect("connect to the test cluster over TLS");
    let database = harness.database_name().to_owned();
    let sessions: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1",
    )
    .bind(&database)
    .fetch_all(&pool)
    .await
    .expect("read the sessions' TLS state");
    assert!(
        !sessions.is_empty(),
        "no session on database {database} of the test cluster"
    );
    assert!(
        sessions.iter().all(|ssl| *ssl),
        "sessions without TLS on the test cluster: {sessions:?}"
    );

    let harness = Arc::new(harness);
    settle_brief_load(&harness, &pool, "pgtls").await;
    pool.close().await;

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
    assert_invariants_hold(&worker_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_verify_the_server_certificate() {
    let scratch = ScratchDir::new("sc-pgtls-cli");
    let certificates = TestCertificates::generate(scratch.path(), "postgres");
    let other = TestCertificates::generate(scratch.path(), "other");
    let cluster = PgCluster::start().await;
    cluster.enable_tls(&certificates).await;

    let database = "tls_commands";
    let verified = tls_url(
        &cluster,
        database,
        "verify-full",
        Some(&certificates.ca_file),
    );
    let (code, _, stderr) = run_with_database(&["migrate"], &verified).await;
    assert_eq!(code, Some(0), "migrate over verified TLS failed:\n{stderr}");
    let (code, _, stderr) =
        run_with_database(&["account", "grant", "u-tls", "250"], &verified).await;
    assert_eq!(code, Some(0), "account grant over TLS failed:\n{stderr}");
    let (code, stdout, stderr) =
        run_with_database(&["account", "show", "u-tls", "--json"], &verified).await;
    assert_eq!(code, Some(0), "account show over TLS failed:\n{stderr}");
    let account: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("account show printed no JSON ({error}):\n{stdout}"));
    assert_eq!(account["balance"], 250, "account over TLS: {account}");

    // A CA that did not sign the server's certificate, and the system's
    // roots alone, must both fail verification.
    let wrong_ca = tls_url(&cluster, database, "verify-full", Some(&other.ca_file));
    let system_roots = tls_url(&cluster, database, "verify-full", None);
    for (case, url) in [("another CA", wrong_ca), ("the system roots", system_roots)] {
        let (code, _, stderr) = run_with_database(&["migrate"], &url).await;
        assert_eq!(
            code,
            Some(1),
            "migrate trusting {case} should fail:\n{stderr}"
        );
        for expected in ["TLS with PostgreSQL", "certificate", "sslrootcert"] {
            assert!(
                stderr.contains(expected),
                "migrate trusting {case} does not say `{expected}`:\n{stderr}"
            );
        }
        assert!(
            stderr.contains(":***@127.0.0.1"),
            "migrate trusting {case} does not name the redacted URL:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_fails_against_a_plain_server() {
    // A fresh cluster has `ssl = off`.
    let cluster = PgCluster::start().await;
    let url = tls_url(&cluster, "tls_required", "require", None);
    let (code, _, stderr) = run_with_database(&["migrate"], &url).await;
    assert_eq!(
        code,
        Some(1),
        "migrate with sslmode=require against a server without TLS should fail:\n{stderr}"
    );
    assert!(
        stderr.contains("TLS with PostgreSQL"),
        "the error does not name TLS:\n{stderr}"
    );
    assert!(
        stderr.contains(":***@127.0.0.1"),
        "the error does not name the redacted URL:\n{stderr}"
    );
}
