//! Fault-injection helpers: a TCP proxy whose connections can be cut, a
//! throwaway PostgreSQL cluster, the worker binary as a child process, and
//! a steady load of streams with the checks of how they settled.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::{PgPool, Row};
use stream_credits::messages::EndStatus;
use stream_credits::settings::Settings;
use stream_credits::tokens;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Harness, Outbound, ROUND_MODEL, amqp_connect, chunk, close_connection, end, grant, short_id,
    start,
};

/// Maximum wait for the proxy to reach its target.
const PROXY_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// A loopback TCP proxy to one target address. While cut, it resets every
/// forwarded connection and closes each new one as soon as it is accepted,
/// which a client sees as a lost network path.
pub struct TcpProxy {
    address: SocketAddr,
    open: watch::Sender<bool>,
    forwarded: Arc<AtomicUsize>,
    acceptor: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy to a loopback port");
        let address = listener.local_addr().expect("read the proxy address");
        let (open, state) = watch::channel(true);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let count = forwarded.clone();
        let target = target.to_owned();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(client, target.clone(), state.clone()));
            }
        });
        Self {
            address,
            open,
            forwarded,
            acceptor,
        }
    }

    /// Returns the proxy's own address, `127.0.0.1:port`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Resets every forwarded connection and rejects new ones until
    /// [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// Returns the number of connections forwarded so far, without the
    /// rejected ones.
    pub fn forwarded_connections(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.open.send_replace(false);
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut. A
/// cut resets both sockets.
async fn forward(mut client: TcpStream, target: String, mut state: watch::Receiver<bool>) {
    let connected = tokio::time::timeout(PROXY_CONNECT_WAIT, TcpStream::connect(&target)).await;
    let Ok(Ok(mut server)) = connected else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cut = tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => false,
        _ = state.wait_for(|open| !*open) => true,
    };
    if cut {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// A directory under the system temp directory, removed on drop unless
/// the test is failing, so its logs stay for reading.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<temp>/<label>-<random>`.
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{label}-{}", short_id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// OS user that owns a test cluster when the tests run as root, because
/// `initdb` and `postgres` refuse to run as root.
const CLUSTER_OWNER: &str = "postgres";

/// Superuser of a test cluster. Every loopback connection is trusted.
const CLUSTER_SUPERUSER: &str = "root";

/// Maximum wait for `pg_ctl` to start or stop a cluster.
const PG_CTL_WAIT_SECONDS: &str = "60";

/// A PostgreSQL cluster of the test's own, in a temporary directory, on a
/// free loopback port. It is stopped and deleted on drop, also when the
/// test fails.
pub struct PgCluster {
    root: PathBuf,
    data: PathBuf,
    port: u16,
    /// OS user to run `initdb` and `pg_ctl` as, through `runuser`.
    owner: Option<&'static str>,
}

impl PgCluster {
    /// Creates the cluster with `initdb` and starts it.
    pub async fn start() -> Self {
        let root = std::env::temp_dir().join(format!("sc-pg-{}", short_id()));
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", root.display()));
        let owner = running_as_root().then_some(CLUSTER_OWNER);
        // From here on, drop removes the directory whatever fails next.
        let cluster = Self {
            data: root.join("data"),
            root,
            port: free_loopback_port(),
            owner,
        };
        if let Some(owner) = owner {
            let mut chown = Command::new("chown");
            chown.arg(owner).arg(&cluster.root);
            cluster.run("chown", chown).await;
        }
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&cluster.data).args([
            "-A",
            "trust",
            "-U",
            CLUSTER_SUPERUSER,
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        cluster.run("initdb", initdb).await;
        cluster.resume().await;
        cluster
    }

    /// URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{CLUSTER_SUPERUSER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn resume(&self) {
        // fsync is off because the cluster is thrown away, and a fast stop
        // still writes every committed transaction out.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.root.display()
        );
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &options, "-w", "-t", PG_CTL_WAIT_SECONDS, "start"]);
        self.run("pg_ctl start", pg_ctl).await;
    }

    /// Stops the server in fast mode: open sessions are ended, open
    /// transactions rolled back, and new connections refused.
    pub async fn stop(&self) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg("-D").arg(&self.data).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_WAIT_SECONDS,
            "stop",
        ]);
        self.run("pg_ctl stop", pg_ctl).await;
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = match self.owner {
            Some(owner) => {
                let mut command = Command::new("runuser");
                command.args(["-u", owner, "--", program]);
                command
            }
            None => Command::new(program),
        };
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// Runs a cluster command to its end and fails the test, showing its
    /// output and the end of the server log, when it fails.
    async fn run(&self, step: &str, mut command: Command) {
        let output = tokio::time::timeout(Duration::from_secs(90), command.output())
            .await
            .unwrap_or_else(|_| panic!("{step} did not finish within 90 s"))
            .unwrap_or_else(|error| {
                panic!("cannot run {step}: {error}; the PostgreSQL server binaries must be on PATH")
            });
        if !output.status.success() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let log_tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{step} failed with {}:\n{}{}\nserver log, last lines first:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                log_tail.join("\n")
            );
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let mut stop = match self.owner {
                Some(owner) => {
                    let mut command = std::process::Command::new("runuser");
                    command.args(["-u", owner, "--", "pg_ctl"]);
                    command
                }
                None => std::process::Command::new("pg_ctl"),
            };
            let stopped = stop
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", PG_CTL_WAIT_SECONDS, "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !stopped.is_ok_and(|status| status.success()) {
                eprintln!("cannot stop the test cluster in {}", self.data.display());
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.root) {
            eprintln!("cannot remove {}: {error}", self.root.display());
        }
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// Returns a loopback port that was free a moment ago. Another process may
/// take it before the caller binds it, and the bind then fails.
fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free loopback port")
        .port()
}

