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

// TLS: certificates made by the test, a TLS-terminating proxy, and
// PostgreSQL clusters that accept only TLS connections.

use sqlx::{Connection as _, PgConnection};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Host names the test server certificates are valid for.
const TEST_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A certificate authority made for one test and a server certificate it
/// signed for `localhost` and `127.0.0.1`, written as PEM files.
pub struct TestCertificates {
    /// The CA certificate, for clients to trust.
    pub ca_file: PathBuf,
    /// The server certificate alone, without the CA.
    pub certificate_file: PathBuf,
    /// The server's PKCS#8 private key.
    pub key_file: PathBuf,
    certificate_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCertificates {
    /// Generates a CA named `name` and a server certificate, and writes
    /// `{name}-ca.pem`, `{name}-server.pem` and `{name}-server.key` to
    /// `directory`. The key file is readable by its owner only, as
    /// PostgreSQL requires.
    pub fn generate(directory: &Path, name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("generate the CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("build CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("stream-credits test CA {name}"),
        );
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)
            .expect("sign the CA certificate");

        let server_key = rcgen::KeyPair::generate().expect("generate the server key");
        let names: Vec<String> = TEST_SERVER_NAMES
            .iter()
            .map(|name| name.to_string())
            .collect();
        let mut server_params =
            rcgen::CertificateParams::new(names).expect("build server certificate parameters");
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params
            .signed_by(&server_key, &ca)
            .expect("sign the server certificate");

        let certificates = Self {
            ca_file: directory.join(format!("{name}-ca.pem")),
            certificate_file: directory.join(format!("{name}-server.pem")),
            key_file: directory.join(format!("{name}-server.key")),
            certificate_der: server.der().clone(),
            key_der: server_key.serialize_der(),
        };
        write_file(&certificates.ca_file, &ca.pem(), 0o644);
        write_file(&certificates.certificate_file, &server.pem(), 0o644);
        write_file(&certificates.key_file, &server_key.serialize_pem(), 0o600);
        certificates
    }

    /// Builds a rustls server configuration that presents the server
    /// certificate.
    fn server_config(&self) -> Arc<ServerConfig> {
        // Both ring and aws-lc-rs are compiled into rustls here, so the
        // provider is named rather than left to rustls to pick.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.certificate_der.clone()], key)
            .expect("build the TLS server configuration");
        Arc::new(config)
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;

    std::fs::write(path, contents)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("cannot set the mode of {}: {error}", path.display()));
}

/// A loopback proxy that terminates TLS with a test certificate and
/// forwards the plain bytes to one target address, standing in for a
/// server's own TLS listener.
pub struct TlsProxy {
    address: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    failed_handshakes: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TlsProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: &str, certificates: &TestCertificates) -> Self {
        let acceptor = TlsAcceptor::from(certificates.server_config());
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let (counted, failed) = (handshakes.clone(), failed_handshakes.clone());
        let target = target.to_owned();
        let (address, stop) = serve_loopback("the TLS proxy", move |client| {
            let connection = TlsConnection {
                acceptor: acceptor.clone(),
                target: target.clone(),
                handshakes: counted.clone(),
                failed_handshakes: failed.clone(),
            };
            connection.forward(client)
        })
        .await;
        Self {
            address,
            handshakes,
            failed_handshakes,
            stop,
        }
    }

    /// Returns the proxy's own address, `127.0.0.1:port`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the number of TLS handshakes that succeeded.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Returns the number of TLS handshakes that failed, for example
    /// because the client did not trust the certificate.
    pub fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds a free loopback port for `server` and runs `handle` on every
/// connection accepted, each in a task of its own, until the returned
/// token is cancelled.
async fn serve_loopback<F, H>(server: &str, mut handle: H) -> (SocketAddr, CancellationToken)
where
    F: Future<Output = ()> + Send + 'static,
    H: FnMut(TcpStream) -> F + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|error| panic!("cannot bind {server} to a loopback port: {error}"));
    let address = listener.local_addr().expect("read a bound address");
    let stop = CancellationToken::new();
    let accepting = stop.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = accepting.cancelled() => return,
            };
            let Ok((client, _)) = accepted else {
                return;
            };
            let connection = handle(client);
            let stop = accepting.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = connection => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    (address, stop)
}

