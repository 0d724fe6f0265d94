//! `stream-credits hold-sizing`: how closely holds fit what streams cost.
//!
//! Replays the bundled OpenAssistant conversations through a worker in
//! this process, every start without `max_output_tokens`, twice: once with
//! `reservations.size_from_history` off, so every hold covers the model's
//! maximum output, and once with it on. Each run has its own database and
//! topology prefix and removes them afterwards. For each run it prints the
//! median and 90th percentile of the granted hold divided by the charge,
//! the share of streams that cost more than the granted hold, the share
//! whose hold grew, and the share that still cost more than their hold at
//! settlement.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::{StreamExt, stream};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench::{cleanup, database_url, drop_database, percentile};
use crate::cli::Failure;
use crate::demo::CONVERSATION_MODELS;
use crate::messages::{CreditsGranted, EndStatus};
use crate::producer::{ChatPlan, Producer, PromptSpec, StartReply};
use crate::settings::Settings;
use crate::{broker, db, replay, tokens, worker};

/// Credits of each user: far more than all its streams cost, so no start
/// is denied and no hold is kept from growing.
const USER_CREDITS: i64 = 1_000_000_000;

/// Arguments of `hold-sizing`.
#[derive(Debug, Args)]
pub struct HoldSizingArgs {
    /// Folder with the OpenAssistant conversations.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Conversations to replay in each run, at most 400.
    #[arg(long, default_value_t = 400, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=400))]
    pub conversations: usize,
    /// Users the conversations are spread over, in turn.
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Chats in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Maximum wait for one reply or settlement, in seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_seconds: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Grant and settlement figures of one replayed stream.
#[derive(Debug, Clone)]
struct StreamOutcome {
    granted: i64,
    sized_by: &'static str,
    reserved: i64,
    charged: i64,
    overrun: i64,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct SizingFigures {
    /// `model_default` or `history`.
    pub sizing: &'static str,
    pub streams: usize,
    /// Median of granted hold / charge.
    pub hold_to_charge_median: f64,
    /// 90th percentile of granted hold / charge.
    pub hold_to_charge_p90: f64,
    /// Share of streams that cost more than their granted hold, which
    /// would have overrun without growth.
    pub over_granted_share: f64,
    /// Share of streams whose hold grew while they ran.
    pub grown_share: f64,
    /// Mean growths of a hold that grew.
    pub growths_mean: f64,
    /// Most growths of one hold.
    pub growths_max: i64,
    /// Share of streams that cost more than their hold at settlement.
    pub overrun_share: f64,
    /// Streams by how their hold was sized.
    pub sized_by: BTreeMap<&'static str, usize>,
}

/// Runs both replays and prints their figures.
pub async fn run(settings: Arc<Settings>, args: HoldSizingArgs) -> Result<(), Failure> {
    if args.users == 0 || args.concurrency == 0 {
        return Err(Failure::usage(anyhow::anyhow!(
            "--users and --concurrency must be at least 1"
        )));
    }
    let path = args.data.join("oasst-en100/en_100_tree.jsonl");
    let conversations = replay::load_conversations(&path).with_context(|| {
        format!(
            "cannot read {}; run from the repository root or pass --data",
            path.display()
        )
    })?;
    let run_id = Uuid::now_v7().simple().to_string()[..10].to_owned();

    let mut figures = Vec::new();
    for (sizing, size_from_history) in [("model_default", false), ("history", true)] {
        let mut phase = (*settings).clone();
        let tag = format!("{run_id}-{}", sizing.replace('_', "-"));
        phase.database.url = database_url(
            &phase,
            &format!("stream_credits_sizing_{}", tag.replace('-', "_")),
        )?;
        phase.topology.prefix = format!("sizing-{tag}");
        phase.http.listen = String::new();
        phase.reservations.size_from_history = size_from_history;
        phase.reservations.max_active_per_user = u32::MAX / 2;
        let plans = chat_plans(&conversations, &args, &tag);
        eprintln!(
            "hold-sizing {sizing}: {} chats over {} users",
            plans.len(),
            args.users
        );
        let outcome = replay_phase(Arc::new(phase), &args, &tag, plans).await?;
        figures.push(summarise(sizing, &outcome));
    }

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).expect("figures serialize")
        );
    } else {
        print_figures(&figures);
    }
    Ok(())
}

