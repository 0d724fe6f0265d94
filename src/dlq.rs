//! Dead-letter operations: list, show, replay and purge the messages in
//! the dead-letter queue.
//!
//! Messages are read through a consumer and held unacknowledged while the
//! command runs. Those it does not remove go back to the queue, in order,
//! when its channel closes. On RabbitMQ 3.10, letters taken with
//! `basic.get` come back shuffled, and so do those of a consumer cancelled
//! first, so the consumer is dropped only after the channel is closed.
//!
//! A replayed message is published to the events exchange with publisher
//! confirms before it is removed, so a crash in between leaves a copy in
//! both places, never in neither, and the idempotency keys make the extra
//! copy harmless.
//!
//! Every command works on the letters in the order they were
//! dead-lettered, so that a replay applies a user's messages in their
//! original order. Our letters carry that time in their id, a UUID v7.
//! Letters of the broker's delivery limit carry it in their `x-death`
//! record, in whole seconds, and keep the queue's order within a second.

use std::collections::HashSet;
use std::sync::Arc;

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use serde::Serialize;

use crate::broker::{self, HEADER_DEAD_LETTER_ID, HEADER_DETAIL, HEADER_ERROR, HEADER_ROUTING_KEY};
use crate::cli::{Failure, json_text, printable};
use crate::messages::{self, RejectReason};
use crate::settings::Settings;
use crate::topology::{self, Names};

/// Most dead letters one command reads, so a flooded queue cannot
/// exhaust the operator's memory; run the command again for more. It is
/// the largest prefetch AMQP allows, since every letter read stays
/// unacknowledged.
pub const SCAN_MAX: usize = u16::MAX as usize;

/// Maximum wait for the next letter while reading the dead-letter queue.
const LETTER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reasons.
    List(ListArgs),
    /// Print one dead letter: AMQP properties, headers and original body.
    Show(ShowArgs),
    /// Publish dead letters back to the events exchange, then remove them.
    Replay(ReplayArgs),
    /// Remove dead letters for good.
    Purge(PurgeArgs),
}

/// Arguments of `dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Most dead letters to print.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print one JSON array.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Dead-letter id, as `dlq list` prints it.
    pub id: String,
}

/// The dead letters a command acts on.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// These dead-letter ids.
    #[arg(long, num_args = 1..)]
    pub id: Vec<String>,
    /// Dead letters with this reason code, such as `unknown_stream`.
    #[arg(long, value_name = "CODE")]
    pub reason: Option<String>,
}

/// Arguments of `dlq replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `dlq purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Every dead letter.
    #[arg(long, conflicts_with = "id")]
    pub all: bool,
    /// These dead-letter ids.
    #[arg(long, num_args = 1..)]
    pub id: Vec<String>,
    /// Confirm the removal; without it nothing is removed.
    #[arg(long)]
    pub yes: bool,
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    pub id: String,
    pub reason: String,
    pub detail: String,
    pub routing_key: String,
    /// `type` of the original message, when its body was JSON with no
    /// key twice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// `message_id` of the original message's JSON body (with no key
    /// twice), else its AMQP `message_id` property.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub bytes: usize,
}

/// Runs one dead-letter command. The topology is not declared. With a
/// mistyped prefix that would create queues no worker reads. With another
/// shard count it would bind unread shard queues into the hash ring,
/// where they would take some users' messages.
pub async fn execute(settings: Arc<Settings>, command: DlqCommand) -> Result<(), Failure> {
    let connection = broker::connect(&settings.amqp, "stream-credits dlq").await?;
    let channel = broker::confirm_channel(&connection).await?;
    let names = Names::new(&settings.topology.prefix);
    let fetched = fetch_all(&channel, &names).await;
    let (letters, consumer) = match fetched {
        Ok(fetched) => fetched,
        Err(failure) => {
            close(&channel, &connection).await;
            return Err(failure);
        }
    };

    let result = match command {
        DlqCommand::List(args) => list(&letters, &args),
        DlqCommand::Show(args) => show(&letters, &args.id),
        DlqCommand::Replay(args) => replay(&channel, &names, &letters, &args).await,
        DlqCommand::Purge(args) => purge(&letters, &args).await,
    };
    close(&channel, &connection).await;
    drop(consumer);
    result
}

