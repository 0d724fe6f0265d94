//! SIGKILL of the worker process at random moments under load: after each
//! restart it picks up where the killed process stopped, and in the end
//! every stream settled once at its exact cost.
//!
//! The worker runs as the built binary in a child process. The harness's
//! in-process worker reaches the broker only through a proxy that stays
//! cut, so it never consumes, and the harness is used for its database,
//! topology, publisher and collectors.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use common::process::{
    Load, LoadShape, ScratchDir, TcpProxy, WorkerProcess, assert_settled_exactly_once,
    worker_environment,
};
use stream_credits::settings::SecretUrl;

const KILLS: usize = 8;

/// Range of the pause between a start of the worker and its SIGKILL, in
/// milliseconds.
const KILL_AFTER_MS: std::ops::Range<u64> = 1_000..4_000;

/// Seed of the kill moments, so a failing run can be repeated.
const SEED: u64 = 0x5eed_c0de_2026;

const LOAD_AFTER: Duration = Duration::from_secs(2);

/// Maximum wait for the last streams to settle and for the events that
/// the outbox relay sends about 10 to 15 s after a crash lost a publish.
const SETTLE_WAIT: Duration = Duration::from_secs(40);

const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

const SHAPE: LoadShape = LoadShape {
    users: 20,
    chunks_per_stream: 30,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(30),
};

/// SplitMix64, a small seeded generator, which is all the kill moments need.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn in_range(&mut self, range: &std::ops::Range<u64>) -> u64 {
        range.start + self.next() % (range.end - range.start)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_settles_every_stream_once() {
    let scratch = ScratchDir::new("sc-sigkill");
    let log = scratch.path().join("worker.log");
    let unreachable = TcpProxy::start("127.0.0.1:5672").await;
    unreachable.cut();
    let unreachable_url = format!("amqp://guest:guest@{}/%2f", unreachable.address());

    let mut environment = Vec::new();
    let mut worker = None;
    let harness = Harness::start("sigkill", |settings| {
        environment = worker_environment(settings);
        settings.amqp.url = SecretUrl::new(unreachable_url);
        worker = Some(WorkerProcess::spawn(&environment, scratch.path(), &log));
    })
    .await;
    let mut worker = worker.expect("the worker process was started");
    let users = Load::fund(&harness, "sigkill", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);

    let mut random = SplitMix64(SEED);
    for kill in 1..=KILLS {
        let pause = Duration::from_millis(random.in_range(&KILL_AFTER_MS));
        tokio::time::sleep(pause).await;
        if let Some(status) = worker.exited() {
            panic!(
                "the worker exited by itself with {status} before kill {kill}; see {}",
                log.display()
            );
        }
        worker.kill().await;
        eprintln!("kill {kill} of {KILLS}, {pause:?} after the start");
        worker = WorkerProcess::spawn(&environment, scratch.path(), &log);
    }

    tokio::time::sleep(LOAD_AFTER).await;
    let published = load.finish().await;
    eprintln!(
        "published {} streams of {} users in {} messages",
        published.streams.len(),
        published.users.len(),
        published.messages
    );
    assert_settled_exactly_once(&harness, &harness.pool, &published, SETTLE_WAIT).await;

    let status = worker.terminate(SHUTDOWN_WAIT).await;
    assert!(
        status.success(),
        "the worker exited with {status} after SIGTERM; see {}",
        log.display()
    );
    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
}
