//! The worker: consumes every shard queue, applies messages to the ledger
//! in batches, publishes replies and events, dead-letters what cannot be
//! applied, and acknowledges only after all of that is done.
//!
//! A supervisor loop owns the broker connection. When the connection is
//! lost it reconnects with backoff, declares the topology again and
//! resumes; unacknowledged deliveries come back from the broker, and the
//! processed-message ids make applying them again harmless. While the
//! database is unreachable a shard stops taking messages and retries the
//! same batch with backoff, so an outage dead-letters nothing.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, PgPool, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};

use crate::broker::{self, BrokerError, DeadLetter};
use crate::db;
use crate::ledger::{self, Applied, Ledger, LedgerError, Outcome, Outgoing, ReplyTo};
use crate::messages::{self, DenialReason, Inbound, PartialIds, Rejection, ReservationDenied};
use crate::retention;
use crate::settings::Settings;
use crate::topology::{self, Names, TopologyError};

/// Maximum pause between two attempts to reach the broker or database.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(30);

/// First pause after a failed attempt.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(200);

/// Time a broker session must have run for its end to count as a new
/// outage, which reconnects after the first pause, rather than as one
/// more failed attempt, which pauses longer each time.
const SESSION_STABLE_AFTER: Duration = Duration::from_secs(5);

/// How often unpublished outbox rows are looked for.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);

/// Age after which the relay sends an unmarked outbox row: one orphaned by
/// a crash between commit and marking, or one whose confirm or marking is
/// still coming, which consumers then receive twice with one event id.
const RELAY_AGE_SECONDS: f64 = 10.0;

/// Maximum wait for a connection to close. lapin 4.12 can wait forever
/// on a close once its I/O loop has stopped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Maximum number of holds expired or outbox rows relayed in one
/// transaction, a page of the expiry sweep.
pub const SWEEP_BATCH_MAX: i64 = 200;

/// Batches of sent outbox rows waiting to be marked. When the queue is
/// full, a shard waits for its own confirms and marks its own rows before
/// taking more messages.
const MARK_QUEUE_MAX: usize = 1_024;

/// Maximum outbox ids marked in one statement.
const MARK_ROWS_MAX: usize = 4_096;

/// Time the marker gathers confirmed rows before it marks them, so that
/// starts that come one at a time share a mark's transaction rather than
/// each paying one. It must stay far below `RELAY_AGE_SECONDS`.
const MARK_LINGER: Duration = Duration::from_millis(100);

/// Chunk records one statement of the retention job deletes, so that a
/// statement holds few row locks and ends well within a second. The job
/// runs statements until nothing is left to delete.
const RETENTION_BATCH_MAX: i64 = 10_000;

/// Maximum length of one run of the retention job. The expiry sweep and
/// the outbox relay share its task, so a large backlog is deleted in runs
/// this long, `RETENTION_RESUME_AFTER` apart, rather than in one long run
/// that delays them.
const RETENTION_RUN_MAX: Duration = Duration::from_secs(20);
const RETENTION_RESUME_AFTER: Duration = Duration::from_secs(1);

/// Maximum wait for the broker to confirm a batch's messages before their
/// rows are left to the relay.
const CONFIRM_WAIT: Duration = Duration::from_secs(30);

/// Pool connections left to the expiry sweep, the relay and the marker
/// when shards keep connections between batches.
const CONNECTIONS_NOT_KEPT: u32 = 2;

/// Idle time after which a shard closes its kept connection and takes one
/// from the pool, which checks it first, because the server or the network
/// may have dropped the idle one meanwhile.
const KEPT_IDLE_MAX: Duration = Duration::from_secs(30);

/// Maximum time a shard's transaction, for a batch or for one message, may
/// take from `BEGIN` to the end of `COMMIT` before its connection is closed
/// and the transaction retried. A connection that the network stopped
/// carrying otherwise waits until the kernel gives up on it, which takes
/// many minutes.
const BATCH_DATABASE_WAIT: Duration = Duration::from_secs(10);

/// Limit the server puts on each statement of the worker, below
/// `BATCH_DATABASE_WAIT`. A lone start's statement commits by itself and
/// runs alone within such a wait, so the server cancels it before the
/// worker gives up on it. Abandoned, it could commit later, when its grant
/// and expiry would be stale.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(9);

/// Maximum pause between attempts at a batch while shutdown waits for the
/// database, so that its return is noticed soon.
const STOPPING_RETRY_DELAY_MAX: Duration = Duration::from_millis(500);

/// A failure that ends the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad settings or a broker that cannot host the topology: exit 2.
    #[error(transparent)]
    Topology(TopologyError),
    /// The database cannot be prepared and retrying will not help.
    #[error(transparent)]
    Database(db::DbError),
    /// The HTTP endpoint cannot listen on `http.listen`: exit 1.
    #[error(
        "cannot listen on http.listen {listen}: {source}; stop the process that uses it, \
         choose another address, or set http.listen to \"\" to turn the endpoint off"
    )]
    Listen {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The reason a broker session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Fatal(WorkerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("lost the broker: {0}")]
    Lost(String),
}

impl From<lapin::Error> for SessionError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(error))
    }
}

fn backoff() -> ExponentialBuilder {
    // backon 1.6's jitter adds up to the whole current delay on top of it,
    // so the delay before jitter is capped at half the maximum pause.
    ExponentialBuilder::default()
        .with_min_delay(RETRY_DELAY_MIN)
        .with_max_delay(RETRY_DELAY_MAX / 2)
        .with_jitter()
        .without_max_times()
}

/// Runs the worker until `shutdown` is cancelled, then drains and returns.
pub async fn run(settings: Arc<Settings>, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let broker_connected = Arc::new(AtomicBool::new(false));
    // The endpoint starts before the database is reached, so /healthz
    // responds and /readyz reports the wait while it is unreachable.
    if let Ok(listen) = settings.http.listen.parse() {
        serve_http(&settings, listen, broker_connected.clone(), shutdown.clone()).await?;
    }
    let migrated = tokio::select! {
        pool = prepare_database(&settings) => pool?,
        () = shutdown.cancelled() => return Ok(()),
    };
    migrated.close().await;
    let pool = db::worker_pool(&settings.database, STATEMENT_TIMEOUT).map_err(WorkerError::Database)?;
    let (marks, unmarked) = mpsc::channel(MARK_QUEUE_MAX);
    let marker_stop = CancellationToken::new();
    let marker = tokio::spawn(mark_in_background(pool.clone(), unmarked, marker_stop.clone()));
    let keepable = settings.database.max_connections.saturating_sub(CONNECTIONS_NOT_KEPT);
    let worker = Worker {
        ledger: Ledger::new(settings.clone()),
        keep_permits: Arc::new(Semaphore::new(keepable as usize)),
        settings,
        pool: pool.clone(),
        shutdown,
        broker_connected,
        marks,
        shutdown_seen: Arc::new(OnceLock::new()),
    };
    let result = worker.supervise().await;

    // Every consumer has stopped, so no more ids arrive.
    marker_stop.cancel();
    if tokio::time::timeout(CLOSE_WAIT, marker).await.is_err() {
        warn!(?CLOSE_WAIT, "outbox rows were not marked in time; the relay will send them again");
    }
    // Closing waits for connections in use to come back; a query stuck
    // on an unreachable server must not keep the process alive.
    if tokio::time::timeout(CLOSE_WAIT, pool.close()).await.is_err() {
        warn!(?CLOSE_WAIT, "database pool did not close in time");
    }
    info!("worker stopped");
    result
}

