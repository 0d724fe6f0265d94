//! Producers that use RabbitMQ's direct reply-to get their replies, and a
//! reply address that no longer exists does not stop the worker.

mod common;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;

use common::{Harness, ROUND_MODEL, WAIT, amqp_connect, close_connection, start};

const USER: &str = "u-direct";
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_gets_reply() {
    let harness = Harness::start("direct", |_| {}).await;
    harness.fund(USER, "g-1", 1000).await;

    let connection = amqp_connect().await;
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("enable publisher confirms");
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await
        .expect("consume direct reply-to");

    // First a start whose direct reply-to address no consumer owns, then
    // a start from a live producer.
    for (stream, reply_to) in [
        ("s-gone", "amq.rabbitmq.reply-to.gone"),
        ("s-live", DIRECT_REPLY_TO),
    ] {
        let body = start(USER, stream, &format!("m-{stream}"), ROUND_MODEL, 10, 10);
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_reply_to(reply_to.into())
            .with_correlation_id(stream.into());
        channel
            .basic_publish(
                harness.names.events.as_str().into(),
                USER.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).expect("serialize"),
                properties,
            )
            .await
            .expect("publish a start")
            .await
            .expect("await the confirm");
    }

    let delivery = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a direct reply within the wait")
        .expect("the consumer is open")
        .expect("a delivery");
    let reply: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON reply");
    let correlation_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|id| id.as_str().to_owned());
    assert_eq!(correlation_id.as_deref(), Some("s-live"));
    assert_eq!(reply["type"], "reservation.granted", "{reply}");

    // The worker still takes messages after replying to the stale address.
    harness.barrier(USER).await;
    let account = harness.account(USER).await;
    assert_eq!(account.reserved, 60, "both starts hold 10 + 2 * 10 credits");

    close_connection(&connection).await;
    harness.finish().await;
}