/// Builds the `STREAM_CREDITS__…` variables that make the worker binary use
/// the database, broker, topology and models of `settings`, with the HTTP
/// endpoint off.
pub fn worker_environment(settings: &Settings) -> Vec<(String, String)> {
    let price = &settings.models[ROUND_MODEL];
    let model = format!("MODELS__{}", ROUND_MODEL.to_ascii_uppercase());
    let values = [
        (
            "DATABASE__URL".to_owned(),
            settings.database.url.expose().to_owned(),
        ),
        (
            "DATABASE__ACQUIRE_TIMEOUT_SECONDS".to_owned(),
            settings.database.acquire_timeout_seconds.to_string(),
        ),
        (
            "AMQP__URL".to_owned(),
            settings.amqp.url.expose().to_owned(),
        ),
        (
            "TOPOLOGY__PREFIX".to_owned(),
            settings.topology.prefix.clone(),
        ),
        (
            "TOPOLOGY__SHARDS".to_owned(),
            settings.topology.shards.to_string(),
        ),
        (
            "TOPOLOGY__DELIVERY_LIMIT".to_owned(),
            settings.topology.delivery_limit.to_string(),
        ),
        (
            "WORKER__SHUTDOWN_TIMEOUT_SECONDS".to_owned(),
            settings.worker.shutdown_timeout_seconds.to_string(),
        ),
        ("HTTP__LISTEN".to_owned(), String::new()),
        ("LOG__LEVEL".to_owned(), "info".to_owned()),
        (
            format!("{model}__INPUT_PER_MILLION"),
            price.input_per_million.to_string(),
        ),
        (
            format!("{model}__OUTPUT_PER_MILLION"),
            price.output_per_million.to_string(),
        ),
        (format!("{model}__ENCODING"), price.encoding.clone()),
        (
            format!("{model}__MAX_OUTPUT_TOKENS"),
            price.max_output_tokens.to_string(),
        ),
    ];
    values
        .into_iter()
        .map(|(key, value)| (format!("STREAM_CREDITS__{key}"), value))
        .collect()
}

