//! Losing the broker connection under load: the worker reconnects,
//! declares its topology again and resumes, and the deliveries that come
//! back unacknowledged are not counted twice.
//!
//! The worker reaches RabbitMQ through a loopback proxy that the test cuts,
//! while the test's own publisher connects directly and keeps publishing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::process::{Load, LoadShape, TcpProxy, assert_settled_exactly_once, shards_consumed};
use common::{Harness, RABBITMQ_ADDRESS, amqp_connect, close_connection};
use lapin::ExchangeKind;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use stream_credits::settings::SecretUrl;

const LOAD_BEFORE: Duration = Duration::from_secs(4);
const CUT: Duration = Duration::from_secs(2);
const LOAD_AFTER: Duration = Duration::from_secs(4);

/// Maximum wait for the worker to be consuming again after the proxy is
/// restored. Its reconnect backoff after a 2 s cut stays below this.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// Maximum wait for the last streams to settle and for events that the
/// outbox relay sends about 10 to 15 s after a lost publish.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

const SHAPE: LoadShape = LoadShape {
    users: 20,
    chunks_per_stream: 30,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(30),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_settles_every_stream_once() {
    let proxy = TcpProxy::start(RABBITMQ_ADDRESS).await;
    let proxy_address = proxy.address();
    let harness = Harness::start("amqpcut", |settings| {
        let url = format!("amqp://guest:guest@{proxy_address}/%2f");
        settings.amqp.url = SecretUrl::new(url);
    })
    .await;
    let users = Load::fund(&harness, "amqpcut", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);

    tokio::time::sleep(LOAD_BEFORE).await;
    let connections_before = proxy.forwarded_connections();
    assert_eq!(
        connections_before, 1,
        "the worker uses one broker connection before the cut"
    );
    proxy.cut();
    // Only a worker that declares its topology again on reconnect brings
    // back what is deleted while it is away. Nothing is dead-lettered in
    // this test, so the dead-letter queue is empty.
    delete_dead_letter_topology(&harness).await;
    tokio::time::sleep(CUT).await;
    proxy.restore();

    let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
    loop {
        if proxy.forwarded_connections() > connections_before
            && shards_consumed(&harness).await
            && dead_letter_topology_exists(&harness).await
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "within {RECONNECT_WAIT:?} of the restore, the worker did not consume every shard \
             through a new connection and declare the dead-letter queue again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    tokio::time::sleep(LOAD_AFTER).await;
    let published = load.finish().await;
    eprintln!(
        "published {} streams of {} users in {} messages; the worker opened {} connections",
        published.streams.len(),
        published.users.len(),
        published.messages,
        proxy.forwarded_connections()
    );
    assert_settled_exactly_once(&harness, &harness.pool, &published, SETTLE_WAIT).await;

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
}

async fn delete_dead_letter_topology(harness: &Harness) {
    let connection = amqp_connect().await;
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .queue_delete(
            harness.names.dead.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the dead-letter queue");
    channel
        .exchange_delete(
            harness.names.dlx.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete the dead-letter exchange");
    close_connection(&connection).await;
}

/// Returns whether the dead-letter exchange and queue exist.
async fn dead_letter_topology_exists(harness: &Harness) -> bool {
    let connection = amqp_connect().await;
    // A failed passive declare closes its channel, so each check gets its
    // own.
    let exchange = match connection.create_channel().await {
        Ok(channel) => channel
            .exchange_declare(
                harness.names.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok(),
        Err(_) => false,
    };
    let queue = match connection.create_channel().await {
        Ok(channel) => channel
            .queue_declare(
                harness.names.dead.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok(),
        Err(_) => false,
    };
    close_connection(&connection).await;
    exchange && queue
}
