//! Test harness: one PostgreSQL database, one broker topology and one
//! in-process worker per test, plus helpers to publish contract messages
//! and await replies, events and dead letters.
//!
//! Every test calls [`Harness::finish`], which stops the worker and checks
//! the ledger invariants over the whole database. The database and the
//! topology are removed when the harness is dropped, also after a failed
//! assertion.

#![allow(dead_code)]

pub mod process;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::{Connection as _, PgConnection, PgPool};
use stream_credits::broker::{
    self, HEADER_DEAD_LETTER_ID, HEADER_DETAIL, HEADER_ERROR, HEADER_ROUTING_KEY,
};
use stream_credits::ledger::{self, AccountView};
use stream_credits::messages::{
    self, ChunkEmitted, CreditsGranted, EndStatus, Inbound, StreamEnded, StreamStarted, Usage,
};
use stream_credits::pricing::ModelPrice;
use stream_credits::settings::{SecretUrl, Settings};
use stream_credits::topology::Names;
use stream_credits::{db, invariants, worker};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Model added to every test's price table: 1 credit per prompt token and
/// 2 credits per completion token, so expected amounts are easy to check.
pub const ROUND_MODEL: &str = "round-price";

/// Output allowance of [`ROUND_MODEL`] when a start gives none.
pub const ROUND_MODEL_MAX_OUTPUT: u64 = 100;

/// `application_name` of the harness's own database sessions.
const HARNESS_APPLICATION: &str = "stream-credits-test-harness";

/// Maximum wait for a reply, an event, a dead letter or a database state.
pub const WAIT: Duration = Duration::from_secs(20);

/// Maximum wait for the worker to declare its topology and subscribe.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Maximum wait for the worker to drain and stop.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Pause between two looks at a collector, the dead-letter queue or the
/// database while waiting.
const POLL: Duration = Duration::from_millis(25);

const POSTGRES_ADDRESS: &str = "127.0.0.1:5432";
pub const RABBITMQ_ADDRESS: &str = "127.0.0.1:5672";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const START_POSTGRES: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";
const START_RABBITMQ: &str = "rabbitmq-server -detached, then \
     rabbitmq-plugins enable rabbitmq_consistent_hash_exchange";

/// Plan table and trigger function behind [`Harness::install_fault`].
/// `to_jsonb(NEW) ->> TG_ARGV[0]` reads the trigger's key column by name,
/// so one function serves every table.
const FAULT_FUNCTION: &str = "
CREATE TABLE IF NOT EXISTS test_fault_plan (
    key      text PRIMARY KEY,
    sqlstate text NOT NULL,
    failures bigint,
    counter  regclass NOT NULL
);
CREATE OR REPLACE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    plan test_fault_plan%ROWTYPE;
    attempt bigint;
BEGIN
    SELECT * INTO plan FROM test_fault_plan WHERE key = to_jsonb(NEW) ->> TG_ARGV[0];
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    attempt := nextval(plan.counter);
    IF plan.failures IS NULL OR attempt <= plan.failures THEN
        RAISE EXCEPTION 'injected failure % for key %', attempt, plan.key
            USING ERRCODE = plan.sqlstate;
    END IF;
    RETURN NEW;
END
$$;
";

/// URL of the PostgreSQL database `name` on the local server.
pub fn database_url(name: &str) -> String {
    format!("postgres://{POSTGRES_ADDRESS}/{name}")
}

/// One AMQP message received by a collector.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub body: Value,
}

/// Messages consumed from one queue by a background task.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    fn snapshot(&self) -> Vec<Received> {
        self.0.lock().expect("collector lock").clone()
    }

    /// Consumes `queue` with automatic acknowledgement until the channel
    /// closes, and stores every message.
    async fn spawn(channel: &Channel, queue: &str) -> Self {
        let collector = Self::default();
        let options = BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..Default::default()
        };
        let mut consumer = channel
            .basic_consume(queue.into(), "".into(), options, FieldTable::default())
            .await
            .unwrap_or_else(|error| panic!("cannot consume {queue}: {error}"));
        let store = collector.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                // A body that is not JSON is kept as null, so the test that
                // expects fields in it fails and shows the message.
                let body = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
                let received = Received {
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    correlation_id: delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|id| id.as_str().to_owned()),
                    body,
                };
                store.0.lock().expect("collector lock").push(received);
            }
        });
        collector
    }
}

/// A message taken from the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original body.
    pub body: Vec<u8>,
    /// The AMQP `message_id` property the test published with.
    pub message_id: Option<String>,
    pub error: Option<String>,
    pub detail: Option<String>,
    pub routing_key: Option<String>,
    pub dead_letter_id: Option<String>,
    /// Every AMQP property, headers included, to publish an exact copy.
    pub properties: BasicProperties,
}