/// The worker binary running `run` as a child process. It is killed when
/// dropped.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// Starts `stream-credits run` in `directory` with `environment` added
    /// to an environment cleared of every `STREAM_CREDITS` variable, and
    /// appends its log to `log`.
    pub fn spawn(environment: &[(String, String)], directory: &Path, log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|error| panic!("cannot open {}: {error}", log.display()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_stream-credits"));
        command
            .arg("run")
            .current_dir(directory)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("STREAM_CREDITS") {
                command.env_remove(key);
            }
        }
        command.envs(environment.iter().map(|(key, value)| (key, value)));
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start the worker binary: {error}"));
        Self { child }
    }

    /// Returns the exit status when the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll the worker process")
    }

    /// Sends SIGKILL and waits for the process to end.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL to the worker");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the killed worker ended within 10 s")
            .expect("wait for the killed worker");
    }

    /// Sends SIGTERM and returns the exit status, waiting up to `wait`.
    pub async fn terminate(mut self, wait: Duration) -> ExitStatus {
        let pid = self.child.id().expect("the worker is still running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed with {status}");
        tokio::time::timeout(wait, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the worker did not exit within {wait:?} of SIGTERM"))
            .expect("wait for the worker")
    }
}

/// Returns whether every shard queue of the harness's topology has a
/// consumer.
pub async fn shards_consumed(harness: &Harness) -> bool {
    let connection = amqp_connect().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut consumed = true;
    for index in 0..harness.settings.topology.shards {
        // A failed passive declare closes its channel, so each queue gets
        // a new one.
        let Ok(channel) = connection.create_channel().await else {
            consumed = false;
            break;
        };
        let queue = harness.names.shard(index);
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await;
        let _ = channel.close(200, "checked".into()).await;
        if !declared.is_ok_and(|queue| queue.consumer_count() > 0) {
            consumed = false;
            break;
        }
    }
    close_connection(&connection).await;
    consumed
}

/// Credits granted to every load user once, far more than the holds and
/// charges of the streams one user runs in a test of a minute.
pub const LOAD_GRANT: i64 = 1_000_000;

/// Output allowance of every load stream. A stream whose chunks add up to
/// more fails the test, because its settlement would take the overrun path.
const LOAD_MAX_OUTPUT_TOKENS: u64 = 150;

/// Texts of chunks that carry no `tokens` and are counted by the worker.
/// They hold no user data.
const COUNTED_DELTAS: [&str; 4] = [
    "Quicksort picks a pivot",
    " and splits the list",
    " into smaller, equal and larger parts,",
    " then sorts each part the same way.",
];

/// Shape of a load: how many users stream at once, how long each stream
/// is, and how often each user sends its next message.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    pub users: usize,
    pub chunks_per_stream: u64,
    /// Each user publishes one message per tick: a start, a chunk or an end.
    pub tick: Duration,
    /// Maximum time the load may take to wind down after
    /// [`Load::finish`], while every open stream publishes its last chunks
    /// and its end.
    pub wind_down_max: Duration,
}

/// One stream the load published in full, with what its settlement must
/// show.
#[derive(Debug, Clone)]
pub struct PlannedStream {
    pub user_id: String,
    pub stream_id: String,
    pub prompt_tokens: u64,
    /// Sum of the tokens of every chunk: the `tokens` field where given,
    /// else the worker's count of the delta.
    pub completion_tokens: u64,
    pub chunks: u64,
}

impl PlannedStream {
    /// Returns the round-price hold: 1 credit per prompt token and 2 per
    /// output token of the allowance.
    pub fn hold(&self) -> i64 {
        to_credits(self.prompt_tokens + 2 * LOAD_MAX_OUTPUT_TOKENS)
    }

