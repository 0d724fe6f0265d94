//! Shutdown while PostgreSQL is unreachable. The worker keeps trying the
//! batches it received for as long as an attempt can still end within its
//! shutdown timeout, so a database that comes back in that time gets them
//! applied and acknowledged before the worker stops. A batch it gives up
//! goes back to the queue ahead of anything newer, also to a standby. A
//! broker connection that ends meanwhile ends the attempts, since the batch
//! can no longer be acknowledged.
//!
//! The worker reaches PostgreSQL, and in one case RabbitMQ, through
//! loopback TCP proxies that the test cuts and restores; the harness
//! reaches both directly.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::TcpProxy;
use common::{Harness, Outbound, ROUND_MODEL, amqp_connect, chunk, close_connection, end, start};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde_json::Value;
use stream_credits::messages::EndStatus;
use stream_credits::settings::{SecretUrl, Settings};

const USER: &str = "u-stop-outage";
const STREAM: &str = "s-stop-outage";

/// Round-price hold: 10 prompt tokens + 2 * 50 output tokens = 110.
const RESERVED: i64 = 110;

/// Settled usage: 10 prompt tokens + 2 * (4 + 6) counted tokens = 30.
const COST: i64 = 30;

/// `database.acquire_timeout_seconds` of the worker. With the 10 s limit
/// on one transaction, an attempt at a batch takes at most 11 s.
const ACQUIRE_TIMEOUT_SECONDS: u64 = 1;

/// Time for the worker to take the published batch and fail its first
/// attempts on the cut database.
const FAILING_FOR: Duration = Duration::from_millis(1_500);

/// Time between the shutdown request and the database's return.
const RETURNS_AFTER: Duration = Duration::from_millis(1_500);

/// Time without a delivery after which the standby has read everything.
const STANDBY_IDLE: Duration = Duration::from_secs(2);

/// Messages published while the worker stops, after those it holds.
const NEWER_MESSAGES: u64 = 100;

/// Time between the shutdown request and the end of the broker connection.
const BROKER_LOST_AFTER: Duration = Duration::from_secs(1);

/// Maximum time to stop once the broker connection ends: the closes of the
/// channels and of the connection, each bounded by 5 s, with a margin.
const STOP_AFTER_BROKER_LOST_MAX: Duration = Duration::from_secs(12);

/// Starts a worker that reaches the database through `proxy`.
async fn start_worker(test_name: &str, proxy: &TcpProxy, shutdown_timeout_seconds: u64) -> Harness {
    start_worker_through(test_name, proxy, None, shutdown_timeout_seconds).await
}

/// Starts a worker that reaches the database through `database`, and the
/// broker through `broker` when given.
async fn start_worker_through(
    test_name: &str,
    database: &TcpProxy,
    broker: Option<&TcpProxy>,
    shutdown_timeout_seconds: u64,
) -> Harness {
    let address = database.address().to_string();
    let broker_url = broker.map(|proxy| format!("amqp://guest:guest@{}/%2f", proxy.address()));
    Harness::start(test_name, move |settings: &mut Settings| {
        let url = settings.database.url.expose().replacen("127.0.0.1:5432", &address, 1);
        settings.database.url = SecretUrl::new(url);
        if let Some(url) = broker_url {
            settings.amqp.url = SecretUrl::new(url);
        }
        settings.database.acquire_timeout_seconds = ACQUIRE_TIMEOUT_SECONDS;
        settings.worker.shutdown_timeout_seconds = shutdown_timeout_seconds;
    })
    .await
}

/// Places the test stream's hold, then cuts the database and publishes the
/// stream's chunks and end, which the worker receives and cannot apply.
async fn cut_with_a_batch_pending(harness: &Harness, proxy: &TcpProxy) -> Vec<Outbound> {
    harness.fund(USER, "g-1", 1000).await;
    let reply = harness
        .request(&start(USER, STREAM, "m-start", ROUND_MODEL, 10, 50), "c-start")
        .await;
    assert_eq!(reply["reserved"], RESERVED, "{reply}");
    proxy.cut();
    let pending = vec![
        Outbound::json(&chunk(USER, STREAM, 0, "first", Some(4))),
        Outbound::json(&chunk(USER, STREAM, 1, "second", Some(6))),
        Outbound::json(&end(USER, STREAM, "m-end", EndStatus::Completed, None)),
    ];
    harness.publish_all(&pending).await;
    tokio::time::sleep(FAILING_FOR).await;
    pending
}

/// Messages ready in the shard queues.
async fn ready_messages(harness: &Harness) -> u32 {
    let connection = amqp_connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut ready = 0;
    for index in 0..harness.settings.topology.shards {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare(harness.names.shard(index).as_str().into(), options, FieldTable::default())
            .await
            .expect("the shard queue exists");
        ready += queue.message_count();
    }
    close_connection(&connection).await;
    ready
}

