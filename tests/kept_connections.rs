//! A shard keeps its database connection from one batch to the next. A
//! kept connection that the server closes in between, or that stops
//! carrying anything, costs the next batch a retry on a new connection,
//! and loses and repeats nothing.

mod common;

use common::{Harness, ROUND_MODEL, free_local_address, metric_value, start};
use stream_credits::settings::SecretUrl;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const POSTGRES_ADDRESS: &str = "127.0.0.1:5432";

const USER: &str = "u-kept";

/// Round-price hold: 10 prompt tokens + 2 * 50 output tokens = 110.
const RESERVED: i64 = 110;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_granted_after_connection_lost() {
    let harness = Harness::start("kept", |settings| {
        settings.http.listen = free_local_address();
    })
    .await;
    fund_and_start_first(&harness).await;

    // Every other session on the test's database ends, the worker's kept
    // connection among them.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&harness.pool)
    .await
    .expect("end the other sessions");
    assert!(ended.iter().any(|&ended| ended), "no session of the worker was found to end");

    start_second(&harness).await;
    assert_eq!(harness.count("SELECT count(*) FROM holds").await, 2);
    // The harness's pool is opened as the worker's is.
    let idle_limit: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&harness.pool)
        .await
        .expect("read the session's idle limit");
    assert_eq!(idle_limit, "1min");
    let page = harness.metrics().await;
    let errors = metric_value(&page, "stream_credits_database_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "the closed connection was not noticed: {errors}");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_granted_after_connection_went_silent() {
    let proxy = SilencingProxy::start().await;
    let proxy_address = proxy.address.clone();
    let harness = Harness::start("silent", |settings| {
        let url = settings.database.url.expose().replacen(POSTGRES_ADDRESS, &proxy_address, 1);
        settings.database.url = SecretUrl::new(url);
        settings.database.acquire_timeout_seconds = 1;
    })
    .await;
    fund_and_start_first(&harness).await;

    // The worker's open connections stay open but carry nothing, as after
    // a lost route. New connections work.
    proxy.silence_open_connections();
    start_second(&harness).await;
    harness.finish().await;
}

/// Funds the user and opens a first stream, which leaves its shard a kept
/// connection.
async fn fund_and_start_first(harness: &Harness) {
    harness.fund(USER, "g-1", 1_000).await;
    let first = harness
        .request(&start(USER, "s-1", "m-1", ROUND_MODEL, 10, 50), "c-1")
        .await;
    assert_eq!(first["type"], "reservation.granted", "{first}");
}

/// Opens a second stream and checks that exactly both holds are placed.
async fn start_second(harness: &Harness) {
    let second = harness
        .request(&start(USER, "s-2", "m-2", ROUND_MODEL, 10, 50), "c-2")
        .await;
    assert_eq!(second["type"], "reservation.granted", "{second}");
    assert_eq!(second["available_after"], 1_000 - 2 * RESERVED, "{second}");

    let account = harness.account(USER).await;
    assert_eq!(account.reserved, 2 * RESERVED);
    assert_eq!(account.balance, 1_000);
}

/// A loopback TCP proxy to the local PostgreSQL server that can stop
/// carrying bytes on the connections open at that moment, without closing
/// them, while it forwards new connections as before.
struct SilencingProxy {
    address: String,
    /// A counter raised by each silencing. A connection accepted before the
    /// current value carries nothing.
    generation: watch::Sender<u64>,
}

impl SilencingProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let (generation, state) = watch::channel(0);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = *state.borrow();
                tokio::spawn(forward(client, born, state.clone()));
            }
        });
        Self { address, generation }
    }

    fn silence_open_connections(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

async fn forward(mut client: TcpStream, born: u64, mut state: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(POSTGRES_ADDRESS).await else {
        return;
    };
    let silenced = async { state.wait_for(|generation| *generation > born).await.is_ok() };
    let silent = tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => false,
        silent = silenced => silent,
    };
    if silent {
        // Both sockets stay open and carry nothing until the test ends.
        std::future::pending::<()>().await;
    }
}