    /// Returns the round-price cost of the prompt and the counted chunk
    /// tokens.
    pub fn charge(&self) -> i64 {
        to_credits(self.prompt_tokens + 2 * self.completion_tokens)
    }
}

fn to_credits(amount: u64) -> i64 {
    i64::try_from(amount).expect("test amounts fit in 64 bits")
}

/// What a finished load published.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub users: Vec<String>,
    pub streams: Vec<PlannedStream>,
    pub messages: usize,
}

/// Users streaming in parallel through the harness's publisher. Each user
/// runs one stream at a time and sends one message per tick, so streams
/// are open and half-applied at any moment a fault hits. Users start at
/// different ticks, so their streams do not begin and end together.
pub struct Load {
    stop: CancellationToken,
    task: JoinHandle<LoadResult>,
    shape: LoadShape,
}

/// Where one user is in its current stream.
struct UserCursor {
    user_id: String,
    /// Ticks to wait before the first stream.
    delay_ticks: u64,
    streams_started: u64,
    open: Option<OpenStream>,
}

struct OpenStream {
    plan: PlannedStream,
    next_seq: u64,
}

impl Load {
    /// Names the users `{tag}-u00` and onwards, grants each
    /// [`LOAD_GRANT`] credits and waits until the worker applied the
    /// grants.
    pub async fn fund(harness: &Harness, tag: &str, shape: LoadShape) -> Vec<String> {
        let users: Vec<String> = (0..shape.users)
            .map(|index| format!("{tag}-u{index:02}"))
            .collect();
        let grants: Vec<Outbound> = users
            .iter()
            .map(|user| Outbound::json(&grant(user, &format!("{user}-grant"), LOAD_GRANT)))
            .collect();
        harness.publish_all(&grants).await;
        for user in &users {
            harness.barrier(user).await;
        }
        users
    }

    /// Starts publishing for `users` until [`Load::finish`].
    pub fn start(harness: Arc<Harness>, users: Vec<String>, shape: LoadShape) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_load(harness, users, shape, stop.clone()));
        Self { stop, task, shape }
    }

    /// Lets every open stream publish its remaining chunks and its end,
    /// then returns what was published.
    pub async fn finish(self) -> LoadResult {
        self.stop.cancel();
        let limit = self.shape.wind_down_max;
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => panic!("the load publisher failed: {error}"),
            Err(_) => panic!("the load did not wind down within {limit:?}"),
        }
    }
}

async fn run_load(
    harness: Arc<Harness>,
    users: Vec<String>,
    shape: LoadShape,
    stop: CancellationToken,
) -> LoadResult {
    let stream_length = shape.chunks_per_stream + 2;
    let mut cursors: Vec<UserCursor> = users
        .iter()
        .enumerate()
        .map(|(index, user_id)| UserCursor {
            user_id: user_id.clone(),
            delay_ticks: index as u64 % stream_length,
            streams_started: 0,
            open: None,
        })
        .collect();
    let mut finished = Vec::new();
    let mut messages = 0;
    let mut ticker = tokio::time::interval(shape.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let stopping = stop.is_cancelled();
        let batch: Vec<Outbound> = cursors
            .iter_mut()
            .enumerate()
            .filter_map(|(index, cursor)| {
                next_message(index, cursor, shape, stopping, &mut finished)
            })
            .collect();
        if batch.is_empty() && stopping {
            break;
        }
        messages += batch.len();
        harness.publish_all(&batch).await;
    }
    LoadResult {
        users,
        streams: finished,
        messages,
    }
}