/// One client connection of a [`TlsProxy`].
struct TlsConnection {
    acceptor: TlsAcceptor,
    target: String,
    handshakes: Arc<AtomicUsize>,
    failed_handshakes: Arc<AtomicUsize>,
}

impl TlsConnection {
    /// Completes the handshake, then copies bytes both ways until either
    /// side closes.
    async fn forward(self, client: TcpStream) {
        let mut tls = match self.acceptor.accept(client).await {
            Ok(tls) => tls,
            Err(_) => {
                self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let connected =
            tokio::time::timeout(PROXY_CONNECT_WAIT, TcpStream::connect(&self.target)).await;
        let Ok(Ok(mut server)) = connected else {
            return;
        };
        let _ = server.set_nodelay(true);
        let _ = copy_bidirectional(&mut tls, &mut server).await;
    }
}

/// Maximum wait for a cluster to take TLS connections after a reload.
const TLS_RELOAD_WAIT: Duration = Duration::from_secs(10);

impl PgCluster {
    /// Turns TLS on with `certificates` and makes the server accept TCP
    /// connections only over TLS, by reloading its configuration. Unix
    /// socket connections stay plain.
    pub async fn enable_tls(&self, certificates: &TestCertificates) {
        // The server reads the key as its own OS user, who must own it.
        for file in [&certificates.certificate_file, &certificates.key_file] {
            if let Some(owner) = self.owner {
                let mut chown = Command::new("chown");
                chown.arg(owner).arg(file);
                self.run("chown", chown).await;
            }
        }
        let rules = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
        std::fs::write(self.data.join("pg_hba.conf"), rules).expect("write pg_hba.conf");

        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the test cluster");
        // ALTER SYSTEM takes no bind parameters and runs outside a
        // transaction, so each is a statement of its own. The paths are
        // the test's own and contain no quote.
        let statements = [
            format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}'",
                certificates.certificate_file.display()
            ),
            format!(
                "ALTER SYSTEM SET ssl_key_file = '{}'",
                certificates.key_file.display()
            ),
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
        ];
        for statement in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.as_str()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|error| panic!("{statement}: {error}"));
        }
        let _ = conn.close().await;
        self.wait_for_tls().await;
    }

    /// Waits until a connection that requires TLS succeeds, because the
    /// server applies a reload a moment after it was requested.
    async fn wait_for_tls(&self) {
        let url = format!("{}?sslmode=require", self.url("postgres"));
        let deadline = tokio::time::Instant::now() + TLS_RELOAD_WAIT;
        loop {
            let error = match PgConnection::connect(&url).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return;
                }
                Err(error) => error,
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "the test cluster took no TLS connection within {TLS_RELOAD_WAIT:?} of the \
                 reload: {error}; see {}",
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A short load for tests of a connection path: it checks that streams
/// settle through the path, not how the worker bears faults.
pub const BRIEF_LOAD: LoadShape = LoadShape {
    users: 6,
    chunks_per_stream: 12,
    tick: Duration::from_millis(40),
    wind_down_max: Duration::from_secs(20),
};

/// How long [`settle_brief_load`] publishes.
const BRIEF_LOAD_DURATION: Duration = Duration::from_secs(3);

/// Maximum wait for the streams of a brief load to settle.
const BRIEF_SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Funds users named after `tag`, publishes [`BRIEF_LOAD`] for 3 s and
/// checks that every stream settled exactly once in the database that
/// `pool` reaches.
pub async fn settle_brief_load(harness: &Arc<Harness>, pool: &PgPool, tag: &str) {
    let users = Load::fund(harness, tag, BRIEF_LOAD).await;
    let load = Load::start(harness.clone(), users, BRIEF_LOAD);
    tokio::time::sleep(BRIEF_LOAD_DURATION).await;
    let published = load.finish().await;
    assert_settled_exactly_once(harness, pool, &published, BRIEF_SETTLE_WAIT).await;
}

/// Checks the ledger invariants over the whole database at `url`, for a
/// database the harness does not reach itself.
pub async fn assert_invariants_hold(url: &str) {
    let mut conn = PgConnection::connect(url)
        .await
        .expect("connect for the invariant checks");
    let violations = stream_credits::invariants::check(&mut conn)
        .await
        .expect("run the invariant checks");
    assert!(
        violations.is_empty(),
        "ledger invariants are broken: {violations:#?}"
    );
    let _ = conn.close().await;
}

/// Returns the name of the database that `settings.database.url` names.
pub fn database_name(settings: &Settings) -> String {
    let url = url::Url::parse(settings.database.url.expose()).expect("the database URL parses");
    url.path().trim_start_matches('/').to_owned()
}

/// Returns the stdout and stderr of a finished command, after checking
/// that neither contains `secret`.
pub fn output_without_secret(
    command: &str,
    output: &std::process::Output,
    secret: &str,
) -> (String, String) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stdout.contains(secret),
        "`{command}` printed the secret on stdout:\n{stdout}"
    );
    assert!(
        !stderr.contains(secret),
        "`{command}` printed the secret on stderr:\n{stderr}"
    );
    (stdout, stderr)
}

