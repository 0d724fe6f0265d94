//! Two worker processes share 4 shard queues: A has home shards 0 and 1,
//! B has 2 and 3. Each consumes its home shards at once and subscribes to
//! the other shards as a standby after the standby delay. When A is
//! killed under load, B takes over A's shards, and in the end every stream
//! settled once at its exact cost.
//!
//! RabbitMQ's single active consumer decides which subscriber of a shard
//! queue gets its messages. The test reads that choice with `rabbitmqctl
//! list_consumers`, and finds the process behind each consumer through
//! the client port of the consumer's channel and the process's
//! environment. The harness's in-process worker reaches the broker only
//! through a proxy that stays cut, so it never consumes.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::process::{
    Load, LoadShape, ScratchDir, TcpProxy, WorkerProcess, assert_settled_exactly_once,
    worker_environment,
};
use common::{Harness, amqp_connect, close_connection};
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use sqlx::Row;
use stream_credits::settings::SecretUrl;
use stream_credits::topology::Names;
use tokio::process::Command;

const SHARDS: u16 = 4;

/// `worker.home_shards` of process A, as the environment gives it.
const HOME_A: &str = "0,1";

/// `worker.home_shards` of process B.
const HOME_B: &str = "2,3";

const STANDBY_DELAY_SECONDS: u64 = 2;

const HOME_SHARDS_VARIABLE: &str = "STREAM_CREDITS__WORKER__HOME_SHARDS";

/// Maximum wait for the consumers of the shard queues to reach an
/// expected layout. A debug build takes a few seconds to start, because
/// loading its settings builds the tokenizer tables.
const LAYOUT_WAIT: Duration = Duration::from_secs(30);

/// Maximum run time of one `rabbitmqctl` command.
const RABBITMQCTL_WAIT: Duration = Duration::from_secs(20);

/// Time the load runs before A is killed.
const KILL_AFTER: Duration = Duration::from_secs(3);

/// Time the load runs after B took over A's shards, long enough for every
/// user to run a few whole streams.
const LOAD_AFTER_TAKEOVER: Duration = Duration::from_secs(5);

/// Maximum wait for the last streams to settle and for the events that
/// the outbox relay sends about 10 to 15 s after the kill lost a publish.
const SETTLE_WAIT: Duration = Duration::from_secs(40);

const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// Time without a delivery after which a shard queue counts as read to
/// the end. The probes were confirmed before, so they are all enqueued.
const PROBE_IDLE: Duration = Duration::from_millis(500);

/// AMQP port of the local RabbitMQ, which the worker processes connect to
/// directly.
const AMQP_PORT: u16 = 5672;

const SHAPE: LoadShape = LoadShape {
    users: 20,
    chunks_per_stream: 30,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(30),
};

/// One consumer of a shard queue as RabbitMQ lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ShardConsumer {
    /// `worker.home_shards` of the process that owns the consumer, or
    /// `unknown` when no child process of this test owns its connection.
    owner: String,
    /// True while single active consumer delivers to this consumer.
    active: bool,
}