impl DeadLetter {
    fn from_delivery(delivery: &lapin::message::Delivery) -> Self {
        let properties = &delivery.properties;
        let headers = properties.headers().as_ref();
        Self {
            body: delivery.data.clone(),
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            error: broker::header_text(headers, HEADER_ERROR),
            detail: broker::header_text(headers, HEADER_DETAIL),
            routing_key: broker::header_text(headers, HEADER_ROUTING_KEY),
            dead_letter_id: broker::header_text(headers, HEADER_DEAD_LETTER_ID),
            properties: properties.clone(),
        }
    }
}

/// Builds a letter as RabbitMQ dead-letters it after the delivery limit:
/// the message's own properties and the broker's `x-death` headers, dated
/// 2023-11-14 22:13:20 UTC, and none of ours.
pub fn broker_dead_letter(routing_key: &str, message_id: &str, body: &[u8]) -> DeadLetter {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(3));
    death.insert(
        "reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    death.insert("queue".into(), AMQPValue::LongString("some.shard".into()));
    death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
    let keys = FieldArray::from(vec![AMQPValue::LongString(routing_key.into())]);
    death.insert("routing-keys".into(), AMQPValue::FieldArray(keys));

    let mut headers = FieldTable::default();
    let deaths = FieldArray::from(vec![AMQPValue::FieldTable(death)]);
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
    headers.insert(
        "x-first-death-reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );

    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_type("chunk.emitted".into())
        .with_headers(headers);
    DeadLetter {
        body: body.to_vec(),
        message_id: Some(message_id.to_owned()),
        error: None,
        detail: None,
        routing_key: Some(routing_key.to_owned()),
        dead_letter_id: None,
        properties,
    }
}

/// One message to publish to the events exchange.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// AMQP `message_id` property, which the dead letter keeps.
    pub message_id: Option<String>,
    /// Correlation id of a request. The reply goes to the harness's reply
    /// queue.
    pub correlation_id: Option<String>,
}

impl Outbound {
    /// Builds a JSON message routed by its `user_id`.
    pub fn json(body: &Value) -> Self {
        let routing_key = body["user_id"]
            .as_str()
            .expect("a contract message has a string user_id")
            .to_owned();
        Self {
            routing_key,
            body: serde_json::to_vec(body).expect("JSON values serialize"),
            message_id: body["message_id"].as_str().map(str::to_owned),
            correlation_id: None,
        }
    }

    /// Builds a JSON message that requests a reply with `correlation_id`.
    pub fn request(body: &Value, correlation_id: &str) -> Self {
        Self {
            correlation_id: Some(correlation_id.to_owned()),
            ..Self::json(body)
        }
    }
}

struct Broker {
    /// Kept open because the reply and results queues are exclusive to it.
    connection: Connection,
    /// Channel in confirm mode, for publishing and reading dead letters.
    channel: Channel,
    reply_queue: String,
    replies: Collector,
    results: Collector,
}

/// One test's database, topology and worker.
pub struct Harness {
    pub settings: Arc<Settings>,
    pub names: Names,
    pub pool: PgPool,
    database_name: String,
    broker: Option<Broker>,
    shutdown: CancellationToken,
    worker: Option<JoinHandle<Result<(), worker::WorkerError>>>,
}

impl Harness {
    /// Decodes a message body with the test's limits, as the worker does.
    pub fn decoded(&self, body: &Value) -> Inbound {
        let bytes = serde_json::to_vec(body).expect("JSON serializes");
        messages::decode(&bytes, &self.settings.limits).expect("a valid message")
    }

