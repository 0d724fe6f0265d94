//! The demonstration: a worker in this process, real recorded provider
//! streams and OpenAssistant conversations published by many users at
//! once, and a closing table of what was reserved, charged and refunded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::Failure;
use crate::messages::{CreditsGranted, EndStatus, UsageSource};
use crate::producer::{ChatPlan, ChatResult, Producer, PromptSpec, StartReply, recording_plan};
use crate::settings::Settings;
use crate::{db, invariants, replay, tokens, worker};

/// Credits of a well-funded demo user: two US dollars at one credit per
/// micro-dollar, enough for every chat it is given.
const FUNDED_CREDITS: i64 = 2_000_000;

/// Credits of a poorly funded demo user, so some starts are denied.
const POOR_CREDITS: i64 = 1_500;

/// One user in this many is poorly funded.
const POOR_USER_EVERY: usize = 8;

/// Models the OpenAssistant chats are billed as, in turn.
pub(crate) const CONVERSATION_MODELS: &[&str] = &["gpt-4o-mini", "gpt-4.1-nano", "claude-haiku-4-5", "gpt-4o"];

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder with the bundled captures and conversations.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Number of demo users the chats are spread over.
    #[arg(long, default_value_t = 40)]
    pub users: usize,
    /// Chats in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// OpenAssistant conversations to replay, at most 400.
    #[arg(long, default_value_t = 400, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=400))]
    pub conversations: usize,
    /// Maximum wait for one reply or settlement, in seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_seconds: u64,
}

/// One chat of the demo with what the provider reported, if anything.
struct DemoChat {
    plan: ChatPlan,
    provider_completion_tokens: Option<u64>,
}

/// Totals printed at the end.
#[derive(Debug, Default)]
struct Totals {
    streams: u64,
    granted: u64,
    denied: u64,
    reserved: i64,
    charged: i64,
    refunded: i64,
    forgiven: i64,
    counted_tokens: u64,
    provider_tokens: u64,
    counted_tokens_of_provider_streams: u64,
    messages: u64,
}

/// Runs the demo and fails when any invariant is broken.
pub async fn run(settings: Arc<Settings>, args: DemoArgs) -> Result<(), Failure> {
    if args.users == 0 || args.concurrency == 0 {
        return Err(Failure::usage(anyhow::anyhow!("--users and --concurrency must be at least 1")));
    }
    let run_id = Uuid::now_v7().simple().to_string()[..12].to_owned();
    let users: Vec<String> = (0..args.users).map(|i| format!("demo-{run_id}-u{i}")).collect();
    let chats = load_chats(&args, &users, &run_id)?;
    eprintln!(
        "demo {run_id}: {} chats over {} users, worker starting",
        chats.len(),
        users.len()
    );

    let pool = db::migrate(&settings.database).await?;
    // The demo's worker serves no HTTP endpoint, so that a worker already
    // running on `http.listen` does not stop it.
    let mut worker_settings = (*settings).clone();
    worker_settings.http.listen = String::new();
    // SIGTERM or SIGINT, from here on, stops funding or publishing, lets
    // the worker drain what it has received, and fails the demo.
    let interrupt = CancellationToken::new();
    tokio::spawn(crate::cli::cancel_on_signal(interrupt.clone()));
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(Arc::new(worker_settings), shutdown.clone()));
    let producer = Producer::connect(&settings, Duration::from_secs(args.timeout_seconds)).await?;
    let publish = async {
        fund_users(&producer, &users).await?;
        let started = Instant::now();
        let totals = publish_chats(&producer, chats, args.concurrency).await;
        Ok::<_, Failure>((totals, started.elapsed()))
    };
    let (totals, elapsed) = tokio::select! {
        published = publish => published?,
        () = interrupt.cancelled() => {
            shutdown.cancel();
            worker.await.context("worker task failed")??;
            return Err(anyhow::anyhow!(
                "stopped by a signal before every chat ended: the holds of unfinished chats expire \
                 after reservations.ttl_seconds"
            )
            .into());
        }
    };

    shutdown.cancel();
    worker.await.context("worker task failed")??;
    let mut totals = totals?;
    totals.messages += users.len() as u64;

    let mut conn = pool.acquire().await?;
    let violations = invariants::check(&mut conn).await?;
    print_summary(&totals, elapsed, violations.len());
    if !violations.is_empty() {
        for violation in &violations {
            eprintln!("invariant {} broken for {}: {}", violation.invariant, violation.subject, violation.detail);
        }
        return Err(anyhow::anyhow!("{} invariant violations", violations.len()).into());
    }
    Ok(())
}

