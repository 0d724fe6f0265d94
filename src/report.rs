//! `stream-credits report`: a read-only reconciliation of the ledger and
//! the dead-letter queue, for operators and auditors.
//!
//! It prints hold counts, credits reserved against charged, ledger totals,
//! denied starts, estimate accuracy and counted against provider tokens
//! by model, dead letters by reason, and the result of every invariant
//! check (see [`crate::invariants`]). The database figures are read in one
//! read-only repeatable-read transaction, so they agree with each other.
//! Nothing is written: dead letters are read unacknowledged and go back
//! to their queue when the channel closes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use sqlx::PgConnection;

use crate::cli::Failure;
use crate::invariants::{self, SettledHold, Violation};
use crate::messages::UsageSource;
use crate::settings::Settings;
use crate::topology::Names;
use crate::{db, dlq};

/// Maximum wait for RabbitMQ before the report marks the dead letters
/// unavailable. Each letter costs one `basic.get` round trip, estimated at
/// well under a millisecond on one host, so this covers a full read of
/// [`dlq::SCAN_MAX`] letters.
const BROKER_WAIT: Duration = Duration::from_secs(120);

/// Arguments of `report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Count only what happened at or after TIME: an RFC 3339 time such as
    /// 2026-12-04T10:00:00Z, or an age such as 24h or 7d. Open holds, dead
    /// letters and the invariant checks always cover everything.
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Parses `--since`: an RFC 3339 time, or an age counted back from now.
pub fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(text).map_err(|_| {
        format!(
            "`{text}` is neither an RFC 3339 time such as 2026-12-04T10:00:00Z \
             nor an age such as 24h or 7d"
        )
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| format!("the age `{text}` reaches back too far"))
}

/// The whole report, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub generated_at: DateTime<Utc>,
    /// Start of the period; `None` covers everything.
    pub since: Option<DateTime<Utc>>,
    pub holds: HoldCounts,
    pub credits: CreditTotals,
    pub ledger: LedgerTotals,
    /// Denied starts by reason code, from the denial events in the
    /// outbox. `invalid_request` denials are never recorded there, because
    /// the worker sends them without writing an outbox row. Their starts
    /// are dead-lettered and counted under `dead_letters`.
    pub denials: BTreeMap<String, i64>,
    pub estimates: Vec<EstimateAccuracy>,
    pub token_counts: Vec<TokenComparison>,
    pub dead_letters: DeadLetters,
    pub invariants: InvariantResults,
}

/// Holds opened, settled and adjusted in the period, and open now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HoldCounts {
    pub opened: i64,
    /// Every settlement, expiry included.
    pub settled: i64,
    /// Settlements by status: `completed`, `cancelled`, `failed`, `expired`.
    pub settled_by_status: BTreeMap<String, i64>,
    pub expired: i64,
    /// Expired holds whose late `stream.ended` corrected the charge.
    pub adjusted: i64,
    /// Holds open now, whatever the period.
    pub open: i64,
    /// Credits held by the open holds.
    pub open_reserved: CreditSum,
}

/// Credits of the holds settled in the period. `reserved - released +
/// overrun_charged = charged`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreditTotals {
    pub reserved: CreditSum,
    /// Total the users paid, adjustments included.
    pub charged: CreditSum,
    /// The part of the holds that went back: `reserved - charged` of each
    /// hold charged less than it held.
    pub released: CreditSum,
    /// `charged - reserved` of each hold charged more than it held.
    pub overrun_charged: CreditSum,
    /// The cost above the hold that the `cap` policy did not charge.
    pub forgiven: CreditSum,
}

/// Sums of the ledger entries written in the period.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LedgerTotals {
    pub granted: CreditSum,
    /// Charged at settlement, before adjustments.
    pub charged: CreditSum,
    /// Net amount adjustments charged on top, negative when they gave
    /// back more.
    pub adjusted: CreditSum,
}

/// A sum of credit amounts. Each amount is an i64, but a sum over many
/// accounts can pass the i64 range, so sums are kept in 128 bits.
///
/// JSON carries a sum as a number when it fits in an i64 and as a decimal
/// string otherwise, because common JSON readers (serde_json without
/// `arbitrary_precision`, JavaScript) would round a larger number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct CreditSum(pub i128);

impl Serialize for CreditSum {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(self.0) {
            Ok(sum) => serializer.serialize_i64(sum),
            Err(_) => serializer.serialize_str(&self.0.to_string()),
        }
    }
}