/// Reads every dead letter without removing any, for the report. As for
/// the commands, the topology is not declared, so a missing queue is an
/// error.
pub async fn peek(settings: &Settings) -> Result<Vec<DeadLetterView>, Failure> {
    let connection = broker::connect(&settings.amqp, "stream-credits report").await?;
    let channel = connection.create_channel().await?;
    let names = Names::new(&settings.topology.prefix);
    let fetched = fetch_all(&channel, &names).await;
    close(&channel, &connection).await;
    let (letters, consumer) = fetched?;
    drop(consumer);
    Ok(letters.iter().map(view).collect())
}

/// Closes the channel, which returns every letter not acknowledged, and
/// then the connection. lapin 4.12 can wait forever on a close once its
/// I/O loop has stopped, so each close is bounded.
async fn close(channel: &Channel, connection: &lapin::Connection) {
    let bound = std::time::Duration::from_secs(5);
    let _ = tokio::time::timeout(bound, channel.close(200, "done".into())).await;
    let _ = tokio::time::timeout(bound, connection.close(200, "done".into())).await;
}

/// Reads up to [`SCAN_MAX`] of the letters in the queue unacknowledged and
/// sorts them by the time they were dead-lettered. Returns them with their
/// consumer, which the caller drops only after closing the channel.
async fn fetch_all(channel: &Channel, names: &Names) -> Result<(Vec<Delivery>, Consumer), Failure> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = channel
        .queue_declare(names.dead.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(|error| missing_queue(error, names))?;
    let expected = (queue.message_count() as usize).min(SCAN_MAX);
    channel
        .basic_qos(SCAN_MAX as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            names.dead.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut letters = Vec::with_capacity(expected);
    while letters.len() < expected {
        match tokio::time::timeout(LETTER_WAIT, consumer.next()).await {
            Ok(Some(delivery)) => letters.push(delivery?),
            _ => break,
        }
    }
    // The sort is stable, so broker letters from the same second keep the
    // queue's order.
    letters.sort_by_cached_key(|letter| {
        let headers = letter.properties.headers().as_ref();
        let ours = broker::header_text(headers, HEADER_DEAD_LETTER_ID).unwrap_or_default();
        (dead_lettered_at(letter), ours)
    });
    Ok((letters, consumer))
}

/// Names the likely cause when the dead-letter queue does not exist: no
/// worker with this prefix has declared its topology on this broker.
fn missing_queue(error: lapin::Error, names: &Names) -> Failure {
    if !topology::is_not_found(&error) {
        return error.into();
    }
    anyhow::anyhow!(
        "queue `{}` does not exist on this broker: `stream-credits run` declares it, \
         so start a worker with the same topology.prefix once, or check the prefix",
        names.dead
    )
    .into()
}

/// Returns when a letter was dead-lettered, in milliseconds since the Unix
/// epoch: from the timestamp of our id, else from the broker's `x-death`
/// record. Zero when neither has one, as for a letter with a random (v4)
/// id.
fn dead_lettered_at(letter: &Delivery) -> u64 {
    let headers = letter.properties.headers().as_ref();
    if let Some(id) = broker::header_text(headers, HEADER_DEAD_LETTER_ID) {
        let timestamp = uuid::Uuid::parse_str(&id).ok().and_then(|id| id.get_timestamp());
        return timestamp.map_or(0, |timestamp| {
            let (seconds, nanos) = timestamp.to_unix();
            seconds * 1_000 + u64::from(nanos) / 1_000_000
        });
    }
    match first_death(letter).and_then(|death| death.inner().get("time")) {
        Some(AMQPValue::Timestamp(seconds)) => seconds * 1_000,
        _ => 0,
    }
}

/// Returns the id that `dlq show`, `replay` and `purge` take: our header,
/// else a hash for a letter the broker dead-lettered.
fn letter_id(letter: &Delivery) -> String {
    let headers = letter.properties.headers().as_ref();
    broker::header_text(headers, HEADER_DEAD_LETTER_ID).unwrap_or_else(|| broker_letter_id(letter))
}

fn view(letter: &Delivery) -> DeadLetterView {
    let headers = letter.properties.headers().as_ref();
    let ours = broker::header_text(headers, HEADER_ERROR);
    let body = messages::unique_keys_json(&letter.data);
    let text = |key: &str| {
        body.as_ref()
            .and_then(|body| body.get(key))
            .and_then(|value| value.as_str())
            .map(str::to_owned)
    };
    DeadLetterView {
        id: letter_id(letter),
        reason: ours
            .clone()
            .unwrap_or_else(|| RejectReason::RetriesExhausted.code().to_owned()),
        detail: broker::header_text(headers, HEADER_DETAIL)
            .unwrap_or_else(|| "dead-lettered by the broker after its delivery limit".to_owned()),
        routing_key: original_routing_key(letter),
        message_type: text("type"),
        message_id: text("message_id").or_else(|| {
            letter.properties.message_id().as_ref().map(|id| id.as_str().to_owned())
        }),
        bytes: letter.data.len(),
    }
}

/// Id of a letter the broker dead-lettered, which has no header of ours:
/// a hash of its body, first death time (in whole seconds), routing key
/// and reply properties, stable across listings. Copies of one message
/// dead-lettered in the same second share it, and a command given the id
/// acts on all of them.
fn broker_letter_id(letter: &Delivery) -> String {
    // FNV-1a, 64 bits: stable across Rust versions, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let death_time = first_death(letter)
        .and_then(|death| death.inner().get("time").map(|time| format!("{time:?}")))
        .unwrap_or_default();
    let property = |value: &Option<lapin::types::ShortString>| {
        value.as_ref().map(|value| value.as_str().to_owned()).unwrap_or_default()
    };
    let properties = &letter.properties;
    let fields = [
        death_time,
        original_routing_key(letter),
        property(properties.reply_to()),
        property(properties.correlation_id()),
        property(properties.message_id()),
    ];
    // A zero byte after each field keeps ("ab", "c") apart from ("a", "bc").
    let separated = fields.iter().flat_map(|field| field.as_bytes().iter().chain(&[0]));
    for byte in letter.data.iter().chain(separated) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("broker-{hash:016x}")
}

fn first_death(letter: &Delivery) -> Option<&FieldTable> {
    let headers = letter.properties.headers().as_ref()?;
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

/// Returns the routing key the message was first published with: from our
/// header, else from the broker's `x-death` record.
fn original_routing_key(letter: &Delivery) -> String {
    let headers = letter.properties.headers().as_ref();
    if let Some(key) = broker::header_text(headers, HEADER_ROUTING_KEY) {
        return key;
    }
    let from_death =
        first_death(letter).and_then(|death| match death.inner().get("routing-keys")? {
            AMQPValue::FieldArray(keys) => match keys.as_slice().first()? {
                AMQPValue::LongString(key) => {
                    Some(String::from_utf8_lossy(key.as_bytes()).into_owned())
                }
                _ => None,
            },
            _ => None,
        });
    from_death.unwrap_or_else(|| letter.routing_key.as_str().to_owned())
}

fn list(letters: &[Delivery], args: &ListArgs) -> Result<(), Failure> {
    let views: Vec<DeadLetterView> = letters.iter().take(args.limit).map(view).collect();
    if args.json {
        println!(
            "{}",
            json_text(&views, true)
        );
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.set_header([
        "id",
        "reason",
        "routing key",
        "type",
        "message_id",
        "detail",
    ]);
    for item in &views {
        table.add_row([
            printable(&item.id),
            printable(&item.reason),
            printable(&item.routing_key),
            printable(item.message_type.as_deref().unwrap_or_default()),
            printable(item.message_id.as_deref().unwrap_or_default()),
            printable(&item.detail),
        ]);
    }
    println!("{table}");
    eprintln!("{} of {} shown", views.len(), count_letters(letters.len()));
    Ok(())
}

/// Prints the summary `dlq list` prints, then the letter as it is stored:
/// the AMQP properties it carries, every header and the body. Nothing is
/// added to the properties or headers.
fn show(letters: &[Delivery], id: &str) -> Result<(), Failure> {
    let letter = letters
        .iter()
        .find(|letter| letter_id(letter) == id)
        .ok_or_else(|| not_found(&[id.to_owned()]))?;
    let properties = &letter.properties;
    // A body with a repeated key is shown as text: as JSON it would keep
    // only the last value of that key.
    let body = messages::unique_keys_json(&letter.data).unwrap_or_else(|| {
        serde_json::Value::String(String::from_utf8_lossy(&letter.data).into_owned())
    });
    let headers = properties
        .headers()
        .as_ref()
        .map_or_else(Default::default, table_json);
    let output = serde_json::json!({
        "dead_letter": view(letter),
        "properties": properties_json(properties),
        "headers": headers,
        "body": body,
    });
    println!(
        "{}",
        json_text(&output, true)
    );
    Ok(())
}

/// Converts the AMQP properties other than the headers to a JSON object,
/// leaving out the ones the letter does not carry. `type` is the AMQP
/// name of what lapin calls `kind`.
fn properties_json(properties: &BasicProperties) -> serde_json::Value {
    let mut fields = serde_json::Map::new();
    let texts = [
        ("content_type", properties.content_type()),
        ("content_encoding", properties.content_encoding()),
        ("correlation_id", properties.correlation_id()),
        ("reply_to", properties.reply_to()),
        ("expiration", properties.expiration()),
        ("message_id", properties.message_id()),
        ("type", properties.kind()),
        ("user_id", properties.user_id()),
        ("app_id", properties.app_id()),
        ("cluster_id", properties.cluster_id()),
    ];
    for (name, value) in texts {
        if let Some(value) = value {
            fields.insert(name.to_owned(), value.as_str().into());
        }
    }
    if let Some(mode) = properties.delivery_mode() {
        fields.insert("delivery_mode".to_owned(), (*mode).into());
    }
    if let Some(priority) = properties.priority() {
        fields.insert("priority".to_owned(), (*priority).into());
    }
    if let Some(seconds) = properties.timestamp() {
        fields.insert("timestamp".to_owned(), (*seconds).into());
    }
    serde_json::Value::Object(fields)
}

fn table_json(table: &FieldTable) -> serde_json::Value {
    let fields = table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), field_json(value)));
    serde_json::Value::Object(fields.collect())
}

