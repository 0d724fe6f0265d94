//! `stream-credits bench`: measures the worker against the broker and
//! PostgreSQL it runs on, on its own database and topology prefix.
//!
//! Every figure comes from one run on the local services; nothing here is
//! a pass or fail check. The last line printed is one JSON object with
//! the headline figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::Failure;
use crate::messages::{ChatMessage, ChunkEmitted, CreditsGranted, EndStatus, StreamEnded, StreamStarted};
use crate::settings::Settings;
use crate::topology::{self, Names};
use crate::{broker, db, replay, tokens};

/// Publishes between two waits for confirms. Large enough to keep the
/// broker busy, small enough to bound the messages in flight.
const CONFIRM_WINDOW: usize = 2_000;

/// Rounds of a ceiling run and a worker run whose ratios give the
/// median, after one round that warms up the queues.
const THROUGHPUT_ROUNDS: usize = 9;

/// Credits of each benchmark user: far more than any hold it places.
const USER_CREDITS: i64 = 1_000_000_000;

/// Model every benchmark stream is billed as.
const MODEL: &str = "gpt-4o-mini";

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Folder with the OpenAssistant conversations.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Streams in the throughput mix.
    #[arg(long, default_value_t = 400)]
    pub streams: usize,
    /// Users the streams are spread over.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Starts per second in the grant round-trip measurement.
    #[arg(long, default_value_t = 500)]
    pub grant_rate: u32,
    /// Duration of the grant round-trip measurement, in seconds.
    #[arg(long, default_value_t = 4)]
    pub grant_seconds: u32,
    /// Open streams in the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub open_streams: usize,
    /// Starts in the reservation-rate measurement.
    #[arg(long, default_value_t = 20_000)]
    pub reservations: usize,
    /// Where to draw throughput against concurrent streams (SVG).
    #[arg(long, default_value = "docs/throughput.svg")]
    pub plot: PathBuf,
    /// Keep the benchmark database and queues for inspection.
    #[arg(long)]
    pub keep: bool,
}

/// The figures of one run, printed last as one JSON line.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub broker_messages_per_second: f64,
    pub worker_messages_per_second: f64,
    pub chunk_throughput_ratio: f64,
    /// Ratios of the rounds in the order they ran, so that a trend over
    /// the run shows. The headline ratio is their median.
    pub throughput_ratios: Vec<f64>,
    pub grant_rtt_p50_ms: f64,
    pub grant_rtt_p99_ms: f64,
    /// The echo of starts on their own route: the events exchange, the
    /// hash exchange and a durable quorum shard queue.
    pub echo_rtt_p50_ms: f64,
    pub echo_rtt_p99_ms: f64,
    /// The echo through a transient queue, the broker's shortest route.
    pub echo_transient_rtt_p50_ms: f64,
    pub echo_transient_rtt_p99_ms: f64,
    /// Median latency of `SELECT 1`, the round trip alone, run by pgbench
    /// with one client at the grant measurement's rate.
    pub paced_select_p50_ms: f64,
    /// Median latency of a one-row update with its commit, run the same way.
    pub paced_commit_p50_ms: f64,
    pub db_transactions_per_chunk: f64,
    pub reservations_per_second: f64,
    pub pgbench_tps: f64,
    pub bytes_per_open_stream: f64,
    pub token_count_ns_per_chunk: f64,
}

/// One message of the mix, ready to publish.
#[derive(Clone)]
struct Outbound {
    routing_key: String,
    body: Vec<u8>,
}