    /// Creates the test's database and topology and starts a worker with
    /// 2 shards, the round-price model and whatever `configure` changes.
    pub async fn start(test_name: &str, configure: impl FnOnce(&mut Settings)) -> Self {
        init_logging();
        require_service("PostgreSQL", POSTGRES_ADDRESS, START_POSTGRES).await;
        require_service("RabbitMQ", RABBITMQ_ADDRESS, START_RABBITMQ).await;

        let suffix = short_id();
        let database_name = format!("sc_t_{test_name}_{suffix}");
        let mut settings = Settings::default();
        settings.database.url = SecretUrl::new(database_url(&database_name));
        settings.amqp.url = SecretUrl::new(AMQP_URL);
        settings.topology.prefix = format!("t-{test_name}-{suffix}");
        settings.topology.shards = 2;
        settings.worker.shutdown_timeout_seconds = 10;
        settings.http.listen = String::new();
        settings
            .models
            .insert(ROUND_MODEL.to_owned(), round_price());
        configure(&mut settings);
        settings
            .validate()
            .unwrap_or_else(|error| panic!("test settings are invalid: {error}"));
        let settings = Arc::new(settings);
        let names = Names::new(&settings.topology.prefix);

        // The harness reaches the database directly, even when `configure`
        // sends the worker through another address.
        let mut direct = settings.database.clone();
        direct.url = SecretUrl::new(format!(
            "{}?application_name={HARNESS_APPLICATION}",
            database_url(&database_name)
        ));
        let pool = db::migrate(&direct)
            .await
            .unwrap_or_else(|error| panic!("cannot create database {database_name}: {error}"));
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(worker::run(settings.clone(), shutdown.clone()));
        let mut harness = Self {
            settings,
            names,
            pool,
            database_name,
            broker: None,
            shutdown,
            worker: Some(worker),
        };
        harness.wait_until_consuming().await;
        harness.broker = Some(harness.connect_collectors().await);
        harness
    }

    /// Creates and migrates the test's database without broker or worker,
    /// for tests of the command line.
    pub async fn database_only(test_name: &str) -> Self {
        require_service("PostgreSQL", POSTGRES_ADDRESS, START_POSTGRES).await;
        let suffix = short_id();
        let database_name = format!("sc_t_{test_name}_{suffix}");
        let mut settings = Settings::default();
        settings.database.url = SecretUrl::new(database_url(&database_name));
        settings.topology.prefix = format!("t-{test_name}-{suffix}");
        let pool = db::migrate(&settings.database)
            .await
            .unwrap_or_else(|error| panic!("cannot create database {database_name}: {error}"));
        Self {
            names: Names::new(&settings.topology.prefix),
            settings: Arc::new(settings),
            pool,
            database_name,
            broker: None,
            shutdown: CancellationToken::new(),
            worker: None,
        }
    }

    /// Name of the test's database.
    pub fn database_name(&self) -> &str {
        &self.database_name
    }