// An AMQP 0-9-1 proxy that reads the frames passing through it, to see
// every delivery, acknowledgement and close between worker and broker.

use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Frame type of an AMQP 0-9-1 method frame.
const FRAME_METHOD: u8 = 1;

/// Byte that ends every AMQP 0-9-1 frame.
const FRAME_END: u8 = 0xCE;

/// Frame type, channel and payload size: 1 + 2 + 4 bytes.
const FRAME_HEADER_LEN: usize = 7;

/// `AMQP\0\0\x09\x01`, which a client sends before its first frame.
const PROTOCOL_HEADER_LEN: usize = 8;

/// Bytes read from one side before they are parsed and passed on.
const TAP_BUFFER_LEN: usize = 64 * 1024;

/// A close the broker sent: `connection.close` on channel 0 or
/// `channel.close` on another channel.
#[derive(Debug, Clone)]
pub struct BrokerClose {
    /// Number of the TCP connection through the tap, from 0.
    pub connection: usize,
    pub channel: u16,
    /// AMQP reply code, such as 406 PRECONDITION_FAILED.
    pub reply_code: u16,
    pub reply_text: String,
}

/// What an [`AmqpTap`] saw, summed over every connection.
#[derive(Debug, Clone, Default)]
pub struct TapReport {
    pub connections: usize,
    /// `basic.deliver` frames from the broker.
    pub deliveries: usize,
    /// Deliveries with the `redelivered` flag, which the broker sets on a
    /// message that went back to its queue unacknowledged.
    pub redeliveries: usize,
    /// `basic.ack`, `basic.nack` and `basic.reject` frames from the client.
    pub settlements: usize,
    /// Acknowledgements with the `multiple` flag.
    pub multiple_acks: usize,
    pub broker_closes: Vec<BrokerClose>,
    /// Acknowledgements, nacks or rejects of a delivery tag that was not
    /// outstanding on its channel: never delivered, or settled before.
    pub unknown_tags: Vec<String>,
    /// Bytes that did not parse as AMQP frames. Parsing stops on that
    /// connection.
    pub framing_errors: Vec<String>,
}

/// Outstanding delivery tags of one channel.
#[derive(Debug, Default)]
struct ChannelTags {
    outstanding: BTreeSet<u64>,
    /// Set once a close was sent either way; the channel's frames are
    /// ignored until it is opened again.
    closing: bool,
}

#[derive(Debug, Default)]
struct TapState {
    report: TapReport,
    /// Channels by connection and channel number.
    channels: HashMap<(usize, u16), ChannelTags>,
}

/// Which way a frame travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToBroker,
    ToClient,
}

/// A loopback proxy to an AMQP 0-9-1 server that parses the frames it
/// forwards. It tracks the outstanding delivery tags of every channel, so
/// it detects an acknowledgement of a tag that is not outstanding even
/// before the broker replies with a `channel.close`.
pub struct AmqpTap {
    address: SocketAddr,
    state: Arc<Mutex<TapState>>,
    stop: CancellationToken,
}

impl AmqpTap {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: &str) -> Self {
        let state = Arc::new(Mutex::new(TapState::default()));
        let shared = state.clone();
        let target = target.to_owned();
        let (address, stop) = serve_loopback("the AMQP tap", move |client| {
            let connection = {
                let mut state = shared.lock().expect("tap state lock");
                state.report.connections += 1;
                state.report.connections - 1
            };
            tap_connection(client, target.clone(), shared.clone(), connection)
        })
        .await;
        Self {
            address,
            state,
            stop,
        }
    }

    /// Returns the tap's own address, `127.0.0.1:port`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns what the tap saw so far.
    pub fn report(&self) -> TapReport {
        self.state.lock().expect("tap state lock").report.clone()
    }
}

