//! Read-only views of an account and its open holds, for `account show`
//! and `GET /accounts/{user_id}`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::ledger::{self, AccountView, LedgerError};

/// One open hold as the chat frontend sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct OpenHold {
    pub stream_id: String,
    pub reservation_id: Uuid,
    pub model: String,
    /// Credits held.
    pub reserved: i64,
    pub prompt_tokens: i64,
    /// Completion tokens counted so far.
    pub counted_completion_tokens: i64,
    pub opened_at: DateTime<Utc>,
    /// Time the hold expires unless another event for its stream arrives.
    pub expires_at: DateTime<Utc>,
}

/// An account with its open holds, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct AccountDetail {
    #[serde(flatten)]
    pub account: AccountView,
    pub holds: Vec<OpenHold>,
}

/// Reads an account and its open holds; `None` for a user never granted
/// credits. `ttl_seconds` dates each hold's expiry from its last event.
pub async fn detail(
    conn: &mut PgConnection,
    user_id: &str,
    ttl_seconds: u64,
) -> Result<Option<AccountDetail>, LedgerError> {
    let Some(account) = ledger::account(conn, user_id).await? else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT stream_id, reservation_id, model, reserved, prompt_tokens, \
         counted_completion_tokens, opened_at, \
         last_event_at + make_interval(secs => $2) AS expires_at \
         FROM holds WHERE user_id = $1 AND settled_at IS NULL ORDER BY opened_at",
    )
    .bind(user_id)
    .bind(ttl_seconds as f64)
    .fetch_all(&mut *conn)
    .await?;
    let holds = rows
        .iter()
        .map(|row| {
            Ok(OpenHold {
                stream_id: row.try_get("stream_id")?,
                reservation_id: row.try_get("reservation_id")?,
                model: row.try_get("model")?,
                reserved: row.try_get("reserved")?,
                prompt_tokens: row.try_get("prompt_tokens")?,
                counted_completion_tokens: row.try_get("counted_completion_tokens")?,
                opened_at: row.try_get("opened_at")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Some(AccountDetail { account, holds }))
}
