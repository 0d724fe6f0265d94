//! PostgreSQL pool, database creation and embedded migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::settings::{DatabaseSettings, redact_url};

/// Migrations compiled into the binary from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// A failure to reach or prepare the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot reach PostgreSQL at {url}: {source}; check the host and port in database.url and that PostgreSQL is running")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// The TLS handshake failed, or the URL requires TLS from a server
    /// without it.
    #[error("TLS with PostgreSQL at {url} failed: {error}{hint}")]
    Tls {
        url: String,
        /// Shown in the message rather than as a source, so the error
        /// chain prints the cause once, before the hint.
        error: sqlx::Error,
        /// Advice on what to check, empty when the error names no cause.
        hint: &'static str,
    },
    /// The server answered and rejected the connection, for example for
    /// a database or role that does not exist.
    #[error("PostgreSQL at {url} rejected the connection: {message}{hint}")]
    Rejected {
        url: String,
        /// The server's message, without the line of the server's source
        /// code that sqlx adds.
        message: String,
        /// Shown in the message rather than as a source, so the error
        /// chain prints the cause once.
        error: sqlx::Error,
        /// Advice on what to check, empty when the error names no cause.
        hint: &'static str,
    },
    /// The database exists but has none of this program's tables.
    #[error("the database at {url} has no stream-credits tables; create them with `stream-credits migrate`, or check the database name in database.url")]
    NotMigrated { url: String },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl DbError {
    /// Whether the database may become reachable later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { source, .. } | Self::Tls { error: source, .. } | Self::Rejected { error: source, .. } => {
                crate::ledger::is_transient(source)
            }
            Self::Migrate(sqlx::migrate::MigrateError::Execute(error)) => {
                crate::ledger::is_transient(error)
            }
            Self::Migrate(_) | Self::NotMigrated { .. } => false,
        }
    }
}

/// Opens a pool. Connections are made lazily, so an unreachable database
/// shows up as retryable errors on use rather than here.
///
/// The server ends a session that sits in a transaction for a minute
/// without a statement. None of ours pauses that long, and a connection
/// the network stopped carrying mid-transaction then releases its row
/// locks, which the transaction's retry on a new connection waits for.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    pool_with(settings, &[])
}

/// Opens a pool like [`pool`] whose server cancels any statement that
/// runs longer than `statement_timeout`. Migrations need no such limit,
/// so the worker opens this pool only after they have run.
pub fn worker_pool(settings: &DatabaseSettings, statement_timeout: Duration) -> Result<PgPool, DbError> {
    let milliseconds = format!("{}ms", statement_timeout.as_millis());
    pool_with(settings, &[("statement_timeout", &milliseconds)])
}

fn pool_with(settings: &DatabaseSettings, parameters: &[(&str, &str)]) -> Result<PgPool, DbError> {
    let options = PgConnectOptions::from_str(settings.url.expose())
        .map_err(|source| connect_error(settings.url.redacted(), source))?
        .options([("idle_in_transaction_session_timeout", "60s")])
        .options(parameters.iter().copied());
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_seconds))
        .connect_lazy_with(options))
}

/// Wraps a failed connect, telling a TLS failure apart. sqlx reports a
/// failed handshake as an I/O error around the rustls error, and a server
/// without TLS as a TLS error.
fn connect_error(url: String, source: sqlx::Error) -> DbError {
    if let sqlx::Error::Database(error) = &source {
        // SQLSTATE 3D000: no such database. Class 28: the role does not
        // exist, or the password or authentication method was rejected.
        let code = error.code().unwrap_or_default();
        let hint = match code.as_ref() {
            "3D000" => "; `stream-credits migrate` creates it, or check the database name in database.url",
            code if code.starts_with("28") => "; check the user and password in database.url",
            _ => "",
        };
        return DbError::Rejected {
            url,
            message: error.message().to_owned(),
            error: source,
            hint,
        };
    }
    let hint = match &source {
        sqlx::Error::Tls(_) => "",
        sqlx::Error::Io(io) => match io.get_ref().and_then(|inner| inner.downcast_ref()) {
            Some(rustls::Error::InvalidCertificate(_)) => {
                "; the server's certificate must chain to the CA file that `sslrootcert` \
                 names in database.url, and with sslmode=verify-full it must name the URL's host"
            }
            Some(_) => "",
            None => return DbError::Connect { url, source },
        },
        _ => return DbError::Connect { url, source },
    };
    DbError::Tls {
        url,
        error: source,
        hint,
    }
}

/// Opens a pool on a database that must exist, after one connection
/// made outside the pool has succeeded, so that a failure reports its
/// cause at once rather than as a pool timeout. Neither creates the
/// database nor applies migrations.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let pool = pool(settings)?;
    let url = settings.url.redacted();
    let mut check = PgConnection::connect_with(&pool.connect_options())
        .await
        .map_err(|source| connect_error(url.clone(), source))?;
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('accounts') IS NOT NULL")
        .fetch_one(&mut check)
        .await
        .map_err(|source| connect_error(url.clone(), source))?;
    let _ = check.close().await;
    if !migrated {
        return Err(DbError::NotMigrated { url });
    }
    Ok(pool)
}

/// Creates the database when missing and applies every migration.
pub async fn migrate(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let url = settings.url.expose();
    let wrap = |source| connect_error(redact_url(url), source);
    if !sqlx::Postgres::database_exists(url).await.map_err(wrap)? {
        // Two processes may race to create it; the loser sees it exist.
        if let Err(error) = sqlx::Postgres::create_database(url).await
            && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(wrap(error));
        }
    }
    let pool = pool(settings)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