/// Advances one user by one message and returns it, or `None` when the
/// user waits or, once `stopping`, has no stream open.
fn next_message(
    user_index: usize,
    cursor: &mut UserCursor,
    shape: LoadShape,
    stopping: bool,
    finished: &mut Vec<PlannedStream>,
) -> Option<Outbound> {
    if cursor.delay_ticks > 0 && !stopping {
        cursor.delay_ticks -= 1;
        return None;
    }
    let Some(open) = cursor.open.as_mut() else {
        if stopping {
            return None;
        }
        let number = cursor.streams_started;
        cursor.streams_started += 1;
        let plan = PlannedStream {
            user_id: cursor.user_id.clone(),
            stream_id: format!("{}-s{number:03}", cursor.user_id),
            prompt_tokens: 20 + (user_index as u64 + number) % 7,
            completion_tokens: 0,
            chunks: shape.chunks_per_stream,
        };
        let body = start(
            &plan.user_id,
            &plan.stream_id,
            &format!("{}-start", plan.stream_id),
            ROUND_MODEL,
            plan.prompt_tokens,
            LOAD_MAX_OUTPUT_TOKENS,
        );
        // The start requests a reply, correlated by the stream id.
        let request = Outbound::request(&body, &plan.stream_id);
        cursor.open = Some(OpenStream { plan, next_seq: 0 });
        return Some(request);
    };

    let plan = &mut open.plan;
    if open.next_seq < shape.chunks_per_stream {
        let seq = open.next_seq;
        open.next_seq += 1;
        // Every fifth chunk leaves the count to the worker's tokenizer, and
        // the others give 1 to 3 tokens.
        let body = if seq % 5 == 4 {
            let delta = COUNTED_DELTAS[(seq as usize / 5) % COUNTED_DELTAS.len()];
            plan.completion_tokens += count_delta(delta);
            chunk(&plan.user_id, &plan.stream_id, seq, delta, None)
        } else {
            let tokens = 1 + (seq + user_index as u64) % 3;
            plan.completion_tokens += tokens;
            chunk(&plan.user_id, &plan.stream_id, seq, "tok", Some(tokens))
        };
        return Some(Outbound::json(&body));
    }

    let body = end(
        &plan.user_id,
        &plan.stream_id,
        &format!("{}-end", plan.stream_id),
        EndStatus::Completed,
        None,
    );
    let closed = cursor.open.take().expect("a stream is open");
    assert!(
        closed.plan.completion_tokens <= LOAD_MAX_OUTPUT_TOKENS,
        "stream {} has {} completion tokens, above its allowance of {LOAD_MAX_OUTPUT_TOKENS}; \
         use fewer chunks per stream",
        closed.plan.stream_id,
        closed.plan.completion_tokens
    );
    finished.push(closed.plan);
    Some(Outbound::json(&body))
}

fn count_delta(delta: &str) -> u64 {
    let encoder = tokens::encoder("o200k_base").expect("o200k_base is bundled");
    tokens::count_text(encoder, delta)
}

/// One hold as stored.
#[derive(Debug)]
struct StoredHold {
    user_id: String,
    settle_status: Option<String>,
    charged: Option<i64>,
    reserved: i64,
    counted_completion_tokens: i64,
    chunks: i64,
}

/// Checks that every stream of `load` settled exactly once at its exact
/// cost and that nothing was dead-lettered or denied. `pool` reaches the
/// worker's database. Waits up to `wait` for the worker to settle the
/// last streams, and as long again for the last replies and events, which
/// the outbox relay publishes about 10 to 15 s late when a fault lost
/// their first publish.
pub async fn assert_settled_exactly_once(
    harness: &Harness,
    pool: &PgPool,
    load: &LoadResult,
    wait: Duration,
) {
    assert!(
        !load.streams.is_empty(),
        "the load published no complete stream"
    );
    wait_until_holds_settled(pool, load, wait).await;
    check_holds(pool, load).await;
    check_accounts(pool, load).await;
    check_events(harness, load, wait).await;

    let dead_letters = harness.take_dead_letters().await;
    let summary: Vec<String> = dead_letters
        .iter()
        .map(|letter| {
            format!(
                "{:?} {:?} ({:?})",
                letter.message_id, letter.error, letter.detail
            )
        })
        .collect();
    assert!(
        dead_letters.is_empty(),
        "{} messages were dead-lettered: {summary:#?}",
        dead_letters.len()
    );
}

