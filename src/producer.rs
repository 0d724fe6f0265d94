//! The producer side: publishes chats as contract messages, awaits grants
//! on a reply queue and settlements on the results exchange. The `replay`
//! and `demo` commands use it, and so can a test.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use uuid::Uuid;

use crate::broker::{self, BrokerError};
use crate::cli::Failure;
use crate::messages::{
    ChatMessage, ChunkEmitted, EndStatus, ReservationDenied, ReservationGranted,
    ReservationSettled, StreamEnded, StreamStarted, Usage,
};
use crate::replay::{self, Format, Recording};
use crate::settings::Settings;
use crate::topology::{self, Names};

/// The broker's pseudo-queue for direct replies to this channel.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// AMQP delivery mode of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

/// A producer failure.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("cannot declare the topology: {0}")]
    Topology(#[from] topology::TopologyError),
    #[error("no {what} within {seconds} s for stream `{stream_id}`; is a worker running?")]
    TimedOut {
        what: &'static str,
        stream_id: String,
        seconds: u64,
    },
    #[error("RabbitMQ did not confirm a published message")]
    NotConfirmed,
}

/// The reply to a `stream.started`.
#[derive(Debug, Clone)]
pub enum StartReply {
    Granted(ReservationGranted),
    Denied(ReservationDenied),
}

/// The form in which a chat's prompt is sent.
#[derive(Debug, Clone)]
pub enum PromptSpec {
    Tokens(u64),
    Messages(Vec<ChatMessage>),
}

/// One chat to publish: the start, the deltas and the end.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub user_id: String,
    pub stream_id: String,
    pub model: String,
    pub prompt: PromptSpec,
    pub max_output_tokens: Option<u64>,
    pub deltas: Vec<String>,
    pub status: EndStatus,
    pub usage: Option<Usage>,
}