/// Runs every measurement and prints the table and the JSON line.
pub async fn run(settings: Arc<Settings>, args: BenchArgs) -> Result<(), Failure> {
    let run_id = Uuid::now_v7().simple().to_string()[..10].to_owned();
    let mut settings = (*settings).clone();
    settings.database.url = database_url(&settings, &format!("stream_credits_bench_{run_id}"))?;
    settings.http.listen = String::new();
    settings.reservations.max_active_per_user = u32::MAX / 2;
    let settings = Arc::new(settings);

    let conversations = replay::load_conversations(&args.data.join("oasst-en100/en_100_tree.jsonl"))
        .context("cannot read the OpenAssistant conversations; run from the repository root or pass --data")?;
    let bpe = tokens::encoder("o200k_base").expect("o200k_base is built in");
    let answers: Vec<Vec<String>> = conversations
        .iter()
        .map(|conversation| replay::token_sized_deltas(&conversation.answer, bpe))
        .collect();

    let progress = ProgressBar::new(6).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("static template"),
    );
    let mut figures = Figures::default();
    let pool = db::migrate(&settings.database).await?;
    let connection = broker::connect(&settings.amqp, "stream-credits bench").await?;

    progress.set_message("token counting");
    figures.token_count_ns_per_chunk = token_count_ns(&answers);
    progress.inc(1);

    progress.set_message("broker ceiling and worker throughput");
    let worker_settings = with_prefix(&settings, &format!("bench-{run_id}-worker"));
    let names = Names::new(&worker_settings.topology.prefix);
    let channel = broker::confirm_channel(&connection).await?;
    topology::declare(&channel, &worker_settings.topology)
        .await
        .map_err(Failure::from)?;
    let mut worker = ChildWorker::start(&worker_settings, "run").await?;
    worker.wait_until_consuming(&connection, &names, worker_settings.topology.shards).await?;
    fund(&channel, &names, &run_id, args.users).await?;
    let ceiling_prefix = format!("bench-{run_id}-ceiling");
    let ceiling_mix = stream_mix(&run_id, &answers, &args, "m");
    // The broker's rate moves by a tenth or more within a minute on a
    // shared machine. So each worker run is compared with the ceiling run
    // next to it, and the ratio is the median of the rounds' ratios. The
    // order within a round alternates, so a machine that speeds up or
    // slows down over the rounds favours neither side. Round 0 only warms
    // up, because new queues are slower than queues that have carried
    // traffic.
    let mut pairs = Vec::with_capacity(THROUGHPUT_ROUNDS);
    let (mut commits_in_runs, mut chunks_in_runs) = (0, 0);
    for round in 0..=THROUGHPUT_ROUNDS {
        let worker_mix = stream_mix(&run_id, &answers, &args, &format!("w{round}"));
        let ceiling_first = round % 2 == 0;
        let mut ceiling = 0.0;
        if ceiling_first {
            ceiling = broker_ceiling(&connection, &settings, &ceiling_prefix, &ceiling_mix).await?;
        }
        let commits_before = commits(&pool).await?;
        let (worker_rate, _) = worker_throughput(&channel, &names, &pool, &worker_mix, args.streams).await?;
        commits_in_runs += commits(&pool).await? - commits_before;
        if !ceiling_first {
            ceiling = broker_ceiling(&connection, &settings, &ceiling_prefix, &ceiling_mix).await?;
        }
        chunks_in_runs += worker_mix.iter().filter(|message| message.body.starts_with(b"{\"type\":\"chunk")).count();
        if round > 0 {
            pairs.push((ceiling, worker_rate));
        }
    }
    figures.throughput_ratios = pairs.iter().map(|&(ceiling, worker)| ratio(ceiling, worker)).collect();
    let (ceiling, worker_rate) = median_round(&mut pairs);
    figures.broker_messages_per_second = ceiling;
    figures.worker_messages_per_second = worker_rate;
    figures.chunk_throughput_ratio = ratio(ceiling, worker_rate);
    figures.db_transactions_per_chunk = commits_in_runs as f64 / chunks_in_runs.max(1) as f64;
    progress.inc(1);

    progress.set_message("throughput against concurrent streams");
    let mut curve = Vec::new();
    for (round, concurrent) in [1usize, 10, 50, 200].into_iter().enumerate() {
        let streams = args.streams.min(400).max(concurrent);
        let round_args = BenchArgs { streams, ..args.clone_for_curve(concurrent) };
        let mix = stream_mix(&run_id, &answers, &round_args, &format!("c{round}"));
        let (rate, _) = worker_throughput(&channel, &names, &pool, &mix, streams).await?;
        curve.push((concurrent, rate));
    }
    draw_plot(&args.plot, &curve).context("cannot draw the throughput plot")?;
    progress.inc(1);

    progress.set_message("grant round trip");
    settle_database(&pool).await?;
    (figures.grant_rtt_p50_ms, figures.grant_rtt_p99_ms) = grant_rtt(&connection, &names, &run_id, &args).await?;
    let ceiling = with_prefix(&settings, &ceiling_prefix);
    (figures.echo_rtt_p50_ms, figures.echo_rtt_p99_ms) = echo_rtt(&connection, &ceiling, &run_id, &args).await?;
    (figures.echo_transient_rtt_p50_ms, figures.echo_transient_rtt_p99_ms) = transient_echo_rtt(&connection, &args).await?;
    (figures.paced_select_p50_ms, figures.paced_commit_p50_ms) = paced_statements(&settings, &pool, &args).await?;
    progress.inc(1);

    progress.set_message("reservations and pgbench");
    settle_database(&pool).await?;
    figures.reservations_per_second = reservation_rate(&channel, &names, &pool, &run_id, &args).await?;
    settle_database(&pool).await?;
    figures.pgbench_tps = pgbench(&settings, &pool).await?;
    progress.inc(1);

    progress.set_message("memory per open stream");
    figures.bytes_per_open_stream = memory_per_open_stream(&worker, &channel, &names, &pool, &run_id, &args).await?;
    progress.inc(1);
    progress.finish_and_clear();

    worker.stop().await;
    if !args.keep {
        cleanup(&connection, &settings, &[&ceiling_prefix, &worker_settings.topology.prefix]).await;
        drop(pool);
        drop_database(&settings).await;
    }
    print_figures(&figures, &curve, &args);
    Ok(())
}

fn ratio(ceiling: f64, worker: f64) -> f64 {
    worker / ceiling.max(1.0)
}

/// Sorts `rounds` of (ceiling, worker) rates by their ratio and returns
/// the round in the middle.
fn median_round(rounds: &mut [(f64, f64)]) -> (f64, f64) {
    rounds.sort_by(|a, b| ratio(a.0, a.1).total_cmp(&ratio(b.0, b.1)));
    rounds[rounds.len() / 2]
}

impl BenchArgs {
    fn clone_for_curve(&self, concurrent: usize) -> Self {
        Self {
            data: self.data.clone(),
            streams: self.streams,
            users: concurrent.max(1),
            grant_rate: self.grant_rate,
            grant_seconds: self.grant_seconds,
            open_streams: self.open_streams,
            reservations: self.reservations,
            plot: self.plot.clone(),
            keep: self.keep,
        }
    }
}

pub(crate) fn database_url(settings: &Settings, name: &str) -> Result<crate::settings::SecretUrl, Failure> {
    let mut url = url::Url::parse(settings.database.url.expose()).map_err(Failure::usage)?;
    url.set_path(name);
    Ok(crate::settings::SecretUrl::new(url.to_string()))
}

