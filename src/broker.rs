//! RabbitMQ connection and confirmed publishing of replies, events and
//! dead letters.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use uuid::Uuid;

use crate::ledger::{Destination, Outgoing};
use crate::messages::RejectReason;
use crate::settings::SecretUrl;
use crate::topology::Names;

/// Dead-letter header: the reason code.
pub const HEADER_ERROR: &str = "x-stream-credits-error";
/// Dead-letter header: one line on what was wrong, quoting no text.
pub const HEADER_DETAIL: &str = "x-stream-credits-detail";
/// Dead-letter header: the routing key the message was first sent with.
pub const HEADER_ROUTING_KEY: &str = "x-stream-credits-routing-key";
/// Dead-letter header: the id that `dlq show`, `replay` and `purge` take.
pub const HEADER_DEAD_LETTER_ID: &str = "x-stream-credits-dead-letter-id";

/// AMQP delivery mode of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused to take a message (a negative confirm).
    #[error("RabbitMQ did not confirm a message to {target}")]
    NotConfirmed { target: String },
}

/// Opens a connection; errors name the URL without its password.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url.expose(), properties)
        .await
        .map_err(|source| BrokerError::Connect {
            url: url.redacted(),
            source,
        })
}

/// Opens a channel with publisher confirms on.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// Publishes one message and waits for the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?;
    match confirm.await? {
        Confirmation::Nack(_) => Err(BrokerError::NotConfirmed {
            target: format!("exchange `{exchange}`"),
        }),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
    }
}

/// Publishes replies and events, all confirmed before it returns. The
/// publishes are pipelined: all are sent, then all confirms awaited.
pub async fn publish_outgoing(
    channel: &Channel,
    names: &Names,
    outgoing: &[Outgoing],
) -> Result<(), BrokerError> {
    let mut confirms = Vec::with_capacity(outgoing.len());
    for message in outgoing {
        let body = serde_json::to_vec(&message.body).expect("JSON values serialize");
        let event_id = message
            .body
            .get("event_id")
            .and_then(|id| id.as_str())
            .unwrap_or_default();
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(message.event_type.as_str().into())
            .with_message_id(event_id.into());
        let exchange = match message.destination {
            Destination::Reply => {
                if let Some(correlation_id) = &message.correlation_id {
                    properties = properties.with_correlation_id(correlation_id.as_str().into());
                }
                ""
            }
            Destination::Event => {
                properties = properties.with_delivery_mode(PERSISTENT);
                names.results.as_str()
            }
        };
        let confirm = channel
            .basic_publish(
                exchange.into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        confirms.push((confirm, exchange));
    }
    for (confirm, exchange) in confirms {
        if let Confirmation::Nack(_) = confirm.await? {
            return Err(BrokerError::NotConfirmed {
                target: format!("exchange `{exchange}`"),
            });
        }
    }
    Ok(())
}

/// A message to dead-letter: the original body, properties and routing
/// key, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub body: &'a [u8],
    pub properties: &'a BasicProperties,
    pub routing_key: &'a str,
    pub reason: RejectReason,
    pub detail: &'a str,
}

/// Publishes a dead letter to the dead-letter exchange, confirmed, and
/// returns its dead-letter id.
pub async fn dead_letter(
    channel: &Channel,
    names: &Names,
    letter: DeadLetter<'_>,
) -> Result<Uuid, BrokerError> {
    let id = Uuid::new_v4();
    let mut headers = letter.properties.headers().clone().unwrap_or_default();
    let text = |value: &str| AMQPValue::LongString(value.into());
    headers.insert(ShortString::from(HEADER_ERROR), text(letter.reason.code()));
    headers.insert(ShortString::from(HEADER_DETAIL), text(letter.detail));
    headers.insert(ShortString::from(HEADER_ROUTING_KEY), text(letter.routing_key));
    headers.insert(
        ShortString::from(HEADER_DEAD_LETTER_ID),
        text(&id.to_string()),
    );
    let properties = letter
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    publish_confirmed(channel, &names.dlx, letter.routing_key, letter.body, properties).await?;
    Ok(id)
}

/// Reads a string header.
pub fn header_text(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    let value = headers?.inner().get(key)?;
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}
