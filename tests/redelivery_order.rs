//! The order in which the broker delivers again what a consumer held
//! without acknowledging, on the project's own shard queues (quorum, single
//! active consumer, delivery limit, at-least-once dead-lettering).
//!
//! The worker relies on it. After a crash or a lost connection, a user's
//! unacknowledged messages must come back in publishing order. Otherwise a
//! chunk could be applied before its stream's start, or an end before a
//! trailing chunk. The consumer here reaches RabbitMQ through a loopback
//! proxy that the test cuts, as a SIGKILL or a network fault would.

mod common;

use std::time::Duration;

use common::process::TcpProxy;
use common::{amqp_connect, close_connection};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use stream_credits::settings::{Settings, TopologySettings};
use stream_credits::topology::{self, Names};

/// Messages published to the one user's shard.
const MESSAGES: usize = 1_200;
/// Deliveries the first consumer may hold, as the worker's `amqp.prefetch`.
const PREFETCH: u16 = 500;
/// Maximum wait for one delivery.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_returns_deliveries_in_order() {
    returns_in_order("cut", 137, Standby::None, |_, proxy| {
        proxy.cut();
        async {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_channel_returns_deliveries_in_order() {
    returns_in_order("close", 1, Standby::None, |channel, _| async move {
        channel.close(200, "test closes the channel".into()).await.unwrap();
    })
    .await;
}

/// Two worker processes: the one holding the shard dies and the standby,
/// subscribed all along, is handed the queue. The dead one's deliveries
/// must reach the standby before anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_gets_returns_first_after_cut() {
    returns_in_order("standby", 250, Standby::Waiting, |_, proxy| {
        proxy.cut();
        async {}
    })
    .await;
}

/// A stopping worker closes its channels without cancelling first, so the
/// standby gets the queue only then, and gets the returned deliveries
/// before anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_gets_returns_first_after_close() {
    returns_in_order("standby-close", 250, Standby::Waiting, |channel, _| async move {
        channel.close(200, "test closes the channel".into()).await.unwrap();
    })
    .await;
}

/// Whether a second consumer waits on the queue while the first consumes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Standby {
    None,
    Waiting,
}

/// Publishes `MESSAGES` numbered messages for one user and takes
/// `PREFETCH` of them through a proxy, acknowledging the first `acked`.
/// Then ends that consumer with `stop` and checks that the next consumer
/// (subscribed afterwards, or waiting as standby) receives every
/// unacknowledged message once, in publishing order.
async fn returns_in_order<F, Fut>(case: &str, acked: usize, standby: Standby, stop: F)
where
    F: FnOnce(Channel, &TcpProxy) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let settings = TopologySettings {
        prefix: format!("t-order-{case}-{tag}"),
        shards: 1,
        ..Settings::default().topology
    };
    let direct = amqp_connect().await;
    let publisher = direct.create_channel().await.unwrap();
    let names = topology::declare(&publisher, &settings)
        .await
        .expect("declare the topology; the consistent-hash plugin must be enabled");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for index in 0..MESSAGES {
        publisher
            .basic_publish(
                names.events.as_str().into(),
                "u-order".into(),
                BasicPublishOptions::default(),
                index.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.address());
    let proxied = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect through the proxy");
    let channel = proxied.create_channel().await.unwrap();
    let mut consumer = subscribe(&channel, &names).await;
    let first = take(&mut consumer, PREFETCH as usize, Some(acked)).await;
    assert_eq!(first, (0..PREFETCH as usize).collect::<Vec<_>>());

    let again = direct.create_channel().await.unwrap();
    let mut next = None;
    if standby == Standby::Waiting {
        next = Some(subscribe(&again, &names).await);
        // Give the broker time to register the waiting consumer.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop(channel, &proxy).await;
    drop(proxied);
    let mut next = match next {
        Some(consumer) => consumer,
        None => subscribe(&again, &names).await,
    };
    let rest = take(&mut next, MESSAGES - acked, None).await;
    let expected: Vec<usize> = (acked..MESSAGES).collect();
    if rest != expected {
        let first_wrong = rest
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want)
            .unwrap_or(rest.len().min(expected.len()));
        panic!(
            "after `{case}`, {} messages came back; the first out of place is at position \
             {first_wrong}: {:?}",
            rest.len(),
            &rest[first_wrong..rest.len().min(first_wrong + 10)]
        );
    }

    remove(&again, &names).await;
    close_connection(&direct).await;
}

/// Subscribes to the shard queue with the worker's prefetch.
async fn subscribe(channel: &Channel, names: &Names) -> Consumer {
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    channel
        .basic_consume(
            names.shard(0).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Receives `count` deliveries and returns their numbers. With
/// `ack_through`, acknowledges the first that many with one `multiple` ack
/// and leaves the rest unacknowledged; without it, acknowledges each.
async fn take(consumer: &mut Consumer, count: usize, ack_through: Option<usize>) -> Vec<usize> {
    let mut numbers = Vec::with_capacity(count);
    while numbers.len() < count {
        let delivery = tokio::time::timeout(DELIVERY_WAIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} deliveries arrived", numbers.len()))
            .expect("the consumer is open")
            .unwrap();
        let number: usize = std::str::from_utf8(&delivery.data).unwrap().parse().unwrap();
        numbers.push(number);
        match ack_through {
            Some(through) if numbers.len() == through => {
                let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
            }
            Some(_) => {}
            None => {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
        }
    }
    numbers
}

/// Deletes the test's queues and exchanges.
async fn remove(channel: &Channel, names: &Names) {
    for queue in [names.shard(0), names.dead.clone()] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&names.events, &names.dlx, &names.results] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
