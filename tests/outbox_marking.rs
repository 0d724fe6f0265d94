//! A batch is acknowledged without waiting for its outbox rows' confirms,
//! and each row is marked published once the broker confirms it, long
//! before the outbox relay would take the row as lost and send it again.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, ROUND_MODEL, end, start};
use stream_credits::messages::EndStatus;

/// Maximum wait for the rows to be marked. The relay sends only rows left
/// unmarked for 10 s (`RELAY_AGE_SECONDS` in src/worker.rs), so a row
/// marked within this wait was marked after its own confirm.
const MARK_WAIT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_rows_are_marked_promptly() {
    let harness = Harness::start("marking", |_| {}).await;
    let user = "u-marking";
    harness.fund(user, "g-1", 10_000).await;

    let granted = harness
        .request(&start(user, "s-1", "m-1", ROUND_MODEL, 10, 100), "c-1")
        .await;
    assert_eq!(granted["type"], "reservation.granted", "{granted}");
    harness
        .publish(&end(user, "s-1", "m-2", EndStatus::Completed, None))
        .await;
    let settled = harness.event("reservation.settled", "s-1").await;
    assert_eq!(settled["type"], "reservation.settled", "{settled}");

    let waited = Instant::now();
    let (total, unmarked) = loop {
        let total = harness.count("SELECT count(*) FROM outbox").await;
        let unmarked = harness.count("SELECT count(*) FROM outbox WHERE published_at IS NULL").await;
        if unmarked == 0 || waited.elapsed() > MARK_WAIT {
            break (total, unmarked);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(total >= 2, "the grant and the settlement have outbox rows: {total}");
    assert_eq!(unmarked, 0, "outbox rows still unmarked after {MARK_WAIT:?}");

    harness.finish().await;
}
