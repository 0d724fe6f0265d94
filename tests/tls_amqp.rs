//! RabbitMQ over TLS. The worker settles streams through an `amqps://`
//! URL when `amqp.tls_ca_file` names the CA of the broker's certificate.
//! A certificate it cannot verify is rejected with an error that names
//! it, and a CA file that cannot be used exits 2 naming the setting. No
//! output contains the URL's password.
//!
//! RabbitMQ's own TLS listener needs a restart of the node, so a proxy
//! in the test terminates TLS with a certificate the test made and
//! forwards plain AMQP to the local broker.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{
    ScratchDir, TestCertificates, TlsProxy, WorkerProcess, output_without_secret, settle_brief_load,
};
use common::{Harness, RABBITMQ_ADDRESS, run_binary};
use stream_credits::settings::SecretUrl;

/// Password of the URL in the failure cases. RabbitMQ's guest user has
/// the password `guest`, so these connections could not log in either,
/// but they fail earlier, during the TLS handshake.
const PASSWORD: &str = "SECRETMQ9";

/// Maximum wait for the worker binary to log a failed connection. A debug
/// build spends a few seconds building the tiktoken encoders first.
const LOG_WAIT: Duration = Duration::from_secs(60);

/// Returns `amqps://guest:{password}@localhost:{port}/%2f`.
fn amqps_url(proxy: &TlsProxy, password: &str) -> String {
    format!(
        "amqps://guest:{password}@localhost:{}/%2f",
        proxy.address().port()
    )
}

/// Builds the environment that points the binary at `url`, trusting
/// `ca_file` when given.
fn amqp_env(url: &str, ca_file: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![("STREAM_CREDITS__AMQP__URL".to_owned(), url.to_owned())];
    if let Some(ca_file) = ca_file {
        env.push((
            "STREAM_CREDITS__AMQP__TLS_CA_FILE".to_owned(),
            ca_file.display().to_string(),
        ));
    }
    env
}