/// Builds one completed chat per conversation, without `max_output_tokens`.
fn chat_plans(
    conversations: &[replay::Conversation],
    args: &HoldSizingArgs,
    tag: &str,
) -> Vec<ChatPlan> {
    let bpe = tokens::encoder("o200k_base").expect("o200k_base is built in");
    conversations
        .iter()
        .take(args.conversations)
        .enumerate()
        .map(|(index, conversation)| {
            let messages = conversation.prompt_messages();
            ChatPlan {
                user_id: user_id(tag, index % args.users),
                stream_id: format!("sizing-{tag}-s{index}"),
                model: CONVERSATION_MODELS[index % CONVERSATION_MODELS.len()].to_owned(),
                prompt: PromptSpec::Messages(messages),
                max_output_tokens: None,
                deltas: replay::token_sized_deltas(&conversation.answer, bpe),
                status: EndStatus::Completed,
                usage: None,
            }
        })
        .collect()
}

fn user_id(tag: &str, index: usize) -> String {
    format!("sizing-{tag}-u{index}")
}

/// Outcome of one run: every stream's figures and the mean and maximum
/// growths of the holds that grew.
struct PhaseOutcome {
    streams: Vec<StreamOutcome>,
    growths_mean: f64,
    growths_max: i64,
}

/// Runs a worker on `settings`, replays `plans` through it and removes the
/// run's database and topology.
async fn replay_phase(
    settings: Arc<Settings>,
    args: &HoldSizingArgs,
    tag: &str,
    plans: Vec<ChatPlan>,
) -> Result<PhaseOutcome, Failure> {
    let pool = db::migrate(&settings.database).await?;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(settings.clone(), shutdown.clone()));
    let outcome = measure_phase(&settings, &pool, args, tag, plans).await;

    // The phase's database and queues are removed whether or not it succeeded.
    shutdown.cancel();
    let stopped = worker.await;
    match broker::connect(&settings.amqp, "stream-credits hold-sizing").await {
        Ok(connection) => cleanup(&connection, &settings, &[&settings.topology.prefix]).await,
        Err(error) => eprintln!(
            "cannot remove the queues of prefix {}: {error}",
            settings.topology.prefix
        ),
    }
    pool.close().await;
    drop_database(&settings).await;
    let outcome = outcome?;
    stopped.context("worker task failed")??;
    Ok(outcome)
}

/// Funds the phase's users, runs every chat through the phase's worker and
/// reads how often holds grew.
async fn measure_phase(
    settings: &Settings,
    pool: &PgPool,
    args: &HoldSizingArgs,
    tag: &str,
    plans: Vec<ChatPlan>,
) -> Result<PhaseOutcome, Failure> {
    let producer = Producer::connect(settings, Duration::from_secs(args.timeout_seconds)).await?;
    let users: Vec<String> = (0..args.users).map(|index| user_id(tag, index)).collect();
    for user in &users {
        let grant = CreditsGranted {
            kind: Default::default(),
            message_id: format!("{user}-grant"),
            user_id: user.clone(),
            amount: USER_CREDITS,
            reason: Some("hold-sizing".to_owned()),
            occurred_at: chrono::Utc::now(),
        };
        producer.publish(user, &grant.message_id, &grant).await?;
    }

    let mut results = stream::iter(plans)
        .map(|plan| {
            let producer = &producer;
            async move { producer.run_chat(&plan).await }
        })
        .buffered(args.concurrency);
    let mut outcomes = Vec::new();
    while let Some(result) = results.next().await {
        let result = result?;
        let (StartReply::Granted(grant), Some(settled)) = (&result.reply, &result.settled) else {
            return Err(
                anyhow::anyhow!("a start of a funded user was denied: {:?}", result.reply).into(),
            );
        };
        outcomes.push(StreamOutcome {
            granted: grant.reserved,
            sized_by: grant.sized_by.code(),
            reserved: settled.reserved,
            charged: settled.charged,
            overrun: settled.overrun,
        });
    }
    drop(results);
    let (growths_mean, growths_max): (f64, i64) = sqlx::query_as(
        "SELECT coalesce(avg(extensions) FILTER (WHERE extensions > 0), 0)::float8, \
         coalesce(max(extensions), 0)::bigint FROM holds",
    )
    .fetch_one(pool)
    .await?;
    Ok(PhaseOutcome {
        streams: outcomes,
        growths_mean,
        growths_max,
    })
}