impl Drop for AmqpTap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Forwards one connection both ways until either side closes.
async fn tap_connection(
    client: TcpStream,
    target: String,
    state: Arc<Mutex<TapState>>,
    connection: usize,
) {
    let connected = tokio::time::timeout(PROXY_CONNECT_WAIT, TcpStream::connect(&target)).await;
    let Ok(Ok(server)) = connected else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let to_broker = TapRelay {
        direction: Direction::ToBroker,
        connection,
        state: state.clone(),
        frames: FrameSplitter::new(PROTOCOL_HEADER_LEN),
    };
    let to_client = TapRelay {
        direction: Direction::ToClient,
        connection,
        state,
        frames: FrameSplitter::new(0),
    };
    // Dropping both halves of both sockets when either way ends closes
    // the other side too.
    tokio::select! {
        () = to_broker.run(client_read, server_write) => {}
        () = to_client.run(server_read, client_write) => {}
    }
}

/// One way of a tapped connection.
struct TapRelay {
    direction: Direction,
    connection: usize,
    state: Arc<Mutex<TapState>>,
    frames: FrameSplitter,
}

impl TapRelay {
    /// Parses what arrives before passing it on, so a delivery is
    /// recorded before the client can acknowledge it.
    async fn run(mut self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        let mut buffer = vec![0; TAP_BUFFER_LEN];
        let mut parsing = true;
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if parsing {
                let mut state = self.state.lock().expect("tap state lock");
                let recorded = self.frames.push(&buffer[..read]).and_then(|methods| {
                    methods.into_iter().try_for_each(|method| {
                        state.record(self.direction, self.connection, method)
                    })
                });
                if let Err(error) = recorded {
                    let error = format!(
                        "connection {}, {:?}: {error}",
                        self.connection, self.direction
                    );
                    state.report.framing_errors.push(error);
                    parsing = false;
                }
            }
            if to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    }
}

/// One method frame.
#[derive(Debug)]
struct MethodFrame {
    channel: u16,
    class_id: u16,
    method_id: u16,
    arguments: Vec<u8>,
}

/// Splits a byte stream into frames, keeping a partial frame until the
/// rest arrives.
struct FrameSplitter {
    pending: Vec<u8>,
    /// Bytes of the protocol header still to skip.
    header_left: usize,
}

impl FrameSplitter {
    fn new(header_len: usize) -> Self {
        Self {
            pending: Vec::new(),
            header_left: header_len,
        }
    }

    /// Appends `bytes` and returns the method frames now complete.
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<MethodFrame>, String> {
        let skipped = self.header_left.min(bytes.len());
        self.header_left -= skipped;
        self.pending.extend_from_slice(&bytes[skipped..]);

        let mut methods = Vec::new();
        let mut offset = 0;
        while self.pending.len() - offset >= FRAME_HEADER_LEN {
            let frame = &self.pending[offset..];
            let size = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
            let frame_len = FRAME_HEADER_LEN + size + 1;
            if frame.len() < frame_len {
                break;
            }
            if frame[frame_len - 1] != FRAME_END {
                return Err(format!(
                    "a frame of type {} and {size} bytes does not end with 0xCE",
                    frame[0]
                ));
            }
            let payload = &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + size];
            if frame[0] == FRAME_METHOD && payload.len() >= 4 {
                methods.push(MethodFrame {
                    channel: u16::from_be_bytes([frame[1], frame[2]]),
                    class_id: u16::from_be_bytes([payload[0], payload[1]]),
                    method_id: u16::from_be_bytes([payload[2], payload[3]]),
                    arguments: payload[4..].to_vec(),
                });
            }
            offset += frame_len;
        }
        self.pending.drain(..offset);
        Ok(methods)
    }
}

/// Reads the fields of a method's arguments in order.
struct ArgumentReader<'a> {
    bytes: &'a [u8],
}

impl ArgumentReader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], String> {
        if self.bytes.len() < len {
            return Err(format!("a method frame ends {len} bytes early"));
        }
        let (field, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(field)
    }

