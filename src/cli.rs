//! The command line: parses arguments, loads settings and runs a command.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad settings.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::ledger::{Ledger, LedgerError, Outcome, ReplyTo};
use crate::messages::{CreditsGranted, Inbound, Rejection};
use crate::settings::Settings;
use crate::worker::{self, WorkerError};
use crate::{accounts, bench, db, demo, dlq, hold_sizing, producer, report, telemetry};

/// Credit reservation and settlement for streaming LLM chats.
#[derive(Debug, Parser)]
#[command(name = "stream-credits", version, about)]
pub struct Cli {
    /// TOML settings file; defaults to ./stream-credits.toml when present.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker until SIGTERM or SIGINT, then drain and exit 0.
    Run,
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Replay real recorded chats through the broker to a worker and
    /// print what was reserved, charged and refunded.
    Demo(demo::DemoArgs),
    /// Publish recorded provider streams to a running worker and print
    /// each stream's settlement.
    Replay(producer::ReplayArgs),
    /// Measure throughput, latency and memory against the local services
    /// on a database and topology prefix of its own.
    Bench(bench::BenchArgs),
    /// Replay the OpenAssistant conversations with and without holds sized
    /// from history and print how closely holds fit charges.
    HoldSizing(hold_sizing::HoldSizingArgs),
    /// Grant credits or show an account.
    #[command(subcommand)]
    Account(AccountCommand),
    /// List, show, replay or purge dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Print a read-only reconciliation of the ledger and the dead
    /// letters; exit 1 when an invariant is broken or the broker is
    /// unreachable.
    Report(report::ReportArgs),
    /// Reply at once to every message on the shard queues, without the
    /// database. The benchmark runs this as its echo responder.
    #[command(hide = true)]
    EchoResponder,
}

/// Account commands.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Add credits to a user's balance.
    Grant(GrantArgs),
    /// Print a user's balance, reserved and available credits.
    Show(ShowArgs),
}

/// Arguments of `account grant`.
#[derive(Debug, Args)]
pub struct GrantArgs {
    pub user: String,
    /// Credits to add, at least 1.
    pub amount: i64,
    /// Free text stored with the ledger entry.
    #[arg(long)]
    pub reason: Option<String>,
    /// Key that makes a repeated grant apply once; a new one by default.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// Arguments of `account show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    pub user: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    /// Bad usage or settings: exit 2.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

/// Parses the process arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return report(Failure::from(error)),
    };

    // The worker listens for SIGTERM before the settings are validated,
    // which builds tokenizer tables and takes a moment, so a stop sent
    // during start-up still ends in a clean exit.
    let shutdown = CancellationToken::new();
    if matches!(cli.command, Command::Run) {
        runtime.spawn(cancel_on_signal(shutdown.clone()));
    }

    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => return report(Failure::usage(error)),
    };
    // The worker keeps lapin's log lines, which tell of a connection's
    // troubles that it recovers from without returning an error.
    telemetry::init(&settings.log, !matches!(cli.command, Command::Run));
    let settings = Arc::new(settings);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run(settings, shutdown).await,
            command => execute(command, settings).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    eprintln!("error: {}", error_chain_text(&failure.error));
    ExitCode::from(failure.code)
}

/// Joins an error and its causes with `: `, leaving out a cause whose
/// text is already shown. Many errors, sqlx's among them, put their
/// cause in their own message and also return it as their source.
fn error_chain_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// Runs one command with loaded settings.
pub async fn execute(command: Command, settings: Arc<Settings>) -> Result<(), Failure> {
    match command {
        Command::Run => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            run(settings, shutdown).await
        }
        Command::Migrate => {
            db::migrate(&settings.database).await?;
            eprintln!("every migration is applied");
            Ok(())
        }
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Replay(args) => producer::replay(settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::HoldSizing(args) => hold_sizing::run(settings, args).await,
        Command::Account(AccountCommand::Grant(args)) => grant(settings, args).await,
        Command::Account(AccountCommand::Show(args)) => show(settings, args).await,
        Command::Dlq(command) => dlq::execute(settings, command).await,
        Command::Report(args) => report::run(settings, args).await,
        Command::EchoResponder => bench::serve_echo(settings).await,
    }
}

async fn run(settings: Arc<Settings>, shutdown: CancellationToken) -> Result<(), Failure> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "worker starting");
    worker::run(settings, shutdown).await.map_err(|error| match error {
        WorkerError::Topology(_) => Failure::usage(error),
        WorkerError::Database(_) | WorkerError::Listen { .. } => Failure::from(error),
    })
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = interrupt.await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    token.cancel();
}

/// Returns `text` for a terminal, with its invisible characters escaped.
/// Controls could clear the terminal, and format characters such as a
/// right-to-left override or a zero-width space could make one id look
/// like another. Separators other than the ASCII space, private-use and
/// unassigned code points, and the letters and marks that Unicode lets
/// a renderer draw as nothing (a Hangul filler, a variation selector)
/// are escaped too. A backslash is doubled, so that no id reads as the
/// escaped form of another. JSON output escapes the same characters the
/// JSON way (see [`json_text`]), which keeps every value as it is.
pub(crate) fn printable(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if is_hidden(character) || character == '\\' {
            escaped.extend(character.escape_default());
        } else {
            escaped.push(character);
        }
    }
    escaped
}