fn with_prefix(settings: &Settings, prefix: &str) -> Arc<Settings> {
    let mut settings = settings.clone();
    settings.topology.prefix = prefix.to_owned();
    Arc::new(settings)
}

fn user_id(run_id: &str, index: usize) -> String {
    format!("bench-{run_id}-u{index}")
}

/// Builds the message mix: every stream's start, deltas and end, with
/// `args.users` streams interleaved at a time as concurrent chats are.
fn stream_mix(run_id: &str, answers: &[Vec<String>], args: &BenchArgs, tag: &str) -> Vec<Outbound> {
    let now = chrono::Utc::now();
    let mut per_stream: Vec<Vec<Outbound>> = Vec::with_capacity(args.streams);
    for index in 0..args.streams {
        let user = user_id(run_id, index % args.users.max(1));
        let stream_id = format!("bench-{run_id}-{tag}-s{index}");
        let deltas = &answers[index % answers.len()];
        let mut messages = Vec::with_capacity(deltas.len() + 2);
        let start = StreamStarted {
            kind: Default::default(),
            message_id: format!("{stream_id}-start"),
            user_id: user.clone(),
            stream_id: stream_id.clone(),
            model: MODEL.to_owned(),
            messages: Some(vec![ChatMessage {
                role: "user".to_owned(),
                content: "Benchmark prompt".to_owned(),
                name: None,
            }]),
            prompt: None,
            prompt_tokens: None,
            max_output_tokens: Some(2048),
            occurred_at: now,
        };
        messages.push(outbound(&user, &start));
        for (seq, delta) in deltas.iter().enumerate() {
            let chunk = ChunkEmitted {
                kind: Default::default(),
                message_id: format!("{stream_id}-c{seq}"),
                user_id: user.clone(),
                stream_id: stream_id.clone(),
                seq: seq as u64,
                delta: delta.clone(),
                tokens: None,
                occurred_at: now,
            };
            messages.push(outbound(&user, &chunk));
        }
        let end = StreamEnded {
            kind: Default::default(),
            message_id: format!("{stream_id}-end"),
            user_id: user.clone(),
            stream_id,
            status: EndStatus::Completed,
            usage: None,
            occurred_at: now,
        };
        messages.push(outbound(&user, &end));
        per_stream.push(messages);
    }
    interleave(per_stream, args.users.max(1))
}

/// Interleaves streams `width` at a time: message k of each stream in a
/// group, then message k + 1, so `width` chats are open at once.
fn interleave(per_stream: Vec<Vec<Outbound>>, width: usize) -> Vec<Outbound> {
    let mut mix = Vec::new();
    for group in per_stream.chunks(width) {
        let longest = group.iter().map(Vec::len).max().unwrap_or(0);
        for position in 0..longest {
            for stream in group {
                if let Some(message) = stream.get(position) {
                    mix.push(message.clone());
                }
            }
        }
    }
    mix
}

fn outbound<T: Serialize>(user: &str, message: &T) -> Outbound {
    Outbound {
        routing_key: user.to_owned(),
        body: serde_json::to_vec(message).expect("messages serialize"),
    }
}

fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// Publishes `messages` to `exchange`, waiting for confirms every window.
async fn publish_all(channel: &Channel, exchange: &str, messages: &[Outbound]) -> Result<(), Failure> {
    for window in messages.chunks(CONFIRM_WINDOW) {
        let mut confirms = Vec::with_capacity(window.len());
        for message in window {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    properties(),
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            confirm.await?;
        }
    }
    Ok(())
}

fn token_count_ns(answers: &[Vec<String>]) -> f64 {
    let bpe = tokens::encoder("o200k_base").expect("o200k_base is built in");
    let chunks: Vec<&str> = answers.iter().flatten().map(String::as_str).collect();
    let started = Instant::now();
    let mut total = 0u64;
    for chunk in &chunks {
        total += tokens::count_text(bpe, chunk);
    }
    let elapsed = started.elapsed();
    std::hint::black_box(total);
    elapsed.as_nanos() as f64 / chunks.len().max(1) as f64
}

