//! A 30-second PostgreSQL outage under load dead-letters nothing, and
//! every stream settles once at its exact cost when the server is back.
//!
//! The worker's database lives on a PostgreSQL cluster that the test
//! creates, stops with `pg_ctl stop -m fast` and starts again, so the
//! outage reaches only this test.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Harness;
use common::process::{Load, LoadShape, PgCluster, assert_settled_exactly_once};
use sqlx::{Connection, PgConnection, PgPool};
use stream_credits::invariants;
use stream_credits::settings::SecretUrl;

const OUTAGE: Duration = Duration::from_secs(30);

/// Load before the outage and after the server is back.
const LOAD_BEFORE: Duration = Duration::from_secs(4);
const LOAD_AFTER: Duration = Duration::from_secs(3);

/// Maximum wait for the backlog to settle after the load stops. A shard
/// retries its batch with backoff of at most 30 s, plus the time to apply
/// what piled up during the outage.
const SETTLE_WAIT: Duration = Duration::from_secs(45);

const SHAPE: LoadShape = LoadShape {
    users: 20,
    chunks_per_stream: 30,
    tick: Duration::from_millis(100),
    wind_down_max: Duration::from_secs(30),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_settles_every_stream_once() {
    let cluster = PgCluster::start().await;
    let mut worker_url = String::new();
    let harness = Harness::start("pgdown", |settings| {
        let database = settings
            .database
            .url
            .expose()
            .rsplit('/')
            .next()
            .expect("a database URL names the database")
            .to_owned();
        worker_url = cluster.url(&database);
        settings.database.url = SecretUrl::new(worker_url.clone());
    })
    .await;
    // The harness's own pool reaches the shared server, so the checks read
    // the cluster through a pool of their own.
    let pool = PgPool::connect(&worker_url)
        .await
        .expect("connect to the test cluster");
    let users = Load::fund(&harness, "pgdown", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);

    tokio::time::sleep(LOAD_BEFORE).await;
    pool.close().await;
    cluster.stop().await;
    let stopped_at = Instant::now();
    tokio::time::sleep(OUTAGE.saturating_sub(Duration::from_secs(1))).await;
    let during = harness.take_dead_letters().await;
    assert!(
        during.is_empty(),
        "{} messages were dead-lettered during the outage",
        during.len()
    );
    tokio::time::sleep(OUTAGE.saturating_sub(stopped_at.elapsed())).await;
    cluster.resume().await;
    eprintln!("the cluster was down for {:?}", stopped_at.elapsed());

    tokio::time::sleep(LOAD_AFTER).await;
    let published = load.finish().await;
    eprintln!(
        "published {} streams of {} users in {} messages",
        published.streams.len(),
        published.users.len(),
        published.messages
    );
    let pool = PgPool::connect(&worker_url)
        .await
        .expect("connect to the test cluster again");
    let settling = Instant::now();
    assert_settled_exactly_once(&harness, &pool, &published, SETTLE_WAIT).await;
    eprintln!(
        "the checks passed {:?} after the load stopped",
        settling.elapsed()
    );
    pool.close().await;

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
    let mut conn = PgConnection::connect(&worker_url)
        .await
        .expect("connect to the test cluster for the invariant checks");
    let violations = invariants::check(&mut conn)
        .await
        .expect("run the invariant checks");
    assert!(
        violations.is_empty(),
        "ledger invariants are broken on the test cluster: {violations:#?}"
    );
    let _ = conn.close().await;
}