impl std::fmt::Display for CreditSum {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(formatter)
    }
}

/// Parses the text of a PostgreSQL `numeric` sum. The queries sum in
/// `numeric` and cast to text, because a `bigint` sum overflows with the
/// error `bigint out of range` once the total passes the i64 range.
fn parse_sum(text: &str) -> Result<CreditSum, sqlx::Error> {
    text.parse::<i128>()
        .map(CreditSum)
        .map_err(|error| sqlx::Error::Decode(format!("credit sum `{text}`: {error}").into()))
}

/// Accuracy of hold sizes against final charges for one model, over the
/// holds settled in the period. The estimate is the hold as granted, so
/// growth while a stream ran counts as the estimate falling short.
#[derive(Debug, Clone, Serialize)]
pub struct EstimateAccuracy {
    pub model: String,
    pub holds: u64,
    /// Holds that grew past their grant while their stream ran.
    pub grown: u64,
    /// Holds that charged nothing, such as failed streams without usage;
    /// they have no hold-to-charge ratio.
    pub charged_nothing: u64,
    /// Median of granted hold / final charge (nearest rank).
    pub hold_to_charge_median: Option<f64>,
    /// 90th percentile of granted hold / final charge (nearest rank).
    pub hold_to_charge_p90: Option<f64>,
    /// Share of holds whose usage cost more than the granted hold.
    pub overrun_share: f64,
}

/// The worker's counts against the provider's for one model.
///
/// Only streams settled by their own `stream.ended` with provider usage
/// count: after expiry the worker drops chunks, so the count of an
/// adjusted hold can fall short for reasons other than counting.
#[derive(Debug, Clone, Serialize)]
pub struct TokenComparison {
    pub model: String,
    pub streams: u64,
    pub completion: TokenDifference,
    /// The prompt as counted at the start, or as the producer stated it.
    pub prompt: TokenDifference,
}

/// Token sums and the mean of each stream's |counted - provider| /
/// provider in percent. Streams whose provider count is 0 are left out of
/// the mean.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenDifference {
    pub counted: u64,
    pub provider: u64,
    pub mean_abs_diff_percent: Option<f64>,
}

/// The dead-letter queue as it is now.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeadLetters {
    Read {
        queue: String,
        total: usize,
        /// Whether the queue held more than one read takes
        /// ([`dlq::SCAN_MAX`]), so the counts cover only the first ones.
        truncated: bool,
        by_reason: BTreeMap<String, usize>,
    },
    Unavailable {
        queue: String,
        error: String,
    },
}

/// The invariant checks over every account and hold.
#[derive(Debug, Clone, Serialize)]
pub struct InvariantResults {
    pub accounts_checked: i64,
    pub holds_checked: i64,
    pub violations: Vec<Violation>,
    /// Accounts named by any violation, sorted.
    pub violating_accounts: Vec<String>,
}

/// Builds the report, prints it and fails when an invariant is broken or
/// the dead letters could not be read.
pub async fn run(settings: Arc<Settings>, args: ReportArgs) -> Result<(), Failure> {
    let generated_at = Utc::now();
    let (database, dead_letters) = tokio::join!(
        read_database(&settings, args.since),
        read_dead_letters(&settings)
    );
    let database = database.context("cannot read the ledger database")?;
    let report = Report {
        generated_at,
        since: args.since,
        holds: database.holds,
        credits: database.credits,
        ledger: database.ledger,
        denials: database.denials,
        estimates: database.estimates,
        token_counts: database.token_counts,
        dead_letters,
        invariants: database.invariants,
    };

    if args.json {
        println!(
            "{}",
            crate::cli::json_text(&report, true)
        );
    } else {
        print!("{}", render_text(&report));
    }
    outcome(&report)
}