/// The outcome of one published chat.
#[derive(Debug, Clone)]
pub struct ChatResult {
    pub reply: StartReply,
    /// `None` when the start was denied, so nothing was streamed.
    pub settled: Option<ReservationSettled>,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A connection that publishes chats and collects their outcomes.
pub struct Producer {
    _connection: Connection,
    channel: Channel,
    names: Names,
    replies: Waiters,
    settled: Arc<Mutex<HashMap<String, ReservationSettled>>>,
    settled_notify: Arc<Notify>,
    timeout: Duration,
}

fn stream_key(user_id: &str, stream_id: &str) -> String {
    format!("{user_id}\u{0}{stream_id}")
}

impl Producer {
    /// Connects, declares the topology, and starts listening for replies
    /// and settlement events. `timeout` bounds every wait.
    pub async fn connect(settings: &Settings, timeout: Duration) -> Result<Self, ProducerError> {
        let connection = broker::connect(&settings.amqp, "stream-credits producer").await?;
        let channel = broker::confirm_channel(&connection).await?;
        let names = topology::declare(&channel, &settings.topology).await?;

        let replies: Waiters = Arc::default();
        let reply_consumer = consume_no_ack(&channel, DIRECT_REPLY_TO).await?;
        tokio::spawn(route_replies(reply_consumer, replies.clone()));

        let events = connection.create_channel().await?;
        let queue = events
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        events
            .queue_bind(
                queue.name().clone(),
                names.results.as_str().into(),
                "reservation.settled".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let event_consumer = consume_no_ack(&events, queue.name().as_str()).await?;
        let settled = Arc::default();
        let settled_notify = Arc::new(Notify::new());
        tokio::spawn(collect_settlements(
            event_consumer,
            Arc::clone(&settled),
            Arc::clone(&settled_notify),
        ));

        Ok(Self {
            _connection: connection,
            channel,
            names,
            replies,
            settled,
            settled_notify,
            timeout,
        })
    }

    /// Publishes one message to the events exchange, routed by user.
    pub async fn publish<T: Serialize>(
        &self,
        user_id: &str,
        message_id: &str,
        message: &T,
    ) -> Result<(), ProducerError> {
        let confirm = self.send(user_id, message_id, message).await?;
        confirmed(confirm.await?)
    }

    /// Publishes a `stream.started` and waits for its reply.
    pub async fn start(&self, start: &StreamStarted) -> Result<StartReply, ProducerError> {
        let correlation_id = Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        self.replies
            .lock()
            .expect("reply map lock")
            .insert(correlation_id.clone(), sender);

        let body = serde_json::to_vec(start).expect("messages serialize");
        let properties = message_properties(&start.message_id)
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.as_str().into());
        let confirm = self
            .channel
            .basic_publish(
                self.names.events.as_str().into(),
                start.user_id.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        confirmed(confirm.await?)?;

        let reply = tokio::time::timeout(self.timeout, receiver).await;
        self.replies.lock().expect("reply map lock").remove(&correlation_id);
        let timed_out = || ProducerError::TimedOut {
            what: "reply",
            stream_id: start.stream_id.clone(),
            seconds: self.timeout.as_secs(),
        };
        let body = reply.map_err(|_| timed_out())?.map_err(|_| timed_out())?;
        parse_reply(body).ok_or_else(timed_out)
    }

    /// Publishes a chat end to end and waits for its settlement.
    pub async fn run_chat(&self, plan: &ChatPlan) -> Result<ChatResult, ProducerError> {
        let start = StreamStarted {
            kind: Default::default(),
            message_id: format!("{}-start", plan.stream_id),
            user_id: plan.user_id.clone(),
            stream_id: plan.stream_id.clone(),
            model: plan.model.clone(),
            messages: match &plan.prompt {
                PromptSpec::Messages(messages) => Some(messages.clone()),
                PromptSpec::Tokens(_) => None,
            },
            prompt: None,
            prompt_tokens: match plan.prompt {
                PromptSpec::Tokens(tokens) => Some(tokens),
                PromptSpec::Messages(_) => None,
            },
            max_output_tokens: plan.max_output_tokens,
            occurred_at: chrono::Utc::now(),
        };
        let reply = self.start(&start).await?;
        if let StartReply::Denied(_) = reply {
            // A chat backend does not call the model without a grant.
            return Ok(ChatResult {
                reply,
                settled: None,
            });
        }

        self.stream(plan).await?;
        let settled = self.settlement(&plan.user_id, &plan.stream_id).await?;
        Ok(ChatResult {
            reply,
            settled: Some(settled),
        })
    }

    /// Publishes the chunks and the end of a granted chat. The publishes
    /// are pipelined, then every confirm is awaited.
    pub async fn stream(&self, plan: &ChatPlan) -> Result<(), ProducerError> {
        let mut confirms = Vec::with_capacity(plan.deltas.len() + 1);
        for (seq, delta) in plan.deltas.iter().enumerate() {
            let chunk = ChunkEmitted {
                kind: Default::default(),
                message_id: format!("{}-chunk-{seq}", plan.stream_id),
                user_id: plan.user_id.clone(),
                stream_id: plan.stream_id.clone(),
                seq: seq as u64,
                delta: delta.clone(),
                tokens: None,
                occurred_at: chrono::Utc::now(),
            };
            confirms.push(self.send(&plan.user_id, &chunk.message_id, &chunk).await?);
        }
        let end = StreamEnded {
            kind: Default::default(),
            message_id: format!("{}-end", plan.stream_id),
            user_id: plan.user_id.clone(),
            stream_id: plan.stream_id.clone(),
            status: plan.status,
            usage: plan.usage,
            occurred_at: chrono::Utc::now(),
        };
        confirms.push(self.send(&plan.user_id, &end.message_id, &end).await?);
        for confirm in confirms {
            confirmed(confirm.await?)?;
        }
        Ok(())
    }

    async fn send<T: Serialize>(
        &self,
        user_id: &str,
        message_id: &str,
        message: &T,
    ) -> Result<lapin::PublisherConfirm, ProducerError> {
        let body = serde_json::to_vec(message).expect("messages serialize");
        Ok(self
            .channel
            .basic_publish(
                self.names.events.as_str().into(),
                user_id.into(),
                BasicPublishOptions::default(),
                &body,
                message_properties(message_id),
            )
            .await?)
    }

    /// Waits for the `reservation.settled` event of a stream.
    pub async fn settlement(
        &self,
        user_id: &str,
        stream_id: &str,
    ) -> Result<ReservationSettled, ProducerError> {
        let key = stream_key(user_id, stream_id);
        let wait = async {
            loop {
                let notified = self.settled_notify.notified();
                if let Some(event) = self.settled.lock().expect("settled map lock").remove(&key) {
                    return event;
                }
                notified.await;
            }
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| ProducerError::TimedOut {
                what: "settlement",
                stream_id: stream_id.to_owned(),
                seconds: self.timeout.as_secs(),
            })
    }
}

/// Subscribes to `queue` with automatic acknowledgement: replies and
/// events are only read here, so a lost one only costs a timeout.
async fn consume_no_ack(channel: &Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    channel
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await
}

fn message_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_message_id(message_id.into())
}

fn confirmed(confirmation: Confirmation) -> Result<(), ProducerError> {
    match confirmation {
        Confirmation::Nack(_) => Err(ProducerError::NotConfirmed),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
    }
}

fn parse_reply(body: Value) -> Option<StartReply> {
    match body.get("type")?.as_str()? {
        "reservation.granted" => serde_json::from_value(body).ok().map(StartReply::Granted),
        "reservation.denied" => serde_json::from_value(body).ok().map(StartReply::Denied),
        _ => None,
    }
}

async fn route_replies(mut consumer: lapin::Consumer, waiters: Waiters) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Some(correlation_id) = delivery.properties.correlation_id().clone() else {
            continue;
        };
        let Ok(body) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        let waiter = waiters
            .lock()
            .expect("reply map lock")
            .remove(correlation_id.as_str());
        if let Some(waiter) = waiter {
            let _ = waiter.send(body);
        }
    }
}