/// Consumers of every shard queue by shard index, each list sorted.
type Layout = BTreeMap<u16, Vec<ShardConsumer>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_killed_workers_shards() {
    let scratch = ScratchDir::new("sc-two-workers");
    let log_a = scratch.path().join("worker-a.log");
    let log_b = scratch.path().join("worker-b.log");
    let unreachable = TcpProxy::start("127.0.0.1:5672").await;
    unreachable.cut();
    let unreachable_url = format!("amqp://guest:guest@{}/%2f", unreachable.address());

    let mut workers = None;
    let harness = Harness::start("two_workers", |settings| {
        settings.topology.shards = SHARDS;
        let common = worker_environment(settings);
        settings.amqp.url = SecretUrl::new(unreachable_url);
        let environment_a = with_home_shards(&common, HOME_A);
        let environment_b = with_home_shards(&common, HOME_B);
        workers = Some((
            WorkerProcess::spawn(&environment_a, scratch.path(), &log_a),
            WorkerProcess::spawn(&environment_b, scratch.path(), &log_b),
        ));
    })
    .await;
    let (mut worker_a, mut worker_b) = workers.expect("both worker processes were started");

    // Each home shard has its home process active and the other process
    // waiting, once both standby subscriptions are made.
    let startup: Layout = (0..SHARDS)
        .map(|shard| {
            let (home, other) = if shard < 2 {
                (HOME_A, HOME_B)
            } else {
                (HOME_B, HOME_A)
            };
            (
                shard,
                sorted(vec![consumer(home, true), consumer(other, false)]),
            )
        })
        .collect();
    wait_for_layout(&harness.names, &startup, "after startup").await;

    let users = Load::fund(&harness, "twoworkers", SHAPE).await;
    let harness = Arc::new(harness);
    let load = Load::start(harness.clone(), users, SHAPE);
    tokio::time::sleep(KILL_AFTER).await;
    for (name, worker, log) in [("A", &mut worker_a, &log_a), ("B", &mut worker_b, &log_b)] {
        if let Some(status) = worker.exited() {
            panic!(
                "worker {name} exited by itself with {status}; see {}",
                log.display()
            );
        }
    }
    worker_a.kill().await;
    let killed_at = database_now(&harness).await;
    eprintln!("killed worker A at {killed_at}");

    // B's standby consumers on shards 0 and 1 become active.
    let takeover: Layout = (0..SHARDS)
        .map(|shard| (shard, vec![consumer(HOME_B, true)]))
        .collect();
    wait_for_layout(&harness.names, &takeover, "after A was killed").await;
    tokio::time::sleep(LOAD_AFTER_TAKEOVER).await;

    let published = load.finish().await;
    eprintln!(
        "published {} streams of {} users in {} messages",
        published.streams.len(),
        published.users.len(),
        published.messages
    );
    assert_settled_exactly_once(&harness, &harness.pool, &published, SETTLE_WAIT).await;

    let status = worker_b.terminate(SHUTDOWN_WAIT).await;
    assert!(
        status.success(),
        "worker B exited with {status} after SIGTERM; see {}",
        log_b.display()
    );

    // With no worker consuming, probe messages stay in the shard queues
    // and show where the exchange routes each user.
    let shard_of_user = shards_of_users(&harness.names, &published.users).await;
    let users_of_a: Vec<&String> = shard_of_user
        .iter()
        .filter(|(_, shard)| **shard < 2)
        .map(|(user, _)| user)
        .collect();
    eprintln!(
        "{} of {} users hash onto A's shards",
        users_of_a.len(),
        shard_of_user.len()
    );
    assert!(
        !users_of_a.is_empty(),
        "no user hashes onto shard 0 or 1, so the takeover carried no stream: {shard_of_user:?}"
    );
    let opened_after_kill = streams_opened_since(&harness, killed_at).await;
    for user in users_of_a {
        assert!(
            opened_after_kill.get(user).copied().unwrap_or_default() > 0,
            "user {user} hashes onto shard {} of A, but none of its streams was opened \
             after A was killed",
            shard_of_user[user]
        );
    }

    let harness = Arc::into_inner(harness).expect("the load released the harness");
    harness.finish().await;
}

fn with_home_shards(common: &[(String, String)], home_shards: &str) -> Vec<(String, String)> {
    let mut environment = common.to_vec();
    environment.push((HOME_SHARDS_VARIABLE.to_owned(), home_shards.to_owned()));
    environment.push((
        "STREAM_CREDITS__WORKER__STANDBY_DELAY_SECONDS".to_owned(),
        STANDBY_DELAY_SECONDS.to_string(),
    ));
    environment
}

fn consumer(owner: &str, active: bool) -> ShardConsumer {
    ShardConsumer {
        owner: owner.to_owned(),
        active,
    }
}

fn sorted(mut consumers: Vec<ShardConsumer>) -> Vec<ShardConsumer> {
    consumers.sort();
    consumers
}

/// Polls the consumers of the shard queues until they match `expected`,
/// and fails with the last layout seen after [`LAYOUT_WAIT`].
async fn wait_for_layout(names: &Names, expected: &Layout, moment: &str) {
    let started = Instant::now();
    loop {
        let layout = shard_consumers(names).await;
        if &layout == expected {
            eprintln!(
                "consumers {moment} as expected after {:?}",
                started.elapsed()
            );
            return;
        }
        assert!(
            started.elapsed() < LAYOUT_WAIT,
            "consumers of the shard queues {moment}, after {LAYOUT_WAIT:?}:\n{layout:#?}\n\
             expected:\n{expected:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads every consumer of the test's shard queues from `rabbitmqctl`
/// and names the process that owns each.
async fn shard_consumers(names: &Names) -> Layout {
    let queues: BTreeMap<String, u16> = (0..SHARDS)
        .map(|shard| (names.shard(shard), shard))
        .collect();
    let consumers = rabbitmqctl(&["list_consumers", "queue_name", "channel_pid", "active"]).await;
    let channels = rabbitmqctl(&["list_channels", "pid", "name"]).await;

    // A channel's name starts with the client's address, such as
    // `127.0.0.1:40312 -> 127.0.0.1:5672 (1)`.
    let client_ports: BTreeMap<&str, u16> = channels
        .lines()
        .filter_map(|line| {
            let (pid, name) = line.split_once('\t')?;
            let client = name.split(" -> ").next()?;
            let port = client.rsplit(':').next()?.parse().ok()?;
            Some((pid, port))
        })
        .collect();

    let mut layout = Layout::new();
    for line in consumers.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [queue, channel, active] = fields[..] else {
            panic!("rabbitmqctl list_consumers printed an unexpected line: {line:?}");
        };
        let Some(shard) = queues.get(queue) else {
            continue;
        };
        let owner = client_ports
            .get(channel)
            .and_then(|port| home_shards_of_port(*port))
            .unwrap_or_else(|| "unknown".to_owned());
        layout.entry(*shard).or_default().push(ShardConsumer {
            owner,
            active: active == "true",
        });
    }
    for consumers in layout.values_mut() {
        consumers.sort();
    }
    layout
}

/// Runs `rabbitmqctl --silent` with `arguments` and returns its output,
/// one tab-separated row a line, without headers.
async fn rabbitmqctl(arguments: &[&str]) -> String {
    let run = Command::new("rabbitmqctl")
        .arg("--silent")
        .args(arguments)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RABBITMQCTL_WAIT, run)
        .await
        .unwrap_or_else(|_| {
            panic!("rabbitmqctl {arguments:?} did not finish within {RABBITMQCTL_WAIT:?}")
        })
        .unwrap_or_else(|error| {
            panic!("cannot run rabbitmqctl: {error}; it must be on PATH and reach the local node")
        });
    assert!(
        output.status.success(),
        "rabbitmqctl {arguments:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("rabbitmqctl prints UTF-8")
}

/// Returns the `worker.home_shards` environment value of the child
/// process of this test whose TCP socket to RabbitMQ has the local port
/// `port`. Linux only, because it reads `/proc`.
fn home_shards_of_port(port: u16) -> Option<String> {
    let socket = format!("socket:[{}]", socket_inode(port)?);
    child_processes().into_iter().find_map(|pid| {
        let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        let owns_socket = descriptors.flatten().any(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == socket.as_str())
        });
        owns_socket.then(|| environment_value(pid, HOME_SHARDS_VARIABLE))?
    })
}