async fn wait_until_holds_settled(pool: &PgPool, load: &LoadResult, wait: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    loop {
        let settled: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) FROM holds WHERE user_id = ANY($1) AND settled_at IS NOT NULL",
        )
        .bind(&load.users)
        .fetch_one(pool)
        .await;
        let progress = match settled {
            Ok(count) if count >= load.streams.len() as i64 => {
                eprintln!(
                    "all {count} holds were settled {:?} into the wait",
                    started.elapsed()
                );
                return;
            }
            Ok(count) => format!("{count} settled holds"),
            Err(error) => format!("the count of settled holds failed: {error}"),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} streams were published, but after {wait:?} there are {progress}",
            load.streams.len(),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn check_holds(pool: &PgPool, load: &LoadResult) {
    let rows = sqlx::query(
        "SELECT user_id, stream_id, settle_status, charged, reserved, \
         counted_completion_tokens, chunks FROM holds WHERE user_id = ANY($1)",
    )
    .bind(&load.users)
    .fetch_all(pool)
    .await
    .expect("read the holds");
    let mut holds: HashMap<String, StoredHold> = HashMap::new();
    for row in rows {
        let stream_id: String = row.get("stream_id");
        let hold = StoredHold {
            user_id: row.get("user_id"),
            settle_status: row.get("settle_status"),
            charged: row.get("charged"),
            reserved: row.get("reserved"),
            counted_completion_tokens: row.get("counted_completion_tokens"),
            chunks: row.get("chunks"),
        };
        let previous = holds.insert(stream_id.clone(), hold);
        assert!(previous.is_none(), "stream {stream_id} has two holds");
    }
    assert_eq!(
        holds.len(),
        load.streams.len(),
        "holds in the database against streams published"
    );

    for stream in &load.streams {
        let id = &stream.stream_id;
        let hold = holds
            .get(id)
            .unwrap_or_else(|| panic!("stream {id} has no hold"));
        assert_eq!(hold.user_id, stream.user_id, "user of stream {id}");
        assert_eq!(
            hold.settle_status.as_deref(),
            Some("completed"),
            "settle status of stream {id}"
        );
        assert_eq!(
            hold.chunks, stream.chunks as i64,
            "chunks applied to stream {id}"
        );
        assert_eq!(
            hold.counted_completion_tokens, stream.completion_tokens as i64,
            "counted completion tokens of stream {id}"
        );
        assert_eq!(hold.reserved, stream.hold(), "hold of stream {id}");
        assert_eq!(hold.charged, Some(stream.charge()), "charge of stream {id}");
    }
}

async fn check_accounts(pool: &PgPool, load: &LoadResult) {
    let mut charges: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for stream in &load.streams {
        let entry = charges.entry(stream.user_id.as_str()).or_default();
        entry.0 += stream.charge();
        entry.1 += 1;
    }
    for user in &load.users {
        let (charged, streams) = charges.get(user.as_str()).copied().unwrap_or_default();
        let row =
            sqlx::query("SELECT balance, reserved, holds_open FROM accounts WHERE user_id = $1")
                .bind(user)
                .fetch_one(pool)
                .await
                .unwrap_or_else(|error| panic!("read the account of {user}: {error}"));
        let balance: i64 = row.get("balance");
        let reserved: i64 = row.get("reserved");
        let holds_open: i32 = row.get("holds_open");
        assert_eq!(balance, LOAD_GRANT - charged, "balance of {user}");
        assert_eq!(reserved, 0, "reserved credits of {user}");
        assert_eq!(holds_open, 0, "open holds of {user}");

        let entries = sqlx::query(
            "SELECT kind, count(*) AS entries FROM ledger WHERE user_id = $1 GROUP BY kind",
        )
        .bind(user)
        .fetch_all(pool)
        .await
        .expect("count ledger entries");
        let entries: BTreeMap<String, i64> = entries
            .iter()
            .map(|row| (row.get("kind"), row.get("entries")))
            .collect();
        assert_eq!(
            entries.get("grant").copied(),
            Some(1),
            "grant entries of {user}"
        );
        assert_eq!(
            entries.get("charge").copied().unwrap_or_default(),
            streams,
            "charge entries of {user}"
        );
        assert_eq!(
            entries.get("adjustment"),
            None,
            "adjustment entries of {user}"
        );
    }
}