    /// Waits until every shard queue has a consumer, which the worker adds
    /// only after declaring and binding the whole topology.
    async fn wait_until_consuming(&mut self) {
        let connection = amqp_connect().await;
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            if self.worker.as_ref().is_some_and(JoinHandle::is_finished) {
                let result = self.worker.take().expect("worker handle").await;
                panic!(
                    "the worker stopped before consuming: {result:?}. When RabbitMQ lacks the \
                     x-consistent-hash exchange type, run: rabbitmq-plugins enable \
                     rabbitmq_consistent_hash_exchange"
                );
            }
            if self.all_shards_consumed(&connection).await {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker did not subscribe to its {} shard queues within {READY_WAIT:?}",
                self.settings.topology.shards
            );
            tokio::time::sleep(POLL * 4).await;
        }
        close_connection(&connection).await;
    }

    async fn all_shards_consumed(&self, connection: &Connection) -> bool {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        for index in 0..self.settings.topology.shards {
            // A passive declare of a missing queue closes the channel, so
            // every check gets a new one.
            let Ok(channel) = connection.create_channel().await else {
                return false;
            };
            let queue = self.names.shard(index);
            let declared = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await;
            let _ = channel.close(200, "checked".into()).await;
            match declared {
                Ok(queue) if queue.consumer_count() > 0 => {}
                _ => return false,
            }
        }
        true
    }

    /// Opens the harness's own connection: a confirm channel, a private
    /// reply queue and a queue bound to every outcome event.
    async fn connect_collectors(&self) -> Broker {
        let connection = amqp_connect().await;
        let channel = connection.create_channel().await.expect("open a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("enable publisher confirms");

        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let reply_queue = channel
            .queue_declare("".into(), private, FieldTable::default())
            .await
            .expect("declare the reply queue")
            .name()
            .as_str()
            .to_owned();
        let results_queue = channel
            .queue_declare("".into(), private, FieldTable::default())
            .await
            .expect("declare the results queue")
            .name()
            .as_str()
            .to_owned();
        channel
            .queue_bind(
                results_queue.as_str().into(),
                self.names.results.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the results queue");

        let consumer_channel = connection.create_channel().await.expect("open a channel");
        let replies = Collector::spawn(&consumer_channel, &reply_queue).await;
        let results = Collector::spawn(&consumer_channel, &results_queue).await;
        Broker {
            connection,
            channel,
            reply_queue,
            replies,
            results,
        }
    }

    fn broker(&self) -> &Broker {
        self.broker
            .as_ref()
            .expect("this harness was started without a broker")
    }

    /// Publishes messages persistently to the events exchange, sending all
    /// before awaiting the confirms, and fails on a nack or an unroutable
    /// message.
    pub async fn publish_all(&self, messages: &[Outbound]) {
        let broker = self.broker();
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            if let Some(id) = &message.message_id {
                properties = properties.with_message_id(id.as_str().into());
            }
            if let Some(correlation_id) = &message.correlation_id {
                properties = properties
                    .with_reply_to(broker.reply_queue.as_str().into())
                    .with_correlation_id(correlation_id.as_str().into());
            }
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let confirm = broker
                .channel
                .basic_publish(
                    self.names.events.as_str().into(),
                    message.routing_key.as_str().into(),
                    options,
                    &message.body,
                    properties,
                )
                .await
                .expect("publish to the events exchange");
            confirms.push(confirm);
        }
        for confirm in confirms {
            match confirm.await.expect("await a publisher confirm") {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(returned)) => panic!(
                    "the events exchange routed no queue for routing key {}",
                    returned.delivery.routing_key
                ),
                other => panic!("RabbitMQ did not confirm a message: {other:?}"),
            }
        }
    }

    /// Publishes one JSON message routed by its `user_id`.
    pub async fn publish(&self, body: &Value) {
        self.publish_all(&[Outbound::json(body)]).await;
    }

    /// Publishes one JSON message with a reply address and returns the
    /// reply.
    pub async fn request(&self, body: &Value, correlation_id: &str) -> Value {
        self.publish_all(&[Outbound::request(body, correlation_id)])
            .await;
        self.reply(correlation_id).await
    }

    /// Waits for the first reply with `correlation_id`.
    pub async fn reply(&self, correlation_id: &str) -> Value {
        self.replies(correlation_id, 1).await.remove(0)
    }

    /// Waits until `count` replies with `correlation_id` arrived, and
    /// returns all that did.
    pub async fn replies(&self, correlation_id: &str, count: usize) -> Vec<Value> {
        let broker = self.broker();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found: Vec<Value> = broker
                .replies
                .snapshot()
                .into_iter()
                .filter(|reply| reply.correlation_id.as_deref() == Some(correlation_id))
                .map(|reply| reply.body)
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} replies with correlation id {correlation_id} arrived within {WAIT:?}",
                found.len()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Returns every reply received so far.
    pub fn all_replies(&self) -> Vec<Received> {
        self.broker().replies.snapshot()
    }

    /// Returns the outcome events of `event_type` for `stream_id` received
    /// so far.
    pub fn events(&self, event_type: &str, stream_id: &str) -> Vec<Value> {
        self.broker()
            .results
            .snapshot()
            .into_iter()
            .filter(|event| event.routing_key == event_type)
            .map(|event| event.body)
            .filter(|body| body["stream_id"] == stream_id)
            .collect()
    }

    /// Waits for the first outcome event of `event_type` for `stream_id`.
    pub async fn event(&self, event_type: &str, stream_id: &str) -> Value {
        self.event_within(event_type, stream_id, WAIT).await
    }

    /// Waits up to `timeout` for the first outcome event of `event_type`
    /// for `stream_id`.
    pub async fn event_within(
        &self,
        event_type: &str,
        stream_id: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.events(event_type, stream_id).into_iter().next() {
                return event;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {event_type} event for stream {stream_id} within {timeout:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Returns once the worker has handled every message published so far
    /// for `user_id`. It publishes a start for an unknown model, which
    /// changes no balance, and waits for its denial: one user's messages
    /// share a shard queue and are applied, dead-lettered and replied to
    /// in order.
    ///
    /// NOTE: a message returned to its queue with a nack is applied after
    /// the barrier when both were in the same batch.
    pub async fn barrier(&self, user_id: &str) {
        let id = format!("barrier-{}", Uuid::new_v4());
        let body = start(user_id, &id, &id, "no-such-model", 1, 1);
        let reply = self.request(&body, &id).await;
        assert_eq!(reply["reason"], "unknown_model", "barrier reply: {reply}");
    }

    /// Takes every message now in the dead-letter queue.
    pub async fn take_dead_letters(&self) -> Vec<DeadLetter> {
        let broker = self.broker();
        let mut letters = Vec::new();
        loop {
            let message = broker
                .channel
                .basic_get(
                    self.names.dead.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("read the dead-letter queue");
            let Some(message) = message else {
                return letters;
            };
            letters.push(DeadLetter::from_delivery(&message.delivery));
        }
    }

    /// Reads every message now in the dead-letter queue without removing
    /// any. They are read unacknowledged on a channel of their own, and
    /// closing it returns them to the queue.
    pub async fn peek_dead_letters(&self) -> Vec<DeadLetter> {
        let channel = self
            .broker()
            .connection
            .create_channel()
            .await
            .expect("open a channel");
        let mut letters = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.names.dead.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("read the dead-letter queue")
        {
            letters.push(DeadLetter::from_delivery(&message.delivery));
        }
        let closing = channel.close(200, "dead letters read".into());
        let closed = tokio::time::timeout(Duration::from_secs(5), closing).await;
        assert!(
            matches!(closed, Ok(Ok(()))),
            "closing the channel that read the dead letters failed: {closed:?}"
        );
        letters
    }

    /// Publishes an exact copy of `letter`, body and properties, to the
    /// dead-letter exchange, as a replay interrupted before its removal
    /// would leave it.
    pub async fn publish_dead_letter_copy(&self, letter: &DeadLetter) {
        let routing_key = letter.routing_key.clone().unwrap_or_default();
        let confirm = self
            .broker()
            .channel
            .basic_publish(
                self.names.dlx.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &letter.body,
                letter.properties.clone(),
            )
            .await
            .expect("publish to the dead-letter exchange");
        let confirmation = confirm.await.expect("await a publisher confirm");
        assert!(
            matches!(confirmation, Confirmation::Ack(_)),
            "RabbitMQ did not confirm the dead-letter copy: {confirmation:?}"
        );
    }

    /// Returns the number of ready messages in the dead-letter queue.
    pub async fn dead_letter_count(&self) -> u32 {
        let channel = self
            .broker()
            .connection
            .create_channel()
            .await
            .expect("open a channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare(
                self.names.dead.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .expect("look up the dead-letter queue");
        let _ = channel.close(200, "counted".into()).await;
        queue.message_count()
    }

    /// Waits until the dead-letter queue contains `expected` ready messages.
    /// Letters a command held unacknowledged come back to the queue a
    /// moment after its channel closes, so a single look can be early.
    pub async fn wait_dead_letter_count(&self, expected: u32) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let count = self.dead_letter_count().await;
            if count == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the dead-letter queue holds {count} messages, expected {expected} within {WAIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Environment that points the binary at this test's database, broker
    /// topology and delivery limit. The shard count and delivery limit
    /// must match, because the binary declares the topology too and
    /// RabbitMQ rejects a redeclare with other queue arguments.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let topology = &self.settings.topology;
        vec![
            (
                "STREAM_CREDITS__DATABASE__URL".to_owned(),
                database_url(&self.database_name),
            ),
            ("STREAM_CREDITS__AMQP__URL".to_owned(), AMQP_URL.to_owned()),
            (
                "STREAM_CREDITS__TOPOLOGY__PREFIX".to_owned(),
                topology.prefix.clone(),
            ),
            (
                "STREAM_CREDITS__TOPOLOGY__SHARDS".to_owned(),
                topology.shards.to_string(),
            ),
            (
                "STREAM_CREDITS__TOPOLOGY__DELIVERY_LIMIT".to_owned(),
                topology.delivery_limit.to_string(),
            ),
        ]
    }

    /// Runs the built binary with `args` against this test's database and
    /// topology.
    pub async fn run_cli(&self, args: &[&str]) -> std::process::Output {
        let env = self.cli_env();
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        run_binary(args, &env).await
    }

    /// Fetches the worker's `/metrics` page. The test must have set
    /// `http.listen`, for example to [`free_local_address`].
    pub async fn metrics(&self) -> String {
        let address = self.settings.http.listen.clone();
        assert!(
            !address.is_empty(),
            "the harness turns the HTTP endpoint off; set http.listen in the test's settings"
        );
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match http_get(&address, "/metrics").await {
                Ok((200, body)) => return body,
                Ok((status, body)) => panic!("GET /metrics returned {status}: {body}"),
                Err(error) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "GET http://{address}/metrics failed for {WAIT:?}: {error}"
                ),
            }
            tokio::time::sleep(POLL * 4).await;
        }
    }

    /// Makes inserts into `table` fail as planned with [`Self::plan_failures`].
    /// The trigger matches the plan's key against the inserted row's
    /// `column`. Attempts are counted with a sequence, which a rolled-back
    /// transaction does not undo, so a planned number of failures stays
    /// planned across the worker's retries.
    pub async fn install_fault(&self, table: &str, column: &str) {
        sqlx::raw_sql(FAULT_FUNCTION)
            .execute(&self.pool)
            .await
            .expect("create the fault-injection function");
        let statement = format!(
            "CREATE TRIGGER test_fault BEFORE INSERT ON {table} FOR EACH ROW \
             EXECUTE FUNCTION test_fault('{column}')"
        );
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("create the fault trigger on {table}: {error}"));
    }

    /// Plans failures for inserted rows whose trigger column is `key`: the
    /// first `failures` attempts raise an error with `sqlstate`, or every
    /// attempt when `failures` is `None`.
    pub async fn plan_failures(&self, key: &str, sqlstate: &str, failures: Option<i64>) {
        let ordinal: i64 = sqlx::query_scalar("SELECT count(*) + 1 FROM test_fault_plan")
            .fetch_one(&self.pool)
            .await
            .expect("count the planned faults");
        let counter = format!("test_fault_attempts_{ordinal}");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SEQUENCE {counter}")))
            .execute(&self.pool)
            .await
            .expect("create the attempt counter");
        sqlx::query(
            "INSERT INTO test_fault_plan (key, sqlstate, failures, counter) \
             VALUES ($1, $2, $3, $4::regclass)",
        )
        .bind(key)
        .bind(sqlstate)
        .bind(failures)
        .bind(&counter)
        .execute(&self.pool)
        .await
        .expect("store the fault plan");
    }

    /// Returns how many inserts of rows with `key` were attempted, failed
    /// ones included.
    pub async fn fault_attempts(&self, key: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(pg_sequence_last_value(counter), 0) FROM test_fault_plan \
             WHERE key = $1",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .expect("read the attempt counter")
    }

    /// Cancels the planned failures for `key`, so later attempts succeed.
    pub async fn clear_failures(&self, key: &str) {
        sqlx::query("UPDATE test_fault_plan SET failures = 0 WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await
            .expect("clear the fault plan");
    }

    /// Locks `user_id`'s account row in a transaction of the test, so that a
    /// worker batch that writes the row waits until the transaction ends.
    pub async fn lock_account(&self, user_id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut lock = self.pool.begin().await.expect("begin");
        sqlx::query("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .execute(&mut *lock)
            .await
            .expect("lock the account row");
        lock
    }

    /// Reads an account and panics when the user has none.
    pub async fn account(&self, user_id: &str) -> AccountView {
        let mut conn = self.pool.acquire().await.expect("acquire a connection");
        ledger::account(&mut conn, user_id)
            .await
            .expect("read the account")
            .unwrap_or_else(|| panic!("account {user_id} not found"))
    }

    /// Reads a stream's counted completion tokens and chunk count from its
    /// hold, and panics when the stream has none.
    pub async fn hold_counts(&self, user_id: &str, stream_id: &str) -> (i64, i64) {
        sqlx::query_as(
            "SELECT counted_completion_tokens, chunks FROM holds \
             WHERE user_id = $1 AND stream_id = $2",
        )
        .bind(user_id)
        .bind(stream_id)
        .fetch_one(&self.pool)
        .await
        .expect("read the hold's counts")
    }

    /// Counts this user's ledger entries of `kind` (`grant`, `charge` or
    /// `adjustment`).
    pub async fn ledger_rows(&self, user_id: &str, kind: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = $2")
            .bind(user_id)
            .bind(kind)
            .fetch_one(&self.pool)
            .await
            .expect("count ledger rows")
    }

    /// Runs `query`, which returns one count such as `SELECT count(*) …`,
    /// on the test's database.
    pub async fn count(&self, query: &'static str) -> i64 {
        sqlx::query_scalar(query)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("{query}: {error}"))
    }

    /// Grants credits through the broker and waits until the balance shows
    /// them.
    pub async fn fund(&self, user_id: &str, message_id: &str, amount: i64) {
        self.publish(&grant(user_id, message_id, amount)).await;
        self.barrier(user_id).await;
    }

    /// Lists the state, wait event and statement start of every session
    /// on the test's database but the harness's own, to show what a stuck
    /// worker keeps open.
    async fn database_sessions(&self) -> Vec<(String, String, String)> {
        let sessions = sqlx::query_as(
            "SELECT coalesce(state, ''), coalesce(wait_event, ''), left(query, 80) \
             FROM pg_stat_activity WHERE datname = $1 AND application_name <> $2",
        )
        .bind(&self.database_name)
        .bind(HARNESS_APPLICATION)
        .fetch_all(&self.pool)
        .await;
        sessions
            .unwrap_or_else(|error| vec![("unknown".to_owned(), error.to_string(), String::new())])
    }

    /// Stops the worker and checks that it stopped cleanly. Does nothing
    /// when it is already stopped.
    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker.take() {
            let Ok(stopped) = tokio::time::timeout(STOP_WAIT, worker).await else {
                let sessions = self.database_sessions().await;
                panic!(
                    "the worker did not stop within {STOP_WAIT:?}; sessions still open on \
                     {}: {sessions:#?}",
                    self.database_name
                );
            };
            let result = stopped.expect("the worker task panicked");
            assert!(
                result.is_ok(),
                "the worker stopped with an error: {result:?}"
            );
        }
    }

    /// Starts the worker again, with the same settings, after
    /// `stop_worker`.
    pub async fn restart_worker(&mut self) {
        assert!(self.worker.is_none(), "the worker is still running");
        self.shutdown = CancellationToken::new();
        self.worker = Some(tokio::spawn(worker::run(self.settings.clone(), self.shutdown.clone())));
        self.wait_until_consuming().await;
    }

    /// Waits until the stopped worker's database sessions have ended, and
    /// with them their unsent table statistics.
    pub async fn wait_for_worker_sessions(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let sessions = self.database_sessions().await;
            if sessions.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker sessions still open after 10 s: {sessions:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the worker, checks that it stopped cleanly and that no
    /// ledger invariant is broken anywhere in the database. The database and
    /// the topology are removed when `self` drops.
    pub async fn finish(mut self) {
        self.stop_worker().await;

        let mut conn = PgConnection::connect(&database_url(&self.database_name))
            .await
            .expect("connect to the test database");
        let violations = invariants::check(&mut conn)
            .await
            .expect("run the invariant checks");
        assert!(
            violations.is_empty(),
            "ledger invariants are broken: {violations:#?}"
        );
        let _ = conn.close().await;
        self.pool.close().await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker.take() {
            worker.abort();
        }
        let database_name = self.database_name.clone();
        let names = self.broker.as_ref().map(|_| self.names.clone());
        let shards = self.settings.topology.shards;
        // Drop runs inside the test's runtime, which cannot block on a
        // future, so the removal runs on a thread with its own runtime.
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a runtime for clean-up");
            runtime.block_on(async {
                if let Some(names) = names {
                    delete_topology(&names, shards).await;
                }
                drop_database(&database_name).await;
            });
        });
        if removal.join().is_err() {
            eprintln!("clean-up of database {} failed", self.database_name);
        }
    }
}

pub async fn delete_topology(names: &Names, shards: u16) {
    let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
    else {
        eprintln!(
            "cannot reach RabbitMQ to delete the queues of {}",
            names.events
        );
        return;
    };
    let mut queues: Vec<String> = (0..shards).map(|index| names.shard(index)).collect();
    queues.push(names.dead.clone());
    for queue in queues {
        // A failed delete closes the channel, so each gets its own.
        if let Ok(channel) = connection.create_channel().await
            && let Err(error) = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
        {
            eprintln!("cannot delete queue {queue}: {error}");
        }
    }
    for exchange in [&names.events, &names.dlx, &names.results] {
        if let Ok(channel) = connection.create_channel().await
            && let Err(error) = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
        {
            eprintln!("cannot delete exchange {exchange}: {error}");
        }
    }
    close_connection(&connection).await;
}

async fn drop_database(name: &str) {
    let mut conn = match PgConnection::connect(&database_url("postgres")).await {
        Ok(conn) => conn,
        Err(error) => {
            eprintln!("cannot connect to drop database {name}: {error}");
            return;
        }
    };
    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&mut conn)
        .await
    {
        eprintln!("cannot drop database {name}: {error}");
    }
    let _ = conn.close().await;
}