/// Connections the HTTP endpoint may hold, apart from the worker's pool.
const HTTP_DATABASE_CONNECTIONS: u32 = 2;

/// Serves the HTTP endpoint on a small pool of its own until `shutdown`.
/// Fails at once when it cannot listen on `listen`.
async fn serve_http(
    settings: &Settings,
    listen: std::net::SocketAddr,
    broker_connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let mut database = settings.database.clone();
    database.max_connections = HTTP_DATABASE_CONNECTIONS;
    let readiness = crate::http::Readiness {
        pool: db::pool(&database).map_err(WorkerError::Database)?,
        broker_connected,
        ttl_seconds: settings.reservations.ttl_seconds,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| WorkerError::Listen { listen, source })?;
    tokio::spawn(async move {
        if let Err(error) = crate::http::serve(listener, readiness, shutdown).await {
            error!(%error, %listen, "cannot serve the HTTP endpoint");
        }
    });
    Ok(())
}

/// Creates and migrates the database, retrying while it is unreachable.
async fn prepare_database(settings: &Settings) -> Result<PgPool, WorkerError> {
    (|| db::migrate(&settings.database))
        .retry(backoff())
        .when(db::DbError::is_retryable)
        .notify(|error, delay| warn!(%error, ?delay, "database not ready, retrying"))
        .await
        .map_err(WorkerError::Database)
}

#[derive(Clone)]
struct Worker {
    settings: Arc<Settings>,
    ledger: Ledger,
    pool: PgPool,
    shutdown: CancellationToken,
    broker_connected: Arc<AtomicBool>,
    /// Outbox rows sent by the shards, for the background marker.
    marks: mpsc::Sender<ToMark>,
    /// How many more pool connections the shards may keep between batches.
    keep_permits: Arc<Semaphore>,
    /// Instant at which a task first observed the shutdown request. The
    /// drain starts then.
    shutdown_seen: Arc<OnceLock<Instant>>,
}

impl Worker {
    /// Returns the instant the drain must end:
    /// `worker.shutdown_timeout_seconds` after shutdown was first observed,
    /// or `None` while no shutdown is requested.
    fn drain_deadline(&self) -> Option<Instant> {
        if !self.shutdown.is_cancelled() {
            return None;
        }
        let seen = *self.shutdown_seen.get_or_init(Instant::now);
        Some(seen + Duration::from_secs(self.settings.worker.shutdown_timeout_seconds))
    }

    /// Returns the maximum duration of one attempt at a batch: the wait for
    /// a pool connection, then the transaction.
    fn attempt_max(&self) -> Duration {
        Duration::from_secs(self.settings.database.acquire_timeout_seconds) + BATCH_DATABASE_WAIT
    }