/// Checks the outcome events. An event whose publish a fault interrupted
/// arrives late, from the outbox relay, and a crash between publish and
/// marking the outbox row may send it twice with the same `event_id`, so
/// events are counted by id.
async fn check_events(harness: &Harness, load: &LoadResult, wait: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    let mut pending: Vec<&PlannedStream> = load.streams.iter().collect();
    loop {
        let replied: HashSet<String> = harness
            .all_replies()
            .into_iter()
            .filter_map(|reply| reply.correlation_id)
            .collect();
        pending.retain(|stream| {
            !replied.contains(&stream.stream_id)
                || ["reservation.granted", "reservation.settled"]
                    .iter()
                    .any(|event_type| harness.events(event_type, &stream.stream_id).is_empty())
        });
        if pending.is_empty() {
            eprintln!(
                "every reply and event arrived {:?} into the wait",
                started.elapsed()
            );
            break;
        }
        let missing: Vec<&str> = pending
            .iter()
            .take(10)
            .map(|s| s.stream_id.as_str())
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} streams lack a reply, a reservation.granted or a reservation.settled event \
             after {wait:?}, among them {missing:?}",
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut replies: HashMap<String, Vec<Value>> = HashMap::new();
    for reply in harness.all_replies() {
        if let Some(correlation_id) = reply.correlation_id {
            replies.entry(correlation_id).or_default().push(reply.body);
        }
    }
    let mut republished = 0;
    for stream in &load.streams {
        let id = &stream.stream_id;
        let settled = harness.events("reservation.settled", id);
        republished += settled.len() - 1;
        let event_ids: BTreeSet<String> = settled.iter().map(event_id).collect();
        assert_eq!(
            event_ids.len(),
            1,
            "distinct reservation.settled events of stream {id}: {event_ids:?}"
        );
        for event in &settled {
            assert_eq!(
                event["charged"],
                stream.charge(),
                "charged of stream {id}: {event}"
            );
            assert_eq!(
                event["counted_completion_tokens"], stream.completion_tokens,
                "counted tokens of stream {id}: {event}"
            );
            assert_eq!(
                event["refunded"],
                stream.hold() - stream.charge(),
                "refund of stream {id}"
            );
        }

        let granted: BTreeSet<String> = harness
            .events("reservation.granted", id)
            .iter()
            .map(event_id)
            .collect();
        assert_eq!(
            granted.len(),
            1,
            "distinct reservation.granted events of stream {id}"
        );
        let denied = harness.events("reservation.denied", id);
        assert!(denied.is_empty(), "stream {id} was denied: {denied:?}");

        // A start applied again after a fault sends its stored reply again,
        // with the same event_id as the grant event.
        let stream_replies = replies
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let reply_ids: BTreeSet<String> = stream_replies.iter().map(event_id).collect();
        assert_eq!(
            reply_ids, granted,
            "event ids of the replies to the start of stream {id}"
        );
        for reply in stream_replies {
            assert_eq!(
                reply["type"], "reservation.granted",
                "reply to stream {id}: {reply}"
            );
            assert_eq!(
                reply["reserved"],
                stream.hold(),
                "reply to stream {id}: {reply}"
            );
        }
    }
    eprintln!("{republished} settlement events arrived again with the same event_id");
}

fn event_id(event: &Value) -> String {
    event["event_id"]
        .as_str()
        .unwrap_or_else(|| panic!("event without event_id: {event}"))
        .to_owned()
}
