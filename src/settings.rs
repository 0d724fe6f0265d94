//! Layered, validated settings: built-in defaults, then an optional TOML
//! file, then `STREAM_CREDITS__SECTION__KEY` environment variables.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pricing::{self, ModelPrice};

mod sources;

use sources::SetValues;

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "STREAM_CREDITS";

/// File read when `--config` is not given and the file exists.
pub const DEFAULT_FILE: &str = "stream-credits.toml";

/// A settings failure. Every variant maps to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {path} not found")]
    FileNotFound { path: PathBuf },
    /// An error of the `config` crate that names no key set by the file
    /// or the environment. Not a source, so the message is printed once.
    #[error("invalid settings: {0}")]
    Load(config::ConfigError),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("unknown setting `{key}` in {origin}; expected one of {expected}")]
    UnknownKey {
        key: String,
        origin: String,
        expected: String,
    },
    #[error("invalid value `{value}` for `{key}` in {origin}: expected {expected}")]
    Value {
        key: String,
        value: String,
        origin: String,
        expected: String,
    },
    /// A value of the right type that a check of [`Settings::validate`]
    /// rejected, with where it was set.
    #[error("invalid value `{value}` for `{key}` in {origin}: {reason}")]
    Rejected {
        key: String,
        value: String,
        origin: String,
        reason: String,
    },
    #[error("invalid settings file {path}, line {line}, column {column}: {reason}")]
    FileSyntax {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

impl SettingsError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A connection URL that may carry a password. `Debug` and `Display` show
/// it with the password replaced, so it is safe in logs and errors.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL string.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the connection only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL with `***`, both the one before the
/// host and the value of every query parameter whose name contains
/// `password` (`password`, `sslpassword`). Text that is not a URL is
/// replaced whole, because it may still hold a secret.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "<unparsable URL>".to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if let Some(query) = url.query() {
        let query = redact_query(query);
        url.set_query(Some(&query));
    }
    url.to_string()
}

/// Replaces the value of each password parameter of a URL query. The
/// other parameters keep their text as written.
fn redact_query(query: &str) -> String {
    let redact_pair = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        // Compare the decoded name, so `pass%77ord` is caught too.
        let decoded = url::form_urlencoded::parse(name.as_bytes())
            .next()
            .map(|(name, _)| name.to_ascii_lowercase())
            .unwrap_or_default();
        if decoded.contains("password") {
            format!("{name}=***")
        } else {
            pair.to_owned()
        }
    };
    query
        .split('&')
        .map(redact_pair)
        .collect::<Vec<_>>()
        .join("&")
}

/// What happens when the cost of a stream exceeds its hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overrun {
    /// The user pays the whole cost; the balance may go below zero.
    Debit,
    /// The user pays at most the hold; the rest is forgiven.
    Cap,
}

/// Log output style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// All settings of the binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub topology: TopologySettings,
    pub reservations: ReservationSettings,
    pub limits: LimitSettings,
    pub worker: WorkerSettings,
    pub retention: RetentionSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// Price table by lower-case model name. Loaded apart from the other
    /// sections because model names contain dots (`gpt-4.1`), which the
    /// `config` crate would read as nested keys.
    #[serde(skip_serializing, default = "pricing::builtin_models")]
    pub models: BTreeMap<String, ModelPrice>,
}

/// Fields of one model that a settings file or variable may set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelOverride {
    input_per_million: Option<i64>,
    output_per_million: Option<i64>,
    cached_input_per_million: Option<i64>,
    encoding: Option<String>,
    max_output_tokens: Option<u64>,
}

/// Prefix of the environment variables that set model prices.
const MODEL_ENV_PREFIX: &str = "STREAM_CREDITS__MODELS__";

/// PostgreSQL connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSettings {
    /// The database; created when missing.
    pub url: SecretUrl,
    /// Pool size of one worker process.
    pub max_connections: u32,
    /// How long a query waits for a pooled connection before it counts as
    /// a database outage.
    pub acquire_timeout_seconds: u64,
}

/// RabbitMQ connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmqpSettings {
    pub url: SecretUrl,
    /// Unacknowledged deliveries per shard consumer.
    pub prefetch: u16,
    /// PEM file of CA certificates that an `amqps://` broker's certificate
    /// may chain to, trusted in addition to the system's root certificates.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// Names and shape of the broker topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopologySettings {
    /// First part of every exchange and queue name.
    pub prefix: String,
    /// Number of shard queues bound to the consistent-hash exchange.
    pub shards: u16,
    /// Deliveries of one message before the broker dead-letters it. Fixed
    /// when a shard queue is first declared: RabbitMQ refuses a redeclare
    /// with other arguments.
    pub delivery_limit: u32,
}

/// Reservation behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservationSettings {
    /// Idle time after which a hold expires.
    pub ttl_seconds: u64,
    /// How often the expiry sweep runs.
    pub sweep_interval_seconds: u64,
    /// Open holds one user may have at once.
    pub max_active_per_user: u32,
    pub overrun: Overrun,
    /// Whether a hold grows from the user's available credits when the
    /// stream's counted usage nears it.
    pub growth: bool,
    /// Share of the hold, in percent, that counted usage must reach for
    /// the hold to grow.
    pub growth_threshold_percent: u32,
    /// One growth step, in percent of the hold as granted. A hold grows by
    /// as many steps as it takes to bring usage below the threshold again.
    pub growth_step_percent: u32,
    /// Largest hold one stream may grow to, in credits. A hold granted
    /// above it never grows.
    pub hold_max_credits: i64,
    /// Whether a start without `max_output_tokens` holds an allowance sized
    /// from recent completions instead of the model's maximum.
    pub size_from_history: bool,
    /// Recent completed streams of a user, or of a model, that sizing and
    /// the retry estimate read.
    pub history_streams: u32,
    /// Completed streams needed before a history is used.
    pub history_streams_min: u32,
    /// Percentile of the recent completion sizes that a sized hold covers.
    pub history_percentile: u32,
}