/// Sends the worker's logs to the test output, filtered by `RUST_LOG`
/// (errors only when it is unset).
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Fails the test with the command that starts a service it cannot reach.
async fn require_service(service: &str, address: &str, start_command: &str) {
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(address),
    )
    .await;
    match attempt {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => panic!(
            "{service} is not reachable at {address} ({error}); start it with: {start_command}"
        ),
        Err(_) => panic!(
            "{service} at {address} did not accept a connection within 3 s; start it with: {start_command}"
        ),
    }
}

/// Closes an AMQP connection, giving up after 5 s.
///
/// NOTE: lapin 4.12.3 `Connection::close` sometimes never returns after
/// channels with consumers were closed (3 of 600 closes in a local probe
/// against RabbitMQ 3.10.8), so every close here is bounded.
pub async fn close_connection(connection: &Connection) {
    let closing = connection.close(200, "test done".into());
    if tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .is_err()
    {
        eprintln!("closing an AMQP connection timed out after 5 s");
    }
}

/// Opens a connection to the local RabbitMQ, failing the test with the
/// command that starts it when it is unreachable.
pub async fn amqp_connect() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap_or_else(|error| {
            panic!("cannot connect to RabbitMQ at {RABBITMQ_ADDRESS}: {error}; start it with: {START_RABBITMQ}")
        })
}

