//! Deletes the records of counted chunks that no later copy can need.
//!
//! Every applied message leaves a record of its id, so a copy of it is
//! recognised, and nearly all of those are chunks. A chunk's record is
//! needed only while its stream's hold is open: once the hold is settled,
//! the ledger drops any chunk of that stream as `chunk_after_settlement`.
//! The records have no stream column, so the job goes by time instead. A
//! chunk is counted after its hold was placed, so a chunk record older
//! than every open hold belongs to a settled stream. The margin covers the
//! one way a record can predate its hold: a batch's rows carry the time
//! its transaction began, which may be before the transaction that placed
//! the hold it then read.
//!
//! Records of starts, ends and credit grants are kept, because a copy of
//! a grant whose record was gone would add the credits again. There are
//! only a few of them per stream, like the rows of holds and the ledger.

use sqlx::PgPool;

use crate::ledger::LedgerError;

/// How much older than the oldest open hold a chunk record must be before
/// it is deleted, in seconds. The worker abandons a transaction that has
/// not committed 10 seconds after it began, so a record predates its hold
/// by less than that. Ten minutes also covers a step of the database's
/// clock.
pub const CHUNK_RECORD_MARGIN_SECONDS: f64 = 600.0;

/// Deletes up to `limit` chunk records that no copy can need, in one
/// statement, and returns how many it deleted. A pass that deleted
/// `limit` leaves more to delete.
pub async fn remove_once(pool: &PgPool, limit: i64) -> Result<u64, LedgerError> {
    // The rows are picked first because PostgreSQL has no DELETE … LIMIT.
    let removed = sqlx::query(
        "DELETE FROM processed_messages WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM processed_messages \
             WHERE kind = 'chunk.emitted' \
               AND processed_at < (SELECT coalesce(min(opened_at), now()) FROM holds WHERE settled_at IS NULL) \
                   - make_interval(secs => $1) \
             LIMIT $2))",
    )
    .bind(CHUNK_RECORD_MARGIN_SECONDS)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(removed)
}

/// The outcome of one run of [`remove_all`].
#[derive(Debug, Default)]
pub struct Run {
    /// Records deleted by the passes that finished.
    pub removed: u64,
    /// Whether the last pass left nothing more to delete.
    pub finished: bool,
    /// The error that stopped the run, if one did.
    pub error: Option<LedgerError>,
}

/// Runs passes of [`remove_once`] until one leaves nothing more to delete,
/// one fails, or `keep_going` returns false before the next.
pub async fn remove_all(pool: &PgPool, limit: i64, keep_going: impl Fn() -> bool) -> Run {
    let mut run = Run::default();
    while keep_going() {
        match remove_once(pool, limit).await {
            Ok(pass) => {
                run.removed += pass;
                if pass < limit as u64 {
                    run.finished = true;
                    break;
                }
            }
            Err(error) => {
                run.error = Some(error);
                break;
            }
        }
    }
    run
}