async fn collect_settlements(
    mut consumer: lapin::Consumer,
    settled: Arc<Mutex<HashMap<String, ReservationSettled>>>,
    notify: Arc<Notify>,
) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Ok(event) = serde_json::from_slice::<ReservationSettled>(&delivery.data) else {
            continue;
        };
        let key = stream_key(&event.user_id, &event.stream_id);
        settled.lock().expect("settled map lock").insert(key, event);
        notify.notify_waiters();
    }
}

/// Arguments of `replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Recorded provider streams: OpenAI chat or completion chunks (SSE or
    /// JSON lines), Anthropic, Bedrock, Cohere or Gemini events.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// User to bill; must hold enough credits.
    #[arg(long, default_value = "replay")]
    pub user: String,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Maximum wait for a reply or a settlement, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_seconds: u64,
}

/// One row of `replay` output.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayRow {
    pub file: String,
    pub stream_id: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub counted_completion_tokens: u64,
    pub usage_source: String,
    pub charged: i64,
    /// The denial reason when the stream was not granted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
}

/// Returns the model to bill a recording as: its own name, else a stand-in
/// for formats whose events carry no model name.
pub fn recording_model(recording: &Recording) -> String {
    match (&recording.model, recording.format) {
        (Some(model), _) => model.clone(),
        (None, Format::Cohere) => "command-a".to_owned(),
        (None, Format::Bedrock) => "amazon-nova-lite".to_owned(),
        (None, _) => "gpt-4o".to_owned(),
    }
}

/// Turns a recording into a chat plan. The prompt text is not recorded,
/// so the prompt is sent as the provider's prompt token count.
pub fn recording_plan(recording: &Recording, user_id: &str, stream_id: String) -> ChatPlan {
    let usage = recording.usage.map(|usage| Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_prompt_tokens: (usage.cached_prompt_tokens > 0).then_some(usage.cached_prompt_tokens),
    });
    ChatPlan {
        user_id: user_id.to_owned(),
        stream_id,
        model: recording_model(recording),
        prompt: PromptSpec::Tokens(usage.map_or(0, |usage| usage.prompt_tokens)),
        max_output_tokens: None,
        deltas: recording.deltas.clone(),
        status: EndStatus::Completed,
        usage,
    }
}