/// Returns a loopback address with a port that was free a moment ago,
/// for the worker's HTTP endpoint.
pub fn free_local_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener
        .local_addr()
        .expect("read the bound address")
        .to_string()
}

/// Returns the value of one series in a Prometheus text page, such as
/// `stream_credits_dropped_total{reason="chunk_after_settlement"}`.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Sends `GET path` over HTTP/1.1 to `address` and returns the status
/// code and body. Enough for the worker's endpoint, which sends a
/// `Content-Length` body and closes on `Connection: close`.
pub async fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no response within 5 s")
        })??;
    let text = String::from_utf8_lossy(&response);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the endpoint answered with a chunked body, which this client does not decode"
    );
    Ok((status, body.to_owned()))
}

fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..8].to_owned()
}

pub fn round_price() -> ModelPrice {
    ModelPrice {
        input_per_million: 1_000_000,
        output_per_million: 2_000_000,
        cached_input_per_million: None,
        encoding: "o200k_base".to_owned(),
        max_output_tokens: ROUND_MODEL_MAX_OUTPUT,
    }
}

/// Builds a `credits.granted` body.
pub fn grant(user_id: &str, message_id: &str, amount: i64) -> Value {
    let message = CreditsGranted {
        kind: Default::default(),
        message_id: message_id.to_owned(),
        user_id: user_id.to_owned(),
        amount,
        reason: Some("test top-up".to_owned()),
        occurred_at: Utc::now(),
    };
    serde_json::to_value(message).expect("messages serialize")
}

