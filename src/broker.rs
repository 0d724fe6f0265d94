//! RabbitMQ connection and confirmed publishing of replies, events and
//! dead letters.

use std::path::{Path, PathBuf};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
    DefaultConnectionBuilder,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use uuid::Uuid;

use crate::ledger::{Destination, Outgoing};
use crate::messages::RejectReason;
use crate::settings::AmqpSettings;
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
    #[error("cannot connect to RabbitMQ at {url}: {source}{hint}")]
    Connect {
        url: String,
        /// Boxed, so that a result carrying this error stays small.
        #[source]
        source: Box<lapin::Error>,
        /// Advice on what to check, empty when the error names no cause.
        hint: &'static str,
    },
    /// The TLS handshake of an `amqps://` connection failed.
    #[error("TLS handshake with RabbitMQ at {url} failed: {error}{hint}")]
    Tls {
        url: String,
        /// Shown in the message rather than as a source, so the error
        /// chain prints the cause once, before the hint.
        error: lapin::Error,
        /// Advice on what to check, empty when the error names no cause.
        hint: &'static str,
    },
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused to take a message (a negative confirm).
    #[error("RabbitMQ did not confirm a message to {target}")]
    NotConfirmed { target: String },
    #[error("cannot use amqp.tls_ca_file: {0}")]
    CaFile(#[from] CaFileError),
}

/// A CA file that cannot serve as trusted roots.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PEM file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} contains no PEM certificate")]
    Empty { path: PathBuf },
}

/// Reads a PEM file of CA certificates and returns its text, after
/// checking that it contains at least one certificate.
///
/// NOTE: only the PEM framing is checked here. A block whose content is
/// not a valid X.509 certificate is rejected at connect time instead, by
/// the TLS handshake setup.
pub fn read_ca_file(path: &Path) -> Result<String, CaFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut certificates = 0;
    for certificate in CertificateDer::pem_slice_iter(text.as_bytes()) {
        certificate.map_err(|error| CaFileError::Invalid {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(CaFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// Opens a connection. Errors name the URL without its password. An
/// `amqps://` connection verifies the broker's certificate and host name
/// with rustls against the system's root certificates and those of
/// `amqp.tls_ca_file`. The file is read on every connect, so a renewed CA
/// is picked up at the next reconnect.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = match &settings.tls_ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(read_ca_file(path)?),
        },
        None => OwnedTLSConfig::default(),
    };
    let wrap = |source| connect_error(settings.url.redacted(), source);
    DefaultConnectionBuilder::new()
        .map_err(wrap)?
        .with_uri_str(settings.url.expose().to_owned())
        .with_properties(properties)
        .with_tls_config(tls)
        .connect()
        .await
        .map_err(wrap)
}

/// Wraps a failed connect, telling a TLS failure apart: rustls reports it
/// inside the I/O error that lapin returns.
fn connect_error(url: String, source: lapin::Error) -> BrokerError {
    let lapin::ErrorKind::IOError(io) = source.kind() else {
        let text = source.to_string();
        let hint = if text.contains("ACCESS_REFUSED") {
            "; check the user and password in amqp.url"
        } else if text.contains("NOT_ALLOWED") {
            "; check the virtual host in amqp.url and the user's permissions on it"
        } else {
            ""
        };
        return BrokerError::Connect { url, source: Box::new(source), hint };
    };
    let Some(tls) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        let hint = match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "; check that RabbitMQ is running and listens on the host and port of amqp.url"
            }
            _ => "",
        };
        return BrokerError::Connect { url, source: Box::new(source), hint };
    };
    let hint = match tls {
        rustls::Error::InvalidCertificate(_) => {
            "; the broker's certificate must name the host of amqp.url and chain to a \
             system root certificate or to one in amqp.tls_ca_file"
        }
        _ => "",
    };
    BrokerError::Tls {
        url,
        error: source,
        hint,
    }
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
    publish_unconfirmed(channel, names, outgoing).await?.wait().await
}

/// Sends replies and events and returns their confirms without waiting
/// for them.
pub async fn publish_unconfirmed(
    channel: &Channel,
    names: &Names,
    outgoing: &[Outgoing],
) -> Result<Confirms, BrokerError> {
    let mut confirms = Confirms::default();
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
        confirms.pending.push((confirm, message.destination));
    }
    Ok(confirms)
}

/// The broker's confirms of messages sent by [`publish_unconfirmed`].
#[derive(Default)]
pub struct Confirms {
    pending: Vec<(PublisherConfirm, Destination)>,
}

impl Confirms {
    /// Waits for every confirm; fails on the first negative one.
    pub async fn wait(self) -> Result<(), BrokerError> {
        for (confirm, destination) in self.pending {
            if let Confirmation::Nack(_) = confirm.await? {
                let target = match destination {
                    Destination::Reply => "the default exchange (a reply)",
                    Destination::Event => "the results exchange",
                };
                return Err(BrokerError::NotConfirmed { target: target.to_owned() });
            }
        }
        Ok(())
    }
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
    // Time-ordered, so that dead-letter commands can sort letters by it.
    let id = Uuid::now_v7();
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
