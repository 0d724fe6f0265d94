//! A failed connection to RabbitMQ exits 1 with a hint on what to check:
//! the credentials when the broker refuses the login, and the host and
//! port when nothing listens there.

mod common;

use common::run_binary;

/// Runs `dlq list` against `amqp_url` and returns its exit code and
/// standard error.
async fn dlq_list(amqp_url: &str) -> (Option<i32>, String) {
    let output = run_binary(&["dlq", "list"], &[("STREAM_CREDITS__AMQP__URL", amqp_url)]).await;
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_login_names_credentials() {
    let (code, stderr) = dlq_list("amqp://guest:not-the-password@127.0.0.1:5672/%2f").await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("ACCESS_REFUSED"), "stderr: {stderr}");
    assert!(stderr.contains("check the user and password in amqp.url"), "stderr: {stderr}");
    assert!(!stderr.contains("not-the-password"), "stderr shows the password: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_names_host_and_port() {
    // Nothing listens on port 1 of the loopback address.
    let (code, stderr) = dlq_list("amqp://guest:guest@127.0.0.1:1/%2f").await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("Connection refused"), "stderr: {stderr}");
    assert!(stderr.contains("listens on the host and port of amqp.url"), "stderr: {stderr}");
}