fn load_chats(args: &DemoArgs, users: &[String], run_id: &str) -> Result<Vec<DemoChat>, Failure> {
    let mut chats = Vec::new();
    let user = |index: usize| users[index % users.len()].clone();

    for path in capture_files(&args.data)? {
        let recording = replay::parse_recording_file(&path)
            .with_context(|| format!("cannot parse {}", path.display()))?;
        let stream_id = format!("demo-{run_id}-c{}", chats.len());
        let plan = recording_plan(&recording, &user(chats.len()), stream_id);
        chats.push(DemoChat {
            provider_completion_tokens: plan.usage.map(|usage| usage.completion_tokens),
            plan,
        });
    }

    let conversations_path = args.data.join("oasst-en100/en_100_tree.jsonl");
    let conversations = replay::load_conversations(&conversations_path)
        .with_context(|| format!("cannot read {}", conversations_path.display()))?;
    let bpe = tokens::encoder("o200k_base").expect("o200k_base is built in");
    for (index, conversation) in conversations.iter().take(args.conversations).enumerate() {
        let mut deltas = replay::token_sized_deltas(&conversation.answer, bpe);
        // Every tenth chat is cancelled halfway and every twentieth fails,
        // so the table shows refunds of unused holds.
        let status = match index {
            i if i % 20 == 19 => EndStatus::Failed,
            i if i % 10 == 9 => EndStatus::Cancelled,
            _ => EndStatus::Completed,
        };
        if status != EndStatus::Completed {
            deltas.truncate(deltas.len() / 2);
        }
        let messages = conversation.prompt_messages();
        chats.push(DemoChat {
            plan: ChatPlan {
                user_id: user(chats.len()),
                stream_id: format!("demo-{run_id}-o{index}"),
                model: CONVERSATION_MODELS[index % CONVERSATION_MODELS.len()].to_owned(),
                prompt: PromptSpec::Messages(messages),
                max_output_tokens: Some(1024),
                deltas,
                status,
                usage: None,
            },
            provider_completion_tokens: None,
        });
    }
    Ok(chats)
}

fn capture_files(data: &Path) -> Result<Vec<PathBuf>, Failure> {
    let mut files = Vec::new();
    for folder in ["vercel-ai-fixtures", "openai-python-snapshots"] {
        let folder = data.join(folder);
        let entries = std::fs::read_dir(&folder).with_context(|| {
            format!("cannot read {}; run the demo from the repository root or pass --data", folder.display())
        })?;
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".chunks.txt") || name.ends_with(".sse.txt") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

async fn fund_users(producer: &Producer, users: &[String]) -> Result<(), Failure> {
    for (index, user) in users.iter().enumerate() {
        let amount = if index % POOR_USER_EVERY == POOR_USER_EVERY - 1 {
            POOR_CREDITS
        } else {
            FUNDED_CREDITS
        };
        let grant = CreditsGranted {
            kind: Default::default(),
            message_id: format!("{user}-grant"),
            user_id: user.clone(),
            amount,
            reason: Some("demo".to_owned()),
            occurred_at: chrono::Utc::now(),
        };
        producer.publish(user, &grant.message_id, &grant).await?;
    }
    Ok(())
}

async fn publish_chats(
    producer: &Producer,
    chats: Vec<DemoChat>,
    concurrency: usize,
) -> Result<Totals, Failure> {
    let progress = ProgressBar::new(chats.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} chats settled {elapsed} {msg}")
            .expect("static template"),
    );
    let mut results = stream::iter(chats)
        .map(|chat| async move {
            let result = producer.run_chat(&chat.plan).await;
            (chat, result)
        })
        .buffer_unordered(concurrency);

    let mut totals = Totals::default();
    while let Some((chat, result)) = results.next().await {
        let result = result?;
        add_chat(&mut totals, &chat, &result);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(totals)
}

fn add_chat(totals: &mut Totals, chat: &DemoChat, result: &ChatResult) {
    totals.streams += 1;
    totals.messages += 1;
    match (&result.reply, &result.settled) {
        (StartReply::Granted(_), Some(settled)) => {
            totals.granted += 1;
            totals.messages += chat.plan.deltas.len() as u64 + 1;
            totals.reserved += settled.reserved;
            totals.charged += settled.charged;
            totals.refunded += settled.refunded;
            totals.forgiven += settled.forgiven;
            totals.counted_tokens += settled.counted_completion_tokens;
            if let (Some(provider), UsageSource::Provider) =
                (chat.provider_completion_tokens, settled.usage_source)
            {
                totals.provider_tokens += provider;
                totals.counted_tokens_of_provider_streams += settled.counted_completion_tokens;
            }
        }
        _ => totals.denied += 1,
    }
}

fn print_summary(totals: &Totals, elapsed: Duration, violations: usize) {
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let mut table = comfy_table::Table::new();
    table.set_header(["figure", "value"]);
    let difference = totals.counted_tokens_of_provider_streams as f64 / totals.provider_tokens.max(1) as f64 - 1.0;
    let rows: Vec<(&str, String)> = vec![
        ("streams", totals.streams.to_string()),
        ("granted", totals.granted.to_string()),
        ("denied", totals.denied.to_string()),
        ("credits reserved", totals.reserved.to_string()),
        ("credits charged", totals.charged.to_string()),
        ("credits refunded", totals.refunded.to_string()),
        ("credits forgiven", totals.forgiven.to_string()),
        ("completion tokens counted (all streams)", totals.counted_tokens.to_string()),
        (
            "counted vs provider completion tokens (provider counts include reasoning that is not streamed)",
            format!(
                "{} vs {} ({:+.2} %)",
                totals.counted_tokens_of_provider_streams,
                totals.provider_tokens,
                difference * 100.0
            ),
        ),
        ("messages published", totals.messages.to_string()),
        ("events per second", format!("{:.0}", totals.messages as f64 / seconds)),
        ("elapsed", format!("{seconds:.1} s")),
        ("invariant violations", violations.to_string()),
    ];
    for (name, value) in rows {
        table.add_row([name.to_owned(), value]);
    }
    println!("{table}");
}
