//! SIGTERM stops `demo` while it funds its users and while it publishes:
//! its worker drains what it has received, and the demo exits 1 saying
//! that a signal stopped it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, database_url};
use stream_credits::topology::Names;

/// Maximum wait for the demo to start publishing, and then to exit.
const DEMO_WAIT: Duration = Duration::from_secs(60);

/// Users for the demo to fund, one confirmed message each, so that it is
/// still funding them a second after it starts.
const MANY_USERS: &str = "20000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_demo_with_exit_1() {
    // One chat at a time, so the demo is still publishing when the signal
    // comes.
    sigterm_stops_demo("demointr", &["--concurrency", "1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_funding_exits_1() {
    sigterm_stops_demo("demofund", &["--users", MANY_USERS]).await;
}

/// Starts `demo` with `args`, sends it SIGTERM a second after it starts
/// its worker, and checks that it exits 1 saying that a signal stopped it.
async fn sigterm_stops_demo(name: &str, args: &[&str]) {
    let harness = Harness::database_only(name).await;
    let prefix = format!("t-{}", harness.database_name().replace('_', "-"));
    let directory = std::env::temp_dir().join(format!("sc-demo-{}", harness.database_name()));
    std::fs::create_dir_all(&directory).expect("create a log directory");
    let stderr_path = directory.join("stderr.log");
    let url = database_url(harness.database_name());
    let mut demo = Command::new(env!("CARGO_BIN_EXE_stream-credits"))
        .arg("demo")
        .args(args)
        .arg("--data")
        .arg(format!("{}/data", env!("CARGO_MANIFEST_DIR")))
        .env_remove("RUST_LOG")
        .env("STREAM_CREDITS__DATABASE__URL", &url)
        .env("STREAM_CREDITS__TOPOLOGY__PREFIX", &prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("create the log file"))
        .spawn()
        .expect("start the demo");

    let deadline = Instant::now() + DEMO_WAIT;
    let read = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    while !read().contains("worker starting") {
        assert!(Instant::now() < deadline, "the demo did not start: {}", read());
        assert!(demo.try_wait().expect("poll the demo").is_none(), "the demo exited: {}", read());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM failed with {status}");

    let deadline = Instant::now() + DEMO_WAIT;
    let code = loop {
        if let Some(status) = demo.try_wait().expect("poll the demo") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the demo did not stop: {}", read());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = read();
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("stopped by a signal"), "stderr: {stderr}");

    let shards = stream_credits::settings::Settings::default().topology.shards;
    common::delete_topology(&Names::new(&prefix), shards).await;
    let _ = std::fs::remove_dir_all(&directory);
    harness.finish().await;
}
