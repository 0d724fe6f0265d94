//! PostgreSQL pool, database creation and embedded migrations.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::settings::{DatabaseSettings, redact_url};

/// Migrations compiled into the binary from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// A failure to reach or prepare the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot reach PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl DbError {
    /// Whether the database may become reachable later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { source, .. } => crate::ledger::is_transient(source),
            Self::Migrate(sqlx::migrate::MigrateError::Execute(error)) => {
                crate::ledger::is_transient(error)
            }
            Self::Migrate(_) => false,
        }
    }
}

/// Opens a pool. Connections are made lazily, so an unreachable database
/// shows up as retryable errors on use rather than here.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_seconds))
        .connect_lazy(settings.url.expose())
        .map_err(|source| DbError::Connect {
            url: settings.url.redacted(),
            source,
        })
}

/// Creates the database when missing and applies every migration.
pub async fn migrate(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let url = settings.url.expose();
    let connect_error = |source| DbError::Connect {
        url: redact_url(url),
        source,
    };
    if !sqlx::Postgres::database_exists(url).await.map_err(connect_error)? {
        // Two processes may race to create it; the loser sees it exist.
        if let Err(error) = sqlx::Postgres::create_database(url).await
            && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(connect_error(error));
        }
    }
    let pool = pool(settings)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
