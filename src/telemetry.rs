//! Logging: human-readable text or JSON lines on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Filter put before the configured level: PostgreSQL's notices below
/// WARNING, such as "relation already exists, skipping" on each
/// migration check, say nothing an operator can act on. A directive for
/// the same target in `log.level` comes later and wins.
const QUIET_NOTICES: &str = "sqlx::postgres::notice=warn";

/// Filter put before the configured level for a command other than the
/// worker, as `QUIET_NOTICES` is. Every lapin error reaches the command,
/// which prints it once with what to do, so lapin's own log lines would
/// only repeat it in its internal terms.
const QUIET_BROKER_LIBRARY: &str = "lapin=off";

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the
/// configured level, and with it `quiet_broker_library`, which turns off
/// lapin's own log lines. Calling it twice keeps the first subscriber.
pub fn init(settings: &LogSettings, quiet_broker_library: bool) {
    let configured = || {
        let mut directives = QUIET_NOTICES.to_owned();
        if quiet_broker_library {
            directives = format!("{directives},{QUIET_BROKER_LIBRARY}");
        }
        EnvFilter::new(format!("{directives},{}", settings.level))
    };
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) => EnvFilter::try_new(&directives).unwrap_or_else(|error| {
            eprintln!("warning: RUST_LOG `{directives}` is not a valid filter ({error}); using log.level");
            configured()
        }),
        Err(_) => configured(),
    };
    // Colour codes help a person at a terminal, but in a file or a log
    // shipper they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
