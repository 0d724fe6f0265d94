//! The TypeScript producer in `examples/node-producer` against a real
//! worker: its chat is granted, its deltas are counted and it is settled
//! at the charge that the project's own token counting and prices give,
//! or at the provider's usage when its end carries one. A user without
//! credits is denied and the producer exits 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use common::Harness;
use serde_json::{Value, json};
use stream_credits::pricing::{ModelPrice, TokenUsage};
use stream_credits::tokens::{self, ChatText};

const EXAMPLE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node-producer");
const INSTALL_NODE: &str = "install Node.js 20 or later with npm, for example \
     `apt-get install nodejs npm` on Debian 13 or a release from nodejs.org";
/// Oldest Node.js major version the example supports (`engines` in its
/// package.json).
const NODE_MAJOR_MIN: u32 = 20;

/// Longest `npm ci`: it downloads a few small packages from the registry.
const INSTALL_WAIT: Duration = Duration::from_secs(300);
/// Maximum time of a type-check and build, or of one run of the producer.
const RUN_WAIT: Duration = Duration::from_secs(120);

const MODEL: &str = "gpt-4o-mini";
const MAX_OUTPUT_TOKENS: u64 = 256;
const BALANCE: i64 = 100_000;

/// Exit code of the producer when the start is denied.
const EXIT_DENIED: i32 = 1;

/// Returns a prompt with a named message, which the chat framing counts
/// apart.
fn chat_messages() -> Value {
    json!([
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "name": "ada", "content": "How does quicksort work?"}
    ])
}

/// The completion as it streamed, with text that is not ASCII.
const DELTAS: [&str; 6] = [
    "Quicksort",
    " picks a pivot,",
    " moves smaller items before it",
    " and larger ones after it — naïvely",
    " 🙂 —",
    " then sorts both sides the same way.",
];

/// Provider usage of the second chat.
const PROVIDER_USAGE: (u64, u64) = (31, 47);

/// Runs `program args` in the example folder, failing the test after
/// `wait` or on a non-zero exit with the output.
fn run_tool(program: &str, args: &[&str], wait: Duration) -> Output {
    let mut child = std::process::Command::new(program)
        .args(args)
        .current_dir(EXAMPLE_DIR)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {program} ({error}); {INSTALL_NODE}"));
    let deadline = std::time::Instant::now() + wait;
    while child.try_wait().expect("poll the child").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "`{program} {}` did not finish within {wait:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("read the child's output");
    assert!(
        output.status.success(),
        "`{program} {}` failed with {:?}: {}{}",
        args.join(" "),
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Checks Node.js, installs the example's packages when `node_modules`
/// is missing and builds it, once per test binary.
fn prepare_example() {
    static PREPARED: OnceLock<()> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let version = run_tool("node", &["--version"], RUN_WAIT);
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        let major: Option<u32> = version
            .strip_prefix('v')
            .and_then(|rest| rest.split('.').next())
            .and_then(|major| major.parse().ok());
        assert!(
            major.is_some_and(|major| major >= NODE_MAJOR_MIN),
            "node {version} is too old; {INSTALL_NODE}"
        );
        if !Path::new(EXAMPLE_DIR).join("node_modules").is_dir() {
            run_tool("npm", &["ci", "--no-audit", "--no-fund"], INSTALL_WAIT);
        }
        run_tool("npm", &["run", "build"], RUN_WAIT);
    });
}

/// Runs the built producer with `env` and returns its output.
async fn run_producer(env: &[(&str, &str)]) -> Output {
    tokio::task::spawn_blocking(prepare_example)
        .await
        .expect("prepare the example");
    let mut command = tokio::process::Command::new("node");
    command
        .arg("dist/producer.js")
        .current_dir(EXAMPLE_DIR)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(RUN_WAIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("the producer did not exit within {RUN_WAIT:?}"))
        .unwrap_or_else(|error| panic!("cannot run node ({error}); {INSTALL_NODE}"))
}

/// Writes a chat file for the producer and returns its path.
fn write_chat(usage: Option<(u64, u64)>) -> PathBuf {
    let mut chat = json!({
        "model": MODEL,
        "messages": chat_messages(),
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        "deltas": DELTAS,
    });
    if let Some((prompt_tokens, completion_tokens)) = usage {
        chat["usage"] =
            json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens});
    }
    let path = std::env::temp_dir().join(format!("node-chat-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, chat.to_string()).expect("write the chat file");
    path
}

/// Environment that points the producer at the test's broker topology.
fn producer_env<'a>(
    harness: &'a Harness,
    user: &'a str,
    stream: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AMQP_URL", harness.settings.amqp.url.expose()),
        ("TOPOLOGY_PREFIX", harness.settings.topology.prefix.as_str()),
        ("USER_ID", user),
        ("STREAM_ID", stream),
    ]
}