impl ReservationSettings {
    /// Checks the growth and history settings, naming the first bad key.
    fn validate_holds(&self) -> Result<(), SettingsError> {
        // History reads are on the reservation path; 10,000 index entries
        // is far more than a percentile needs and still a fast scan.
        const HISTORY_STREAMS_MAX: u32 = 10_000;
        // Ten steps of the granted hold at once is already a large jump.
        const GROWTH_STEP_PERCENT_MAX: u32 = 1_000;
        let bounded = [
            (
                "growth_threshold_percent",
                self.growth_threshold_percent,
                100,
            ),
            (
                "growth_step_percent",
                self.growth_step_percent,
                GROWTH_STEP_PERCENT_MAX,
            ),
            ("history_percentile", self.history_percentile, 100),
            ("history_streams", self.history_streams, HISTORY_STREAMS_MAX),
            (
                "history_streams_min",
                self.history_streams_min,
                self.history_streams,
            ),
        ];
        for (key, value, max) in bounded {
            if value == 0 || value > max {
                return Err(SettingsError::invalid(
                    format!("reservations.{key}"),
                    format!("must be between 1 and {max}"),
                ));
            }
        }
        if self.hold_max_credits <= 0 {
            return Err(SettingsError::invalid(
                "reservations.hold_max_credits",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Bounds on input, each with the reason for its value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitSettings {
    /// Largest message body accepted. 1 MiB fits any realistic chat prompt
    /// and keeps one message from filling a worker's memory.
    pub message_bytes_max: usize,
    /// Longest `message_id`, `user_id` or `stream_id`, in characters. 200
    /// fits a UUID with any sensible prefix, and bounds index size.
    pub id_chars_max: usize,
    /// Largest token count one message may state (`prompt_tokens`,
    /// `max_output_tokens`, `tokens`, usage fields). 10 million is far
    /// above any model's context window, so only a broken producer hits
    /// it, and it keeps every cost well inside 64 bits.
    pub tokens_max: u64,
    /// Most chunks one stream may report. 1 million deltas is more than
    /// ten times the longest output of any current model.
    pub chunks_per_stream_max: u64,
}

/// How the worker takes work from the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// Most deliveries applied in one database transaction.
    pub batch_messages_max: usize,
    /// Body bytes after which a batch takes no more deliveries. A batch
    /// always takes at least one. Token counting runs inside the batch's
    /// database wait and took up to 0.4 µs a byte on the inputs measured,
    /// so this keeps a batch of large bodies well within that wait.
    pub batch_bytes_max: usize,
    /// Maximum wait of a batch for more deliveries before it is applied,
    /// in milliseconds. Larger batches cost the database fewer
    /// transactions and hold writes per message. A delivery with
    /// `reply_to` ends the wait at once, and 0 applies what has arrived.
    pub batch_linger_ms: u64,
    /// Batches of one shard applied at once. Batches that share no user
    /// run side by side and are acknowledged in the order they were
    /// received. Each holds a database connection while it applies.
    pub batches_in_flight: usize,
    /// Longest wait for in-flight work on SIGTERM or SIGINT.
    pub shutdown_timeout_seconds: u64,
    /// Shards this process consumes at once; empty means every shard.
    /// Each other shard gets a standby subscription after
    /// `standby_delay_seconds`, which RabbitMQ's single active consumer
    /// activates only when the process consuming it goes away.
    #[serde(default, deserialize_with = "one_or_many_shards")]
    pub home_shards: Vec<u16>,
    /// Wait before subscribing to shards that are not home shards, so
    /// that the processes whose home they are subscribe first.
    pub standby_delay_seconds: u64,
}

/// How long the worker keeps the records that make messages idempotent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionSettings {
    /// How often the retention job runs, in seconds; 0 turns it off. The
    /// job deletes the record of every chunk counted ten minutes or more
    /// before the oldest open hold was placed: that chunk's stream is
    /// settled, so a copy of it arriving later is dropped without one.
    pub interval_seconds: u64,
}

/// Reads `worker.home_shards` as a list, as one shard or as text listing
/// shards with commas (`"0,3"` in a file). `config` reads a variable such
/// as `…__HOME_SHARDS=3`, which has no comma, as a number, and the items of
/// `…__HOME_SHARDS=0,3` as text.
fn one_or_many_shards<'de, D>(deserializer: D) -> Result<Vec<u16>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::{Error, SeqAccess, Visitor};

    struct Shards;

    impl<'de> Visitor<'de> for Shards {
        type Value = Vec<u16>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a shard number or a list of shard numbers")
        }

        fn visit_u64<E: Error>(self, shard: u64) -> Result<Self::Value, E> {
            let shard = u16::try_from(shard).map_err(|_| E::custom(format!("shard {shard} is too large")))?;
            Ok(vec![shard])
        }

        fn visit_i64<E: Error>(self, shard: i64) -> Result<Self::Value, E> {
            let shard = u64::try_from(shard).map_err(|_| E::custom(format!("shard {shard} is negative")))?;
            self.visit_u64(shard)
        }

        /// Reads one shard or, as a file may write it, a comma-separated
        /// list of them.
        fn visit_str<E: Error>(self, text: &str) -> Result<Self::Value, E> {
            text.split(',')
                .map(|shard| {
                    shard
                        .trim()
                        .parse::<u16>()
                        .map_err(|_| E::custom(format!("`{shard}` is not a shard number")))
                })
                .collect()
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
            let mut shards = Vec::new();
            while let Some(item) = items.next_element::<ShardItem>()? {
                shards.push(item.0);
            }
            Ok(shards)
        }
    }

    /// One item of the list: a number, or text holding one.
    struct ShardItem(u16);

    impl<'de> Deserialize<'de> for ShardItem {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let shards = deserializer.deserialize_any(Shards)?;
            match shards.as_slice() {
                [shard] => Ok(Self(*shard)),
                _ => Err(D::Error::custom("a list item must be one shard number")),
            }
        }
    }

    deserializer.deserialize_any(Shards)
}