/// Converts one AMQP field value to JSON. Strings with invalid UTF-8 have
/// those bytes replaced, timestamps stay seconds since the Unix epoch, a
/// byte array becomes an array of numbers and a decimal becomes its scale
/// and unscaled value.
fn field_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(flag) => Value::from(*flag),
        AMQPValue::ShortShortInt(number) => Value::from(*number),
        AMQPValue::ShortShortUInt(number) => Value::from(*number),
        AMQPValue::ShortInt(number) => Value::from(*number),
        AMQPValue::ShortUInt(number) => Value::from(*number),
        AMQPValue::LongInt(number) => Value::from(*number),
        AMQPValue::LongUInt(number) => Value::from(*number),
        AMQPValue::LongLongInt(number) => Value::from(*number),
        AMQPValue::Timestamp(seconds) => Value::from(*seconds),
        AMQPValue::Float(number) => Value::from(*number),
        AMQPValue::Double(number) => Value::from(*number),
        AMQPValue::DecimalValue(decimal) => {
            serde_json::json!({ "scale": decimal.scale, "value": decimal.value })
        }
        AMQPValue::ShortString(text) => Value::from(text.as_str()),
        AMQPValue::LongString(text) => Value::from(String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::ByteArray(bytes) => Value::from(bytes.as_slice()),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(field_json).collect())
        }
        AMQPValue::FieldTable(table) => table_json(table),
        AMQPValue::Void => Value::Null,
    }
}