    fn octet(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn short(&mut self) -> Result<u16, String> {
        let field = self.take(2)?;
        Ok(u16::from_be_bytes([field[0], field[1]]))
    }

    fn long_long(&mut self) -> Result<u64, String> {
        let field: [u8; 8] = self.take(8)?.try_into().expect("take returns 8 bytes");
        Ok(u64::from_be_bytes(field))
    }

    fn short_string(&mut self) -> Result<String, String> {
        let len = usize::from(self.octet()?);
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }
}

/// AMQP 0-9-1 class and method ids, as (class, method).
mod amqp_method {
    pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub const BASIC_DELIVER: (u16, u16) = (60, 60);
    pub const BASIC_GET_OK: (u16, u16) = (60, 71);
    pub const BASIC_ACK: (u16, u16) = (60, 80);
    pub const BASIC_REJECT: (u16, u16) = (60, 90);
    pub const BASIC_NACK: (u16, u16) = (60, 120);
}

impl TapState {
    fn record(
        &mut self,
        direction: Direction,
        connection: usize,
        method: MethodFrame,
    ) -> Result<(), String> {
        use amqp_method::*;

        let key = (connection, method.channel);
        let mut arguments = ArgumentReader {
            bytes: &method.arguments,
        };
        match (direction, (method.class_id, method.method_id)) {
            (_, CHANNEL_OPEN | CHANNEL_OPEN_OK) => {
                self.channels.insert(key, ChannelTags::default());
            }
            (Direction::ToClient, CONNECTION_CLOSE | CHANNEL_CLOSE) => {
                let reply_code = arguments.short()?;
                let reply_text = arguments.short_string()?;
                self.report.broker_closes.push(BrokerClose {
                    connection,
                    channel: method.channel,
                    reply_code,
                    reply_text,
                });
                self.channels.entry(key).or_default().closing = true;
            }
            (Direction::ToBroker, CHANNEL_CLOSE) => {
                self.channels.entry(key).or_default().closing = true;
            }
            (Direction::ToClient, BASIC_DELIVER) => {
                let _consumer_tag = arguments.short_string()?;
                let tag = arguments.long_long()?;
                let redelivered = arguments.octet()? & 1 == 1;
                self.record_delivery(key, tag, redelivered);
            }
            (Direction::ToClient, BASIC_GET_OK) => {
                let tag = arguments.long_long()?;
                let redelivered = arguments.octet()? & 1 == 1;
                self.record_delivery(key, tag, redelivered);
            }
            (Direction::ToBroker, BASIC_ACK) => {
                let tag = arguments.long_long()?;
                let multiple = arguments.octet()? & 1 == 1;
                self.record_settlement(key, "basic.ack", tag, multiple);
            }
            (Direction::ToBroker, BASIC_NACK) => {
                let tag = arguments.long_long()?;
                let multiple = arguments.octet()? & 1 == 1;
                self.record_settlement(key, "basic.nack", tag, multiple);
            }
            (Direction::ToBroker, BASIC_REJECT) => {
                let tag = arguments.long_long()?;
                self.record_settlement(key, "basic.reject", tag, false);
            }
            _ => {}
        }
        Ok(())
    }

    fn record_delivery(&mut self, key: (usize, u16), tag: u64, redelivered: bool) {
        self.report.deliveries += 1;
        if redelivered {
            self.report.redeliveries += 1;
        }
        self.channels
            .entry(key)
            .or_default()
            .outstanding
            .insert(tag);
    }

    /// Settles `tag`, or with `multiple` every outstanding tag up to it.
    /// Like RabbitMQ, it takes `tag` itself to be outstanding unless it is
    /// 0 with `multiple`, which settles everything.
    fn record_settlement(&mut self, key: (usize, u16), name: &str, tag: u64, multiple: bool) {
        self.report.settlements += 1;
        if multiple {
            self.report.multiple_acks += 1;
        }
        let channel = self.channels.entry(key).or_default();
        if channel.closing {
            return;
        }
        if multiple && tag == 0 {
            channel.outstanding.clear();
            return;
        }
        if !channel.outstanding.contains(&tag) {
            let (connection, channel_number) = key;
            self.report.unknown_tags.push(format!(
                "connection {connection}, channel {channel_number}: {name} of delivery tag \
                 {tag} (multiple: {multiple}), which is not outstanding; outstanding are {} \
                 tags from {:?} to {:?}",
                channel.outstanding.len(),
                channel.outstanding.first(),
                channel.outstanding.last()
            ));
            return;
        }
        if multiple {
            channel.outstanding = channel.outstanding.split_off(&(tag + 1));
        } else {
            channel.outstanding.remove(&tag);
        }
    }
}