/// HTTP endpoint settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty turns it off.
    pub listen: String,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `stream_credits=debug`.
    pub level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database: DatabaseSettings {
                url: SecretUrl::new("postgres://127.0.0.1:5432/stream_credits"),
                max_connections: 10,
                acquire_timeout_seconds: 5,
            },
            amqp: AmqpSettings {
                url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
                prefetch: 500,
                tls_ca_file: None,
            },
            topology: TopologySettings {
                prefix: "credits".to_owned(),
                shards: 8,
                delivery_limit: 5,
            },
            reservations: ReservationSettings {
                ttl_seconds: 900,
                sweep_interval_seconds: 30,
                max_active_per_user: 16,
                overrun: Overrun::Debit,
                growth: true,
                // At 80 % a step lands before the stream outruns its hold,
                // even when one batch brings many chunks at once.
                growth_threshold_percent: 80,
                // Half the granted hold per step: a stream twice as long as
                // its hold grows two or three times, not dozens.
                growth_step_percent: 50,
                // Ten US dollars at one credit per micro-dollar, above the
                // cost of the longest output of every built-in model.
                hold_max_credits: 10_000_000,
                size_from_history: true,
                // Enough streams for a stable percentile, few enough that a
                // change in a user's habits shows soon.
                history_streams: 50,
                // Below five streams a percentile is little more than the
                // longest stream seen.
                history_streams_min: 5,
                // Measured on the OpenAssistant replay (docs/benchmarks.md).
                history_percentile: 60,
            },
            limits: LimitSettings {
                message_bytes_max: 1024 * 1024,
                id_chars_max: 200,
                tokens_max: 10_000_000,
                chunks_per_stream_max: 1_000_000,
            },
            worker: WorkerSettings {
                batch_messages_max: 256,
                batch_bytes_max: 1024 * 1024,
                // 100 ms rather than 20 took the worker from about 0.74 of
                // the broker's rate to 0.87 on the benchmark's mix.
                // docs/benchmarks.md has the runs.
                batch_linger_ms: 100,
                batches_in_flight: 1,
                shutdown_timeout_seconds: 30,
                home_shards: Vec::new(),
                standby_delay_seconds: 15,
            },
            retention: RetentionSettings {
                // Ten minutes of chunks at a time keeps each run short
                // next to the traffic that left them.
                interval_seconds: 600,
            },
            http: HttpSettings {
                listen: "127.0.0.1:9464".to_owned(),
            },
            log: LogSettings {
                format: LogFormat::Text,
                level: "info".to_owned(),
            },
            models: pricing::builtin_models(),
        }
    }
}