/// Builds a `stream.started` body whose prompt is given as a token count.
pub fn start(
    user_id: &str,
    stream_id: &str,
    message_id: &str,
    model: &str,
    prompt_tokens: u64,
    max_output_tokens: u64,
) -> Value {
    let message = StreamStarted {
        kind: Default::default(),
        message_id: message_id.to_owned(),
        user_id: user_id.to_owned(),
        stream_id: stream_id.to_owned(),
        model: model.to_owned(),
        messages: None,
        prompt: None,
        prompt_tokens: Some(prompt_tokens),
        max_output_tokens: Some(max_output_tokens),
        occurred_at: Utc::now(),
    };
    serde_json::to_value(message).expect("messages serialize")
}

/// Builds a `chunk.emitted` body with message id `{stream_id}-c{seq}`.
pub fn chunk(user_id: &str, stream_id: &str, seq: u64, delta: &str, tokens: Option<u64>) -> Value {
    let message = ChunkEmitted {
        kind: Default::default(),
        message_id: format!("{stream_id}-c{seq}"),
        user_id: user_id.to_owned(),
        stream_id: stream_id.to_owned(),
        seq,
        delta: delta.to_owned(),
        tokens,
        occurred_at: Utc::now(),
    };
    serde_json::to_value(message).expect("messages serialize")
}