    async fn supervise(&self) -> Result<(), WorkerError> {
        let mut attempt_delay = backoff().build();
        while !self.shutdown.is_cancelled() {
            let mut established = None;
            match self.session(&mut established).await {
                Ok(()) => break,
                Err(SessionError::Fatal(error)) => return Err(error),
                Err(error) => {
                    metrics::counter!("stream_credits_reconnects_total").increment(1);
                    // A session that ran a while resets the backoff, so a
                    // drop after earlier drops still reconnects quickly.
                    if established.is_some_and(|at: Instant| at.elapsed() >= SESSION_STABLE_AFTER) {
                        attempt_delay = backoff().build();
                    }
                    let delay = attempt_delay.next().unwrap_or(RETRY_DELAY_MAX);
                    warn!(%error, ?delay, "broker session ended, reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => break,
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs one broker connection: declares, then consumes until shutdown or
    /// failure. Sets `established` once every shard has its consumer task.
    async fn session(&self, established: &mut Option<Instant>) -> Result<(), SessionError> {
        let connection = broker::connect(&self.settings.amqp, "stream-credits worker").await?;
        let setup = connection.create_channel().await?;
        let names = topology::declare(&setup, &self.settings.topology)
            .await
            .map_err(|error| match error {
                TopologyError::Broker(error) => SessionError::from(error),
                fatal => SessionError::Fatal(WorkerError::Topology(fatal)),
            })?;
        let names = Arc::new(names);
        info!(prefix = %self.settings.topology.prefix, shards = self.settings.topology.shards, "topology declared, consuming");

        let session_stop = self.shutdown.child_token();
        let mut tasks = JoinSet::new();
        let homes = &self.settings.worker.home_shards;
        let standby_delay = Duration::from_secs(self.settings.worker.standby_delay_seconds);
        for index in 0..self.settings.topology.shards {
            let channel = broker::confirm_channel(&connection).await?;
            let home = homes.is_empty() || homes.contains(&index);
            let shard = Shard {
                worker: self.clone(),
                names: names.clone(),
                channel: channel.clone(),
                queue: names.shard(index),
                stop: session_stop.clone(),
                subscribe_after: if home { Duration::ZERO } else { standby_delay },
                kept_connections: std::sync::Mutex::new(Vec::new()),
            };
            tasks.spawn(closing_channel(channel, shard.consume()));
        }
        let channel = broker::confirm_channel(&connection).await?;
        let maintenance = Maintenance {
            worker: self.clone(),
            names: names.clone(),
            channel: channel.clone(),
            stop: session_stop.clone(),
        };
        tasks.spawn(closing_channel(channel, maintenance.run()));

        self.broker_connected.store(true, Ordering::Relaxed);
        *established = Some(Instant::now());
        let result = self.wait(&connection, &mut tasks, &session_stop).await;
        self.broker_connected.store(false, Ordering::Relaxed);
        session_stop.cancel();
        let drain = Duration::from_secs(self.settings.worker.shutdown_timeout_seconds);
        let until = self.drain_deadline().unwrap_or_else(|| Instant::now() + drain);
        let finished = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(until.into(), finished).await.is_err() {
            warn!(?drain, "in-flight work did not finish in time; unacknowledged messages will be redelivered");
            tasks.abort_all();
        }
        // Rows whose confirms are still coming are marked before the
        // connection closes, so that the relay does not send them again.
        self.flush_marks().await;
        close_channel(&setup).await;
        // lapin's close can wait forever once its I/O loop has stopped, so
        // it is bounded; the broker drops the socket's channels either way.
        let close = connection.close(200, "worker stopping".into());
        let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
        result
    }

    /// Waits, at most `CLOSE_WAIT`, until the marker has marked every
    /// outbox row sent so far or left it to the relay.
    async fn flush_marks(&self) {
        let (answer, flushed) = oneshot::channel();
        let flush = async {
            if self.marks.send(ToMark::Flush(answer)).await.is_ok() {
                let _ = flushed.await;
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, flush).await;
    }

    async fn wait(
        &self,
        connection: &Connection,
        tasks: &mut JoinSet<Result<(), SessionError>>,
        session_stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let joined = tokio::select! {
            () = self.shutdown.cancelled() => {
                info!("shutdown requested, draining");
                return Ok(());
            }
            joined = tasks.join_next() => joined,
        };
        let result = match joined {
            Some(Ok(result)) => result,
            Some(Err(join_error)) => Err(SessionError::Lost(join_error.to_string())),
            None => Err(SessionError::Lost("every consumer stopped".to_owned())),
        };
        if self.shutdown.is_cancelled() {
            return Ok(());
        }
        session_stop.cancel();
        match result {
            Ok(()) => Err(SessionError::Lost(format!(
                "a consumer stopped (connection connected: {})",
                connection.status().connected()
            ))),
            Err(error) => Err(error),
        }
    }
}

/// When a batch stops taking deliveries: at `worker.batch_messages_max`
/// deliveries or `worker.batch_bytes_max` bytes of bodies.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    messages: usize,
    bytes: usize,
}

impl BatchLimits {
    fn of(settings: &Settings) -> Self {
        Self {
            messages: settings.worker.batch_messages_max,
            bytes: settings.worker.batch_bytes_max,
        }
    }

    fn is_full(&self, deliveries: &[Delivery]) -> bool {
        deliveries.len() >= self.messages
            || deliveries.iter().map(|delivery| delivery.data.len()).sum::<usize>() >= self.bytes
    }
}

/// The consumer of one shard queue.
struct Shard {
    worker: Worker,
    names: Arc<Names>,
    channel: Channel,
    queue: String,
    stop: CancellationToken,
    /// Zero for a home shard; the standby delay for any other.
    subscribe_after: Duration,
    /// Connections kept from one batch to the next, one per batch in flight.
    kept_connections: std::sync::Mutex<Vec<KeptConnection>>,
}

/// A pool connection a shard keeps between its batches. The pool checks a
/// connection with a round trip when it hands it out and again when it
/// gets it back, and the first check delays a start's reply. A connection
/// whose batch fails with an error goes back to the pool, which closes it
/// if broken, and one whose batch timed out is closed.
struct KeptConnection {
    conn: PoolConnection<Postgres>,
    /// Counts the connection against `Worker::keep_permits`.
    permit: Option<OwnedSemaphorePermit>,
    idle_since: Instant,
}

/// A batch being applied, as a future that returns the batch's acker when done.
type Applying<'a> = Pin<Box<dyn Future<Output = Result<Option<Acker>, SessionError>> + Send + 'a>>;

/// The batches of one shard that are being applied, oldest first, with
/// the users each one has messages of.
struct InFlight<'a> {
    batches: FuturesOrdered<Applying<'a>>,
    users: VecDeque<HashSet<String>>,
    /// `worker.batches_in_flight`.
    max: usize,
}

impl<'a> InFlight<'a> {
    fn new(max: usize) -> Self {
        Self {
            batches: FuturesOrdered::new(),
            users: VecDeque::new(),
            max,
        }
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Returns whether a new batch of `users` must wait for the oldest
    /// batch, because it shares a user with a batch in flight or because
    /// no more batches may run.
    fn must_wait_for(&self, users: &HashSet<String>) -> bool {
        self.batches.len() >= self.max
            || self.users.iter().any(|earlier| !earlier.is_disjoint(users))
    }

    fn push(&mut self, users: HashSet<String>, batch: Applying<'a>) {
        self.users.push_back(users);
        self.batches.push_back(batch);
    }

    /// Waits for the oldest batch, or returns `None` when none is in flight.
    async fn next(&mut self) -> Option<Result<Option<Acker>, SessionError>> {
        let done = self.batches.next().await?;
        self.users.pop_front();
        Some(done)
    }
}

/// Runs a task of the session and then, unless it failed or closed the
/// channel itself, closes its channel. lapin otherwise closes a channel in
/// the background when its last handle is dropped, and one still closing
/// when the connection closes is logged as a connection error.
async fn closing_channel(
    channel: Channel,
    task: impl Future<Output = Result<(), SessionError>>,
) -> Result<(), SessionError> {
    let result = task.await;
    if result.is_ok() && channel.status().connected() {
        close_channel(&channel).await;
    }
    result
}

/// Closes `channel`, waiting at most `CLOSE_WAIT` for the broker.
async fn close_channel(channel: &Channel) {
    let _ = tokio::time::timeout(CLOSE_WAIT, channel.close(200, "worker stopping".into())).await;
}

/// The fate of one delivery once its batch is done.
#[derive(Debug)]
enum Disposition {
    Ack,
    DeadLetter(Rejection),
}

/// One delivery, decoded.
struct Item {
    delivery: Delivery,
    message: Result<Inbound, Rejection>,
    reply_to: ReplyTo,
}

impl Shard {
    async fn consume(self) -> Result<(), SessionError> {
        if !self.subscribe_after.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(self.subscribe_after) => {}
                () = self.stop.cancelled() => return Ok(()),
            }
            info!(queue = %self.queue, "subscribed as standby");
        }
        self.channel
            .basic_qos(self.worker.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        debug!(queue = %self.queue, "subscribed");

        let batch_max = BatchLimits::of(&self.worker.settings);
        let linger = Duration::from_millis(self.worker.settings.worker.batch_linger_ms);
        let mut in_flight = InFlight::new(self.worker.settings.worker.batches_in_flight);
        let mut database_down = false;
        'batches: loop {
            let first = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    if !self.acknowledge(done?).await? {
                        database_down = true;
                        break;
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            let Some(first) = first else {
                return Err(SessionError::Lost(format!("consumer of {} ended", self.queue)));
            };
            let received = Instant::now();
            let mut deliveries = vec![first?];
            // Take whatever else is already here, without waiting, so a
            // busy shard commits many messages per transaction and an idle
            // one answers at once.
            while !batch_max.is_full(&deliveries) {
                match consumer.next().now_or_never() {
                    Some(Some(delivery)) => deliveries.push(delivery?),
                    _ => break,
                }
            }
            // A user's messages are applied in order, so a batch waits for
            // every earlier batch that has one of its users and takes more
            // deliveries while it waits. Then, once, it waits for more
            // until the linger ends, unless one of them requests a reply.
            let users_of = |deliveries: &[Delivery]| -> HashSet<String> {
                deliveries.iter().map(|delivery| delivery.routing_key.to_string()).collect()
            };
            let mut users = users_of(&deliveries);
            let mut lingered = false;
            loop {
                if in_flight.must_wait_for(&users) {
                    tokio::select! {
                        biased;
                        Some(done) = in_flight.next() => {
                            if !self.acknowledge(done?).await? {
                                database_down = true;
                                break 'batches;
                            }
                        }
                        Some(next) = consumer.next(), if !batch_max.is_full(&deliveries) => {
                            let delivery = next?;
                            users.insert(delivery.routing_key.to_string());
                            deliveries.push(delivery);
                        }
                    }
                    continue;
                }
                if lingered {
                    break;
                }
                lingered = true;
                let until = received + linger;
                if !self
                    .linger(&mut consumer, &mut deliveries, until, batch_max, &mut in_flight)
                    .await?
                {
                    database_down = true;
                    break 'batches;
                }
                users = users_of(&deliveries);
            }
            in_flight.push(users, Box::pin(self.apply(deliveries, received)));
        }

        // Batches still in flight finish their work. After a batch that was
        // not applied, none is acknowledged, because a `multiple` ack would
        // cover that batch's deliveries too.
        while let Some(done) = in_flight.next().await {
            let acker = done?;
            if !database_down && !self.acknowledge(acker).await? {
                database_down = true;
            }
        }
        // Closing the channel would fail the confirms still coming and leave
        // the last batches' outbox rows to the relay, which sends them again.
        // The marker waits for every confirm. lapin's `wait_for_confirms`
        // waits for the last publish only, and RabbitMQ does not promise to
        // confirm in publishing order: stops that used it still lost some.
        if self.channel.status().connected() {
            self.worker.flush_marks().await;
        }
        // The deliveries not applied go back to the queue when the channel
        // closes. It closes while the consumer still exists, because
        // dropping an active lapin consumer sends a cancel first, and after
        // a cancel RabbitMQ 3.10 returns them out of order, also to a
        // standby (tests/shutdown_backlog.rs, tests/redelivery_order.rs).
        close_channel(&self.channel).await;
        drop(consumer);
        Ok(())
    }

    /// Acknowledges an applied batch, or returns false for a batch that
    /// was not applied.
    async fn acknowledge(&self, applied: Option<Acker>) -> Result<bool, SessionError> {
        let Some(acker) = applied else {
            return Ok(false);
        };
        acker.ack(BasicAckOptions { multiple: true }).await?;
        Ok(true)
    }

    /// Adds deliveries to a batch until `until`, until it is full, or until
    /// one of them requests a reply. A busy shard then applies more
    /// messages per transaction, and a start's reply is sent without
    /// delay. Shutdown ends the wait, and the batch is applied as it is.
    /// The batches in flight keep running and are acknowledged as they
    /// finish. Returns false when one of them was not applied.
    async fn linger<'a>(
        &'a self,
        consumer: &mut lapin::Consumer,
        deliveries: &mut Vec<Delivery>,
        until: Instant,
        batch_max: BatchLimits,
        in_flight: &mut InFlight<'a>,
    ) -> Result<bool, SessionError> {
        if deliveries.iter().any(awaits_reply) {
            return Ok(true);
        }
        let until = tokio::time::Instant::from_std(until);
        while !batch_max.is_full(deliveries) {
            let next = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep_until(until) => break,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    if !self.acknowledge(done?).await? {
                        return Ok(false);
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            // A consumer that ended is reported by the next read.
            let Some(delivery) = next else { break };
            let delivery = delivery?;
            let answer_now = awaits_reply(&delivery);
            deliveries.push(delivery);
            if answer_now {
                break;
            }
        }
        Ok(true)
    }

    /// Applies one batch, dead-letters what it rejects and publishes its
    /// replies and events. `received` is when the batch's first delivery
    /// arrived. Returns the acker of the batch's last delivery, for one
    /// `multiple` ack, or `None` when shutdown interrupted a database
    /// retry, in which case the broker will redeliver the batch.
    async fn apply(&self, deliveries: Vec<Delivery>, received: Instant) -> Result<Option<Acker>, SessionError> {
        let limits = &self.worker.settings.limits;
        let limit_attempts = self.worker.settings.topology.delivery_limit;
        let items: Vec<Item> = deliveries
            .into_iter()
            .map(|delivery| Item {
                message: messages::decode(&delivery.data, limits)
                    .and_then(|message| routed_by_user(message, delivery.routing_key.as_str())),
                reply_to: reply_address(&delivery),
                delivery,
            })
            .collect();

        let Some(results) = self.apply_with_retry(&items).await else {
            return Ok(None);
        };

        let mut outgoing: Vec<Outgoing> = Vec::new();
        let mut dispositions = Vec::with_capacity(items.len());
        // The latency histogram each applied start or end is timed in.
        let mut timed: Vec<&'static str> = Vec::new();
        for (item, result) in items.iter().zip(results) {
            let _entered = message_span(item).entered();
            let disposition = match (&item.message, result) {
                (Err(rejection), _) => {
                    outgoing.extend(invalid_request_reply(rejection, &item.reply_to));
                    Disposition::DeadLetter(rejection.clone())
                }
                (Ok(message), Some(Ok(applied))) => {
                    outgoing.extend(applied.outgoing);
                    record_outcome(item, &applied.outcome);
                    if applied.outcome == Outcome::Applied {
                        timed.extend(latency_histogram(message));
                    }
                    match applied.outcome {
                        Outcome::DeadLetter(rejection) => {
                            let answer = Rejection {
                                partial: Box::new(message_ids(message)),
                                ..rejection.clone()
                            };
                            outgoing.extend(invalid_request_reply(&answer, &item.reply_to));
                            Disposition::DeadLetter(rejection)
                        }
                        _ => Disposition::Ack,
                    }
                }
                (Ok(_), Some(Err(error))) => Disposition::DeadLetter(exhausted(&error, limit_attempts)),
                (Ok(_), None) => unreachable!("every valid message has a result"),
            };
            dispositions.push(disposition);
        }

        self.dead_letter_all(&items, &dispositions).await?;
        let mut confirms = broker::publish_unconfirmed(&self.channel, &self.names, &outgoing).await?;
        let latency = received.elapsed().as_secs_f64();
        for name in timed {
            metrics::histogram!(name).record(latency);
        }
        // A message with an outbox row is sent again by the relay until
        // its row is marked, so the batch is acknowledged without waiting
        // for its confirm, and a background task marks the row once the
        // confirm comes. Any other message, such as a denial of an invalid
        // start, is confirmed before the batch is acknowledged.
        if outgoing.iter().any(|message| message.outbox_id.is_none()) {
            std::mem::take(&mut confirms).wait().await?;
        }
        let ids = outbox_ids(&outgoing);
        if !ids.is_empty() {
            let published = ToMark::Published { confirms, ids };
            if let Err(mpsc::error::TrySendError::Full(published)) = self.worker.marks.try_send(published) {
                let mut ids = Vec::new();
                published.confirmed_ids(&mut ids).await;
                mark_published(&self.worker.pool, &ids).await;
            }
        }
        let last = items.into_iter().last().expect("a batch is never empty");
        Ok(Some(last.delivery.acker))
    }

    /// Applies every valid message of the batch in one transaction,
    /// retrying while the database is unreachable. A final error sends the
    /// batch through one transaction per message, so only the failing
    /// message is held back. `None` means shutdown came first.
    async fn apply_with_retry(
        &self,
        items: &[Item],
    ) -> Option<Vec<Option<Result<Applied, LedgerError>>>> {
        match self.retry_while_unreachable(|| self.apply_batch(items)).await? {
            Ok(results) => Some(results.into_iter().map(|applied| applied.map(Ok)).collect()),
            Err(error) => {
                warn!(%error, queue = %self.queue, "batch failed, applying its messages one by one");
                let mut results = Vec::with_capacity(items.len());
                for item in items {
                    results.push(self.apply_one_with_retry(item).await?);
                }
                Some(results)
            }
        }
    }

    /// Runs `attempt` until it succeeds or fails for a reason other than an
    /// unreachable database, pausing with backoff between attempts. After
    /// shutdown, attempts go on as long as one can end before the drain
    /// does. Returns `None` when the batch is given up: the database stayed
    /// unreachable that long, or the broker session ended. An attempt in
    /// progress is never cut off, so a commit is always followed by its
    /// publishing and acknowledgement.
    async fn retry_while_unreachable<T, F, Fut>(&self, mut attempt: F) -> Option<Result<T, LedgerError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, LedgerError>>,
    {
        let mut pauses = backoff().build();
        let mut waiting_to_stop = false;
        loop {
            let error = match attempt().await {
                Err(error) if error.is_retryable() => error,
                result => return Some(result),
            };
            let pause = pauses.next().unwrap_or(RETRY_DELAY_MAX);
            metrics::counter!("stream_credits_database_errors_total").increment(1);
            if !self.stop.is_cancelled() {
                warn!(%error, ?pause, queue = %self.queue, "database unavailable, statement cancelled or transaction in conflict, batch will be retried");
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = self.stop.cancelled() => {}
                }
            }
            let Some(pause) = self.pause_while_stopping(pause) else {
                warn!(%error, queue = %self.queue, "shard consumer stopping with the database unavailable, batch returned to the queue unapplied");
                return None;
            };
            if !waiting_to_stop {
                waiting_to_stop = true;
                warn!(%error, queue = %self.queue, "shutdown waits for the database to apply a received batch");
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Returns the pause before the next attempt at a batch once the session
    /// is stopping. Returns `None` when no attempt should follow. That is
    /// the case when the worker is not shutting down (the broker session
    /// ended) or the shard's channel is closed, because the broker has taken
    /// the batch back, and when the attempt might not end before the drain.
    fn pause_while_stopping(&self, pause: Duration) -> Option<Duration> {
        let deadline = self.worker.drain_deadline()?;
        if !self.channel.status().connected() {
            return None;
        }
        let pause = pause.min(STOPPING_RETRY_DELAY_MAX);
        (Instant::now() + pause + self.worker.attempt_max() <= deadline).then_some(pause)
    }

    async fn apply_batch(&self, items: &[Item]) -> Result<Vec<Option<Applied>>, LedgerError> {
        let valid: Vec<(&Inbound, &ReplyTo)> = items
            .iter()
            .filter_map(|item| item.message.as_ref().ok().map(|message| (message, &item.reply_to)))
            .collect();
        let span = info_span!("batch", queue = %self.queue, messages = valid.len());
        // A start that arrives alone is granted by one statement, which
        // commits as it ends. A start that the statement does not grant
        // takes a transaction with the sizing already read. The statement
        // gets a wait of its own, after the reads that size the hold, so
        // the server's statement timeout, shorter than the wait, cancels it
        // before the worker gives up on it: abandoned, it could still
        // commit.
        if let [(message @ Inbound::StreamStarted(start), reply_to)] = valid.as_slice()
            && items.len() == 1
        {
            let ledger = &self.worker.ledger;
            let sized = self
                .on_connection(async |conn| ledger.size_start(conn, start).instrument(span.clone()).await)
                .await?;
            if let Some(sized) = sized {
                let alone = self
                    .on_connection(async |conn| {
                        ledger.start_alone(conn, start, &sized, reply_to).instrument(span.clone()).await
                    })
                    .await?;
                let applied = match alone {
                    Some(applied) => applied,
                    None => {
                        self.in_transaction(async |conn| {
                            ledger.apply_sized_start(conn, (*message, *reply_to), sized).instrument(span).await
                        })
                        .await?
                    }
                };
                return Ok(vec![Some(applied)]);
            }
        }
        let mut applied = self
            .in_transaction(async |conn| self.worker.ledger.apply_batch(conn, &valid).instrument(span).await)
            .await?
            .into_iter();

        // Invalid deliveries have no result; the rest take theirs in order.
        let results = items
            .iter()
            .map(|item| item.message.as_ref().ok().and_then(|_| applied.next()))
            .collect();
        Ok(results)
    }

    /// Runs `work` in one transaction on a connection from `take_connection`
    /// and commits.
    async fn in_transaction<T>(
        &self,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.on_connection(async |conn| {
            let mut tx = conn.begin().await?;
            let result = work(&mut tx).await?;
            tx.commit().await?;
            Ok(result)
        })
        .await
    }

    /// Runs `work` on a connection from `take_connection`. Work that has
    /// not ended within `BATCH_DATABASE_WAIT` fails as retryable, and its
    /// connection is closed.
    async fn on_connection<T>(
        &self,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut connection = self.take_connection().await?;
        // A panic fails this attempt alone, instead of the shard's task and
        // with it every shard of the session.
        let work = AssertUnwindSafe(work(&mut *connection.conn)).catch_unwind();
        match tokio::time::timeout(BATCH_DATABASE_WAIT, work).await {
            Ok(Ok(result)) => {
                let result = result?;
                self.keep_connection(connection);
                Ok(result)
            }
            Ok(Err(_)) => {
                // The connection may be left inside a transaction.
                drop(connection.conn.detach());
                error!(queue = %self.queue, "applying messages panicked, attempt failed");
                Err(LedgerError::Panicked)
            }
            Err(_) => {
                // The server or the path to it went silent. The connection is
                // closed rather than given back, because the pool's check of a
                // returned connection would wait on it without end and hold
                // its place in the pool.
                drop(connection.conn.detach());
                let silent = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from PostgreSQL within {BATCH_DATABASE_WAIT:?}"),
                );
                Err(LedgerError::from(sqlx::Error::Io(silent)))
            }
        }
    }

    /// Takes the connection kept from an earlier batch, or one from the
    /// pool, which this shard keeps afterwards if a permit is free.
    async fn take_connection(&self) -> Result<KeptConnection, sqlx::Error> {
        let reused = self.kept_connections.lock().expect("never poisoned").pop();
        if let Some(reused) = reused {
            if reused.idle_since.elapsed() < KEPT_IDLE_MAX {
                return Ok(reused);
            }
            // Closed rather than given back, for the same reason as after a
            // batch that timed out: the pool's check could wait without end.
            drop(reused.conn.detach());
        }
        let conn = self.worker.pool.acquire().await?;
        Ok(KeptConnection {
            conn,
            permit: self.worker.keep_permits.clone().try_acquire_owned().ok(),
            idle_since: Instant::now(),
        })
    }

    /// Keeps a connection whose batch committed, if it has a permit.
    fn keep_connection(&self, mut connection: KeptConnection) {
        if connection.permit.is_some() {
            connection.idle_since = Instant::now();
            self.kept_connections.lock().expect("never poisoned").push(connection);
        }
    }

    async fn apply_one_with_retry(
        &self,
        item: &Item,
    ) -> Option<Option<Result<Applied, LedgerError>>> {
        let Ok(message) = &item.message else {
            return Some(None);
        };
        let once = || self.in_transaction(async |conn| self.apply_traced(conn, message, item).await);
        // A final error is retried in place, a bounded number of times,
        // rather than returned to the queue: a requeued message would be
        // applied after later messages of the same user, such as a chunk
        // after its stream's end.
        let attempts_max = self.worker.settings.topology.delivery_limit;
        let mut pauses = backoff().build();
        for attempt in 1..=attempts_max {
            let error = match self.retry_while_unreachable(once).await? {
                Ok(applied) => return Some(Some(Ok(applied))),
                Err(error) => error,
            };
            metrics::counter!("stream_credits_database_errors_total").increment(1);
            if attempt == attempts_max {
                error!(
                    %error,
                    attempt,
                    message.id = message.message_id(),
                    user.id = message.user_id(),
                    "message failed on every attempt and is dead-lettered"
                );
                return Some(Some(Err(error)));
            }
            warn!(
                %error,
                attempt,
                message.id = message.message_id(),
                user.id = message.user_id(),
                "message failed, retrying it in place"
            );
            let pause = pauses.next().unwrap_or(RETRY_DELAY_MAX);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return None,
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn apply_traced(
        &self,
        conn: &mut sqlx::PgConnection,
        message: &Inbound,
        item: &Item,
    ) -> Result<Applied, LedgerError> {
        self.worker
            .ledger
            .apply(conn, message, &item.reply_to)
            .instrument(message_span(item))
            .await
    }

    async fn dead_letter_all(
        &self,
        items: &[Item],
        dispositions: &[Disposition],
    ) -> Result<(), SessionError> {
        for (item, disposition) in items.iter().zip(dispositions) {
            let Disposition::DeadLetter(rejection) = disposition else {
                continue;
            };
            let letter = DeadLetter {
                body: &item.delivery.data,
                properties: &item.delivery.properties,
                routing_key: item.delivery.routing_key.as_str(),
                reason: rejection.reason,
                detail: &rejection.detail,
            };
            let id = broker::dead_letter(&self.channel, &self.names, letter)
                .instrument(message_span(item))
                .await?;
            // A rejection made by the ledger comes from a decoded message,
            // whose id the decoder's partial read does not carry.
            let message_id = match &item.message {
                Ok(message) => Some(message.message_id()),
                Err(rejection) => rejection.partial.message_id.as_deref(),
            };
            metrics::counter!("stream_credits_dead_letters_total", "reason" => rejection.reason.code())
                .increment(1);
            warn!(
                reason = rejection.reason.code(),
                detail = %rejection.detail,
                dead_letter.id = %id,
                message.id = message_id.unwrap_or_default(),
                user.id = item.delivery.routing_key.as_str(),
                "message dead-lettered"
            );
        }
        Ok(())
    }

}

/// The dead-letter reason of a message that failed on every attempt. The
/// detail names the SQLSTATE only, because PostgreSQL's own message may
/// quote values from the message.
fn exhausted(error: &LedgerError, attempts: u32) -> Rejection {
    let detail = match error {
        LedgerError::Retryable(source) | LedgerError::Final(source) => {
            let code = source.as_database_error().and_then(|db| db.code().map(|code| code.into_owned()));
            format!(
                "applying failed {attempts} times in a row; last database error SQLSTATE {}",
                code.as_deref().unwrap_or("unknown")
            )
        }
        LedgerError::Panicked => format!("applying panicked {attempts} times in a row"),
    };
    Rejection {
        reason: messages::RejectReason::RetriesExhausted,
        detail,
        partial: Default::default(),
    }
}

/// Returns whether the delivery requests a reply (`reply_to` is set).
fn awaits_reply(delivery: &Delivery) -> bool {
    delivery.properties.reply_to().is_some()
}

fn reply_address(delivery: &Delivery) -> ReplyTo {
    let properties = &delivery.properties;
    ReplyTo {
        queue: properties
            .reply_to()
            .as_ref()
            .map(|queue| queue.as_str().to_owned())
            .filter(|queue| !queue.is_empty() && !queue.contains('\0')),
        // PostgreSQL text cannot hold NUL, and the outbox stores both.
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.contains('\0')),
    }
}

/// Builds the denial an invalid `stream.started` with a `reply_to` gets, so
/// its producer is not left waiting.
fn invalid_request_reply(rejection: &Rejection, reply_to: &ReplyTo) -> Option<Outgoing> {
    let queue = reply_to.queue.clone()?;
    let partial = &rejection.partial;
    if partial.type_name.as_deref().is_some_and(|kind| kind != "stream.started") {
        return None;
    }
    let denial = ReservationDenied {
        kind: Default::default(),
        event_id: uuid::Uuid::now_v7(),
        user_id: partial.user_id.clone(),
        stream_id: partial.stream_id.clone(),
        reason: DenialReason::InvalidRequest,
        requested: None,
        available: None,
        detail: Some(format!("{}: {}", rejection.reason.code(), rejection.detail)),
        retry_after_seconds: None,
    };
    Some(Outgoing {
        outbox_id: None,
        destination: ledger::Destination::Reply,
        routing_key: queue,
        correlation_id: reply_to.correlation_id.clone(),
        event_type: "reservation.denied".to_owned(),
        body: serde_json::to_value(&denial).expect("events serialize"),
    })
}

/// Rejects a message published with a routing key other than its
/// `user_id`: the hash exchange may have put it on another shard than the
/// user's other messages, so their order is lost.
fn routed_by_user(message: Inbound, routing_key: &str) -> Result<Inbound, Rejection> {
    if message.user_id() == routing_key {
        return Ok(message);
    }
    Err(Rejection {
        reason: messages::RejectReason::InvalidField,
        detail: "the routing key differs from field `user_id`; publish with routing key = user_id".to_owned(),
        partial: Box::new(message_ids(&message)),
    })
}

/// Returns the ids of a decoded message, for a reply to a start the
/// ledger rejected.
fn message_ids(message: &Inbound) -> PartialIds {
    PartialIds {
        type_name: Some(message.type_name().to_owned()),
        message_id: Some(message.message_id().to_owned()),
        user_id: Some(message.user_id().to_owned()),
        stream_id: message.stream_id().map(str::to_owned),
    }
}

/// Returns the span of one message, so every line logged about it carries
/// its ids. A message that failed validation carries the ids that could be
/// read.
fn message_span(item: &Item) -> Span {
    let (kind, message_id, user_id, stream_id) = match &item.message {
        Ok(message) => (
            message.type_name(),
            message.message_id(),
            message.user_id(),
            message.stream_id().unwrap_or_default(),
        ),
        Err(rejection) => {
            let partial = &rejection.partial;
            (
                partial.type_name.as_deref().unwrap_or_default(),
                partial.message_id.as_deref().unwrap_or_default(),
                partial.user_id.as_deref().unwrap_or_default(),
                partial.stream_id.as_deref().unwrap_or_default(),
            )
        }
    };
    info_span!(
        "message",
        message.id = message_id,
        message.type = kind,
        user.id = user_id,
        stream.id = stream_id,
    )
}

/// Returns the histogram of the time from receipt to the published reply
/// of a start or settlement event of an end. Other messages publish
/// nothing a producer waits on.
fn latency_histogram(message: &Inbound) -> Option<&'static str> {
    match message {
        Inbound::StreamStarted(_) => Some("stream_credits_reservation_latency_seconds"),
        Inbound::StreamEnded(_) => Some("stream_credits_settle_latency_seconds"),
        Inbound::ChunkEmitted(_) | Inbound::CreditsGranted(_) => None,
    }
}

fn record_outcome(item: &Item, outcome: &Outcome) {
    let Ok(message) = &item.message else {
        return;
    };
    let label = match outcome {
        Outcome::Applied => "applied",
        Outcome::Duplicate => "duplicate",
        Outcome::Dropped(reason) => {
            metrics::counter!("stream_credits_dropped_total", "reason" => reason.code()).increment(1);
            debug!(reason = reason.code(), message.id = message.message_id(), "message dropped");
            "dropped"
        }
        Outcome::DeadLetter(_) => "dead_lettered",
    };
    metrics::counter!(
        "stream_credits_messages_total",
        "type" => message.type_name(),
        "outcome" => label
    )
    .increment(1);
}

fn outbox_ids(outgoing: &[Outgoing]) -> Vec<i64> {
    outgoing.iter().filter_map(|message| message.outbox_id).collect()
}

/// An entry the shards send to the background marker.
enum ToMark {
    /// Outbox rows sent by one batch, marked once the broker confirms
    /// every message of the batch.
    Published { confirms: broker::Confirms, ids: Vec<i64> },
    /// A request, replied to once every row sent before it is marked or
    /// left to the relay.
    Flush(oneshot::Sender<()>),
}

impl ToMark {
    /// Adds the ids of confirmed rows to `ids`. Rows the broker did not
    /// confirm are left to the relay.
    async fn confirmed_ids(self, ids: &mut Vec<i64>) {
        let Self::Published { confirms, ids: sent } = self else {
            return;
        };
        match tokio::time::timeout(CONFIRM_WAIT, confirms.wait()).await {
            Ok(Ok(())) => ids.extend(sent),
            Ok(Err(error)) => warn!(%error, rows = sent.len(), "messages not confirmed by the broker; the relay will send them again"),
            Err(_) => warn!(?CONFIRM_WAIT, rows = sent.len(), "broker confirm timed out; the relay will send the messages again"),
        }
    }
}

/// Marks the rows that shards send once the broker has confirmed them,
/// joining the batches that arrive within `MARK_LINGER` of the first into
/// one statement. A flush request or `stop` ends the wait at once. After
/// `stop`, marks what is left and returns.
async fn mark_in_background(pool: PgPool, mut unmarked: mpsc::Receiver<ToMark>, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            biased;
            next = unmarked.recv() => match next {
                Some(first) => Some(first),
                None => return,
            },
            () = stop.cancelled() => None,
        };
        let until = tokio::time::Instant::now() + MARK_LINGER;
        let mut ids = Vec::new();
        let mut flushes = Vec::new();
        let mut next = first.or_else(|| unmarked.try_recv().ok());
        loop {
            while let Some(entry) = next.take() {
                match entry {
                    ToMark::Flush(answer) => flushes.push(answer),
                    published => published.confirmed_ids(&mut ids).await,
                }
                if ids.len() < MARK_ROWS_MAX {
                    next = unmarked.try_recv().ok();
                }
            }
            if !flushes.is_empty() || stop.is_cancelled() || ids.len() >= MARK_ROWS_MAX {
                break;
            }
            next = tokio::select! {
                biased;
                () = stop.cancelled() => None,
                next = unmarked.recv() => next,
                () = tokio::time::sleep_until(until) => None,
            };
            if next.is_none() {
                break;
            }
        }
        mark_published(&pool, &ids).await;
        for answer in flushes {
            let _ = answer.send(());
        }
        if stop.is_cancelled() && unmarked.is_empty() {
            return;
        }
    }
}

/// Marks published outbox rows. A failure only means the relay publishes
/// them again later with the same event ids, which consumers drop.
async fn mark_published(pool: &PgPool, ids: &[i64]) {
    if ids.is_empty() {
        return;
    }
    let result = async {
        let mut tx = pool.begin().await?;
        ledger::mark_published(&mut tx, ids).await?;
        tx.commit().await?;
        Ok::<_, LedgerError>(())
    }
    .await;
    if let Err(error) = result {
        warn!(%error, rows = ids.len(), "cannot mark outbox rows published; the relay will send them again");
    }
}

/// The expiry sweep, the outbox relay and the retention job, on one
/// confirm channel.
struct Maintenance {
    worker: Worker,
    names: Arc<Names>,
    channel: Channel,
    stop: CancellationToken,
}

impl Maintenance {
    async fn run(self) -> Result<(), SessionError> {
        let sweep_every = Duration::from_secs(self.worker.settings.reservations.sweep_interval_seconds);
        let mut sweep = tokio::time::interval(sweep_every);
        let mut relay = tokio::time::interval(RELAY_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        relay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first run waits a whole interval: a worker that restarts
        // often would otherwise run the job at every start.
        let retain_every = Duration::from_secs(self.worker.settings.retention.interval_seconds);
        let mut retain = (!retain_every.is_zero())
            .then(|| tokio::time::interval_at(tokio::time::Instant::now() + retain_every, retain_every));
        if let Some(retain) = retain.as_mut() {
            retain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                _ = sweep.tick() => self.sweep().await?,
                _ = relay.tick() => self.relay().await?,
                _ = async { retain.as_mut().expect("checked by the condition").tick().await }, if retain.is_some() => {
                    if self.retain().await {
                        retain.as_mut().expect("ticked above").reset_after(RETENTION_RESUME_AFTER);
                    }
                }
            }
        }
    }

    /// Deletes the chunk records that no copy can need, a batch at a
    /// time, until none is left, shutdown comes or `RETENTION_RUN_MAX`
    /// has passed. Returns whether records are left for a run soon after,
    /// once the sweep and the relay have had their turn. Database errors
    /// are logged and left to the next interval.
    async fn retain(&self) -> bool {
        let until = Instant::now() + RETENTION_RUN_MAX;
        let run = retention::remove_all(&self.worker.pool, RETENTION_BATCH_MAX, || {
            !self.stop.is_cancelled() && Instant::now() < until
        })
        .await;
        if run.removed > 0 {
            metrics::counter!("stream_credits_chunk_records_deleted_total").increment(run.removed);
            info!(records = run.removed, finished = run.finished, "deleted chunk records of settled streams");
        }
        if let Some(error) = run.error {
            metrics::counter!("stream_credits_database_errors_total").increment(1);
            warn!(%error, "retention job failed, retrying at the next interval");
            return false;
        }
        !run.finished
    }

    /// Expires idle holds a page at a time until a page finds none.
    /// Database errors are logged and left to the next tick. Holds that
    /// fail to settle are left to the next tick too, and the later pages
    /// pass over them, so any number of them leaves the rest to expire.
    async fn sweep(&self) -> Result<(), SessionError> {
        let mut failed = Vec::new();
        loop {
            let result = async {
                let mut tx = self.worker.pool.begin().await?;
                let expiry = self.worker.ledger.expire_idle(&mut tx, SWEEP_BATCH_MAX, &failed).await?;
                tx.commit().await?;
                Ok::<_, LedgerError>(expiry)
            }
            .await;
            let expiry = match result {
                Ok(expiry) => expiry,
                Err(error) => {
                    metrics::counter!("stream_credits_database_errors_total").increment(1);
                    warn!(%error, "expiry sweep failed, retrying at the next interval");
                    return Ok(());
                }
            };
            if expiry.expired == 0 && expiry.failed.is_empty() {
                return Ok(());
            }
            metrics::counter!("stream_credits_expiry_failures_total").increment(expiry.failed.len() as u64);
            failed.extend(expiry.failed);
            if expiry.expired > 0 {
                metrics::counter!("stream_credits_holds_expired_total").increment(expiry.expired as u64);
                info!(holds = expiry.expired, "expired idle holds");
                broker::publish_outgoing(&self.channel, &self.names, &expiry.outgoing).await?;
                mark_published(&self.worker.pool, &outbox_ids(&expiry.outgoing)).await;
            }
        }
    }

    /// Publishes outbox rows left unmarked for `RELAY_AGE_SECONDS`, a
    /// batch at a time until fewer than a full batch are left, an error
    /// stops the pass or shutdown comes. The rows stay locked until they
    /// are marked, so two relays never send one row at the same time.
    async fn relay(&self) -> Result<(), SessionError> {
        while !self.stop.is_cancelled() {
            let result = async {
                let mut tx = self.worker.pool.begin().await?;
                let rows = ledger::lock_unpublished(&mut tx, RELAY_AGE_SECONDS, SWEEP_BATCH_MAX).await?;
                Ok::<_, LedgerError>((tx, rows))
            }
            .await;
            let (mut tx, rows) = match result {
                Ok(found) => found,
                Err(error) => {
                    warn!(%error, "outbox relay cannot read the database, retrying later");
                    return Ok(());
                }
            };
            if rows.is_empty() {
                return Ok(());
            }
            broker::publish_outgoing(&self.channel, &self.names, &rows).await?;
            let ids: Vec<i64> = rows.iter().filter_map(|row| row.outbox_id).collect();
            let marked = async {
                ledger::mark_published(&mut tx, &ids).await?;
                tx.commit().await?;
                Ok::<_, LedgerError>(())
            }
            .await;
            if let Err(error) = marked {
                warn!(%error, "cannot mark relayed rows; they will be sent again");
                return Ok(());
            }
            info!(rows = ids.len(), "relayed unpublished replies and events");
            if (rows.len() as i64) < SWEEP_BATCH_MAX {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn retry_pause_stays_below_maximum() {
        let delays: Vec<Duration> = backoff().build().take(200).collect();
        assert_eq!(delays.len(), 200);
        for delay in delays {
            assert!(delay <= RETRY_DELAY_MAX, "{delay:?}");
        }
    }
}