impl Settings {
    /// Loads settings from the defaults, `file` (or `stream-credits.toml`
    /// when it exists) and the environment, then validates them.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads and validates settings like [`Settings::load`] from an
    /// explicit set of environment variables. A rejected value is
    /// reported with where it was set.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let (settings, set_values) = Self::load_with_origins(file, vars)?;
        settings.validate().map_err(|error| set_values.locate(error))?;
        Ok(settings)
    }

    /// Loads settings like [`Settings::load`] from an explicit set of
    /// environment variables, without validating them.
    pub fn load_unvalidated(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        Ok(Self::load_with_origins(file, vars)?.0)
    }

    fn load_with_origins(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, SetValues), SettingsError> {
        let defaults = config::Config::try_from(&Self::default()).map_err(SettingsError::Load)?;
        let mut builder = config::Config::builder().add_source(defaults);

        let path = match file {
            Some(path) if !path.exists() => {
                return Err(SettingsError::FileNotFound {
                    path: path.to_owned(),
                });
            }
            Some(path) => Some(path),
            None if Path::new(DEFAULT_FILE).exists() => Some(Path::new(DEFAULT_FILE)),
            None => None,
        };
        let mut model_layers = Vec::new();
        let mut set_values = SetValues::new();
        if let Some(path) = path {
            let read = read_toml(path, &mut set_values);
            let (table, models) = read.map_err(|error| set_values.locate(error))?;
            set_values.add_file(path, &table)?;
            let rest = toml::to_string(&table).map_err(|error| {
                SettingsError::invalid(path.display().to_string(), error.to_string())
            })?;
            builder = builder.add_source(config::File::from_str(&rest, config::FileFormat::Toml));
            model_layers.push(models);
        }

        let (model_vars, vars): (Vec<_>, Vec<_>) = vars
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .partition(|(key, _)| key.to_ascii_uppercase().starts_with(MODEL_ENV_PREFIX));
        let env_models = models_from_env(model_vars, &mut set_values);
        model_layers.push(env_models.map_err(|error| set_values.locate(error))?);
        set_values.add_env(&vars)?;
        set_values.check_integers()?;
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key(sources::LIST_KEY)
            .source(Some(vars.into_iter().collect()));

        let mut settings: Self = builder
            .add_source(environment)
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|error| set_values.explain(error))?;
        for layer in model_layers {
            apply_model_overrides(&mut settings.models, layer).map_err(|error| set_values.locate(error))?;
        }
        Ok((settings, set_values))
    }

    /// Checks every value that the types alone cannot, naming the key of
    /// the first bad one.
    pub fn validate(&self) -> Result<(), SettingsError> {
        validate_url(
            "database.url",
            self.database.url.expose(),
            &["postgres", "postgresql"],
        )?;
        self.validate_database_query()?;
        validate_url("amqp.url", self.amqp.url.expose(), &["amqp", "amqps"])?;
        self.validate_amqp_tls()?;
        self.validate_counts()?;
        self.reservations.validate_holds()?;
        self.validate_topology()?;
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(SettingsError::invalid(
                "http.listen",
                format!("`{}` is not an IP address and port", self.http.listen),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(SettingsError::invalid(
                "log.level",
                format!("`{}` is not a tracing filter", self.log.level),
            ));
        }
        for (name, price) in &self.models {
            price
                .validate(self.limits.tokens_max)
                .map_err(|(field, reason)| {
                    let key = if field.is_empty() {
                        format!("models.{name}")
                    } else {
                        format!("models.{name}.{field}")
                    };
                    SettingsError::invalid(key, reason)
                })?;
        }
        Ok(())
    }

    /// The counts that must be greater than zero, by key, with their values.
    pub(crate) fn positive_counts(&self) -> [(&'static str, u64); 12] {
        [
            (
                "database.max_connections",
                self.database.max_connections.into(),
            ),
            (
                "database.acquire_timeout_seconds",
                self.database.acquire_timeout_seconds,
            ),
            ("amqp.prefetch", self.amqp.prefetch.into()),
            ("topology.shards", self.topology.shards.into()),
            (
                "topology.delivery_limit",
                self.topology.delivery_limit.into(),
            ),
            ("reservations.ttl_seconds", self.reservations.ttl_seconds),
            (
                "reservations.sweep_interval_seconds",
                self.reservations.sweep_interval_seconds,
            ),
            (
                "reservations.max_active_per_user",
                self.reservations.max_active_per_user.into(),
            ),
            ("limits.tokens_max", self.limits.tokens_max),
            (
                "worker.batch_messages_max",
                self.worker.batch_messages_max as u64,
            ),
            ("worker.batch_bytes_max", self.worker.batch_bytes_max as u64),
            (
                "worker.batches_in_flight",
                self.worker.batches_in_flight as u64,
            ),
        ]
    }

    fn validate_counts(&self) -> Result<(), SettingsError> {
        for (key, value) in self.positive_counts() {
            if value == 0 {
                return Err(SettingsError::invalid(key, "must be greater than zero"));
            }
        }
        if self.limits.id_chars_max == 0 {
            return Err(SettingsError::invalid("limits.id_chars_max", "must be greater than zero"));
        }
        if self.limits.message_bytes_max == 0 {
            return Err(SettingsError::invalid("limits.message_bytes_max", "must be greater than zero"));
        }
        // A duration near u64::MAX seconds overflows a deadline, or the
        // interval sent to PostgreSQL for a ttl. Ten years is far beyond
        // any useful value.
        const SECONDS_MAX: u64 = 10 * 365 * 24 * 3600;
        let durations = [
            ("database.acquire_timeout_seconds", self.database.acquire_timeout_seconds),
            ("reservations.ttl_seconds", self.reservations.ttl_seconds),
            ("reservations.sweep_interval_seconds", self.reservations.sweep_interval_seconds),
            ("worker.shutdown_timeout_seconds", self.worker.shutdown_timeout_seconds),
            ("worker.standby_delay_seconds", self.worker.standby_delay_seconds),
        ];
        for (key, seconds) in durations {
            if seconds > SECONDS_MAX {
                return Err(SettingsError::invalid(key, format!("must be at most {SECONDS_MAX}")));
            }
        }
        // Each batch in flight may hold a connection of the pool.
        const IN_FLIGHT_MAX: usize = 16;
        if self.worker.batches_in_flight > IN_FLIGHT_MAX {
            return Err(SettingsError::invalid(
                "worker.batches_in_flight",
                format!("must be at most {IN_FLIGHT_MAX}"),
            ));
        }
        // A batch in flight takes a connection while it applies, and the
        // outbox marker and the expiry sweep take one each. With one batch
        // per shard a short pool only makes shards wait for a connection,
        // so that is allowed on any pool.
        let in_flight = self.worker.batches_in_flight as u64;
        let connections_needed = u64::from(self.topology.shards) * in_flight + 2;
        if in_flight > 1 && connections_needed > u64::from(self.database.max_connections) {
            return Err(SettingsError::invalid(
                "worker.batches_in_flight",
                format!(
                    "{in_flight} batches in flight on {} shards need {connections_needed} database \
                     connections, more than database.max_connections ({}); raise \
                     database.max_connections or lower worker.batches_in_flight",
                    self.topology.shards, self.database.max_connections
                ),
            ));
        }
        // A timer far in the future overflows; a month between runs is
        // already more than any table should wait.
        const RETENTION_INTERVAL_MAX: u64 = 30 * 24 * 3600;
        if self.retention.interval_seconds > RETENTION_INTERVAL_MAX {
            return Err(SettingsError::invalid(
                "retention.interval_seconds",
                format!("must be at most {RETENTION_INTERVAL_MAX}"),
            ));
        }
        // A longer wait would hold every delivery of a quiet shard
        // unacknowledged for seconds and gain nothing more in batch size.
        const LINGER_MS_MAX: u64 = 1_000;
        if self.worker.batch_linger_ms > LINGER_MS_MAX {
            return Err(SettingsError::invalid(
                "worker.batch_linger_ms",
                format!("must be at most {LINGER_MS_MAX}"),
            ));
        }
        Ok(())
    }

    /// Rejects a `database.url` query parameter that sqlx 0.9 does not
    /// read. sqlx would ignore it and log its value, which may be a
    /// secret such as libpq's `sslpassword`.
    fn validate_database_query(&self) -> Result<(), SettingsError> {
        // The parameters that `PgConnectOptions` of sqlx-postgres 0.9.1
        // reads from a URL, in `options/parse.rs`.
        const KNOWN: [&str; 18] = [
            "sslmode",
            "ssl-mode",
            "sslrootcert",
            "ssl-root-cert",
            "ssl-ca",
            "sslcert",
            "ssl-cert",
            "sslkey",
            "ssl-key",
            "statement-cache-capacity",
            "host",
            "hostaddr",
            "port",
            "dbname",
            "user",
            "password",
            "application_name",
            "options",
        ];
        let Ok(url) = url::Url::parse(self.database.url.expose()) else {
            return Ok(());
        };
        for (name, _) in url.query_pairs() {
            let known = KNOWN.contains(&name.as_ref())
                || (name.starts_with("options[") && name.ends_with(']'));
            if !known {
                return Err(SettingsError::invalid(
                    "database.url",
                    format!(
                        "unknown query parameter `{name}`; sqlx reads only {} and options[NAME]",
                        KNOWN.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_amqp_tls(&self) -> Result<(), SettingsError> {
        const KEY: &str = "amqp.tls_ca_file";
        let Some(path) = &self.amqp.tls_ca_file else {
            return Ok(());
        };
        // A CA file with a plain `amqp://` URL would suggest a verified
        // connection where there is none.
        let scheme = url::Url::parse(self.amqp.url.expose()).map(|url| url.scheme().to_owned());
        if scheme.as_deref() != Ok("amqps") {
            return Err(SettingsError::invalid(
                KEY,
                "is set, but amqp.url does not start with amqps://",
            ));
        }
        crate::broker::read_ca_file(path)
            .map(drop)
            .map_err(|error| SettingsError::invalid(KEY, error.to_string()))
    }

    fn validate_topology(&self) -> Result<(), SettingsError> {
        if let Some(shard) = self
            .worker
            .home_shards
            .iter()
            .find(|shard| **shard >= self.topology.shards)
        {
            return Err(SettingsError::invalid(
                "worker.home_shards",
                format!(
                    "shard {shard} does not exist; topology.shards is {}",
                    self.topology.shards
                ),
            ));
        }
        let prefix = &self.topology.prefix;
        // Queue names are at most 255 bytes in AMQP 0-9-1; the longest name
        // built from the prefix adds `.events.shard.65535`.
        let valid = !prefix.is_empty()
            && prefix.len() <= 200
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return Err(SettingsError::invalid(
                "topology.prefix",
                "must be 1 to 200 characters of letters, digits, '.', '-' or '_'",
            ));
        }
        Ok(())
    }

    /// The price entry of `model`: its own, else that of its undated name.
    pub fn model(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        pricing::lookup(&self.models, model)
    }
}

/// Reads a TOML settings file, returning it without its `models` table
/// and the model overrides from that table.
/// Reads a settings file, and returns its tables without `models` and its
/// model price overrides, recording where each price field was set.
fn read_toml(
    path: &Path,
    set_values: &mut SetValues,
) -> Result<(toml::Table, BTreeMap<String, ModelOverride>), SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| SettingsError::invalid(path.display().to_string(), error.to_string()))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|error| toml_syntax_error(path, &text, &error))?;
    let models = match table.remove("models") {
        None => BTreeMap::new(),
        Some(toml::Value::Table(models)) => models
            .into_iter()
            .map(|(name, value)| {
                let key = format!("models.{name}");
                set_values.add_file_model(path, &name, &value);
                let parsed = ModelOverride::deserialize(value).map_err(|error| {
                    // serde names the Rust type a model's table becomes.
                    let reason = error.message().replace("struct ModelOverride", "a table of model fields");
                    SettingsError::invalid(&key, reason)
                })?;
                Ok((name.to_ascii_lowercase(), parsed))
            })
            .collect::<Result<_, SettingsError>>()?,
        Some(_) => return Err(SettingsError::invalid("models", "must be a table")),
    };
    Ok((table, models))
}

/// Names the line and column where a settings file stops being TOML.
fn toml_syntax_error(path: &Path, text: &str, error: &toml::de::Error) -> SettingsError {
    let start = error.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..start).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    SettingsError::FileSyntax {
        path: path.to_owned(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        reason: error.message().to_owned(),
    }
}

/// Reads `STREAM_CREDITS__MODELS__<NAME>__<FIELD>` variables.
fn models_from_env(
    vars: Vec<(String, String)>,
    set_values: &mut SetValues,
) -> Result<BTreeMap<String, ModelOverride>, SettingsError> {
    let mut models: BTreeMap<String, ModelOverride> = BTreeMap::new();
    for (key, value) in vars {
        let rest = &key[MODEL_ENV_PREFIX.len()..];
        let Some((name, field)) = rest.rsplit_once("__") else {
            return Err(SettingsError::invalid(
                key.as_str(),
                "expected STREAM_CREDITS__MODELS__<MODEL>__<FIELD>",
            ));
        };
        let name = name.to_ascii_lowercase();
        let field = field.to_ascii_lowercase();
        let setting = format!("models.{name}.{field}");
        set_values.add_model_field(&setting, &value, &format!("environment variable {key}"));
        let entry = models.entry(name).or_default();
        let integer = |value: &str| {
            value.trim().parse::<i64>().map_err(|_| {
                SettingsError::invalid(&setting, format!("`{value}` is not a 64-bit integer"))
            })
        };
        match field.as_str() {
            "input_per_million" => entry.input_per_million = Some(integer(&value)?),
            "output_per_million" => entry.output_per_million = Some(integer(&value)?),
            "cached_input_per_million" => entry.cached_input_per_million = Some(integer(&value)?),
            "encoding" => entry.encoding = Some(value),
            "max_output_tokens" => {
                let tokens = u64::try_from(integer(&value)?)
                    .map_err(|_| SettingsError::invalid(&setting, "must not be negative"))?;
                entry.max_output_tokens = Some(tokens);
            }
            _ => return Err(SettingsError::invalid(&setting, "unknown model field")),
        }
    }
    Ok(models)
}

/// Applies overrides onto the price table. A model that is not in the
/// table yet must set every required field.
fn apply_model_overrides(
    models: &mut BTreeMap<String, ModelPrice>,
    overrides: BTreeMap<String, ModelOverride>,
) -> Result<(), SettingsError> {
    for (name, layer) in overrides {
        let price = match models.remove(&name) {
            Some(mut price) => {
                if let Some(value) = layer.input_per_million {
                    price.input_per_million = value;
                }
                if let Some(value) = layer.output_per_million {
                    price.output_per_million = value;
                }
                if layer.cached_input_per_million.is_some() {
                    price.cached_input_per_million = layer.cached_input_per_million;
                }
                if let Some(value) = layer.encoding {
                    price.encoding = value;
                }
                if let Some(value) = layer.max_output_tokens {
                    price.max_output_tokens = value;
                }
                price
            }
            None => {
                let missing = |field: &str| {
                    SettingsError::invalid(
                        format!("models.{name}.{field}"),
                        "missing; a model not in the built-in table must set it",
                    )
                };
                ModelPrice {
                    input_per_million: layer
                        .input_per_million
                        .ok_or_else(|| missing("input_per_million"))?,
                    output_per_million: layer
                        .output_per_million
                        .ok_or_else(|| missing("output_per_million"))?,
                    cached_input_per_million: layer.cached_input_per_million,
                    encoding: layer.encoding.ok_or_else(|| missing("encoding"))?,
                    max_output_tokens: layer
                        .max_output_tokens
                        .ok_or_else(|| missing("max_output_tokens"))?,
                }
            }
        };
        models.insert(name, price);
    }
    Ok(())
}

fn validate_url(key: &str, raw: &str, schemes: &[&str]) -> Result<(), SettingsError> {
    let url = url::Url::parse(raw).map_err(|error| {
        SettingsError::invalid(key, format!("not a URL ({error})"))
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(SettingsError::invalid(
            key,
            format!(
                "scheme `{}` is not one of {}",
                url.scheme(),
                schemes.join(", ")
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SettingsError::invalid(key, "the URL has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let vars = vars
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()));
        Settings::load_from(None, vars)
    }

    fn error_text(vars: &[(&str, &str)]) -> String {
        load_with(vars).unwrap_err().to_string()
    }

    /// Writes `text` to a settings file in a directory of this process
    /// named after `tag`, and returns the file's path.
    fn settings_file(tag: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("settings-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{tag}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_are_valid() {
        let settings = load_with(&[]).unwrap();
        assert_eq!(settings.topology.prefix, "credits");
        assert_eq!(settings.topology.shards, 8);
        assert_eq!(settings.reservations.ttl_seconds, 900);
        assert_eq!(settings.reservations.overrun, Overrun::Debit);
    }

    #[test]
    fn environment_overrides_defaults() {
        let settings = load_with(&[
            ("STREAM_CREDITS__TOPOLOGY__SHARDS", "3"),
            ("STREAM_CREDITS__RESERVATIONS__OVERRUN", "cap"),
            ("STREAM_CREDITS__MODELS__GPT-4O__INPUT_PER_MILLION", "7"),
        ])
        .unwrap();
        assert_eq!(settings.topology.shards, 3);
        assert_eq!(settings.reservations.overrun, Overrun::Cap);
        assert_eq!(settings.models["gpt-4o"].input_per_million, 7);
        assert_eq!(settings.models["gpt-4o"].output_per_million, 10_000_000);
    }

    #[test]
    fn file_adds_models_with_dotted_names() {
        let path = settings_file(
            "models",
            "[topology]\nprefix = \"filed\"\n\n[models.\"acme-1.5\"]\ninput_per_million = 3\n\
             output_per_million = 4\nencoding = \"cl100k_base\"\nmax_output_tokens = 99\n\n\
             [models.\"gpt-4.1\"]\noutput_per_million = 5\n",
        );
        let settings = Settings::load_unvalidated(Some(&path), Vec::new()).unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.topology.prefix, "filed");
        assert_eq!(settings.models["acme-1.5"].max_output_tokens, 99);
        assert_eq!(settings.models["gpt-4.1"].output_per_million, 5);
        assert_eq!(settings.models["gpt-4.1"].input_per_million, 2_000_000);
    }

    #[test]
    fn file_with_negative_price_names_the_key() {
        let path = settings_file("negative", "[models.gpt-4o]\ninput_per_million = -5\n");
        let settings = Settings::load_unvalidated(Some(&path), Vec::new()).unwrap();
        let text = settings.validate().unwrap_err().to_string();
        assert!(text.contains("models.gpt-4o.input_per_million"), "{text}");
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains("models.gpt-4o.input_per_million"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn batch_linger_above_a_second_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__WORKER__BATCH_LINGER_MS", "1001")]);
        assert!(text.contains("worker.batch_linger_ms"), "{text}");
        assert!(text.contains("at most 1000"), "{text}");
        let settings = load_with(&[("STREAM_CREDITS__WORKER__BATCH_LINGER_MS", "1000")]).unwrap();
        assert_eq!(settings.worker.batch_linger_ms, 1000);
    }

    #[test]
    fn retention_interval_above_a_month_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__RETENTION__INTERVAL_SECONDS", "2592001")]);
        assert!(text.contains("retention.interval_seconds"), "{text}");
        assert!(text.contains("at most 2592000"), "{text}");
        assert!(text.contains("`2592001`"), "{text}");
        assert!(text.contains("environment variable STREAM_CREDITS__RETENTION__INTERVAL_SECONDS"), "{text}");
        let settings = load_with(&[("STREAM_CREDITS__RETENTION__INTERVAL_SECONDS", "0")]).unwrap();
        assert_eq!(settings.retention.interval_seconds, 0);
    }

    #[test]
    fn fraction_for_an_integer_setting_is_rejected() {
        let text = error_text(&[("STREAM_CREDITS__RESERVATIONS__TTL_SECONDS", "2.7")]);
        assert!(text.contains("reservations.ttl_seconds"), "{text}");
        assert!(text.contains("`2.7`"), "{text}");
        assert!(text.contains("integer"), "{text}");
        let settings = load_with(&[("STREAM_CREDITS__RESERVATIONS__TTL_SECONDS", "3.0")]).unwrap();
        assert_eq!(settings.reservations.ttl_seconds, 3);
    }

    #[test]
    fn integer_beyond_64_bits_is_rejected() {
        let variable = "STREAM_CREDITS__LIMITS__TOKENS_MAX";
        let text = error_text(&[(variable, "99999999999999999999")]);
        assert!(text.contains("limits.tokens_max"), "{text}");
        assert!(text.contains(&format!("environment variable {variable}")), "{text}");
        assert!(text.contains("`99999999999999999999`"), "{text}");
    }

    #[test]
    fn zero_id_limit_names_its_key() {
        let variable = "STREAM_CREDITS__LIMITS__ID_CHARS_MAX";
        let text = error_text(&[(variable, "0")]);
        assert!(text.contains("limits.id_chars_max"), "{text}");
        assert!(text.contains(&format!("environment variable {variable}")), "{text}");
    }

    #[test]
    fn batches_in_flight_out_of_range_names_the_key() {
        for value in ["0", "17"] {
            let text = error_text(&[("STREAM_CREDITS__WORKER__BATCHES_IN_FLIGHT", value)]);
            assert!(text.contains("worker.batches_in_flight"), "{value}: {text}");
        }
    }

    #[test]
    fn batches_in_flight_beyond_pool_names_both_keys() {
        let text = error_text(&[("STREAM_CREDITS__WORKER__BATCHES_IN_FLIGHT", "2")]);
        assert!(text.contains("worker.batches_in_flight"), "{text}");
        assert!(text.contains("need 18 database connections"), "{text}");
        assert!(text.contains("database.max_connections (10)"), "{text}");

        let fitting = load_with(&[
            ("STREAM_CREDITS__WORKER__BATCHES_IN_FLIGHT", "2"),
            ("STREAM_CREDITS__DATABASE__MAX_CONNECTIONS", "18"),
        ]);
        assert_eq!(fitting.unwrap().worker.batches_in_flight, 2);
    }

    #[test]
    fn one_batch_in_flight_fits_any_pool() {
        let settings = load_with(&[
            ("STREAM_CREDITS__TOPOLOGY__SHARDS", "16"),
            ("STREAM_CREDITS__DATABASE__MAX_CONNECTIONS", "4"),
        ]);
        assert_eq!(settings.unwrap().topology.shards, 16);
    }

    #[test]
    fn home_shards_parse_from_file_text_and_list() {
        let dir = std::env::temp_dir().join(format!("settings-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, expected) in [("\"0, 1,2\"", vec![0, 1, 2]), ("[4, 5]", vec![4, 5]), ("\"6\"", vec![6])] {
            let path = dir.join("shards.toml");
            std::fs::write(&path, format!("[worker]\nhome_shards = {text}\n")).unwrap();
            let settings = Settings::load_from(Some(&path), Vec::new()).unwrap();
            assert_eq!(settings.worker.home_shards, expected, "{text}");
        }
        let path = dir.join("shards.toml");
        std::fs::write(&path, "[worker]\nhome_shards = \"0,x\"\n").unwrap();
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains("`x` is not a shard number"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn home_shards_parse_from_environment() {
        let settings = load_with(&[("STREAM_CREDITS__WORKER__HOME_SHARDS", "0,3")]).unwrap();
        assert_eq!(settings.worker.home_shards, vec![0, 3]);
    }

    #[test]
    fn single_home_shard_parses_from_environment() {
        let settings = load_with(&[("STREAM_CREDITS__WORKER__HOME_SHARDS", "5")]).unwrap();
        assert_eq!(settings.worker.home_shards, vec![5]);
    }

    #[test]
    fn non_numeric_home_shard_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__WORKER__HOME_SHARDS", "first")]);
        assert!(text.contains("worker.home_shards"), "{text}");
    }

    #[test]
    fn home_shard_beyond_shards_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__WORKER__HOME_SHARDS", "8")]);
        assert!(text.contains("worker.home_shards"), "{text}");
    }

    #[test]
    fn growth_threshold_above_100_names_the_key() {
        let text = error_text(&[(
            "STREAM_CREDITS__RESERVATIONS__GROWTH_THRESHOLD_PERCENT",
            "101",
        )]);
        assert!(
            text.contains("reservations.growth_threshold_percent"),
            "{text}"
        );
    }

    #[test]
    fn history_minimum_above_streams_names_the_key() {
        let text = error_text(&[
            ("STREAM_CREDITS__RESERVATIONS__HISTORY_STREAMS", "10"),
            ("STREAM_CREDITS__RESERVATIONS__HISTORY_STREAMS_MIN", "11"),
        ]);
        assert!(text.contains("reservations.history_streams_min"), "{text}");
    }

    #[test]
    fn growth_settings_parse_from_environment() {
        let settings = load_with(&[
            ("STREAM_CREDITS__RESERVATIONS__GROWTH", "false"),
            ("STREAM_CREDITS__RESERVATIONS__HOLD_MAX_CREDITS", "500"),
        ])
        .unwrap();
        assert!(!settings.reservations.growth);
        assert_eq!(settings.reservations.hold_max_credits, 500);
        assert!(settings.reservations.size_from_history);
    }

    #[test]
    fn zero_shards_name_the_key() {
        let text = error_text(&[("STREAM_CREDITS__TOPOLOGY__SHARDS", "0")]);
        assert!(text.contains("topology.shards"), "{text}");
    }

    #[test]
    fn overflowing_prices_name_the_model() {
        let text = error_text(&[("STREAM_CREDITS__LIMITS__TOKENS_MAX", "1000000000000000000")]);
        assert!(text.contains("invalid setting `models."), "{text}");
        assert!(!text.contains("output_per_million`"), "{text}");
        assert!(text.contains("limits.tokens_max (1000000000000000000)"), "{text}");
        assert!(
            text.contains("`limits.tokens_max` = `1000000000000000000` in environment variable STREAM_CREDITS__LIMITS__TOKENS_MAX"),
            "{text}"
        );
    }

    #[test]
    fn overflowing_price_from_a_file_names_the_file() {
        let path = settings_file("overflow", "[models.gpt-4o]\noutput_per_million = 9000000000000000000\n");
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains("invalid setting `models.gpt-4o`"), "{text}");
        let origin = format!("`models.gpt-4o.output_per_million` = `9000000000000000000` in {}", path.display());
        assert!(text.contains(&origin), "{text}");
        assert!(!text.contains("`limits.tokens_max` ="), "tokens_max was not set: {text}");
    }

    #[test]
    fn bad_model_fields_name_their_origin() {
        let path = settings_file("model-type", "[models.gpt-4o]\noutput_per_million = \"x\"\n");
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains(&format!("`models.gpt-4o.output_per_million` = `x` in {}", path.display())), "{text}");

        let path = settings_file("model-missing", "[models.acme]\ninput_per_million = 3\n");
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains("`models.acme.output_per_million`: missing"), "{text}");
        assert!(text.contains(&format!("`models.acme.input_per_million` = `3` in {}", path.display())), "{text}");

        let path = settings_file("model-table", "[models]\n\"gpt-4o\" = 5\n");
        let text = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(text.contains("expected a table of model fields"), "{text}");
    }

    #[test]
    fn huge_model_price_variable_names_the_width() {
        let text = error_text(&[("STREAM_CREDITS__MODELS__GPT-4O__OUTPUT_PER_MILLION", "18446744073709551615")]);
        assert!(text.contains("is not a 64-bit integer"), "{text}");
        assert!(text.contains("environment variable STREAM_CREDITS__MODELS__GPT-4O__OUTPUT_PER_MILLION"), "{text}");
    }

    #[test]
    fn names_key_matches_whole_keys() {
        use super::sources::names_key;
        assert!(names_key("lower limits.tokens_max (5)", "limits.tokens_max"));
        assert!(names_key("lower limits.tokens_max.", "limits.tokens_max"));
        assert!(!names_key("lower limits.tokens_max_extra", "limits.tokens_max"));
        assert!(!names_key("lower xlimits.tokens_max", "limits.tokens_max"));
        assert!(!names_key("lower limits.tokens_max.more", "limits.tokens_max"));
    }

    #[test]
    fn huge_durations_name_the_key() {
        for key in ["DATABASE__ACQUIRE_TIMEOUT_SECONDS", "WORKER__SHUTDOWN_TIMEOUT_SECONDS"] {
            let variable = format!("STREAM_CREDITS__{key}");
            let text = error_text(&[(variable.as_str(), "18446744073709551615")]);
            assert!(text.contains("must be at most 315360000"), "{key}: {text}");
        }
    }

    #[test]
    fn zero_acquire_timeout_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__DATABASE__ACQUIRE_TIMEOUT_SECONDS", "0")]);
        assert!(text.contains("database.acquire_timeout_seconds"), "{text}");
        assert!(text.contains("must be greater than zero"), "{text}");
    }

    #[test]
    fn zero_batch_bytes_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__WORKER__BATCH_BYTES_MAX", "0")]);
        assert!(text.contains("worker.batch_bytes_max"), "{text}");
        assert!(text.contains("must be greater than zero"), "{text}");
    }

    #[test]
    fn negative_price_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__MODELS__GPT-4O__OUTPUT_PER_MILLION", "-1")]);
        assert!(text.contains("models.gpt-4o.output_per_million"), "{text}");
        assert!(
            text.contains("environment variable STREAM_CREDITS__MODELS__GPT-4O__OUTPUT_PER_MILLION"),
            "{text}"
        );
        assert!(text.contains("`-1`"), "{text}");
    }

    #[test]
    fn empty_count_names_range_from_one() {
        let text = error_text(&[("STREAM_CREDITS__TOPOLOGY__SHARDS", "")]);
        assert!(text.contains("topology.shards"), "{text}");
        assert!(text.contains("an integer from 1 to 65535"), "{text}");
        let text = error_text(&[("STREAM_CREDITS__RETENTION__INTERVAL_SECONDS", "x")]);
        assert!(text.contains("an integer of 0 or more"), "{text}");
    }

    #[test]
    fn unparsable_url_names_the_key() {
        let text = error_text(&[("STREAM_CREDITS__AMQP__URL", "not a url")]);
        assert!(text.contains("amqp.url"), "{text}");
        assert!(text.ends_with("not a URL (relative URL without a base)"), "{text}");
    }

    #[test]
    fn url_errors_hide_the_password() {
        let text = error_text(&[("STREAM_CREDITS__DATABASE__URL", "mysql://u:hunter2@h/db")]);
        assert!(text.contains("database.url"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn secret_url_debug_hides_the_password() {
        let url = SecretUrl::new("amqp://guest:s3cret@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(!url.to_string().contains("s3cret"));
        assert!(url.redacted().contains("guest:***@"));
    }

    #[test]
    fn query_passwords_are_redacted() {
        let cases = [
            ("postgres://h/x?password=p1", "postgres://h/x?password=***"),
            (
                "postgres://h/x?sslmode=require&sslpassword=p2",
                "postgres://h/x?sslmode=require&sslpassword=***",
            ),
            (
                "postgres://h/x?DB_Password=p3&a=1",
                "postgres://h/x?DB_Password=***&a=1",
            ),
            (
                "postgres://h/x?pass%77ord=p4",
                "postgres://h/x?pass%77ord=***",
            ),
            (
                "postgres://u:p5@h/x?password",
                "postgres://u:***@h/x?password=***",
            ),
        ];
        for (raw, redacted) in cases {
            assert_eq!(redact_url(raw), redacted);
        }
    }

    #[test]
    fn unread_database_query_parameter_names_it() {
        let url = "postgres://h/x?sslmode=require&sslpassword=hunter2";
        let text = error_text(&[("STREAM_CREDITS__DATABASE__URL", url)]);
        assert!(text.contains("database.url"), "{text}");
        assert!(text.contains("`sslpassword`"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn read_database_query_parameters_pass() {
        let url = "postgres://h/x?sslmode=require&password=p&options[search_path]=s";
        load_with(&[("STREAM_CREDITS__DATABASE__URL", url)]).unwrap();
    }

    #[test]
    fn unknown_variable_names_key_and_variable() {
        let text = error_text(&[("STREAM_CREDITS__LOG__COLOUR", "1")]);
        assert!(text.contains("unknown setting `log.colour`"), "{text}");
        assert!(text.contains("STREAM_CREDITS__LOG__COLOUR"), "{text}");
        assert!(text.contains("`log.format`"), "{text}");
    }

    #[test]
    fn variable_naming_a_section_is_rejected() {
        let text = error_text(&[("STREAM_CREDITS__TOPOLOGY", "x")]);
        assert!(text.contains("unknown setting `topology`"), "{text}");
        assert!(text.contains("`topology.shards`"), "{text}");
    }

    #[test]
    fn bad_boolean_lists_what_is_expected() {
        let text = error_text(&[("STREAM_CREDITS__RESERVATIONS__GROWTH", "maybe")]);
        assert_eq!(
            text,
            "invalid value `maybe` for `reservations.growth` in environment variable \
             STREAM_CREDITS__RESERVATIONS__GROWTH: expected a boolean"
        );
    }

    #[test]
    fn file_with_unknown_key_names_it() {
        let path = settings_file(
            "unknown",
            "[models.\"gpt-4.1\"]\noutput_per_million = 5\n[log]\nlevl = \"debug\"\n",
        );
        let text = Settings::load_unvalidated(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(text.contains("unknown setting `log.levl`"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
}