/// Fails naming the ids in `ids` that no letter has, once each, in the
/// order given. Replay and purge call it after acting on the ids found.
fn require_found(letters: &[Delivery], ids: &[String]) -> Result<(), Failure> {
    let found: HashSet<String> = letters.iter().map(letter_id).collect();
    let mut reported = HashSet::new();
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.contains(*id) && reported.insert(*id))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(not_found(&missing))
}

/// Builds the error for dead-letter ids that match no letter, which
/// exits 1.
fn not_found(ids: &[String]) -> Failure {
    let quoted: Vec<String> = ids.iter().map(|id| format!("`{}`", printable(id))).collect();
    let noun = if ids.len() == 1 {
        "dead letter"
    } else {
        "dead letters"
    };
    let error = anyhow::anyhow!(
        "{noun} {} not found; `dlq list` shows the ids",
        quoted.join(", ")
    );
    Failure::from(error)
}

/// Returns `1 dead letter` or `N dead letters`.
fn count_letters(count: usize) -> String {
    if count == 1 {
        "1 dead letter".to_owned()
    } else {
        format!("{count} dead letters")
    }
}

fn selected<'a>(
    letters: &'a [Delivery],
    all: bool,
    ids: &[String],
    reason: Option<&str>,
) -> Vec<&'a Delivery> {
    letters
        .iter()
        .filter(|letter| {
            all || ids.contains(&letter_id(letter))
                || reason.is_some_and(|reason| view(letter).reason == reason)
        })
        .collect()
}

