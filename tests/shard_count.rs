//! A worker started with fewer shards than the queues of its prefix exits
//! 2 and names the queue: the hash exchange still routes users to that
//! queue, and no worker would read it.

mod common;

use common::{Harness, database_url, run_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_shards_exit_2() {
    // The harness's worker declares the prefix with two shards.
    let harness = Harness::start("shardcount", |_| {}).await;
    let topology = &harness.settings.topology;
    assert_eq!(topology.shards, 2);
    let url = database_url(harness.database_name());
    let delivery_limit = topology.delivery_limit.to_string();

    let output = run_binary(
        &["run"],
        &[
            ("STREAM_CREDITS__DATABASE__URL", url.as_str()),
            ("STREAM_CREDITS__TOPOLOGY__PREFIX", topology.prefix.as_str()),
            ("STREAM_CREDITS__TOPOLOGY__SHARDS", "1"),
            ("STREAM_CREDITS__TOPOLOGY__DELIVERY_LIMIT", delivery_limit.as_str()),
            ("STREAM_CREDITS__HTTP__LISTEN", ""),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let queue = format!("{}.events.shard.1", topology.prefix);
    assert!(stderr.contains(&queue), "stderr: {stderr}");
    assert!(stderr.contains("topology.shards is 1"), "stderr: {stderr}");
    harness.finish().await;
}
