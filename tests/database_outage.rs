//! A PostgreSQL outage delays messages but dead-letters none of them.
//!
//! The worker reaches PostgreSQL through a loopback TCP proxy that the test
//! cuts and restores, so the outage affects only this test's worker.

mod common;

use std::time::Duration;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, grant, start};
use stream_credits::messages::EndStatus;
use stream_credits::settings::SecretUrl;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const USER: &str = "u-outage";
const STREAM: &str = "s-outage";
const OUTAGE: Duration = Duration::from_secs(3);

/// Round-price hold: 10 prompt tokens + 2 * 50 output tokens = 110.
const RESERVED: i64 = 110;

/// Settled usage: 10 prompt tokens + 2 * (4 + 6) counted tokens = 30.
const COST: i64 = 30;

/// Rewrites a local PostgreSQL URL to go through `proxy_address`.
fn proxied(url: &str, proxy_address: &str) -> String {
    url.replacen("127.0.0.1:5432", proxy_address, 1)
}

/// A TCP proxy to the local PostgreSQL server that can be cut: while cut,
/// it closes every forwarded connection and every new one at once.
struct Proxy {
    address: String,
    up: watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let (up, state) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, state.clone()));
            }
        });
        Self { address, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut.
async fn forward(mut client: TcpStream, mut state: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect("127.0.0.1:5432").await else {
        return;
    };
    tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => {}
        _ = state.wait_for(|up| !*up) => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_dead_letters_nothing() {
    let proxy = Proxy::start().await;
    let proxy_address = proxy.address.clone();
    let harness = Harness::start("outage", |settings| {
        let url = proxied(settings.database.url.expose(), &proxy_address);
        settings.database.url = SecretUrl::new(url);
        settings.database.acquire_timeout_seconds = 1;
    })
    .await;
    harness.fund(USER, "g-1", 1000).await;
    let reply = harness
        .request(
            &start(USER, STREAM, "m-start", ROUND_MODEL, 10, 50),
            "c-start",
        )
        .await;
    assert_eq!(reply["reserved"], RESERVED, "{reply}");

    proxy.cut();
    let messages = [
        Outbound::json(&chunk(USER, STREAM, 0, "first", Some(4))),
        Outbound::json(&chunk(USER, STREAM, 1, "second", Some(6))),
        Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None)),
        Outbound::json(&grant(USER, "g-2", 500)),
    ];
    harness.publish_all(&messages).await;
    // The outage lasts a fixed time, and the checks below are valid for
    // any length of it.
    tokio::time::sleep(OUTAGE).await;
    let during = harness.take_dead_letters().await;
    assert!(
        during.is_empty(),
        "dead letters during the outage: {during:?}"
    );
    assert!(
        harness.events("reservation.settled", STREAM).is_empty(),
        "the stream was settled while the database was unreachable"
    );
    proxy.restore();

    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["counted_completion_tokens"], 10, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    harness.barrier(USER).await;
    let after = harness.take_dead_letters().await;
    assert!(after.is_empty(), "dead letters after the outage: {after:?}");

    let account = harness.account(USER).await;
    assert_eq!(account.balance, 1500 - COST);
    assert_eq!(account.reserved, 0);
    assert_eq!(
        harness.ledger_rows(USER, "grant").await,
        2,
        "grant ledger rows"
    );

    harness.finish().await;
}
