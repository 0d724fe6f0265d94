//! Exchange and queue names, and their idempotent declaration.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::settings::TopologySettings;

/// Command that enables the consistent-hash exchange on a RabbitMQ node.
pub const ENABLE_PLUGIN_COMMAND: &str =
    "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange";

/// A failure to declare the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The broker lacks the consistent-hash exchange type. Final: exit 2.
    #[error(
        "RabbitMQ has no `x-consistent-hash` exchange type; enable the plugin with `{}` \
         and start again",
        ENABLE_PLUGIN_COMMAND
    )]
    PluginMissing,
    /// An existing queue or exchange was declared with other arguments.
    /// Final: exit 2, because only an operator can resolve it.
    #[error("{name} exists with other settings than this worker's: {message}")]
    Mismatch { name: String, message: String },
    /// Anything else, usually a lost connection: retry.
    #[error("cannot declare the topology: {0}")]
    Broker(#[from] lapin::Error),
}

/// Every name derived from `topology.prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Consistent-hash exchange producers publish to.
    pub events: String,
    /// Dead-letter exchange.
    pub dlx: String,
    /// Queue holding dead letters.
    pub dead: String,
    /// Topic exchange of outcome events.
    pub results: String,
    shard_prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            events: format!("{prefix}.events"),
            dlx: format!("{prefix}.dlx"),
            dead: format!("{prefix}.dead"),
            results: format!("{prefix}.results"),
            shard_prefix: format!("{prefix}.events.shard."),
        }
    }

    /// The queue of shard `index`.
    pub fn shard(&self, index: u16) -> String {
        format!("{}{index}", self.shard_prefix)
    }
}

/// Counts the shard queues under `names` that have a consumer. Each queue
/// is declared passively, so nothing is created, and a missing queue
/// fails with the broker's `NOT_FOUND`, which closes `channel`.
pub async fn consumed_shards(channel: &Channel, names: &Names, shards: u16) -> Result<u16, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut consumed = 0;
    for index in 0..shards {
        let queue = channel
            .queue_declare(names.shard(index).as_str().into(), passive, FieldTable::default())
            .await?;
        consumed += u16::from(queue.consumer_count() > 0);
    }
    Ok(consumed)
}

/// Returns true when `error` is the broker's `NOT_FOUND` reply, as to a
/// passive declaration of a queue that does not exist.
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// Declares every exchange, queue and binding. Declaring again with the
/// same settings changes nothing, so every worker does it on connect.
pub async fn declare(channel: &Channel, settings: &TopologySettings) -> Result<Names, TopologyError> {
    let names = Names::new(&settings.prefix);
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };

    channel
        .exchange_declare(
            names.events.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".to_owned()),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|error| classify(&names.events, error))?;
    // Fanout, so both our own dead letters and those of the broker's
    // delivery limit reach the dead queue whatever their routing key.
    channel
        .exchange_declare(names.dlx.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(|error| classify(&names.dlx, error))?;
    channel
        .exchange_declare(names.results.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .map_err(|error| classify(&names.results, error))?;

    declare_queue(channel, &names.dead, quorum_arguments()).await?;
    channel
        .queue_bind(
            names.dead.as_str().into(),
            names.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| classify(&names.dead, error))?;

    for index in 0..settings.shards {
        let queue = names.shard(index);
        declare_queue(channel, &queue, shard_arguments(&names, settings)).await?;
        // The binding key of a consistent-hash exchange is the shard's
        // weight on the hash ring; every shard weighs the same.
        channel
            .queue_bind(
                queue.as_str().into(),
                names.events.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| classify(&queue, error))?;
    }
    Ok(names)
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<(), TopologyError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.into(), options, arguments)
        .await
        .map_err(|error| classify(name, error))?;
    Ok(())
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(short("x-queue-type"), long("quorum"));
    arguments
}

fn shard_arguments(names: &Names, settings: &TopologySettings) -> FieldTable {
    let mut arguments = quorum_arguments();
    // One consumer at a time per shard keeps each user's messages in order.
    arguments.insert(short("x-single-active-consumer"), AMQPValue::Boolean(true));
    arguments.insert(short("x-dead-letter-exchange"), long(&names.dlx));
    // A message that keeps failing is dead-lettered by the broker after
    // this many deliveries, and at-least-once dead-lettering keeps it from
    // being lost on the way; that strategy needs reject-publish overflow.
    arguments.insert(
        short("x-delivery-limit"),
        AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
    );
    arguments.insert(short("x-dead-letter-strategy"), long("at-least-once"));
    arguments.insert(short("x-overflow"), long("reject-publish"));
    arguments
}

fn short(text: &str) -> ShortString {
    text.into()
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

fn classify(name: &str, error: lapin::Error) -> TopologyError {
    let text = error.to_string();
    if text.contains("x-consistent-hash") || text.contains("exchange type") {
        return TopologyError::PluginMissing;
    }
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        return TopologyError::Mismatch {
            name: name.to_owned(),
            message: text,
        };
    }
    TopologyError::Broker(error)
}