fn summarise(sizing: &'static str, phase: &PhaseOutcome) -> SizingFigures {
    let outcomes = &phase.streams;
    let mut ratios: Vec<f64> = outcomes
        .iter()
        .filter(|outcome| outcome.charged > 0)
        .map(|outcome| outcome.granted as f64 / outcome.charged as f64)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let share = |count: usize| count as f64 / outcomes.len().max(1) as f64;
    let over_granted = outcomes
        .iter()
        .filter(|outcome| outcome.charged > outcome.granted)
        .count();
    let grown = outcomes
        .iter()
        .filter(|outcome| outcome.reserved > outcome.granted)
        .count();
    let overrun = outcomes
        .iter()
        .filter(|outcome| outcome.overrun > 0)
        .count();
    let mut sized_by = BTreeMap::new();
    for outcome in outcomes {
        *sized_by.entry(outcome.sized_by).or_insert(0) += 1;
    }
    SizingFigures {
        sizing,
        streams: outcomes.len(),
        hold_to_charge_median: percentile(&ratios, 0.5),
        hold_to_charge_p90: percentile(&ratios, 0.9),
        over_granted_share: share(over_granted),
        grown_share: share(grown),
        growths_mean: phase.growths_mean,
        growths_max: phase.growths_max,
        overrun_share: share(overrun),
        sized_by,
    }
}

/// One table row: its name and how to format a run's value.
type FigureRow = (&'static str, fn(&SizingFigures) -> String);

fn print_figures(figures: &[SizingFigures]) {
    let mut table = comfy_table::Table::new();
    let mut header = vec!["figure".to_owned()];
    header.extend(figures.iter().map(|run| format!("sizing: {}", run.sizing)));
    table.set_header(header);
    let rows: [FigureRow; 8] = [
        ("streams", |run| run.streams.to_string()),
        ("granted hold / charge, median", |run| {
            format!("{:.2}", run.hold_to_charge_median)
        }),
        ("granted hold / charge, p90", |run| {
            format!("{:.2}", run.hold_to_charge_p90)
        }),
        ("streams costing more than the granted hold", |run| {
            format!("{:.1} %", run.over_granted_share * 100.0)
        }),
        ("streams whose hold grew", |run| {
            format!("{:.1} %", run.grown_share * 100.0)
        }),
        ("growths of a grown hold, mean / max", |run| {
            format!("{:.1} / {}", run.growths_mean, run.growths_max)
        }),
        ("streams over their hold at settlement", |run| {
            format!("{:.1} %", run.overrun_share * 100.0)
        }),
        ("sized by", |run| {
            let parts: Vec<String> = run
                .sized_by
                .iter()
                .map(|(how, count)| format!("{how} {count}"))
                .collect();
            parts.join(", ")
        }),
    ];
    for (name, value) in rows {
        let mut row = vec![name.to_owned()];
        row.extend(figures.iter().map(value));
        table.add_row(row);
    }
    println!("{table}");
}
