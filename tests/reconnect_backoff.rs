//! The reconnect pause grows while the broker stays unreachable, and
//! starts small again after a session that lasted: a worker that was cut
//! off for a long time earlier reconnects at once after a short drop.
//!
//! The worker reaches RabbitMQ through a loopback proxy that the test cuts.

mod common;

use std::time::Duration;

use common::{Harness, RABBITMQ_ADDRESS};
use common::process::{TcpProxy, shards_consumed};
use stream_credits::settings::SecretUrl;

/// A first outage long enough for five failed attempts, after which the
/// next pause is at least 6.4 s.
const LONG_CUT: Duration = Duration::from_secs(9);

/// Longer than the 5 s a session must last to start the pauses again.
const STABLE: Duration = Duration::from_secs(7);

const SHORT_CUT: Duration = Duration::from_millis(500);

/// Maximum time from the restore to the reconnect after the short drop.
/// A pause carried over from the long outage would take 6.4 s or more.
const QUICK: Duration = Duration::from_secs(3);

/// Maximum wait for the reconnect after the long outage.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drop_after_stable_session_reconnects_quickly() {
    let proxy = TcpProxy::start(RABBITMQ_ADDRESS).await;
    let proxy_address = proxy.address();
    let harness = Harness::start("backoff", |settings| {
        settings.amqp.url = SecretUrl::new(format!("amqp://guest:guest@{proxy_address}/%2f"));
    })
    .await;
    wait_for_connection(&proxy, 1, RECONNECT_WAIT).await;

    proxy.cut();
    tokio::time::sleep(LONG_CUT).await;
    proxy.restore();
    wait_for_connection(&proxy, 2, RECONNECT_WAIT).await;
    let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
    while !shards_consumed(&harness).await {
        assert!(tokio::time::Instant::now() < deadline, "the worker did not consume again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tokio::time::sleep(STABLE).await;
    proxy.cut();
    tokio::time::sleep(SHORT_CUT).await;
    proxy.restore();
    let restored = tokio::time::Instant::now();
    wait_for_connection(&proxy, 3, RECONNECT_WAIT).await;
    let took = restored.elapsed();
    assert!(
        took < QUICK,
        "after a stable session the worker took {took:?} to reconnect from a short drop"
    );
    harness.finish().await;
}

/// Waits until the proxy has forwarded `count` connections in all.
async fn wait_for_connection(proxy: &TcpProxy, count: usize, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while proxy.forwarded_connections() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker made {} broker connections within {wait:?}, expected {count}",
            proxy.forwarded_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