/// Token counts the worker must reach: the prompt with its chat framing,
/// and every delta counted alone.
fn counted_tokens(price: &ModelPrice) -> (u64, u64) {
    let bpe = tokens::encoder(&price.encoding).expect("the model's encoding exists");
    let messages = chat_messages();
    let messages = messages.as_array().expect("messages is an array");
    let prompt = tokens::count_chat(
        bpe,
        messages.iter().map(|message| ChatText {
            role: message["role"].as_str().expect("role"),
            name: message["name"].as_str(),
            content: message["content"].as_str().expect("content"),
        }),
    );
    let completion = DELTAS
        .iter()
        .map(|delta| tokens::count_text(bpe, delta))
        .sum();
    (prompt, completion)
}

fn cost(price: &ModelPrice, prompt_tokens: u64, completion_tokens: u64) -> i64 {
    let usage = TokenUsage {
        prompt_tokens,
        cached_prompt_tokens: 0,
        completion_tokens,
    };
    price.cost(usage).expect("the cost fits in 64 bits").0
}

/// Runs the producer with a chat file and returns the grant it printed.
async fn publish_chat(
    harness: &Harness,
    user: &str,
    stream: &str,
    usage: Option<(u64, u64)>,
) -> Value {
    let chat = write_chat(usage);
    let mut env = producer_env(harness, user, stream);
    let chat_path = chat.display().to_string();
    env.push(("CHAT_FILE", &chat_path));
    let output = run_producer(&env).await;
    let _ = std::fs::remove_file(&chat);

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stream}: {stdout}{stderr}");
    for delta in DELTAS {
        assert!(
            !stdout.contains(delta) && !stderr.contains(delta),
            "delta text printed"
        );
    }
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("{stream}: the grant is not JSON ({error}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_producer_chat_is_charged_exactly() {
    let harness = Harness::start("node", |_| {}).await;
    let user = "u-node";
    harness.fund(user, "g-1", BALANCE).await;
    let price = harness
        .settings
        .model(MODEL)
        .expect("the model is priced")
        .1
        .clone();
    let (prompt_tokens, completion_tokens) = counted_tokens(&price);
    let reserved = cost(&price, prompt_tokens, MAX_OUTPUT_TOKENS);

    // Without provider usage the worker's own count decides the charge.
    let grant = publish_chat(&harness, user, "s-node-counted", None).await;
    assert_eq!(grant["type"], "reservation.granted", "{grant}");
    assert_eq!(grant["stream_id"], "s-node-counted", "{grant}");
    assert_eq!(grant["prompt_tokens"], prompt_tokens, "{grant}");
    assert_eq!(grant["reserved"], reserved, "{grant}");
    let counted_charge = cost(&price, prompt_tokens, completion_tokens);
    let settled = harness.event("reservation.settled", "s-node-counted").await;
    assert_eq!(settled["status"], "completed", "{settled}");
    assert_eq!(settled["usage_source"], "counted", "{settled}");
    assert_eq!(
        settled["counted_completion_tokens"], completion_tokens,
        "{settled}"
    );
    assert_eq!(settled["charged"], counted_charge, "{settled}");
    assert_eq!(settled["refunded"], reserved - counted_charge, "{settled}");

    // With provider usage on the end, the provider's count decides.
    let grant = publish_chat(&harness, user, "s-node-provider", Some(PROVIDER_USAGE)).await;
    assert_eq!(grant["reserved"], reserved, "{grant}");
    let provider_charge = cost(&price, PROVIDER_USAGE.0, PROVIDER_USAGE.1);
    let settled = harness
        .event("reservation.settled", "s-node-provider")
        .await;
    assert_eq!(settled["usage_source"], "provider", "{settled}");
    assert_eq!(
        settled["counted_completion_tokens"], completion_tokens,
        "{settled}"
    );
    assert_eq!(settled["charged"], provider_charge, "{settled}");

    let account = harness.account(user).await;
    assert_eq!(account.balance, BALANCE - counted_charge - provider_charge);
    assert_eq!(account.reserved, 0);
    let letters = harness.take_dead_letters().await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_producer_exits_1_when_denied() {
    let harness = Harness::start("nodedeny", |_| {}).await;
    let user = "u-node-poor";
    harness.fund(user, "g-1", 1).await;

    // The built-in sample chat, for a user who cannot afford its hold.
    let output = run_producer(&producer_env(&harness, user, "s-node-denied")).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(EXIT_DENIED), "{stdout}{stderr}");
    assert!(stderr.contains("insufficient_credits"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let holds: i64 = sqlx::query_scalar("SELECT count(*) FROM holds")
        .fetch_one(&harness.pool)
        .await
        .expect("count holds");
    assert_eq!(holds, 0);
    assert_eq!(harness.account(user).await.balance, 1);
    harness.finish().await;
}