/// Returns the inode of the IPv4 socket from local port `port` to the
/// AMQP port, from `/proc/net/tcp`.
fn socket_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Addresses are `hex address:hex port`, and the inode is field 9.
        let port_of = |address: &str| {
            let (_, hex) = address.split_once(':')?;
            u16::from_str_radix(hex, 16).ok()
        };
        let local = port_of(fields.get(1)?)?;
        let remote = port_of(fields.get(2)?)?;
        if local != port || remote != AMQP_PORT {
            return None;
        }
        fields.get(9)?.parse().ok()
    })
}

/// Returns the ids of the processes whose parent is this test process.
fn child_processes() -> Vec<u32> {
    let parent = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The parent id is the second field after the parenthesized
            // command name, which may itself contain spaces.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, after_name)) = stat.rsplit_once(')') else {
                return false;
            };
            after_name
                .split_whitespace()
                .nth(1)
                .and_then(|field| field.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

fn environment_value(pid: u32, variable: &str) -> Option<String> {
    let environment = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{variable}=");
    environment
        .split(|byte| *byte == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(prefix.as_str()).map(str::to_owned))
}

async fn database_now(harness: &Harness) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&harness.pool)
        .await
        .expect("read the database clock")
}

/// Counts by user the holds opened at or after `since`, on the database
/// clock that stamps `holds.opened_at`.
async fn streams_opened_since(harness: &Harness, since: DateTime<Utc>) -> BTreeMap<String, i64> {
    let rows = sqlx::query(
        "SELECT user_id, count(*) AS streams FROM holds WHERE opened_at >= $1 GROUP BY user_id",
    )
    .bind(since)
    .fetch_all(&harness.pool)
    .await
    .expect("count the holds opened after the kill");
    rows.iter()
        .map(|row| (row.get("user_id"), row.get("streams")))
        .collect()
}

/// Publishes one probe message per user, with the user id as routing key
/// like every contract message, and reads back from the shard queues
/// where the consistent-hash exchange put each. Only valid while no
/// worker consumes.
async fn shards_of_users(names: &Names, users: &[String]) -> BTreeMap<String, u16> {
    let connection = amqp_connect().await;
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("enable publisher confirms");
    for user in users {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirmation = channel
            .basic_publish(
                names.events.as_str().into(),
                user.as_str().into(),
                options,
                b"routing probe",
                BasicProperties::default(),
            )
            .await
            .expect("publish a probe message")
            .await
            .expect("await the probe's confirm");
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "the probe for {user} was not routed to a shard: {confirmation:?}"
        );
    }

    // Quorum queues with single active consumer reject basic.get, so each
    // queue is read by a consumer of its own until it stays idle.
    let mut shards = BTreeMap::new();
    for shard in 0..SHARDS {
        let queue = names.shard(shard);
        let options = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await
            .expect("consume a shard queue");
        // Each queue contains at most one probe per user.
        for _ in 0..=users.len() {
            let Ok(Some(delivery)) = tokio::time::timeout(PROBE_IDLE, consumer.next()).await else {
                break;
            };
            let delivery = delivery.expect("receive a probe message");
            shards.insert(delivery.routing_key.as_str().to_owned(), shard);
        }
        channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .expect("cancel the probe consumer");
    }
    close_connection(&connection).await;
    assert_eq!(
        shards.len(),
        users.len(),
        "probes read back from the shard queues: {shards:?}"
    );
    shards
}
