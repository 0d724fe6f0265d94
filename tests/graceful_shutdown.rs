//! SIGTERM of the worker process under load, three times in a row. Each
//! time the process drains and exits 0 within its shutdown timeout, and a
//! new process takes over. In the end every stream settled once at its
//! exact cost, with nothing dead-lettered.
//!
//! The worker runs as the built binary in a child process. The harness's
//! in-process worker reaches the broker only through a proxy that stays
//! cut, so it never consumes, and the harness is used for its database,
//! topology, publisher and collectors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Harness;
use common::process::{
    Load, LoadShape, ScratchDir, TcpProxy, WorkerProcess, assert_settled_exactly_once,
    shards_consumed, worker_environment,
};
use sqlx::Row;
use stream_credits::settings::SecretUrl;

const STOPS: usize = 3;

/// `worker.shutdown_timeout_seconds` of the worker process.
const SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;

/// Time a stopped process may take beyond its shutdown timeout: the
/// database pool and the broker connection are each closed within 5 s
/// after the drain.
const EXIT_MARGIN: Duration = Duration::from_secs(10);

/// Pauses between the moment a worker consumes every shard and its
/// SIGTERM, one per stop, so the signal lands at different points of the
/// streams.
const STOP_AFTER: [Duration; STOPS] = [
    Duration::from_millis(2_500),
    Duration::from_millis(1_700),
    Duration::from_millis(3_100),
];

const LOAD_AFTER: Duration = Duration::from_secs(2);

/// Maximum wait for a new worker process to subscribe to every shard. A
/// debug build takes a few seconds to load its settings, because that
/// builds the tokenizer tables.
const CONSUME_WAIT: Duration = Duration::from_secs(30);

/// Maximum wait for the last streams to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Age at which the worker's outbox relay takes an unpublished row as lost
/// and sends it, `RELAY_AGE_SECONDS` in src/worker.rs.
const RELAY_AGE: Duration = Duration::from_secs(10);

const SHAPE: LoadShape = LoadShape {
    users: 20,
    chunks_per_stream: 30,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(30),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_settles_every_stream_once() {
    let scratch = ScratchDir::new("sc-sigterm");
    let log = scratch.path().join("worker.log");
    let unreachable = TcpProxy::start("127.0.0.1:5672").await;
    unreachable.cut();
    let unreachable_url = format!("amqp://guest:guest@{}/%2f", unreachable.address());

    let mut environment = Vec::new();
    let mut worker = None;
    let harness = Harness::start("sigterm", |settings| {
        settings.worker.shutdown_timeout_seconds = SHUTDOWN_TIMEOUT_SECONDS;
        environment = worker_environment(settings);
        settings.amqp.url = SecretUrl::new(unreachable_url);
        worker = Some(WorkerProcess::spawn(&environment, scratch.path(), &log));
    })
    .await;
    let mut worker = worker.expect("the worker process was started");
    let users = Load::fund(&harness, "sigterm", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);

    let exit_limit = Duration::from_secs(SHUTDOWN_TIMEOUT_SECONDS) + EXIT_MARGIN;
    for (stop, pause) in STOP_AFTER.iter().enumerate() {
        let stop = stop + 1;
        // The stop comes while the worker consumes, so that it has
        // deliveries in flight to drain.
        wait_until_consuming(&harness).await;
        tokio::time::sleep(*pause).await;
        if let Some(status) = worker.exited() {
            panic!(
                "the worker exited by itself with {status} before stop {stop}; see {}",
                log.display()
            );
        }
        let signalled = Instant::now();
        // `terminate` fails the test when the process is still running
        // after `exit_limit`.
        let status = worker.terminate(exit_limit).await;
        let exit_time = signalled.elapsed();
        eprintln!("stop {stop} of {STOPS}: exited with {status} {exit_time:?} after SIGTERM");
        assert!(
            status.success(),
            "stop {stop}: the worker exited with {status} after SIGTERM; see {}",
            log.display()
        );
        worker = WorkerProcess::spawn(&environment, scratch.path(), &log);
    }

    wait_until_consuming(&harness).await;
    tokio::time::sleep(LOAD_AFTER).await;
    let published = load.finish().await;
    eprintln!(
        "published {} streams of {} users in {} messages",
        published.streams.len(),
        published.users.len(),
        published.messages
    );
    assert_settled_exactly_once(&harness, &harness.pool, &published, SETTLE_WAIT).await;
    assert_outbox_published_in_batch(&harness).await;

    let status = worker
        .terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECONDS) + EXIT_MARGIN)
        .await;
    assert!(
        status.success(),
        "the last worker exited with {status} after SIGTERM; see {}",
        log.display()
    );
    // A clean stop logs no error, lapin's included.
    let logged = std::fs::read_to_string(&log).expect("read the worker log");
    let errors: Vec<&str> = logged.lines().filter(|line| line.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "errors logged across the stops: {errors:#?}");
    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
}

/// Waits until every shard queue has a consumer. Only one worker process
/// runs at a time, so the consumer is the newest process.
async fn wait_until_consuming(harness: &Harness) {
    let started = Instant::now();
    while !shards_consumed(harness).await {
        assert!(
            started.elapsed() < CONSUME_WAIT,
            "the new worker did not consume every shard within {CONSUME_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that the worker published every reply and event itself, right
/// after its batch committed. A drained stop loses no publish, so the
/// outbox relay, which sends only rows left unpublished for
/// [`RELAY_AGE`], must have had nothing to send.
async fn assert_outbox_published_in_batch(harness: &Harness) {
    let row = sqlx::query(
        "SELECT count(*) AS total, \
                count(*) FILTER (WHERE published_at IS NULL) AS unpublished, \
                count(*) FILTER (WHERE published_at >= created_at + make_interval(secs => $1)) \
                    AS late \
         FROM outbox",
    )
    .bind(RELAY_AGE.as_secs_f64())
    .fetch_one(&harness.pool)
    .await
    .expect("count the outbox rows");
    let total: i64 = row.get("total");
    let unpublished: i64 = row.get("unpublished");
    let late: i64 = row.get("late");
    eprintln!("{total} outbox rows");
    assert!(total > 0, "the outbox is empty");
    assert_eq!(unpublished, 0, "outbox rows never marked published");
    assert_eq!(
        late, 0,
        "outbox rows published {RELAY_AGE:?} or more after their commit, by the relay"
    );
}