fn outcome(report: &Report) -> Result<(), Failure> {
    let mut problems = Vec::new();
    let invariants = &report.invariants;
    if !invariants.violations.is_empty() {
        problems.push(format!(
            "{} invariant violations in accounts {}",
            invariants.violations.len(),
            invariants.violating_accounts.join(", ")
        ));
    }
    if let DeadLetters::Unavailable { error, .. } = &report.dead_letters {
        problems.push(format!("dead letters could not be read: {error}"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(anyhow::anyhow!(problems.join("; ")).into())
}

/// The parts of the report read from PostgreSQL.
struct DatabaseFigures {
    holds: HoldCounts,
    credits: CreditTotals,
    ledger: LedgerTotals,
    denials: BTreeMap<String, i64>,
    estimates: Vec<EstimateAccuracy>,
    token_counts: Vec<TokenComparison>,
    invariants: InvariantResults,
}

async fn read_database(
    settings: &Settings,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<DatabaseFigures> {
    let pool = db::connect(&settings.database).await?;
    let mut tx = pool.begin().await?;
    // One snapshot for every figure, and a guarantee that nothing is
    // written.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;

    let holds = hold_counts(&mut tx, since).await?;
    let (credits, tallies) = tally_settled(&mut tx, since).await?;
    let figures = DatabaseFigures {
        holds,
        credits,
        ledger: ledger_totals(&mut tx, since).await?,
        denials: denials(&mut tx, since).await?,
        estimates: tallies
            .iter()
            .map(|(model, tally)| tally.estimate(model))
            .collect(),
        token_counts: tallies
            .iter()
            .filter(|(_, tally)| tally.compared > 0)
            .map(|(model, tally)| tally.comparison(model))
            .collect(),
        invariants: invariant_results(&mut tx).await?,
    };
    tx.rollback().await?;
    pool.close().await;
    Ok(figures)
}

async fn hold_counts(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<HoldCounts, sqlx::Error> {
    let (opened, adjusted, open, open_reserved): (i64, i64, i64, String) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE $1::timestamptz IS NULL OR opened_at >= $1), \
         count(*) FILTER (WHERE adjusted_at >= coalesce($1, '-infinity')), \
         count(*) FILTER (WHERE settled_at IS NULL), \
         coalesce(sum(reserved) FILTER (WHERE settled_at IS NULL), 0)::text \
         FROM holds",
    )
    .bind(since)
    .fetch_one(&mut *conn)
    .await?;
    let settled_by_status: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT settle_status, count(*) FROM holds \
         WHERE settled_at >= coalesce($1::timestamptz, '-infinity') GROUP BY settle_status",
    )
    .bind(since)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    Ok(HoldCounts {
        opened,
        settled: settled_by_status.values().sum(),
        expired: settled_by_status.get("expired").copied().unwrap_or(0),
        settled_by_status,
        adjusted,
        open,
        open_reserved: parse_sum(&open_reserved)?,
    })
}

async fn ledger_totals(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<LedgerTotals, sqlx::Error> {
    let (granted, charged, adjusted): (String, String, String) = sqlx::query_as(
        "SELECT coalesce(sum(amount) FILTER (WHERE kind = 'grant'), 0)::text, \
         coalesce(-sum(amount) FILTER (WHERE kind = 'charge'), 0)::text, \
         coalesce(-sum(amount) FILTER (WHERE kind = 'adjustment'), 0)::text \
         FROM ledger WHERE created_at >= coalesce($1::timestamptz, '-infinity')",
    )
    .bind(since)
    .fetch_one(&mut *conn)
    .await?;
    Ok(LedgerTotals {
        granted: parse_sum(&granted)?,
        charged: parse_sum(&charged)?,
        adjusted: parse_sum(&adjusted)?,
    })
}

async fn denials(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT body ->> 'reason', count(*) FROM outbox \
         WHERE event_type = 'reservation.denied' AND destination = 'event' \
         AND created_at >= coalesce($1::timestamptz, '-infinity') GROUP BY 1",
    )
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn invariant_results(conn: &mut PgConnection) -> Result<InvariantResults, sqlx::Error> {
    let (accounts_checked, holds_checked): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM holds)")
            .fetch_one(&mut *conn)
            .await?;
    let violations = invariants::check(conn).await?;
    let mut violating_accounts: Vec<String> = violations
        .iter()
        .map(|violation| violation.user_id.clone())
        .collect();
    violating_accounts.sort();
    violating_accounts.dedup();
    Ok(InvariantResults {
        accounts_checked,
        holds_checked,
        violations,
        violating_accounts,
    })
}

/// Reads every hold settled in the period once, adding it to the credit
/// totals and to its model's tally.
async fn tally_settled(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<(CreditTotals, BTreeMap<String, ModelTally>), sqlx::Error> {
    let mut credits = CreditTotals::default();
    let mut tallies: BTreeMap<String, ModelTally> = BTreeMap::new();
    let mut holds = invariants::settled_holds(conn, since);
    while let Some(hold) = holds.next().await {
        let hold = hold?;
        // A hold whose deciding event is missing or whose cost overflows
        // is reported by the invariant checks and has no cost here.
        let cost = hold
            .resettle()
            .and_then(Result::ok)
            .map(|settled| settled.cost.0);
        credits.add(&hold, cost);
        tallies
            .entry(hold.model.clone())
            .or_default()
            .add(&hold, cost);
    }
    Ok((credits, tallies))
}

impl CreditTotals {
    fn add(&mut self, hold: &SettledHold, cost: Option<i64>) {
        let reserved = i128::from(hold.reserved);
        let charged = i128::from(hold.charged);
        self.reserved.0 += reserved;
        self.charged.0 += charged;
        self.released.0 += (reserved - charged).max(0);
        self.overrun_charged.0 += (charged - reserved).max(0);
        if let Some(cost) = cost {
            self.forgiven.0 += (i128::from(cost) - charged).max(0);
        }
    }
}

/// Running sums over one model's settled holds.
#[derive(Debug, Default)]
struct ModelTally {
    holds: u64,
    grown: u64,
    charged_nothing: u64,
    hold_to_charge: Vec<f64>,
    overruns: u64,
    /// Streams settled at their end with provider usage.
    compared: u64,
    completion: DifferenceTally,
    prompt: DifferenceTally,
}

#[derive(Debug, Default)]
struct DifferenceTally {
    counted: u64,
    provider: u64,
    percent_sum: f64,
    percent_streams: u64,
}

impl ModelTally {
    fn add(&mut self, hold: &SettledHold, cost: Option<i64>) {
        self.holds += 1;
        if hold.reserved > hold.granted {
            self.grown += 1;
        }
        if hold.charged > 0 {
            self.hold_to_charge
                .push(hold.granted as f64 / hold.charged as f64);
        } else {
            self.charged_nothing += 1;
        }
        if cost.is_some_and(|cost| cost > hold.granted) {
            self.overruns += 1;
        }

        let Some(decided) = hold.decided_by else {
            return;
        };
        if hold.adjusted || decided.usage_source != UsageSource::Provider {
            return;
        }
        self.compared += 1;
        self.completion
            .add(hold.counted.completion_tokens, decided.completion_tokens);
        self.prompt
            .add(hold.counted.prompt_tokens, decided.prompt_tokens);
    }

    fn estimate(&self, model: &str) -> EstimateAccuracy {
        let mut ratios = self.hold_to_charge.clone();
        ratios.sort_by(f64::total_cmp);
        EstimateAccuracy {
            model: model.to_owned(),
            holds: self.holds,
            grown: self.grown,
            charged_nothing: self.charged_nothing,
            hold_to_charge_median: nearest_rank(&ratios, 0.5),
            hold_to_charge_p90: nearest_rank(&ratios, 0.9),
            overrun_share: self.overruns as f64 / self.holds as f64,
        }
    }

    fn comparison(&self, model: &str) -> TokenComparison {
        TokenComparison {
            model: model.to_owned(),
            streams: self.compared,
            completion: self.completion.difference(),
            prompt: self.prompt.difference(),
        }
    }
}

impl DifferenceTally {
    fn add(&mut self, counted: u64, provider: u64) {
        self.counted += counted;
        self.provider += provider;
        if provider > 0 {
            self.percent_sum += counted.abs_diff(provider) as f64 / provider as f64 * 100.0;
            self.percent_streams += 1;
        }
    }

    fn difference(&self) -> TokenDifference {
        TokenDifference {
            counted: self.counted,
            provider: self.provider,
            mean_abs_diff_percent: (self.percent_streams > 0)
                .then(|| self.percent_sum / self.percent_streams as f64),
        }
    }
}

/// Returns the nearest-rank percentile `share` (0 to 1) of ascending
/// `sorted` values: the smallest value with at least that share of values
/// at or below it.
fn nearest_rank(sorted: &[f64], share: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (share * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

async fn read_dead_letters(settings: &Settings) -> DeadLetters {
    let queue = Names::new(&settings.topology.prefix).dead;
    let letters = match tokio::time::timeout(BROKER_WAIT, dlq::peek(settings)).await {
        Ok(Ok(letters)) => letters,
        Ok(Err(failure)) => {
            let error = failure.error.to_string();
            return DeadLetters::Unavailable { queue, error };
        }
        Err(_) => {
            let error = format!("RabbitMQ did not answer within {} s", BROKER_WAIT.as_secs());
            return DeadLetters::Unavailable { queue, error };
        }
    };
    let mut by_reason = BTreeMap::new();
    for letter in &letters {
        *by_reason.entry(letter.reason.clone()).or_insert(0) += 1;
    }
    DeadLetters::Read {
        queue,
        total: letters.len(),
        truncated: letters.len() >= dlq::SCAN_MAX,
        by_reason,
    }
}

/// Title of the denials table. It names the reason the table cannot
/// count, so a reader looks for those starts under the dead letters.
const DENIALS_TITLE: &str = "Denied starts (invalid_request denials are not recorded; \
     their starts are dead-lettered and counted under Dead letters)";

/// Renders the report as titled plain-text tables.
pub fn render_text(report: &Report) -> String {
    let period = match report.since {
        Some(since) => format!("since {}", since.to_rfc3339_opts(SecondsFormat::Secs, true)),
        None => "all time".to_owned(),
    };
    let generated_at = report
        .generated_at
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let sections = [
        format!("Reconciliation report, {period}, generated {generated_at}"),
        section("Holds", holds_table(&report.holds)),
        section(
            "Credits of the holds settled",
            credits_table(&report.credits),
        ),
        section("Ledger entries", ledger_table(&report.ledger)),
        section(DENIALS_TITLE, counts_table("reason", &report.denials)),
        section(
            "Estimate accuracy by model",
            estimates_table(&report.estimates),
        ),
        section(
            "Counted against provider tokens by model",
            tokens_table(&report.token_counts),
        ),
        dead_letters_text(&report.dead_letters),
        invariants_text(&report.invariants),
    ];
    let mut text = sections.join("\n\n");
    text.push('\n');
    text
}

fn section(title: &str, table: comfy_table::Table) -> String {
    format!("{title}\n{table}")
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::ASCII_FULL_CONDENSED);
    table.set_header(header.to_vec());
    table
}

fn holds_table(holds: &HoldCounts) -> comfy_table::Table {
    let mut table = table(&["holds", "count"]);
    table.add_row(vec!["opened".to_owned(), holds.opened.to_string()]);
    table.add_row(vec!["settled".to_owned(), holds.settled.to_string()]);
    for (status, count) in &holds.settled_by_status {
        table.add_row(vec![format!("  {status}"), count.to_string()]);
    }
    table.add_row(vec![
        "adjusted after expiry".to_owned(),
        holds.adjusted.to_string(),
    ]);
    table.add_row(vec!["open now".to_owned(), holds.open.to_string()]);
    table.add_row(vec![
        "credits held now".to_owned(),
        holds.open_reserved.to_string(),
    ]);
    table
}

fn credits_table(credits: &CreditTotals) -> comfy_table::Table {
    let mut table = table(&["credits", "amount"]);
    let rows = [
        ("reserved", credits.reserved),
        ("charged", credits.charged),
        ("released", credits.released),
        ("charged beyond holds", credits.overrun_charged),
        ("forgiven", credits.forgiven),
    ];
    for (name, amount) in rows {
        table.add_row(vec![name.to_owned(), amount.to_string()]);
    }
    table
}

fn ledger_table(ledger: &LedgerTotals) -> comfy_table::Table {
    let mut table = table(&["entries", "amount"]);
    table.add_row(vec!["granted".to_owned(), ledger.granted.to_string()]);
    table.add_row(vec![
        "charged at settlement".to_owned(),
        ledger.charged.to_string(),
    ]);
    table.add_row(vec![
        "charged by adjustments".to_owned(),
        ledger.adjusted.to_string(),
    ]);
    table
}

fn counts_table<V: ToString>(key: &str, counts: &BTreeMap<String, V>) -> comfy_table::Table {
    let mut table = table(&[key, "count"]);
    for (name, count) in counts {
        table.add_row(vec![name.clone(), count.to_string()]);
    }
    table
}

fn estimates_table(estimates: &[EstimateAccuracy]) -> comfy_table::Table {
    let mut table = table(&[
        "model",
        "settled holds",
        "grown",
        "hold/charge median",
        "hold/charge p90",
        "overrun share",
        "charged nothing",
    ]);
    for estimate in estimates {
        table.add_row(vec![
            estimate.model.clone(),
            estimate.holds.to_string(),
            estimate.grown.to_string(),
            decimal(estimate.hold_to_charge_median),
            decimal(estimate.hold_to_charge_p90),
            format!("{:.1} %", estimate.overrun_share * 100.0),
            estimate.charged_nothing.to_string(),
        ]);
    }
    table
}

fn tokens_table(comparisons: &[TokenComparison]) -> comfy_table::Table {
    let mut table = table(&[
        "model",
        "tokens",
        "streams",
        "counted",
        "provider",
        "mean |diff| %",
    ]);
    for comparison in comparisons {
        let kinds = [
            ("completion", &comparison.completion),
            ("prompt", &comparison.prompt),
        ];
        for (kind, difference) in kinds {
            table.add_row(vec![
                comparison.model.clone(),
                kind.to_owned(),
                comparison.streams.to_string(),
                difference.counted.to_string(),
                difference.provider.to_string(),
                decimal(difference.mean_abs_diff_percent),
            ]);
        }
    }
    table
}

fn decimal(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.2}"))
}

fn dead_letters_text(dead_letters: &DeadLetters) -> String {
    match dead_letters {
        DeadLetters::Read {
            queue,
            total,
            truncated,
            by_reason,
        } => {
            let more = if *truncated { ", more not read" } else { "" };
            let title = format!("Dead letters in {queue}: {total}{more}");
            section(&title, counts_table("reason", by_reason))
        }
        DeadLetters::Unavailable { queue, error } => {
            format!("Dead letters in {queue}: UNAVAILABLE, {error}")
        }
    }
}

fn invariants_text(results: &InvariantResults) -> String {
    let checked = format!(
        "{} accounts and {} holds",
        results.accounts_checked, results.holds_checked
    );
    if results.violations.is_empty() {
        return format!("Invariants: every check holds over {checked}");
    }
    let mut table = table(&["account", "invariant", "subject", "detail"]);
    for violation in &results.violations {
        table.add_row(vec![
            violation.user_id.clone(),
            violation.invariant.to_owned(),
            violation.subject.clone(),
            violation.detail.clone(),
        ]);
    }
    let title = format!(
        "Invariants: {} VIOLATIONS over {checked}, in accounts {}",
        results.violations.len(),
        results.violating_accounts.join(", ")
    );
    section(&title, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_rfc3339() {
        let since = parse_since("2026-12-04T10:00:00+01:00").unwrap();
        assert_eq!(since.to_rfc3339(), "2026-12-04T09:00:00+00:00");
    }

    #[test]
    fn since_accepts_an_age() {
        let before = Utc::now();
        let since = parse_since("7d").unwrap();
        let age = before - since;
        assert!(
            age >= chrono::Duration::days(7) - chrono::Duration::seconds(5),
            "{age}"
        );
        assert!(age <= chrono::Duration::days(7), "{age}");
        assert!(parse_since("24h").is_ok());
    }

    #[test]
    fn since_rejects_other_text() {
        for text in ["yesterday", "24", "2026-12-04", ""] {
            let error = parse_since(text).unwrap_err();
            assert!(error.contains("RFC 3339"), "{text}: {error}");
        }
    }

    #[test]
    fn credit_sum_json_is_exact() {
        let json = |sum: i128| serde_json::to_value(CreditSum(sum)).unwrap();
        assert_eq!(json(-5), serde_json::json!(-5));
        assert_eq!(json(i64::MAX.into()), serde_json::json!(i64::MAX));
        let past_max = i128::from(i64::MAX) + 1;
        assert_eq!(json(past_max), serde_json::json!("9223372036854775808"));
        let past_min = i128::from(i64::MIN) - 1;
        assert_eq!(json(past_min), serde_json::json!("-9223372036854775809"));
        assert_eq!(parse_sum("9223372036854776807").unwrap().0, past_max + 999);
        assert!(parse_sum("1.5").is_err());
    }

    #[test]
    fn nearest_rank_picks_a_stored_value() {
        let values = [0.4, 2.0, 5.5, 7.0, 15.0];
        assert_eq!(nearest_rank(&values, 0.5), Some(5.5));
        assert_eq!(nearest_rank(&values, 0.9), Some(15.0));
        assert_eq!(nearest_rank(&values[..4], 0.5), Some(2.0));
        assert_eq!(nearest_rank(&values[..1], 0.9), Some(0.4));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn token_difference_skips_zero_provider_counts() {
        let mut tally = DifferenceTally::default();
        tally.add(12, 14);
        tally.add(16, 20);
        tally.add(3, 0);
        let difference = tally.difference();
        assert_eq!(difference.counted, 31);
        assert_eq!(difference.provider, 34);
        let expected = (2.0 / 14.0 + 4.0 / 20.0) / 2.0 * 100.0;
        let mean = difference.mean_abs_diff_percent.unwrap();
        assert!((mean - expected).abs() < 1e-9, "{mean}");
    }
}