/// Returns whether a terminal would show `character` as nothing, as a
/// move of the cursor or of the text around it, or not at all.
fn is_hidden(character: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

    let category = character.general_category();
    matches!(
        category,
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Surrogate
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) || (category == GeneralCategory::SpaceSeparator && character != ' ')
        || drawn_as_nothing(character)
}

/// Serializes `value` as JSON for a terminal, indented when `pretty`.
/// Every hidden character of a string (see [`printable`]) is written as a
/// `\uXXXX` escape, so a reader that parses the output gets each value
/// exactly, and a terminal shows no right-to-left override or zero-width
/// space in it.
pub(crate) fn json_text<T: serde::Serialize + ?Sized>(value: &T, pretty: bool) -> String {
    let mut output = Vec::new();
    let written = if pretty {
        value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut output,
            VisibleStrings(serde_json::ser::PrettyFormatter::new()),
        ))
    } else {
        value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut output,
            VisibleStrings(serde_json::ser::CompactFormatter),
        ))
    };
    written.expect("values of this program serialize to JSON");
    String::from_utf8(output).expect("serde_json writes UTF-8")
}

/// A JSON formatter that writes hidden characters of strings as escapes
/// and leaves the layout to the formatter it wraps.
struct VisibleStrings<F>(F);

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for VisibleStrings<F> {
    fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, fragment: &str) -> std::io::Result<()> {
        let mut start = 0;
        for (offset, character) in fragment.char_indices() {
            if !is_hidden(character) {
                continue;
            }
            self.0.write_string_fragment(writer, &fragment[start..offset])?;
            let mut units = [0u16; 2];
            for unit in character.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = offset + character.len_utf8();
        }
        self.0.write_string_fragment(writer, &fragment[start..])
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.begin_array(writer)
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.end_array(writer)
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_array_value(writer, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(writer)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.begin_object(writer)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.end_object(writer)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_object_key(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(writer)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(writer)
    }
}

/// Returns whether `character` is one of the default-ignorable code
/// points of Unicode's DerivedCoreProperties that is neither a control
/// nor a format character, which `printable` catches by category.
fn drawn_as_nothing(character: char) -> bool {
    matches!(
        character,
        '\u{34f}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180d}'
            | '\u{180f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{ffa0}'
            | '\u{e0100}'..='\u{e01ef}'
    )
}

/// Retries of `account grant` after its transaction fails for a reason
/// that a retry may clear, such as a concurrent grant with the same key.
const GRANT_RETRIES: usize = 2;

async fn grant(settings: Arc<Settings>, args: GrantArgs) -> Result<(), Failure> {
    let message = Inbound::CreditsGranted(CreditsGranted {
        kind: Default::default(),
        message_id: args
            .idempotency_key
            .unwrap_or_else(|| format!("cli-grant-{}", uuid::Uuid::now_v7())),
        user_id: args.user.clone(),
        amount: args.amount,
        reason: args.reason,
        occurred_at: chrono::Utc::now(),
    });
    // The same checks as a grant arriving from the broker.
    let body = serde_json::to_vec(&grant_body(&message)).expect("messages serialize");
    crate::messages::decode(&body, &settings.limits)
        .map_err(|rejection| Failure::usage(grant_error(rejection)))?;

    let pool = db::migrate(&settings.database).await?;
    let ledger = Ledger::new(settings.clone());
    // Two grants with one key at once: the second to commit fails on the
    // processed-message key, and its retry finds the key applied.
    let attempt = async || {
        let mut tx = pool.begin().await?;
        let applied = ledger.apply(&mut tx, &message, &ReplyTo::default()).await?;
        tx.commit().await?;
        Ok::<_, LedgerError>(applied)
    };
    let applied = attempt
        .retry(ExponentialBuilder::default().with_max_times(GRANT_RETRIES))
        .when(LedgerError::is_retryable)
        .await?;
    match applied.outcome {
        Outcome::Applied => eprintln!("granted {} credits to {}", args.amount, printable(&args.user)),
        Outcome::Duplicate => {
            // A key that comes back with another amount is most likely a
            // new grant given an old key, which would otherwise be lost
            // without a word.
            let granted: Option<i64> = sqlx::query_scalar(
                "SELECT amount FROM ledger WHERE user_id = $1 AND message_id = $2 AND kind = 'grant'",
            )
            .bind(&args.user)
            .bind(message.message_id())
            .fetch_optional(&pool)
            .await?;
            if let Some(granted) = granted
                && granted != args.amount
            {
                return Err(anyhow::anyhow!(
                    "idempotency key `{}` already granted {granted} credits to {}, not {}; nothing \
                     changed. Give a new key for another grant",
                    printable(message.message_id()),
                    printable(&args.user),
                    args.amount
                )
                .into());
            }
            eprintln!("this idempotency key was already applied; nothing changed");
        }
        // Rejected for what the database holds, such as a key that
        // another kind of message used: a runtime failure, not bad usage.
        Outcome::DeadLetter(rejection) => return Err(Failure::from(grant_error(rejection))),
        Outcome::Dropped(_) => unreachable!("a grant is never dropped"),
    }
    print_account(&pool, &settings, &args.user, true).await
}

/// Returns a rejected grant's error in the words of the command line: a
/// message's fields are the command's arguments and options here.
fn grant_error(rejection: Rejection) -> anyhow::Error {
    const ARGUMENTS: [(&str, &str); 4] = [
        ("field `message_id`", "`--idempotency-key`"),
        ("field `user_id`", "USER"),
        ("field `amount`", "AMOUNT"),
        ("field `reason`", "`--reason`"),
    ];
    let mut detail = rejection.detail.clone();
    for (field, argument) in ARGUMENTS {
        detail = detail.replace(field, argument);
    }
    anyhow::anyhow!("{}: {detail}", rejection.reason.code())
}

fn grant_body(message: &Inbound) -> serde_json::Value {
    match message {
        Inbound::CreditsGranted(grant) => serde_json::to_value(grant).expect("messages serialize"),
        _ => unreachable!("only grants are built here"),
    }
}

/// Reads the account without creating or migrating the database, so a
/// mistyped `database.url` fails instead of leaving an empty database.
async fn show(settings: Arc<Settings>, args: ShowArgs) -> Result<(), Failure> {
    let pool = db::connect(&settings.database).await?;
    print_account(&pool, &settings, &args.user, args.json).await
}

async fn print_account(
    pool: &sqlx::PgPool,
    settings: &Settings,
    user: &str,
    json: bool,
) -> Result<(), Failure> {
    let mut conn = pool.acquire().await?;
    let detail = accounts::detail(&mut conn, user, settings.reservations.ttl_seconds)
        .await?
        .with_context(|| {
            format!(
                "account `{}` not found: no credits were ever granted to it",
                printable(user)
            )
        })?;
    if json {
        println!("{}", json_text(&detail, false));
        return Ok(());
    }
    let account = &detail.account;
    println!(
        "{}: balance {}, reserved {}, available {}, {} open holds",
        printable(&account.user_id),
        account.balance,
        account.reserved,
        account.available,
        detail.holds.len()
    );
    for hold in &detail.holds {
        println!(
            "  stream {}: {} held, {} completion tokens counted, expires {}",
            printable(&hold.stream_id),
            hold.reserved,
            hold.counted_completion_tokens,
            hold.expires_at
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{json_text, printable};

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("m-1"), "m-1");
        assert_eq!(printable("a\u{1b}[2Jb\nc\0"), "a\\u{1b}[2Jb\\nc\\u{0}");
        assert_eq!(printable("ünï ✓ 中文 🎉 e\u{301}"), "ünï ✓ 中文 🎉 e\u{301}");
    }

    #[test]
    fn printable_escapes_invisible_characters() {
        assert_eq!(printable("m-\u{202e}1-m"), "m-\\u{202e}1-m");
        assert_eq!(printable("m\u{200b}-1"), "m\\u{200b}-1");
        assert_eq!(printable("\u{2066}m\u{2069}"), "\\u{2066}m\\u{2069}");
        assert_eq!(printable("\u{feff}m\u{2028}"), "\\u{feff}m\\u{2028}");
        assert_eq!(printable("m\u{e000}"), "m\\u{e000}");
    }

    #[test]
    fn printable_escapes_spaces_and_blank_letters() {
        assert_eq!(printable("m 1"), "m 1");
        assert_eq!(printable("m\u{a0}1\u{3000}\u{2009}"), "m\\u{a0}1\\u{3000}\\u{2009}");
        assert_eq!(printable("m\u{34f}\u{3164}\u{115f}\u{ffa0}"), "m\\u{34f}\\u{3164}\\u{115f}\\u{ffa0}");
        assert_eq!(printable("m\u{fe0f}\u{e0100}"), "m\\u{fe0f}\\u{e0100}");
    }

    #[test]
    fn printable_doubles_backslashes() {
        assert_ne!(printable("a\u{202e}b"), printable("a\\u{202e}b"));
        assert_eq!(printable("a\\u{202e}b"), "a\\\\u{202e}b");
    }

    #[test]
    fn json_text_escapes_hidden_characters() {
        let value = serde_json::json!({"id": "m-\u{202e}1\u{200b}\u{85}", "tag": "\u{e0067}x", "plain": "é \\ \""});
        let text = json_text(&value, false);
        assert!(text.contains(r"m-\u202e1\u200b\u0085"), "{text}");
        assert!(text.contains(r"\udb40\udc67x"), "{text}");
        assert!(text.contains(r#""é \\ \"""#), "{text}");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("the output is JSON");
        assert_eq!(parsed, value);
    }

    #[test]
    fn json_text_keeps_the_layout() {
        let value = serde_json::json!({"list": [1, {"a": "b"}], "empty": []});
        assert_eq!(json_text(&value, true), serde_json::to_string_pretty(&value).unwrap());
        assert_eq!(json_text(&value, false), serde_json::to_string(&value).unwrap());
    }
}