/// Runs the binary with `env` and returns its exit code and stderr, after
/// checking that no output contains [`PASSWORD`].
async fn run_checked(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String) {
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let output = run_binary(args, &env).await;
    let (_, stderr) = output_without_secret(&args.join(" "), &output, PASSWORD);
    (output.status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_settles_streams_over_amqps() {
    let scratch = ScratchDir::new("sc-amqptls");
    let certificates = TestCertificates::generate(scratch.path(), "broker");
    let proxy = TlsProxy::start(RABBITMQ_ADDRESS, &certificates).await;
    let url = amqps_url(&proxy, "guest");
    let harness = Harness::start("amqptls", |settings| {
        settings.amqp.url = SecretUrl::new(url.clone());
        settings.amqp.tls_ca_file = Some(certificates.ca_file.clone());
    })
    .await;
    assert_eq!(
        proxy.handshakes(),
        1,
        "the worker connects to the broker once, through the TLS proxy"
    );

    let harness = Arc::new(harness);
    settle_brief_load(&harness, &harness.pool, "amqptls").await;
    assert_eq!(
        proxy.failed_handshakes(),
        0,
        "TLS handshakes failed at the proxy"
    );

    // The commands connect the same way as the worker.
    let mut env = harness.cli_env();
    env.retain(|(key, _)| key != "STREAM_CREDITS__AMQP__URL");
    env.extend(amqp_env(&url, Some(&certificates.ca_file)));
    let (code, stderr) = run_checked(&["dlq", "list"], &env).await;
    assert_eq!(code, Some(0), "dlq list over amqps failed:\n{stderr}");
    assert_eq!(
        proxy.handshakes(),
        2,
        "dlq list connects through the TLS proxy"
    );

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_broker_certificate_is_rejected() {
    let scratch = ScratchDir::new("sc-amqptls-bad");
    let certificates = TestCertificates::generate(scratch.path(), "broker");
    let other = TestCertificates::generate(scratch.path(), "other");
    let proxy = TlsProxy::start(RABBITMQ_ADDRESS, &certificates).await;
    let url = amqps_url(&proxy, PASSWORD);
    let redacted = format!("amqps://guest:***@localhost:{}/%2f", proxy.address().port());

    // A command fails at once, both with another CA and with the
    // system's roots alone.
    for (case, ca_file) in [
        ("another CA", Some(other.ca_file.as_path())),
        ("the system roots", None),
    ] {
        let (code, stderr) = run_checked(&["dlq", "list"], &amqp_env(&url, ca_file)).await;
        assert_eq!(
            code,
            Some(1),
            "dlq list trusting {case} should fail:\n{stderr}"
        );
        assert!(
            stderr.contains(&redacted),
            "dlq list trusting {case} does not name {redacted}:\n{stderr}"
        );
        for expected in ["TLS handshake", "certificate", "amqp.tls_ca_file"] {
            assert!(
                stderr.contains(expected),
                "dlq list trusting {case} does not say `{expected}`:\n{stderr}"
            );
        }
    }
    assert_eq!(proxy.handshakes(), 0, "a handshake succeeded");
    assert_eq!(
        proxy.failed_handshakes(),
        2,
        "each command failed one handshake"
    );

    // The worker keeps retrying and logs each failure.
    let database = Harness::database_only("amqptlsbad").await;
    let mut env = database.cli_env();
    env.retain(|(key, _)| key != "STREAM_CREDITS__AMQP__URL");
    env.extend(amqp_env(&url, Some(&other.ca_file)));
    env.push(("STREAM_CREDITS__HTTP__LISTEN".to_owned(), String::new()));
    let log = scratch.path().join("worker.log");
    let mut worker = WorkerProcess::spawn(&env, scratch.path(), &log);
    // The commands failed two handshakes, and the worker's first attempt
    // and first retry fail two more.
    let deadline = Instant::now() + LOG_WAIT;
    while proxy.failed_handshakes() < 4 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            worker.exited().is_none(),
            "the worker exited instead of retrying:\n{text}"
        );
        assert!(
            Instant::now() < deadline,
            "the worker did not retry a failed handshake within {LOG_WAIT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.kill().await;
    let text = std::fs::read_to_string(&log).expect("read the worker's log");
    assert!(
        !text.contains(PASSWORD),
        "the worker logged the password:\n{text}"
    );
    for expected in [redacted.as_str(), "TLS handshake", "amqp.tls_ca_file"] {
        assert!(
            text.contains(expected),
            "the worker's log does not say `{expected}`:\n{text}"
        );
    }
    assert_eq!(proxy.handshakes(), 0, "a handshake succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_ca_file_exits_2() {
    let scratch = ScratchDir::new("sc-amqptls-ca");
    let certificates = TestCertificates::generate(scratch.path(), "broker");
    let missing = scratch.path().join("missing.pem");
    let not_pem = scratch.path().join("not-pem.pem");
    std::fs::write(&not_pem, "no certificate here\n").expect("write a file without PEM");
    let amqps = format!("amqps://guest:{PASSWORD}@localhost:1/%2f");
    let amqp = format!("amqp://guest:{PASSWORD}@localhost:1/%2f");
    let cases = [
        ("a missing file", &amqps, &missing, "missing.pem"),
        ("a file without PEM", &amqps, &not_pem, "no PEM certificate"),
        ("an amqp:// URL", &amqp, &certificates.ca_file, "amqps://"),
    ];
    for (case, url, ca_file, expected) in cases {
        let (code, stderr) = run_checked(&["dlq", "list"], &amqp_env(url, Some(ca_file))).await;
        assert_eq!(
            code,
            Some(2),
            "a CA file with {case} should exit 2:\n{stderr}"
        );
        assert!(
            stderr.contains("amqp.tls_ca_file"),
            "the error for {case} does not name amqp.tls_ca_file:\n{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "the error for {case} does not say `{expected}`:\n{stderr}"
        );
    }
}