/// Maximum wait for the broker to return a closed connection's
/// unacknowledged deliveries to their queue, which it does after the
/// connection has gone.
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// Reads the ready messages of the shard queues until there are at least
/// `expected` or `RETURN_WAIT` has passed, and returns the last count.
async fn ready_messages_once_returned(harness: &Harness, expected: u32) -> u32 {
    let deadline = Instant::now() + RETURN_WAIT;
    loop {
        let ready = ready_messages(harness).await;
        if ready >= expected || Instant::now() >= deadline {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_returning_database() {
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    // Attempts may start for 15 - 11 = 4 s after the shutdown request.
    let mut harness = start_worker("stop_returns", &proxy, 15).await;
    cut_with_a_batch_pending(&harness, &proxy).await;
    assert_eq!(harness.account(USER).await.reserved, RESERVED, "applied during the outage");

    let requested = Instant::now();
    let restore = async {
        tokio::time::sleep(RETURNS_AFTER).await;
        proxy.restore();
    };
    tokio::join!(harness.stop_worker(), restore);
    assert!(
        requested.elapsed() >= RETURNS_AFTER,
        "the worker stopped before the database returned"
    );

    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["counted_completion_tokens"], 10, "{settled}");
    assert_eq!(settled["charged"], COST, "{settled}");
    let account = harness.account(USER).await;
    assert_eq!(account.balance, 1000 - COST);
    assert_eq!(account.reserved, 0);
    assert_eq!(
        ready_messages(&harness).await,
        0,
        "the stopped worker returned messages to the queue"
    );
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_retries_on_broker_loss() {
    let database = TcpProxy::start("127.0.0.1:5432").await;
    let broker = TcpProxy::start("127.0.0.1:5672").await;
    // Attempts may start for 30 - 11 = 19 s after the shutdown request.
    let mut harness = start_worker_through("stop_broker_lost", &database, Some(&broker), 30).await;
    cut_with_a_batch_pending(&harness, &database).await;

    let stop = async {
        harness.stop_worker().await;
        Instant::now()
    };
    let cut_broker = async {
        tokio::time::sleep(BROKER_LOST_AFTER).await;
        broker.cut();
        Instant::now()
    };
    let (stopped, broker_lost) = tokio::join!(stop, cut_broker);
    assert!(
        stopped > broker_lost,
        "the worker stopped before the broker connection ended"
    );
    let stopping = stopped - broker_lost;
    assert!(
        stopping < STOP_AFTER_BROKER_LOST_MAX,
        "the worker kept retrying for {stopping:?} after its broker connection ended"
    );
    assert_eq!(
        harness.account(USER).await.reserved,
        RESERVED,
        "the worker applied part of the batch it gave up"
    );
    assert_eq!(
        ready_messages_once_returned(&harness, 3).await,
        3,
        "the broker did not hold the batch for the next worker"
    );
    database.restore();
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_batch_before_newer_messages() {
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    // Attempts may start for 13 - 11 = 2 s after the shutdown request.
    let shutdown_timeout_seconds = 13;
    let mut harness = start_worker("stop_gives_up", &proxy, shutdown_timeout_seconds).await;

    // A standby on every shard queue, as a second worker process would
    // be: single active consumer keeps it waiting while the worker consumes.
    let standby_connection = amqp_connect().await;
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    for index in 0..harness.settings.topology.shards {
        let channel = standby_connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                harness.names.shard(index).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let body: Value = serde_json::from_slice(&delivery.data).unwrap();
                received.lock().unwrap().push(body["message_id"].as_str().unwrap().to_owned());
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
    }

    let pending = cut_with_a_batch_pending(&harness, &proxy).await;
    assert!(received.lock().unwrap().is_empty(), "the standby took messages from a running worker");

    // Newer messages of the same user keep coming while the worker stops.
    let newer: Vec<Outbound> = (0..NEWER_MESSAGES)
        .map(|seq| Outbound::json(&chunk(USER, "s-stop-newer", seq, "later", Some(1))))
        .collect();
    let publisher = standby_connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let events = harness.names.events.clone();
    let requested = Instant::now();
    let publish_newer = async {
        for message in &newer {
            let confirm = publisher
                .basic_publish(
                    events.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            assert!(confirm.await.unwrap().is_ack(), "the broker refused a newer message");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    let stop = async {
        // Shutdown is requested after some of the newer messages are published.
        tokio::time::sleep(Duration::from_millis(500)).await;
        harness.stop_worker().await;
        requested.elapsed()
    };
    let ((), stopped_after) = tokio::join!(publish_newer, stop);
    assert!(
        stopped_after < Duration::from_secs(shutdown_timeout_seconds),
        "the worker took {stopped_after:?} to stop"
    );

    let mut last_count = received.lock().unwrap().len();
    let mut last_change = Instant::now();
    while last_change.elapsed() < STANDBY_IDLE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let count = received.lock().unwrap().len();
        if count != last_count {
            last_count = count;
            last_change = Instant::now();
        }
    }
    let expected: Vec<String> = pending
        .iter()
        .chain(&newer)
        .map(|message| message.message_id.clone().expect("contract messages have ids"))
        .collect();
    let got = received.lock().unwrap().clone();
    if got != expected {
        let first_wrong = got
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "the standby got {} of {} messages; the first out of publishing order is at \
             position {first_wrong}: {:?}",
            got.len(),
            expected.len(),
            &got[first_wrong..got.len().min(first_wrong + 5)]
        );
    }
    assert_eq!(
        harness.account(USER).await.reserved,
        RESERVED,
        "the worker applied part of the batch it gave up"
    );

    close_connection(&standby_connection).await;
    proxy.restore();
    harness.finish().await;
}