/// Messages per second through the shard queues to consumers that only
/// acknowledge, with the worker's prefetch and a `multiple` ack per batch.
async fn broker_ceiling(
    connection: &Connection,
    settings: &Settings,
    prefix: &str,
    mix: &[Outbound],
) -> Result<f64, Failure> {
    let ceiling = with_prefix(settings, prefix);
    let channel = broker::confirm_channel(connection).await?;
    let names = topology::declare(&channel, &ceiling.topology).await.map_err(Failure::from)?;

    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    for index in 0..ceiling.topology.shards {
        let channel = connection.create_channel().await?;
        channel.basic_qos(ceiling.amqp.prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(names.shard(index).as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let received = received.clone();
        let stop = stop.clone();
        let batch_max = ceiling.worker.batch_messages_max;
        consumers.push(tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break,
                    next = consumer.next() => next,
                };
                let Some(Ok(mut last)) = next else { break };
                let mut count = 1;
                while count < batch_max {
                    match futures_util::FutureExt::now_or_never(consumer.next()) {
                        Some(Some(Ok(delivery))) => {
                            last = delivery;
                            count += 1;
                        }
                        _ => break,
                    }
                }
                let _ = last.acker.ack(BasicAckOptions { multiple: true }).await;
                received.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }

    let started = Instant::now();
    publish_all(&channel, &names.events, mix).await?;
    let deadline = started + Duration::from_secs(600);
    while received.load(std::sync::atomic::Ordering::Relaxed) < mix.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    for consumer in consumers {
        let _ = consumer.await;
    }
    Ok(mix.len() as f64 / elapsed.as_secs_f64())
}

async fn fund(channel: &Channel, names: &Names, run_id: &str, users: usize) -> Result<(), Failure> {
    let grants: Vec<Outbound> = (0..users.max(200))
        .map(|index| {
            let user = user_id(run_id, index);
            let grant = CreditsGranted {
                kind: Default::default(),
                message_id: format!("{user}-grant"),
                user_id: user.clone(),
                amount: USER_CREDITS,
                reason: Some("bench".to_owned()),
                occurred_at: chrono::Utc::now(),
            };
            outbound(&user, &grant)
        })
        .collect();
    publish_all(channel, &names.events, &grants).await
}

/// Publishes the mix to the worker and waits until every stream of it is
/// settled. Returns messages per second and the elapsed time.
async fn worker_throughput(
    channel: &Channel,
    names: &Names,
    pool: &PgPool,
    mix: &[Outbound],
    streams: usize,
) -> Result<(f64, Duration), Failure> {
    let settled_before = settled_holds(pool).await?;
    let started = Instant::now();
    publish_all(channel, &names.events, mix).await?;
    wait_until(pool, "SELECT count(*) FROM holds WHERE settled_at IS NOT NULL", settled_before + streams as i64).await?;
    let elapsed = started.elapsed();
    Ok((mix.len() as f64 / elapsed.as_secs_f64(), elapsed))
}

async fn settled_holds(pool: &PgPool) -> Result<i64, Failure> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM holds WHERE settled_at IS NOT NULL")
        .fetch_one(pool)
        .await?)
}