/// Runs `replay`: every file as one stream, one after another.
pub async fn replay(settings: Arc<Settings>, args: ReplayArgs) -> Result<(), Failure> {
    let mut recordings = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let recording = replay::parse_recording_file(file)
            .map_err(|error| Failure::usage(anyhow::anyhow!("{}: {error}", file.display())))?;
        recordings.push((file, recording));
    }

    require_worker(&settings).await?;
    let producer = Producer::connect(&settings, Duration::from_secs(args.timeout_seconds)).await?;
    let mut rows = Vec::with_capacity(recordings.len());
    for (file, recording) in recordings {
        let stream_id = format!("replay-{}", Uuid::now_v7());
        let plan = recording_plan(&recording, &args.user, stream_id);
        let result = producer.run_chat(&plan).await?;
        rows.push(replay_row(file, &plan, &result));
    }

    if args.json {
        println!("{}", crate::cli::json_text(&rows, true));
    } else {
        print_replay_table(&rows);
    }
    let denied = rows.iter().filter(|row| row.denied.is_some()).count();
    if denied > 0 {
        return Err(anyhow::anyhow!(
            "{denied} of {} starts were denied and replayed nothing; for insufficient_credits, \
             fund the user with `stream-credits account grant {} AMOUNT`",
            rows.len(),
            args.user
        )
        .into());
    }
    Ok(())
}

/// Fails unless a worker consumes every shard queue of the topology, so
/// that no start is left in a queue that no worker reads, to be granted
/// long after `replay` gave up on it.
async fn require_worker(settings: &Settings) -> Result<(), Failure> {
    let connection = broker::connect(&settings.amqp, "stream-credits replay").await?;
    let channel = connection.create_channel().await?;
    let names = Names::new(&settings.topology.prefix);
    let shards = settings.topology.shards;
    let consumed = topology::consumed_shards(&channel, &names, shards).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "checked".into())).await;
    let prefix = &settings.topology.prefix;
    match consumed {
        Ok(consumed) if consumed == shards => Ok(()),
        Ok(consumed) => Err(anyhow::anyhow!(
            "no worker consumes {} of the {shards} shard queues of topology prefix `{prefix}`; \
             start `stream-credits run` with the same settings and try again",
            shards - consumed
        )
        .into()),
        Err(error) if topology::is_not_found(&error) => Err(anyhow::anyhow!(
            "the shard queues of topology prefix `{prefix}` do not exist on this broker; \
             start `stream-credits run` with the same settings, or check the prefix"
        )
        .into()),
        Err(error) => Err(error.into()),
    }
}

fn replay_row(file: &std::path::Path, plan: &ChatPlan, result: &ChatResult) -> ReplayRow {
    let file = file.display().to_string();
    match (&result.reply, &result.settled) {
        (_, Some(settled)) => ReplayRow {
            file,
            stream_id: plan.stream_id.clone(),
            model: plan.model.clone(),
            prompt_tokens: settled.prompt_tokens,
            completion_tokens: settled.completion_tokens,
            counted_completion_tokens: settled.counted_completion_tokens,
            usage_source: serde_json::to_value(settled.usage_source)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default(),
            charged: settled.charged,
            denied: None,
        },
        (StartReply::Denied(denial), None) => ReplayRow {
            file,
            stream_id: plan.stream_id.clone(),
            model: plan.model.clone(),
            prompt_tokens: 0,
            completion_tokens: 0,
            counted_completion_tokens: 0,
            usage_source: String::new(),
            charged: 0,
            denied: Some(denial.reason.code().to_owned()),
        },
        (StartReply::Granted(_), None) => unreachable!("a granted chat waits for its settlement"),
    }
}

fn print_replay_table(rows: &[ReplayRow]) {
    let mut table = comfy_table::Table::new();
    table.set_header([
        "file",
        "stream_id",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "counted_completion_tokens",
        "usage_source",
        "charged",
    ]);
    for row in rows {
        let file = std::path::Path::new(&row.file)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| row.file.clone());
        let source = match &row.denied {
            Some(reason) => format!("denied: {reason}"),
            None => row.usage_source.clone(),
        };
        table.add_row([
            file,
            row.stream_id.clone(),
            row.model.clone(),
            row.prompt_tokens.to_string(),
            row.completion_tokens.to_string(),
            row.counted_completion_tokens.to_string(),
            source,
            row.charged.to_string(),
        ]);
    }
    println!("{table}");
}