async fn replay(
    channel: &Channel,
    names: &Names,
    letters: &[Delivery],
    args: &ReplayArgs,
) -> Result<(), Failure> {
    let selection = &args.selection;
    if let Some(reason) = &selection.reason
        && RejectReason::from_code(reason).is_none()
    {
        let codes: Vec<&str> = RejectReason::ALL.iter().map(|reason| reason.code()).collect();
        return Err(Failure::usage(anyhow::anyhow!(
            "unknown reason code `{}`; expected one of {}",
            printable(reason),
            codes.join(", ")
        )));
    }
    let chosen = selected(
        letters,
        selection.all,
        &selection.id,
        selection.reason.as_deref(),
    );
    for letter in &chosen {
        let item = view(letter);
        if args.dry_run {
            println!(
                "would replay {} ({}) to routing key {}",
                printable(&item.id),
                printable(&item.reason),
                printable(&item.routing_key)
            );
            continue;
        }
        let properties = without_our_headers(&letter.properties);
        broker::publish_confirmed(
            channel,
            &names.events,
            &item.routing_key,
            &letter.data,
            properties,
        )
        .await?;
        letter
            .acker
            .ack(BasicAckOptions::default())
            .await?;
        println!(
            "replayed {} ({}) to routing key {}",
            printable(&item.id),
            printable(&item.reason),
            printable(&item.routing_key)
        );
    }
    eprintln!(
        "{} {}",
        count_letters(chosen.len()),
        if args.dry_run {
            "would be replayed; nothing changed"
        } else {
            "replayed"
        }
    );
    require_found(letters, &selection.id)
}

/// Returns the original properties without the headers that this program
/// or the broker's dead-lettering added.
fn without_our_headers(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        let key = key.as_str();
        if key.starts_with("x-stream-credits-")
            || key.starts_with("x-death")
            || key.starts_with("x-first-death")
            || key.starts_with("x-last-death")
        {
            continue;
        }
        kept.insert(key.into(), value.clone());
    }
    properties.clone().with_headers(kept)
}

async fn purge(letters: &[Delivery], args: &PurgeArgs) -> Result<(), Failure> {
    if !args.all && args.id.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "name what to purge: --all or --id ID"
        )));
    }
    let chosen = selected(letters, args.all, &args.id, None);
    if !args.yes {
        return Err(Failure::usage(anyhow::anyhow!(
            "purge removes {} for good; add --yes to confirm",
            count_letters(chosen.len())
        )));
    }
    for letter in &chosen {
        letter
            .acker
            .ack(BasicAckOptions::default())
            .await?;
    }
    eprintln!("purged {}", count_letters(chosen.len()));
    require_found(letters, &args.id)
}