async fn wait_until(pool: &PgPool, count_query: &'static str, target: i64) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let count: i64 = sqlx::query_scalar(count_query).fetch_one(pool).await?;
        if count >= target {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!("timed out waiting for the worker: {count} of {target}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Vacuums and analyzes the benchmark database and writes a checkpoint,
/// so that catching up on the previous phase's writes does not fall into
/// the next phase's figures. pgbench vacuums before it runs for the same
/// reason. Without the privilege to checkpoint, the vacuum alone is done.
async fn settle_database(pool: &PgPool) -> Result<(), Failure> {
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await?;
    if let Err(error) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::debug!(%error, "no checkpoint before the next phase");
    }
    Ok(())
}

async fn commits(pool: &PgPool) -> Result<i64, Failure> {
    Ok(sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await?)
}

/// Round trip of a start to its grant at a fixed rate of starts.
async fn grant_rtt(connection: &Connection, names: &Names, run_id: &str, args: &BenchArgs) -> Result<(f64, f64), Failure> {
    let count = (args.grant_rate * args.grant_seconds) as usize;
    let bodies = start_messages(run_id, "rtt", count);
    timed_requests(connection, &names.events, &bodies, args.grant_rate).await
}

/// Replies at once to every message on the shard queues of the topology
/// of `settings`, to its `reply_to`, and never touches the database. It
/// takes messages with the worker's prefetch and acknowledges each after
/// its reply, as the worker does. The benchmark runs it in a process of
/// its own, as it runs the worker, so that the two round trips differ
/// only by the worker's work. Returns when the broker connection ends.
pub async fn serve_echo(settings: Arc<Settings>) -> Result<(), Failure> {
    // It acknowledges whatever it takes, so on a topology that carries
    // real traffic it would lose messages.
    let prefix = &settings.topology.prefix;
    if !prefix.starts_with("bench-") {
        return Err(Failure::usage(anyhow::anyhow!(
            "echo-responder only serves a benchmark's topology, whose prefix starts with `bench-`, not `{prefix}`"
        )));
    }
    let connection = broker::connect(&settings.amqp, "stream-credits echo").await?;
    let channel = connection.create_channel().await?;
    let names = topology::declare(&channel, &settings.topology).await.map_err(Failure::from)?;
    let mut responders = tokio::task::JoinSet::new();
    for index in 0..settings.topology.shards {
        let channel = connection.create_channel().await?;
        channel.basic_qos(settings.amqp.prefetch, BasicQosOptions::default()).await?;
        let requests = channel
            .basic_consume(names.shard(index).as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        responders.spawn(send_replies(channel, requests, true));
    }
    responders.join_all().await;
    Ok(())
}

/// Sends each request's body back to its `reply_to` with its correlation
/// id, and acknowledges the request after its reply when `acked`.
async fn send_replies(channel: Channel, mut requests: lapin::Consumer, acked: bool) {
    while let Some(Ok(delivery)) = requests.next().await {
        if let Some(reply_to) = delivery.properties.reply_to().clone() {
            let mut properties = BasicProperties::default();
            if let Some(correlation_id) = delivery.properties.correlation_id().clone() {
                properties = properties.with_correlation_id(correlation_id);
            }
            let _ = channel
                .basic_publish("".into(), reply_to, BasicPublishOptions::default(), &delivery.data, properties)
                .await;
        }
        if acked {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    }
}

/// Round trip of starts on their own route, through the topology of
/// `settings`, to `serve_echo` in a process of its own.
async fn echo_rtt(connection: &Connection, settings: &Settings, run_id: &str, args: &BenchArgs) -> Result<(f64, f64), Failure> {
    let names = Names::new(&settings.topology.prefix);
    let mut echo = ChildWorker::start(settings, "echo-responder").await?;
    echo.wait_until_consuming(connection, &names, settings.topology.shards).await?;
    let count = (args.grant_rate * args.grant_seconds) as usize;
    let result = timed_requests(connection, &names.events, &start_messages(run_id, "echo", count), args.grant_rate).await;
    echo.stop().await;
    result
}

/// Round trip through a server-named transient queue to a responder in
/// this process: the broker's shortest route.
async fn transient_echo_rtt(connection: &Connection, args: &BenchArgs) -> Result<(f64, f64), Failure> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?;
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let requests = channel.basic_consume(queue.name().clone(), "".into(), no_ack, FieldTable::default()).await?;
    let responder = tokio::spawn(send_replies(channel.clone(), requests, false));
    let count = (args.grant_rate * args.grant_seconds) as usize;
    let body = Outbound { routing_key: queue.name().as_str().to_owned(), body: b"{}".to_vec() };
    let result = timed_requests(connection, "", &vec![body; count], args.grant_rate).await;
    responder.abort();
    let _ = channel.close(200, "echo done".into()).await;
    result
}

/// Publishes `bodies` at `rate` a second with direct reply-to and returns
/// the p50 and p99 round trips in milliseconds.
async fn timed_requests(connection: &Connection, exchange: &str, bodies: &[Outbound], rate: u32) -> Result<(f64, f64), Failure> {
    let channel = connection.create_channel().await?;
    let mut replies = channel
        .basic_consume("amq.rabbitmq.reply-to".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await?;
    let sent: Arc<std::sync::Mutex<Vec<Option<Instant>>>> = Arc::new(std::sync::Mutex::new(vec![None; bodies.len()]));
    let expected = bodies.len();
    let collector_sent = sent.clone();
    let collector = tokio::spawn(async move {
        let mut rtts = Vec::with_capacity(expected);
        while rtts.len() < expected {
            let next = tokio::time::timeout(Duration::from_secs(30), replies.next()).await;
            let Ok(Some(Ok(delivery))) = next else { break };
            let index = delivery
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|id| id.as_str().parse::<usize>().ok());
            let sent_at = index.and_then(|index| collector_sent.lock().expect("lock").get(index).copied().flatten());
            if let Some(sent_at) = sent_at {
                rtts.push(sent_at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        rtts
    });

    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (index, message) in bodies.iter().enumerate() {
        ticker.tick().await;
        let properties = properties()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(index.to_string().as_str().into());
        sent.lock().expect("lock")[index] = Some(Instant::now());
        channel
            .basic_publish(exchange.into(), message.routing_key.as_str().into(), BasicPublishOptions::default(), &message.body, properties)
            .await?;
    }
    let mut rtts = collector.await.context("reply collector failed")?;
    if rtts.len() < bodies.len() {
        return Err(anyhow::anyhow!("only {} of {} replies arrived", rtts.len(), bodies.len()).into());
    }
    rtts.sort_by(f64::total_cmp);
    Ok((percentile(&rtts, 0.50), percentile(&rtts, 0.99)))
}

pub(crate) fn percentile(sorted: &[f64], share: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * share).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

/// Holds placed per second at saturation: starts published as fast as the
/// broker takes them, timed until every hold exists.
async fn reservation_rate(channel: &Channel, names: &Names, pool: &PgPool, run_id: &str, args: &BenchArgs) -> Result<f64, Failure> {
    let starts = start_messages(run_id, "r", args.reservations);
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM holds").fetch_one(pool).await?;
    let started = Instant::now();
    publish_all(channel, &names.events, &starts).await?;
    wait_until(pool, "SELECT count(*) FROM holds", before + args.reservations as i64).await?;
    Ok(args.reservations as f64 / started.elapsed().as_secs_f64())
}

fn start_messages(run_id: &str, tag: &str, count: usize) -> Vec<Outbound> {
    (0..count)
        .map(|index| {
            let user = user_id(run_id, index % 200);
            let start = StreamStarted {
                kind: Default::default(),
                message_id: format!("bench-{run_id}-{tag}-{index}"),
                user_id: user.clone(),
                stream_id: format!("bench-{run_id}-{tag}-{index}"),
                model: MODEL.to_owned(),
                messages: None,
                prompt: None,
                prompt_tokens: Some(20),
                max_output_tokens: Some(64),
                occurred_at: chrono::Utc::now(),
            };
            outbound(&user, &start)
        })
        .collect()
}

/// pgbench running the same dedupe insert, guarded update and outbox
/// insert as one transaction, with as many connections as the worker's
/// pool. The worker also inserts the hold, so its transaction writes more.
async fn pgbench(settings: &Settings, pool: &PgPool) -> Result<f64, Failure> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS pgbench_accounts_copy AS SELECT user_id, balance, reserved, holds_open \
         FROM accounts WHERE user_id LIKE 'bench-%'",
    )
    .execute(pool)
    .await?;
    let script = std::env::temp_dir().join(format!("stream-credits-pgbench-{}.sql", std::process::id()));
    // Its outbox rows are written as published, or the worker's relay,
    // still running, would send them to the broker.
    std::fs::write(
        &script,
        "\\set u random(0, 199)\n\
         BEGIN;\n\
         INSERT INTO processed_messages (user_id, message_id, kind) VALUES ('pgbench', gen_random_uuid()::text, 'stream.started');\n\
         UPDATE pgbench_accounts_copy SET reserved = reserved + 10, holds_open = holds_open + 1 \
         WHERE user_id = 'bench-' || :u AND balance - reserved >= 10;\n\
         INSERT INTO outbox (event_id, destination, routing_key, event_type, body, published_at) \
         VALUES (gen_random_uuid(), 'event', 'pgbench', 'pgbench', '{}', now());\n\
         COMMIT;\n",
    )?;
    // The benchmark users are named bench-<run>-u<i>; pgbench addresses
    // them through a copy table keyed bench-<i>.
    sqlx::query("UPDATE pgbench_accounts_copy SET user_id = 'bench-' || split_part(user_id, '-u', 2)")
        .execute(pool)
        .await?;
    let clients = settings.database.max_connections.to_string();
    let output = run_pgbench(settings, &["-T", "10", "-c", &clients, "-j", "2"], &script).await;
    let _ = std::fs::remove_file(&script);
    let output = output?;
    let text = String::from_utf8_lossy(&output.stdout);
    let tps = text
        .lines()
        .find(|line| line.starts_with("tps ="))
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|value| value.parse::<f64>().ok())
        .with_context(|| format!("pgbench printed no tps: {}", String::from_utf8_lossy(&output.stderr)))?;
    Ok(tps)
}

/// Runs pgbench without vacuuming, with `options` and the script file
/// `script`, on the database of `settings`.
async fn run_pgbench(settings: &Settings, options: &[&str], script: &Path) -> Result<std::process::Output, Failure> {
    let url = url::Url::parse(settings.database.url.expose()).map_err(Failure::usage)?;
    let output = tokio::process::Command::new("pgbench")
        .arg("-n")
        .args(options)
        .arg("-f")
        .arg(script)
        .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
        .args(["-p", &url.port().unwrap_or(5432).to_string()])
        .args(["-U", if url.username().is_empty() { "root" } else { url.username() }])
        .arg(url.path().trim_start_matches('/'))
        .env("PGPASSWORD", url.password().unwrap_or_default())
        .output()
        .await
        .context("cannot run pgbench; install PostgreSQL's client tools")?;
    Ok(output)
}

/// Returns the median latencies, in milliseconds, of `SELECT 1` and of a
/// one-row update with its commit, each run by pgbench with one client at
/// the grant measurement's rate and for as long. A grant waits for its
/// hold's commit, so it adds at least one such update to the echo.
async fn paced_statements(settings: &Settings, pool: &PgPool, args: &BenchArgs) -> Result<(f64, f64), Failure> {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_paced_update (id int PRIMARY KEY, n bigint NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO bench_paced_update VALUES (1, 0) ON CONFLICT DO NOTHING")
        .execute(pool)
        .await?;
    let select = paced_p50(settings, args, "SELECT 1;\n").await?;
    let update = paced_p50(settings, args, "UPDATE bench_paced_update SET n = n + 1 WHERE id = 1;\n").await?;
    Ok((select, update))
}

/// Runs `statement` as pgbench's script with one client at the grant
/// rate and returns the median latency of its transactions, in
/// milliseconds, as `logged_latencies` reads them.
async fn paced_p50(settings: &Settings, args: &BenchArgs, statement: &str) -> Result<f64, Failure> {
    let directory = std::env::temp_dir().join(format!("stream-credits-paced-{}", Uuid::new_v4().simple()));
    std::fs::create_dir(&directory)?;
    let script = directory.join("script.sql");
    std::fs::write(&script, statement)?;

    let rate = args.grant_rate.to_string();
    let seconds = args.grant_seconds.to_string();
    let prefix = format!("--log-prefix={}", directory.join(LATENCY_LOG).display());
    let output = run_pgbench(settings, &["-c", "1", "-R", &rate, "-T", &seconds, "-l", &prefix], &script).await;
    let latencies = output.and_then(|output| {
        let latencies = logged_latencies(&directory)?;
        if latencies.is_empty() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(anyhow::anyhow!(
                "pgbench logged no transaction; check that it can reach the benchmark database: {stderr}"
            )
            .into());
        }
        Ok(latencies)
    });
    let _ = std::fs::remove_dir_all(&directory);

    let mut latencies = latencies?;
    latencies.sort_by(f64::total_cmp);
    Ok(percentile(&latencies, 0.50))
}

/// Start of the names of pgbench's transaction logs.
const LATENCY_LOG: &str = "latency";

/// Reads the latencies, in milliseconds, of the transaction logs that
/// pgbench wrote to `directory`, one file per thread. In each line the
/// third field is the time from the transaction's scheduled start to its
/// end, in microseconds. With a rate, the seventh is how late it started,
/// which is taken off, so that a latency is the transaction's own.
fn logged_latencies(directory: &Path) -> Result<Vec<f64>, Failure> {
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let path = entry?.path();
        if !path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(LATENCY_LOG)) {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        latencies.extend(text.lines().filter_map(own_latency_ms));
    }
    Ok(latencies)
}

/// Returns the latency of one line of a pgbench transaction log, less its
/// schedule lag when the line has one, in milliseconds.
fn own_latency_ms(line: &str) -> Option<f64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let micros = fields.get(2)?.parse::<f64>().ok()?;
    let lag = fields.get(6).and_then(|lag| lag.parse::<f64>().ok()).unwrap_or(0.0);
    Some((micros - lag) / 1000.0)
}

/// Resident memory the worker process gains per open stream with many
/// holds open at once.
async fn memory_per_open_stream(
    worker: &ChildWorker,
    channel: &Channel,
    names: &Names,
    pool: &PgPool,
    run_id: &str,
    args: &BenchArgs,
) -> Result<f64, Failure> {
    let open_before: i64 = sqlx::query_scalar("SELECT count(*) FROM holds WHERE settled_at IS NULL").fetch_one(pool).await?;
    let rss_before = worker.resident_bytes();
    let starts = start_messages(run_id, "open", args.open_streams);
    publish_all(channel, &names.events, &starts).await?;
    drop(starts);
    wait_until(
        pool,
        "SELECT count(*) FROM holds WHERE settled_at IS NULL",
        open_before + args.open_streams as i64,
    )
    .await?;
    let rss_after = worker.resident_bytes();
    Ok(rss_after.saturating_sub(rss_before) as f64 / args.open_streams.max(1) as f64)
}

/// `stream-credits run` in a process of its own, as it runs in
/// production, so that the benchmark's publisher and reply collector do
/// not share its runtime or show in its memory.
struct ChildWorker {
    child: tokio::process::Child,
    /// The settings the child reads at start, removed once it consumes.
    settings_file: Option<SettingsFile>,
}

/// A settings file that contains the database password: a new file with
/// a random name that only its owner can read, removed when dropped.
struct SettingsFile {
    path: PathBuf,
}

impl SettingsFile {
    fn write(settings: &Settings) -> Result<Self, Failure> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;

        let path = std::env::temp_dir().join(format!("stream-credits-bench-{}.toml", Uuid::new_v4().simple()));
        let text = toml::to_string(settings).context("cannot write the worker's settings")?;
        // `create_new` fails rather than follow a link or reuse a file
        // that someone else made, whose permissions would stay.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let settings_file = Self { path };
        file.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", settings_file.path.display()))?;
        Ok(settings_file)
    }
}