/// Builds a `stream.ended` body.
pub fn end(
    user_id: &str,
    stream_id: &str,
    message_id: &str,
    status: EndStatus,
    usage: Option<(u64, u64)>,
) -> Value {
    let message = StreamEnded {
        kind: Default::default(),
        message_id: message_id.to_owned(),
        user_id: user_id.to_owned(),
        stream_id: stream_id.to_owned(),
        status,
        usage: usage.map(|(prompt_tokens, completion_tokens)| Usage {
            prompt_tokens,
            completion_tokens,
            cached_prompt_tokens: None,
        }),
        occurred_at: Utc::now(),
    };
    serde_json::to_value(message).expect("messages serialize")
}

/// Runs the built binary with `args`, with `env` added to an environment
/// cleared of `RUST_LOG` and of every `STREAM_CREDITS__` variable, from a
/// directory without a `stream-credits.toml`. Without `RUST_LOG` in `env`,
/// the binary logs at the `log.level` that the test configures.
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let directory = std::env::temp_dir().join(format!("sc-cli-{}", short_id()));
    std::fs::create_dir_all(&directory).expect("create a working directory");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_stream-credits"));
    command.args(args).current_dir(&directory);
    command.env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("STREAM_CREDITS") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the binary finished within 60 s")
        .expect("run the binary");
    let _ = std::fs::remove_dir_all(&directory);
    output
}