impl Drop for SettingsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ChildWorker {
    /// Starts `stream-credits` `subcommand` with `settings`.
    async fn start(settings: &Settings, subcommand: &str) -> Result<Self, Failure> {
        let settings_file = SettingsFile::write(settings)?;
        let program = std::env::current_exe().context("cannot find this program to start the worker")?;
        let mut command = tokio::process::Command::new(program);
        command.arg("--config").arg(&settings_file.path).arg(subcommand);
        // The file contains every setting, and a variable of the
        // benchmark's environment would point the worker elsewhere.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().to_ascii_uppercase().starts_with("STREAM_CREDITS__") {
                command.env_remove(key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).kill_on_drop(true);
        let child = command.spawn().context("cannot start the worker process")?;
        Ok(Self { child, settings_file: Some(settings_file) })
    }

    /// Waits until every shard queue has a consumer, which the worker
    /// starts only after it reached the database and declared the
    /// topology, and then removes the settings file it has read.
    async fn wait_until_consuming(&mut self, connection: &Connection, names: &Names, shards: u16) -> Result<(), Failure> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(anyhow::anyhow!(
                    "the worker process exited with {status} before it consumed; its error is printed above"
                )
                .into());
            }
            let channel = connection.create_channel().await?;
            let consumed = topology::consumed_shards(&channel, names, shards).await?;
            let _ = channel.close(200, "checked consumers".into()).await;
            if consumed == shards {
                self.settings_file = None;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!("the worker process consumed {consumed} of {shards} shards after 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident set size of the worker process; 0 where /proc is missing.
    fn resident_bytes(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Kills the worker. Whatever it has not acknowledged goes with the
    /// benchmark's queues.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}


fn draw_plot(path: &std::path::Path, curve: &[(usize, f64)]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let rate_max = curve.iter().map(|(_, rate)| *rate).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("worker throughput against concurrent streams", ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((1f64..300f64).log_scale(), 0f64..rate_max)?;
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("messages per second")
        .draw()?;
    let points: Vec<(f64, f64)> = curve.iter().map(|(streams, rate)| (*streams as f64, *rate)).collect();
    chart.draw_series(LineSeries::new(points.clone(), &BLUE))?;
    chart.draw_series(points.into_iter().map(|point| Circle::new(point, 4, BLUE.filled())))?;
    root.present()?;
    Ok(())
}

pub(crate) async fn cleanup(connection: &Connection, settings: &Settings, prefixes: &[&str]) {
    let Ok(channel) = connection.create_channel().await else { return };
    for prefix in prefixes {
        let names = Names::new(prefix);
        let mut queues: Vec<String> = (0..settings.topology.shards).map(|index| names.shard(index)).collect();
        queues.push(names.dead.clone());
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for exchange in [&names.events, &names.dlx, &names.results] {
            let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
        }
    }
}

pub(crate) async fn drop_database(settings: &Settings) {
    let Ok(mut url) = url::Url::parse(settings.database.url.expose()) else { return };
    let name = url.path().trim_start_matches('/').to_owned();
    url.set_path("postgres");
    if let Ok(pool) = PgPool::connect(url.as_str()).await {
        let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&pool).await;
    }
}

fn print_figures(figures: &Figures, curve: &[(usize, f64)], args: &BenchArgs) {
    let mut table = comfy_table::Table::new();
    table.set_header(["figure", "value", "goal"]);
    let rows = [
        ("broker ceiling, median round, messages/s", format!("{:.0}", figures.broker_messages_per_second), String::new()),
        ("worker, median round, messages/s", format!("{:.0}", figures.worker_messages_per_second), String::new()),
        ("worker / ceiling, median of the rounds", format!("{:.3}", figures.chunk_throughput_ratio), "≥ 0.90".to_owned()),
        (
            "worker / ceiling, each round in order",
            figures.throughput_ratios.iter().map(|ratio| format!("{ratio:.3}")).collect::<Vec<_>>().join(" "),
            String::new(),
        ),
        ("grant round trip p50, ms", format!("{:.2}", figures.grant_rtt_p50_ms), format!("≤ 1.5 × echo ({:.2})", 1.5 * figures.echo_rtt_p50_ms)),
        ("grant round trip p99, ms", format!("{:.2}", figures.grant_rtt_p99_ms), format!("≤ 10 at {} starts/s", args.grant_rate)),
        ("echo of starts on their route p50 / p99, ms", format!("{:.2} / {:.2}", figures.echo_rtt_p50_ms, figures.echo_rtt_p99_ms), String::new()),
        (
            "echo through a transient queue p50 / p99, ms",
            format!("{:.2} / {:.2}", figures.echo_transient_rtt_p50_ms, figures.echo_transient_rtt_p99_ms),
            String::new(),
        ),
        (
            "PostgreSQL at the grant rate, 1 client p50, ms: SELECT 1 / one-row update",
            format!("{:.2} / {:.2}", figures.paced_select_p50_ms, figures.paced_commit_p50_ms),
            String::new(),
        ),
        ("database transactions per chunk", format!("{:.4}", figures.db_transactions_per_chunk), "≤ 0.05".to_owned()),
        ("reservations/s at saturation", format!("{:.0}", figures.reservations_per_second), format!("≥ pgbench ({:.0})", figures.pgbench_tps)),
        ("pgbench tps, same transaction", format!("{:.0}", figures.pgbench_tps), String::new()),
        ("resident bytes per open stream", format!("{:.0}", figures.bytes_per_open_stream), "≤ 1024".to_owned()),
        ("token counting, ns per chunk", format!("{:.0}", figures.token_count_ns_per_chunk), "≤ 5000".to_owned()),
    ];
    for (name, value, goal) in rows {
        table.add_row([name.to_owned(), value, goal]);
    }
    println!("{table}");
    for (streams, rate) in curve {
        println!("{streams:>4} concurrent streams: {rate:.0} messages/s");
    }
    println!("plot: {}", args.plot.display());
    let json = serde_json::json!({
        "chunk_throughput_ratio": figures.chunk_throughput_ratio,
        "grant_rtt_p50_ms": figures.grant_rtt_p50_ms,
        "grant_rtt_p99_ms": figures.grant_rtt_p99_ms,
        "echo_rtt_p50_ms": figures.echo_rtt_p50_ms,
        "echo_transient_rtt_p50_ms": figures.echo_transient_rtt_p50_ms,
        "paced_select_p50_ms": figures.paced_select_p50_ms,
        "paced_commit_p50_ms": figures.paced_commit_p50_ms,
        "db_transactions_per_chunk": figures.db_transactions_per_chunk,
        "reservations_per_second": figures.reservations_per_second,
        "pgbench_tps": figures.pgbench_tps,
        "bytes_per_open_stream": figures.bytes_per_open_stream,
        "token_count_ns_per_chunk": figures.token_count_ns_per_chunk,
    });
    println!("{json}");
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn echo_responder_rejects_other_prefix() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let Err(failure) = runtime.block_on(serve_echo(Arc::new(Settings::default()))) else {
            panic!("the echo responder served the default topology");
        };
        assert_eq!(failure.code, 2);
        assert!(failure.error.to_string().contains("`credits`"), "{}", failure.error);
    }

    #[test]
    fn own_latency_takes_off_the_lag() {
        assert_eq!(own_latency_ms("0 12 450 0 1764990000 123456 50"), Some(0.4));
        assert_eq!(own_latency_ms("0 12 450 0 1764990000 123456"), Some(0.45));
        assert_eq!(own_latency_ms("0 12"), None);
    }

    #[test]
    fn median_round_orders_by_ratio() {
        let mut rounds = [(100.0, 120.0), (200.0, 150.0), (100.0, 90.0)];
        assert_eq!(median_round(&mut rounds), (100.0, 90.0));
        let ratios: Vec<f64> = rounds.iter().map(|&(ceiling, worker)| ratio(ceiling, worker)).collect();
        assert_eq!(ratios, [0.75, 0.9, 1.2]);
    }

    #[test]
    fn settings_file_is_private_and_removed_on_drop() {
        let mut settings = Settings::load_unvalidated(None, Vec::new()).expect("defaults load");
        settings.database.url = crate::settings::SecretUrl::new("postgres://bench:secret@127.0.0.1:5432/bench");
        settings.topology.prefix = "bench-file".to_owned();

        let file = SettingsFile::write(&settings).expect("write the settings file");
        let path = file.path.clone();
        let mode = std::fs::metadata(&path).expect("the file exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

        let read = Settings::load_unvalidated(Some(&path), Vec::new()).expect("the worker can load the file");
        assert_eq!(read.database.url.expose(), settings.database.url.expose());
        assert_eq!(read.topology.prefix, "bench-file");

        let second = SettingsFile::write(&settings).expect("write a second file");
        assert_ne!(second.path, path, "each file gets a new name");

        drop(file);
        assert!(!path.exists(), "{} was not removed", path.display());
    }
}
