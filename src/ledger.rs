//! The ledger in PostgreSQL: grants, holds, chunk counts and settlements.
//!
//! Each inbound message is applied inside a transaction that the caller
//! owns, together with its processed-message row and the replies and
//! events it causes (the outbox). Nothing here publishes or commits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::{Connection, PgConnection, Postgres, Row};
use tracing::warn;
use uuid::Uuid;

use crate::messages::{
    ChunkEmitted, CreditsGranted, DenialReason, ExtensionReason, GrowthLimit, Inbound,
    PromptInput, RejectReason, Rejection, ReservationAdjusted, ReservationDenied,
    ReservationExtended, ReservationGranted, ReservationSettled, SettleStatus, SizedBy,
    StreamEnded, StreamStarted, Usage, UsageOverReservation,
};
use crate::pricing::{Credits, ModelPrice, TokenUsage};
use crate::settings::Settings;
use crate::settlement::{self, Counted, Settlement};
use crate::{holds, tokens};

/// A ledger failure, split by whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database is unreachable, overloaded, or a transaction lost a
    /// race (deadlock, serialization failure, concurrent claim of the
    /// same message). Retry the whole transaction.
    #[error("database unavailable or transaction in conflict: {0}")]
    Retryable(#[source] sqlx::Error),
    /// Any other database error. Retrying the same message will fail the
    /// same way; the broker's delivery limit bounds the attempts.
    #[error("database error: {0}")]
    Final(#[source] sqlx::Error),
    /// The worker's own code panicked while applying the messages. Final,
    /// so the batch's messages are applied one by one and the one that
    /// panics is dead-lettered after its attempts.
    #[error("the worker panicked while applying the messages")]
    Panicked,
}

impl LedgerError {
    /// Whether the same transaction may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

impl From<sqlx::Error> for LedgerError {
    fn from(error: sqlx::Error) -> Self {
        if is_transient(&error) {
            Self::Retryable(error)
        } else {
            Self::Final(error)
        }
    }
}

/// Whether a database error may go away by itself.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Class 08: connection exception. 40001 and 40P01: serialization
            // failure and deadlock. 57014: statement cancelled, by the
            // worker's statement timeout or by an operator.
            // 57P0x: server shutting down or starting.
            // 53300: too many connections. 23505 on the processed-message
            // key: another worker applied the same message concurrently,
            // and the retry will see it as a duplicate.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "40001" | "40P01" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
                )
                || (code == "23505" && db.constraint() == Some("processed_messages_pkey"))
        }
        _ => false,
    }
}

/// Where an outgoing message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The default exchange, routing key = the producer's `reply_to`.
    Reply,
    /// The results exchange, routing key = the event's `type`.
    Event,
}

impl Destination {
    fn code(self) -> &'static str {
        match self {
            Self::Reply => "reply",
            Self::Event => "event",
        }
    }

    fn from_code(code: &str) -> Self {
        if code == "reply" { Self::Reply } else { Self::Event }
    }
}

/// A reply or event to publish once its transaction has committed.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Row in the outbox, to mark as published; `None` for a reply that is
    /// sent again for a duplicate and was already stored.
    pub outbox_id: Option<i64>,
    pub destination: Destination,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub event_type: String,
    pub body: serde_json::Value,
}

/// The reply address of a delivery.
#[derive(Debug, Clone, Default)]
pub struct ReplyTo {
    pub queue: Option<String>,
    pub correlation_id: Option<String>,
}

/// What applying one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was written.
    Applied,
    /// The message id was seen before; nothing changed.
    Duplicate,
    /// Valid but pointless now, such as a chunk after settlement; nothing
    /// changed and the message is acknowledged.
    Dropped(DropReason),
    /// Cannot be applied: dead-letter it. Nothing was written.
    DeadLetter(Rejection),
}

/// Why a valid message changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    ChunkAfterSettlement,
    EndAfterSettlement,
}

impl DropReason {
    /// Metric label.
    pub fn code(self) -> &'static str {
        match self {
            Self::ChunkAfterSettlement => "chunk_after_settlement",
            Self::EndAfterSettlement => "end_after_settlement",
        }
    }
}

/// The result of applying one message: its outcome and what to publish.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    pub outgoing: Vec<Outgoing>,
}

impl Applied {
    fn new(outcome: Outcome) -> Self {
        Self {
            outcome,
            outgoing: Vec::new(),
        }
    }
}

/// Applies messages to the database with one set of settings.
#[derive(Debug, Clone)]
pub struct Ledger {
    settings: Arc<Settings>,
}

/// Inserts an event's outbox rows, one per destination, with the body of
/// the row of a preceding `event` CTE (none, no rows). Parameters: $1
/// event id, $2 to $4 the destinations, routing keys and correlation ids,
/// $5 event type, $6 reservation id; $7 is left to the `event` CTE.
macro_rules! outbox_insert {
    () => {
        "INSERT INTO outbox (event_id, destination, routing_key, correlation_id, \
         event_type, reservation_id, body) \
         SELECT $1, t.destination, t.routing_key, t.correlation_id, $5, $6, event.body \
         FROM event, unnest($2::text[], $3::text[], $4::text[]) AS t(destination, routing_key, correlation_id) \
         RETURNING outbox_id, destination"
    };
}

/// Writes each hold's counts from the arrays $1 (reservation ids), $2
/// (the new total of tokens counted, which replaces the stored one), $3
/// (chunks, added to the stored number) and $4 (whether usage outgrew the
/// hold), and sets `last_event_at`.
/// Each row is found by its key and updated by its row address, so the
/// update never scans the table (see `BatchState::read`). The rows are
/// locked by the batch's transaction, so their addresses cannot change.
macro_rules! counts_update {
    () => {
        "UPDATE holds h SET counted_completion_tokens = v.counted, chunks = h.chunks + v.chunks, \
         over_signalled = h.over_signalled OR v.signalled, last_event_at = now() \
         FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bool[]) \
         AS v(reservation_id, counted, chunks, signalled) \
         CROSS JOIN LATERAL (SELECT ctid AS address FROM holds \
             WHERE reservation_id = v.reservation_id LIMIT 1) AS found \
         WHERE h.ctid = found.address"
    };
}

/// The columns of a hold row but its stored grant reply.
macro_rules! hold_columns_no_grant {
    () => {
        "reservation_id, user_id, stream_id, model, input_per_million, \
         output_per_million, cached_input_per_million, encoding, reserved, initial_reserved, \
         extensions, prompt_tokens, max_output_tokens, counted_completion_tokens, over_signalled, \
         settle_status, charged, adjusted_at IS NOT NULL AS adjusted"
    };
}

/// A hold row, as read for update.
#[derive(Debug, Clone)]
struct Hold {
    reservation_id: Uuid,
    user_id: String,
    stream_id: String,
    model: String,
    price: ModelPrice,
    reserved: Credits,
    /// The hold as granted, before any growth.
    initial_reserved: Credits,
    /// Times the hold grew.
    extensions: u32,
    prompt_tokens: u64,
    counted_completion_tokens: u64,
    over_signalled: bool,
    settle_status: Option<String>,
    charged: Option<i64>,
    adjusted: bool,
    /// The stored grant; `null` in a hold read only for counting.
    grant_reply: serde_json::Value,
}

const HOLD_COLUMNS: &str = concat!(hold_columns_no_grant!(), ", grant_reply");

impl Hold {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            reservation_id: row.try_get("reservation_id")?,
            user_id: row.try_get("user_id")?,
            stream_id: row.try_get("stream_id")?,
            model: row.try_get("model")?,
            price: ModelPrice {
                input_per_million: row.try_get("input_per_million")?,
                output_per_million: row.try_get("output_per_million")?,
                cached_input_per_million: row.try_get("cached_input_per_million")?,
                encoding: row.try_get("encoding")?,
                max_output_tokens: to_u64(row.try_get("max_output_tokens")?),
            },
            reserved: Credits(row.try_get("reserved")?),
            initial_reserved: Credits(row.try_get("initial_reserved")?),
            extensions: u32::try_from(row.try_get::<i32, _>("extensions")?)
                .expect("extensions are CHECKed non-negative"),
            prompt_tokens: to_u64(row.try_get("prompt_tokens")?),
            counted_completion_tokens: to_u64(row.try_get("counted_completion_tokens")?),
            over_signalled: row.try_get("over_signalled")?,
            settle_status: row.try_get("settle_status")?,
            charged: row.try_get("charged")?,
            adjusted: row.try_get("adjusted")?,
            grant_reply: row.try_get("grant_reply")?,
        })
    }

    fn counted(&self) -> Counted {
        Counted {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.counted_completion_tokens,
        }
    }
}

/// A start's price and the allowance of its hold, from
/// [`Ledger::size_start`].
#[derive(Debug, Clone)]
pub struct SizedStart {
    price: ModelPrice,
    allowance: Allowance,
}

/// The output allowance of a new hold and what it costs.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    prompt_tokens: u64,
    max_output_tokens: u64,
    sized_by: SizedBy,
    /// The price of the prompt and the whole allowance.
    reserved: Credits,
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).expect("token columns are CHECKed non-negative")
}

fn to_i64(value: u64) -> i64 {
    // Token counts are bounded by limits.tokens_max, far below i64::MAX.
    i64::try_from(value).expect("token counts fit in 64 bits")
}

impl Ledger {
    /// Creates a ledger that prices and limits with `settings`.
    pub fn new(settings: Arc<Settings>) -> Self {
        Self { settings }
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies one message inside the caller's transaction.
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        message: &Inbound,
        reply_to: &ReplyTo,
    ) -> Result<Applied, LedgerError> {
        let mut applied = self.apply_batch(conn, &[(message, reply_to)]).await?;
        Ok(applied.pop().expect("one result per message"))
    }

    /// Applies messages in order inside the caller's transaction and
    /// returns one result per message.
    ///
    /// Chunks are counted in memory and written once per stream: one
    /// statement writes every stream's new counts and every processed id
    /// (but those of starts that placed a hold, which their own statement
    /// records), so a batch costs a few statements per stream rather than
    /// several per chunk. A stream's counts are written before any other
    /// message of that stream is applied.
    pub async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[(&Inbound, &ReplyTo)],
    ) -> Result<Vec<Applied>, LedgerError> {
        self.apply_batch_sized(conn, messages, None).await
    }

    /// Applies a start that [`Ledger::start_alone`] did not grant inside
    /// the caller's transaction, with the sizing that was read for it, so
    /// its hold is not sized a second time.
    pub async fn apply_sized_start(
        &self,
        conn: &mut PgConnection,
        message: (&Inbound, &ReplyTo),
        sized: SizedStart,
    ) -> Result<Applied, LedgerError> {
        let mut applied = self.apply_batch_sized(conn, &[message], Some(sized)).await?;
        Ok(applied.pop().expect("one result per message"))
    }

    async fn apply_batch_sized(
        &self,
        conn: &mut PgConnection,
        messages: &[(&Inbound, &ReplyTo)],
        sized: Option<SizedStart>,
    ) -> Result<Vec<Applied>, LedgerError> {
        let mut batch = BatchState::read(conn, messages).await?;
        batch.sized = sized;
        let mut results: Vec<Option<Applied>> = Vec::with_capacity(messages.len());
        // Starts of distinct users, placed together by one statement. A
        // message of a user in the group places the group first, so each
        // user's messages still apply in order.
        let mut group = StartGroup::default();
        for (message, reply_to) in messages {
            if group.users.contains(message.user_id()) {
                self.place_group(conn, &mut batch, &mut group, &mut results).await?;
            }
            let key = (message.user_id().to_owned(), message.message_id().to_owned());

            // A message id seen before changes nothing; a repeated start
            // gets its stored reply again. An id that a message of another
            // type used is a producer's mistake, and dead-lettering the
            // message shows it where dropping it would hide it.
            if let Some(seen) = batch.known.get(&key) {
                if seen.kind != message.type_name() {
                    let rejection = Rejection {
                        reason: RejectReason::InvalidField,
                        detail: format!(
                            "field `message_id` was already used by a {} of this user",
                            seen.kind
                        ),
                        partial: Default::default(),
                    };
                    results.push(Some(Applied::new(Outcome::DeadLetter(rejection))));
                    continue;
                }
                let mut applied = Applied::new(Outcome::Duplicate);
                if let Some(reply) = seen.reply.clone() {
                    applied.outgoing.extend(resend_reply(reply, reply_to));
                }
                results.push(Some(applied));
                continue;
            }

            // A start of a stream without a hold joins the group. A start
            // of a model without a price stays out and is denied below.
            if let Inbound::StreamStarted(start) = message
                && batch.sized.is_none()
                && batch.without_hold.contains(&(start.user_id.clone(), start.stream_id.clone()))
                && let Some(sized) = self.size_start(conn, start).await?
            {
                batch.flush_stream(conn, &start.user_id, &start.stream_id).await?;
                batch.without_hold.remove(&(start.user_id.clone(), start.stream_id.clone()));
                group.users.insert(start.user_id.clone());
                group.starts.push(GroupedStart { index: results.len(), start, reply_to, sized });
                results.push(None);
                continue;
            }

            let (applied, stored_reply) = match message {
                Inbound::ChunkEmitted(chunk) => (self.count_chunk(conn, &mut batch, chunk).await?, None),
                other => {
                    if let Some(stream_id) = other.stream_id() {
                        batch.flush_stream(conn, other.user_id(), stream_id).await?;
                    }
                    self.apply_unbatched(conn, &mut batch, other, reply_to).await?
                }
            };

            // Only an applied message is recorded, so a dead letter
            // replayed later is applied then. A start that placed a hold
            // has recorded its id in the statement that placed it.
            batch.record_applied(key, message.type_name(), &applied.outcome, stored_reply);
            results.push(Some(applied));
        }
        self.place_group(conn, &mut batch, &mut group, &mut results).await?;
        batch.flush(conn).await?;
        Ok(results
            .into_iter()
            .map(|applied| applied.expect("every grouped start was placed"))
            .collect())
    }

    /// Places the holds of the grouped starts in one statement, denies
    /// those it could not place, and fills in their results.
    async fn place_group(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        group: &mut StartGroup<'_>,
        results: &mut [Option<Applied>],
    ) -> Result<(), LedgerError> {
        group.users.clear();
        let starts = std::mem::take(&mut group.starts);
        if starts.is_empty() {
            return Ok(());
        }
        // A start alone takes the one-start statement, whose plan is
        // already made.
        let placed = if let [grouped] = starts.as_slice() {
            let (price, allowance) = (&grouped.sized.price, grouped.sized.allowance);
            vec![self.reserve(conn, grouped.start, price, allowance, Some(batch.now), grouped.reply_to).await?]
        } else {
            self.reserve_many(conn, &starts, batch.now).await?
        };
        for (grouped, placed) in starts.into_iter().zip(placed) {
            let start = grouped.start;
            let requested = grouped.sized.allowance.reserved;
            let (applied, stored_reply) = self
                .grant_or_deny(conn, batch, start, requested, grouped.reply_to, placed)
                .await?;
            let key = (start.user_id.clone(), start.message_id.clone());
            batch.record_applied(key, "stream.started", &applied.outcome, stored_reply);
            results[grouped.index] = Some(applied);
        }
        Ok(())
    }

    async fn apply_unbatched(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        message: &Inbound,
        reply_to: &ReplyTo,
    ) -> Result<(Applied, Option<serde_json::Value>), LedgerError> {
        Ok(match message {
            Inbound::CreditsGranted(grant) => (self.grant(conn, grant).await?, None),
            Inbound::StreamStarted(start) => self.start(conn, batch, start, reply_to).await?,
            Inbound::StreamEnded(end) => (self.end(conn, end).await?, None),
            Inbound::ChunkEmitted(_) => unreachable!("chunks are counted by the batch"),
        })
    }

    async fn grant(
        &self,
        conn: &mut PgConnection,
        grant: &CreditsGranted,
    ) -> Result<Applied, LedgerError> {
        let balance: Option<i64> = sqlx::query_scalar(
            "INSERT INTO accounts (user_id, balance) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE \
             SET balance = accounts.balance + EXCLUDED.balance, updated_at = now() \
             WHERE accounts.balance <= 9223372036854775807 - EXCLUDED.balance \
             RETURNING balance",
        )
        .bind(&grant.user_id)
        .bind(grant.amount)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(balance) = balance else {
            return Ok(Applied::new(Outcome::DeadLetter(Rejection {
                reason: RejectReason::InvalidField,
                detail: "field `amount` would overflow the 64-bit balance".to_owned(),
                partial: Default::default(),
            })));
        };

        insert_ledger_entry(
            conn,
            LedgerEntry {
                user_id: &grant.user_id,
                kind: "grant",
                amount: grant.amount,
                balance_after: balance,
                reservation_id: None,
                message_id: Some(&grant.message_id),
                reason: grant.reason.as_deref(),
            },
        )
        .await?;
        Ok(Applied::new(Outcome::Applied))
    }

    async fn start(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        start: &StreamStarted,
        reply_to: &ReplyTo,
    ) -> Result<(Applied, Option<serde_json::Value>), LedgerError> {
        // A stream that already holds credits gets the same grant again
        // and reserves nothing more. A stream the batch found without a
        // hold needs no second look, unless this batch reserved for it.
        let key = (start.user_id.clone(), start.stream_id.clone());
        let existing = if batch.without_hold.remove(&key) {
            None
        } else {
            lock_hold(conn, &start.user_id, &start.stream_id).await?
        };
        if let Some(hold) = existing {
            if hold.settle_status.is_none() {
                let reply = hold.grant_reply.clone();
                let mut applied = Applied::new(Outcome::Applied);
                applied.outgoing.extend(resend_reply(reply.clone(), reply_to));
                return Ok((applied, Some(reply)));
            }
            let rejection = Rejection {
                reason: RejectReason::InvalidField,
                detail: "field `stream_id` names a stream that was already settled".to_owned(),
                partial: Default::default(),
            };
            return Ok((Applied::new(Outcome::DeadLetter(rejection)), None));
        }

        let sized = match batch.sized.take() {
            Some(sized) => sized,
            None => match self.size_start(conn, start).await? {
                Some(sized) => sized,
                None => {
                    let denial = self.denial(start, DenialReason::UnknownModel, None, None);
                    return self.record_denial(conn, denial, reply_to).await;
                }
            },
        };
        let placed = self
            .reserve(conn, start, &sized.price, sized.allowance, Some(batch.now), reply_to)
            .await?;
        self.grant_or_deny(conn, batch, start, sized.allowance.reserved, reply_to, placed)
            .await
    }

    /// Returns a start's result once its hold was placed or not: the
    /// grant, added to the batch's known ids, or a denial with its reason.
    async fn grant_or_deny(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        start: &StreamStarted,
        requested: Credits,
        reply_to: &ReplyTo,
        placed: Option<(serde_json::Value, Vec<Outgoing>)>,
    ) -> Result<(Applied, Option<serde_json::Value>), LedgerError> {
        let Some((body, outgoing)) = placed else {
            let denial = self.explain_denial(conn, start, requested).await?;
            return self.record_denial(conn, denial, reply_to).await;
        };
        let processed = (start.user_id.clone(), start.message_id.clone());
        batch.known.insert(processed, Seen::new("stream.started", Some(body.clone())));
        let mut applied = Applied::new(Outcome::Applied);
        applied.outgoing = outgoing;
        Ok((applied, Some(body)))
    }

    /// Prices a start and sizes its hold, reading the completions of
    /// recent holds when the allowance is sized from history. Changes
    /// nothing. Returns `None` for a start of an unknown model.
    pub async fn size_start(
        &self,
        conn: &mut PgConnection,
        start: &StreamStarted,
    ) -> Result<Option<SizedStart>, LedgerError> {
        let Some((_, price)) = self.settings.model(&start.model) else {
            return Ok(None);
        };
        let price = price.clone();
        let allowance = self.allowance(conn, start, &price).await?;
        Ok(Some(SizedStart { price, allowance }))
    }

    /// Places the hold of a start sized by [`Ledger::size_start`] in one
    /// statement outside any transaction, which commits as the statement
    /// ends. This is the shortest way from a start to its grant. Returns
    /// `None`, having changed nothing, for a start whose message id or
    /// stream was seen before and for a start to deny. The caller applies
    /// those with `apply_batch`.
    pub async fn start_alone(
        &self,
        conn: &mut PgConnection,
        start: &StreamStarted,
        sized: &SizedStart,
        reply_to: &ReplyTo,
    ) -> Result<Option<Applied>, LedgerError> {
        let reserved = self
            .reserve(conn, start, &sized.price, sized.allowance, None, reply_to)
            .await?;
        Ok(reserved.map(|(_, outgoing)| Applied {
            outcome: Outcome::Applied,
            outgoing,
        }))
    }

    /// Counts a start's prompt and sizes its output allowance.
    async fn allowance(
        &self,
        conn: &mut PgConnection,
        start: &StreamStarted,
        price: &ModelPrice,
    ) -> Result<Allowance, LedgerError> {
        let prompt_tokens = count_prompt(price, start).min(self.settings.limits.tokens_max);
        let (max_output_tokens, sized_by) = holds::output_allowance(
            conn,
            &self.settings.reservations,
            &start.user_id,
            &start.model,
            start.max_output_tokens,
            price.max_output_tokens,
        )
        .await?;
        let Ok(reserved) = price.cost(TokenUsage {
            prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens: max_output_tokens,
        }) else {
            // Settings validation keeps every cost within limits in 64
            // bits, and decoding bounds every token count.
            unreachable!("a hold within limits.tokens_max fits in 64 bits");
        };
        Ok(Allowance {
            prompt_tokens,
            max_output_tokens,
            sized_by,
            reserved,
        })
    }

    /// Places a hold in one statement. The statement takes the hold's
    /// credits from the user's available credits, inserts the hold, stores
    /// its grant in the outbox and records the start's message id with the
    /// grant. It does so only when the credits suffice, the user has a free
    /// stream slot, and neither the message id nor the stream was seen
    /// before. The hold opens at `now`, or at the statement's time when
    /// `now` is `None`. Returns the grant and where to send it, or `None`
    /// when nothing was taken.
    /// PostgreSQL re-checks the guard after waiting for a concurrent
    /// writer's row lock, so no race can overdraw. A concurrent insert of
    /// the same hold or message id fails on its unique key.
    async fn reserve(
        &self,
        conn: &mut PgConnection,
        start: &StreamStarted,
        price: &ModelPrice,
        allowance: Allowance,
        now: Option<DateTime<Utc>>,
        reply_to: &ReplyTo,
    ) -> Result<Option<(serde_json::Value, Vec<Outgoing>)>, LedgerError> {
        let grant = new_grant(start, allowance);
        let body = serde_json::to_value(&grant).expect("events serialize");
        let outbox = OutboxRows::new("reservation.granted", reply_to);
        // $1 to $7 are the outbox's, $7 the grant with placeholders as
        // available_after and expires_at, which the statement replaces.
        // The expiry is written as chrono writes times, to the microsecond.
        let query = concat!(
            "WITH clock AS (SELECT coalesce($18::timestamptz, now()) AS now), \
             debit AS (UPDATE accounts \
                 SET reserved = reserved + $15, holds_open = holds_open + 1, updated_at = now() \
                 WHERE user_id = $8 AND balance - reserved >= $15 AND holds_open < $20 \
                 AND NOT EXISTS (SELECT 1 FROM processed_messages WHERE user_id = $8 AND message_id = $21) \
                 AND NOT EXISTS (SELECT 1 FROM holds WHERE user_id = $8 AND stream_id = $9) \
                 RETURNING balance - reserved AS available_after), \
             event AS (SELECT jsonb_set(jsonb_set($7::jsonb, '{available_after}', to_jsonb(available_after)), \
                 '{expires_at}', to_jsonb(to_char((clock.now + $22 * interval '1 second') AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))) AS body \
                 FROM debit, clock), \
             hold AS (INSERT INTO holds (reservation_id, user_id, stream_id, model, \
                 input_per_million, output_per_million, cached_input_per_million, encoding, reserved, \
                 initial_reserved, prompt_tokens, max_output_tokens, last_event_at, opened_at, \
                 grant_reply, sized_by) \
                 SELECT $6, $8, $9, $10, $11, $12, $13, $14, $15, $15, $16, $17, clock.now, clock.now, body, $19 \
                 FROM event, clock), \
             processed AS (INSERT INTO processed_messages (user_id, message_id, kind, reply) \
                 SELECT $8, $21, 'stream.started', body FROM event), \
             stored AS (",
            outbox_insert!(),
            ") SELECT stored.outbox_id, stored.destination, event.body FROM stored, event"
        );
        let ttl_seconds = i64::try_from(self.settings.reservations.ttl_seconds).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String, serde_json::Value)> = outbox
            .bind(sqlx::query_as(query), grant.event_id, Some(grant.reservation_id), &body)
            .bind(&start.user_id)
            .bind(&start.stream_id)
            .bind(&start.model)
            .bind(price.input_per_million)
            .bind(price.output_per_million)
            .bind(price.cached_input_per_million)
            .bind(&price.encoding)
            .bind(allowance.reserved.0)
            .bind(to_i64(allowance.prompt_tokens))
            .bind(to_i64(allowance.max_output_tokens))
            .bind(now)
            .bind(allowance.sized_by.code())
            .bind(i32::try_from(self.settings.reservations.max_active_per_user).unwrap_or(i32::MAX))
            .bind(&start.message_id)
            .bind(ttl_seconds)
            .fetch_all(&mut *conn)
            .await?;
        let Some((_, _, body)) = rows.first() else {
            return Ok(None);
        };
        let body = body.clone();
        let ids = rows.into_iter().map(|(id, destination, _)| (id, destination)).collect();
        Ok(Some(placed_grant(outbox, ids, body)))
    }

    /// Places the holds of starts of distinct users in one statement, as
    /// [`Ledger::reserve`] places one, each under the same guard. Returns,
    /// in the order of `starts`, each grant and where to send it, or
    /// `None` for a start whose hold was not placed.
    async fn reserve_many(
        &self,
        conn: &mut PgConnection,
        starts: &[GroupedStart<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Option<(serde_json::Value, Vec<Outgoing>)>>, LedgerError> {
        let mut columns = GroupColumns::default();
        let mut outboxes = Vec::with_capacity(starts.len());
        for (ord, grouped) in (0_i32..).zip(starts) {
            let (start, price, allowance) = (grouped.start, &grouped.sized.price, grouped.sized.allowance);
            let grant = new_grant(start, allowance);
            columns.ord.push(ord);
            columns.user_id.push(start.user_id.as_str());
            columns.stream_id.push(start.stream_id.as_str());
            columns.message_id.push(start.message_id.as_str());
            columns.reserved.push(allowance.reserved.0);
            columns.model.push(start.model.as_str());
            columns.input_per_million.push(price.input_per_million);
            columns.output_per_million.push(price.output_per_million);
            columns.cached_input_per_million.push(price.cached_input_per_million);
            columns.encoding.push(price.encoding.as_str());
            columns.prompt_tokens.push(to_i64(allowance.prompt_tokens));
            columns.max_output_tokens.push(to_i64(allowance.max_output_tokens));
            columns.sized_by.push(allowance.sized_by.code());
            columns.reservation_id.push(grant.reservation_id);
            columns.event_id.push(grant.event_id);
            columns.body.push(serde_json::to_string(&grant).expect("events serialize"));
            let outbox = OutboxRows::new("reservation.granted", grouped.reply_to);
            for (destination, routing_key, correlation_id) in &outbox.targets {
                columns.target_ord.push(ord);
                columns.destination.push(destination.code());
                columns.routing_key.push(routing_key.clone());
                columns.correlation_id.push(correlation_id.clone());
            }
            outboxes.push(outbox);
        }
        // The statement of `reserve`, over arrays: $2 to $17 are the
        // starts by ordinal, $20 to $23 their outbox rows. It joins the
        // arrays to accounts, processed ids and holds, so it is planned
        // afresh each time (`persistent(false)`): a plan cached while the
        // tables were small could scan them whole once they have grown.
        let query = "WITH clock AS (SELECT $1::timestamptz AS now), \
             input AS (SELECT * FROM unnest($2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
                 $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::bigint[], \
                 $13::bigint[], $14::text[], $15::uuid[], $16::uuid[], $17::text[]) \
                 AS i(ord, user_id, stream_id, message_id, reserved, model, input_per_million, \
                 output_per_million, cached_input_per_million, encoding, prompt_tokens, max_output_tokens, \
                 sized_by, reservation_id, event_id, body)), \
             debit AS (UPDATE accounts a \
                 SET reserved = a.reserved + i.reserved, holds_open = a.holds_open + 1, updated_at = now() \
                 FROM input i \
                 WHERE a.user_id = i.user_id AND a.balance - a.reserved >= i.reserved AND a.holds_open < $18 \
                 AND NOT EXISTS (SELECT 1 FROM processed_messages p \
                     WHERE p.user_id = i.user_id AND p.message_id = i.message_id) \
                 AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.user_id = i.user_id AND h.stream_id = i.stream_id) \
                 RETURNING i.ord, a.balance - a.reserved AS available_after), \
             event AS (SELECT i.*, jsonb_set(jsonb_set(i.body::jsonb, '{available_after}', \
                 to_jsonb(debit.available_after)), '{expires_at}', \
                 to_jsonb(to_char((clock.now + $19 * interval '1 second') AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))) AS granted \
                 FROM debit JOIN input i ON i.ord = debit.ord CROSS JOIN clock), \
             hold AS (INSERT INTO holds (reservation_id, user_id, stream_id, model, \
                 input_per_million, output_per_million, cached_input_per_million, encoding, reserved, \
                 initial_reserved, prompt_tokens, max_output_tokens, last_event_at, opened_at, \
                 grant_reply, sized_by) \
                 SELECT reservation_id, user_id, stream_id, model, input_per_million, output_per_million, \
                 cached_input_per_million, encoding, reserved, reserved, prompt_tokens, max_output_tokens, \
                 clock.now, clock.now, granted, sized_by FROM event, clock), \
             processed AS (INSERT INTO processed_messages (user_id, message_id, kind, reply) \
                 SELECT user_id, message_id, 'stream.started', granted FROM event), \
             stored AS (INSERT INTO outbox (event_id, destination, routing_key, correlation_id, \
                 event_type, reservation_id, body) \
                 SELECT event.event_id, t.destination, t.routing_key, t.correlation_id, \
                 'reservation.granted', event.reservation_id, event.granted \
                 FROM event JOIN unnest($20::int[], $21::text[], $22::text[], $23::text[]) \
                 AS t(ord, destination, routing_key, correlation_id) ON t.ord = event.ord \
                 RETURNING outbox_id, destination, event_id) \
             SELECT event.ord, stored.outbox_id, stored.destination, event.granted \
             FROM stored JOIN event ON event.event_id = stored.event_id";
        let ttl_seconds = i64::try_from(self.settings.reservations.ttl_seconds).unwrap_or(i64::MAX);
        let max_active = i32::try_from(self.settings.reservations.max_active_per_user).unwrap_or(i32::MAX);
        let rows: Vec<(i32, i64, String, serde_json::Value)> = sqlx::query_as(query)
            .persistent(false)
            .bind(now)
            .bind(&columns.ord)
            .bind(&columns.user_id)
            .bind(&columns.stream_id)
            .bind(&columns.message_id)
            .bind(&columns.reserved)
            .bind(&columns.model)
            .bind(&columns.input_per_million)
            .bind(&columns.output_per_million)
            .bind(&columns.cached_input_per_million)
            .bind(&columns.encoding)
            .bind(&columns.prompt_tokens)
            .bind(&columns.max_output_tokens)
            .bind(&columns.sized_by)
            .bind(&columns.reservation_id)
            .bind(&columns.event_id)
            .bind(&columns.body)
            .bind(max_active)
            .bind(ttl_seconds)
            .bind(&columns.target_ord)
            .bind(&columns.destination)
            .bind(&columns.routing_key)
            .bind(&columns.correlation_id)
            .fetch_all(&mut *conn)
            .await?;

        let mut placed: Vec<Option<(StoredRows, serde_json::Value)>> = vec![None; starts.len()];
        for (ord, outbox_id, destination, granted) in rows {
            let index = usize::try_from(ord).expect("ordinals are the starts' indexes");
            placed[index]
                .get_or_insert_with(|| (Vec::new(), granted))
                .0
                .push((outbox_id, destination));
        }
        Ok(outboxes
            .into_iter()
            .zip(placed)
            .map(|(outbox, placed)| placed.map(|(ids, body)| placed_grant(outbox, ids, body)))
            .collect())
    }

    async fn explain_denial(
        &self,
        conn: &mut PgConnection,
        start: &StreamStarted,
        requested: Credits,
    ) -> Result<ReservationDenied, LedgerError> {
        let row = sqlx::query("SELECT balance - reserved AS available, holds_open FROM accounts WHERE user_id = $1")
            .bind(&start.user_id)
            .fetch_optional(&mut *conn)
            .await?;
        let (available, holds_open) = match row {
            Some(row) => (row.try_get::<i64, _>("available")?, row.try_get::<i32, _>("holds_open")?),
            None => (0, 0),
        };
        let max_active = i64::from(self.settings.reservations.max_active_per_user);
        if i64::from(holds_open) < max_active {
            let reason = DenialReason::InsufficientCredits;
            return Ok(self.denial(start, reason, Some(requested.0), Some(available)));
        }
        let reason = DenialReason::TooManyActiveStreams;
        let mut denial = self.denial(start, reason, Some(requested.0), Some(available));
        denial.retry_after_seconds = holds::retry_after_seconds(
            conn,
            &self.settings.reservations,
            &start.user_id,
            &start.model,
        )
        .await?;
        Ok(denial)
    }

    fn denial(
        &self,
        start: &StreamStarted,
        reason: DenialReason,
        requested: Option<i64>,
        available: Option<i64>,
    ) -> ReservationDenied {
        ReservationDenied {
            kind: Default::default(),
            event_id: Uuid::now_v7(),
            user_id: Some(start.user_id.clone()),
            stream_id: Some(start.stream_id.clone()),
            reason,
            requested,
            available,
            detail: None,
            retry_after_seconds: None,
        }
    }

    async fn record_denial(
        &self,
        conn: &mut PgConnection,
        denial: ReservationDenied,
        reply_to: &ReplyTo,
    ) -> Result<(Applied, Option<serde_json::Value>), LedgerError> {
        let body = serde_json::to_value(&denial).expect("events serialize");
        let mut applied = Applied::new(Outcome::Applied);
        applied.outgoing = enqueue(
            conn,
            denial.event_id,
            "reservation.denied",
            None,
            &body,
            reply_to,
        )
        .await?;
        Ok((applied, Some(body)))
    }

    /// Counts one chunk against its stream's pending counts, loading and
    /// locking the hold on the stream's first chunk in the batch. When the
    /// count nears the hold, the hold grows in this transaction; when it
    /// passes a hold that cannot grow, `usage.over_reservation` is sent.
    async fn count_chunk(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        chunk: &ChunkEmitted,
    ) -> Result<Applied, LedgerError> {
        let stream_key = (chunk.user_id.clone(), chunk.stream_id.clone());
        if !batch.pending.contains_key(&stream_key) {
            // The stream was settled or started earlier in this batch, or
            // its hold did not exist when the batch began.
            let Some(hold) = lock_hold(conn, &chunk.user_id, &chunk.stream_id).await? else {
                return Ok(Applied::new(Outcome::DeadLetter(unknown_stream())));
            };
            batch.pending.insert(stream_key.clone(), PendingCounts::new(hold));
        }
        let pending = batch.pending.get_mut(&stream_key).expect("inserted above");
        if pending.hold.settle_status.is_some() {
            return Ok(Applied::new(Outcome::Dropped(DropReason::ChunkAfterSettlement)));
        }

        let tokens = match chunk.tokens {
            Some(tokens) => tokens,
            None => {
                let bpe = tokens::encoder(&pending.hold.price.encoding)
                    .expect("hold encodings come from validated settings");
                tokens::count_text(bpe, &chunk.delta)
            }
        };
        // Counts stop at limits.tokens_max, the largest usage whose cost
        // the price validation keeps within 64 bits. Real streams stay far
        // below it (the default is 10 million tokens), so reaching it is
        // logged, once per stream.
        let tokens_max = self.settings.limits.tokens_max;
        let uncapped = pending.counted_completion_tokens + tokens;
        if uncapped >= tokens_max && pending.counted_completion_tokens < tokens_max {
            metrics::counter!("stream_credits_counted_usage_capped_total").increment(1);
            warn!(
                user.id = %chunk.user_id,
                stream.id = %chunk.stream_id,
                tokens_max,
                "counted output tokens reached limits.tokens_max; the stream's further chunks add none"
            );
        }
        let counted = uncapped.min(tokens_max);
        pending.counted_completion_tokens = counted;
        pending.chunks += 1;
        let cost_so_far = cost_or_max(&pending.hold.price, pending.hold.prompt_tokens, counted);

        let mut applied = Applied::new(Outcome::Applied);
        // A growth that found no credits is tried again in the next batch,
        // not on every chunk of this one.
        let request = holds::growth_request(
            &self.settings.reservations,
            pending.hold.reserved,
            pending.hold.initial_reserved,
            cost_so_far,
        );
        if let Some(request) = request.filter(|_| !pending.growth_failed) {
            match grow_hold(conn, &mut pending.hold, request, cost_so_far, counted).await? {
                Some(outgoing) => applied.outgoing = outgoing,
                None => pending.growth_failed = true,
            }
        }

        let hold = &pending.hold;
        let signal = !hold.over_signalled && !pending.signalled && cost_so_far > hold.reserved;
        pending.signalled |= signal;
        if signal {
            let event = UsageOverReservation {
                kind: Default::default(),
                event_id: Uuid::now_v7(),
                user_id: hold.user_id.clone(),
                stream_id: hold.stream_id.clone(),
                reservation_id: hold.reservation_id,
                reserved: hold.reserved.0,
                cost_so_far: cost_so_far.0,
                prompt_tokens: hold.prompt_tokens,
                counted_completion_tokens: counted,
            };
            let body = serde_json::to_value(&event).expect("events serialize");
            let outgoing = enqueue(
                conn,
                event.event_id,
                "usage.over_reservation",
                Some(event.reservation_id),
                &body,
                &ReplyTo::default(),
            )
            .await?;
            applied.outgoing.extend(outgoing);
        }
        Ok(applied)
    }

    async fn end(&self, conn: &mut PgConnection, end: &StreamEnded) -> Result<Applied, LedgerError> {
        let Some(hold) = lock_hold(conn, &end.user_id, &end.stream_id).await? else {
            return Ok(Applied::new(Outcome::DeadLetter(unknown_stream())));
        };
        match hold.settle_status.as_deref() {
            None => {
                let outgoing = self
                    .settle_hold(conn, &hold, end.status.into(), end.usage)
                    .await?;
                Ok(Applied {
                    outcome: Outcome::Applied,
                    outgoing,
                })
            }
            Some("expired") if !hold.adjusted => {
                let outgoing = self.adjust(conn, &hold, end).await?;
                Ok(Applied {
                    outcome: Outcome::Applied,
                    outgoing,
                })
            }
            Some(_) => Ok(Applied::new(Outcome::Dropped(DropReason::EndAfterSettlement))),
        }
    }

    /// Settles an open hold: charges the cost, releases the hold and
    /// records a `reservation.settled` event.
    async fn settle_hold(
        &self,
        conn: &mut PgConnection,
        hold: &Hold,
        status: SettleStatus,
        usage: Option<Usage>,
    ) -> Result<Vec<Outgoing>, LedgerError> {
        let settlement = self.compute(hold, status, usage);

        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance - $2, reserved = reserved - $3, \
             holds_open = holds_open - 1, updated_at = now() \
             WHERE user_id = $1 RETURNING balance",
        )
        .bind(&hold.user_id)
        .bind(settlement.charged.0)
        .bind(hold.reserved.0)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE holds SET settled_at = now(), settle_status = $2, charged = $3, \
             completion_tokens = $4 WHERE reservation_id = $1 AND settled_at IS NULL",
        )
        .bind(hold.reservation_id)
        .bind(status.code())
        .bind(settlement.charged.0)
        .bind(to_i64(settlement.usage.completion_tokens))
        .execute(&mut *conn)
        .await?;
        insert_ledger_entry(
            conn,
            LedgerEntry {
                user_id: &hold.user_id,
                kind: "charge",
                amount: -settlement.charged.0,
                balance_after: balance,
                reservation_id: Some(hold.reservation_id),
                message_id: None,
                reason: Some(status.code()),
            },
        )
        .await?;

        let event = ReservationSettled {
            kind: Default::default(),
            event_id: Uuid::now_v7(),
            user_id: hold.user_id.clone(),
            stream_id: hold.stream_id.clone(),
            reservation_id: hold.reservation_id,
            model: hold.model.clone(),
            status,
            reserved: hold.reserved.0,
            cost: settlement.cost.0,
            charged: settlement.charged.0,
            refunded: settlement.refunded.0,
            overrun: settlement.overrun.0,
            forgiven: settlement.forgiven.0,
            prompt_tokens: settlement.usage.prompt_tokens,
            cached_prompt_tokens: settlement.usage.cached_prompt_tokens,
            completion_tokens: settlement.usage.completion_tokens,
            counted_completion_tokens: hold.counted_completion_tokens,
            usage_source: settlement.usage_source,
            balance_after: balance,
        };
        let body = serde_json::to_value(&event).expect("events serialize");
        enqueue(
            conn,
            event.event_id,
            "reservation.settled",
            Some(hold.reservation_id),
            &body,
            &ReplyTo::default(),
        )
        .await
    }

    /// Corrects an expired hold when its `stream.ended` arrives late: the
    /// stream is settled by the usual rules and the difference to what
    /// expiry charged is charged or given back.
    async fn adjust(
        &self,
        conn: &mut PgConnection,
        hold: &Hold,
        end: &StreamEnded,
    ) -> Result<Vec<Outgoing>, LedgerError> {
        let status: SettleStatus = end.status.into();
        let settlement = self.compute(hold, status, end.usage);
        let previously_charged = hold.charged.expect("a settled hold has a charge");
        let difference = settlement.charged.0 - previously_charged;

        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance - $2, updated_at = now() \
             WHERE user_id = $1 RETURNING balance",
        )
        .bind(&hold.user_id)
        .bind(difference)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query("UPDATE holds SET adjusted_at = now(), charged = $2 WHERE reservation_id = $1")
            .bind(hold.reservation_id)
            .bind(settlement.charged.0)
            .execute(&mut *conn)
            .await?;
        insert_ledger_entry(
            conn,
            LedgerEntry {
                user_id: &hold.user_id,
                kind: "adjustment",
                amount: -difference,
                balance_after: balance,
                reservation_id: Some(hold.reservation_id),
                message_id: Some(&end.message_id),
                reason: Some(status.code()),
            },
        )
        .await?;

        let event = ReservationAdjusted {
            kind: Default::default(),
            event_id: Uuid::now_v7(),
            user_id: hold.user_id.clone(),
            stream_id: hold.stream_id.clone(),
            reservation_id: hold.reservation_id,
            status,
            previously_charged,
            charged: settlement.charged.0,
            difference,
            prompt_tokens: settlement.usage.prompt_tokens,
            cached_prompt_tokens: settlement.usage.cached_prompt_tokens,
            completion_tokens: settlement.usage.completion_tokens,
            usage_source: settlement.usage_source,
            balance_after: balance,
        };
        let body = serde_json::to_value(&event).expect("events serialize");
        enqueue(
            conn,
            event.event_id,
            "reservation.adjusted",
            Some(hold.reservation_id),
            &body,
            &ReplyTo::default(),
        )
        .await
    }

    fn compute(&self, hold: &Hold, status: SettleStatus, usage: Option<Usage>) -> Settlement {
        settlement::settle(
            hold.reserved,
            &hold.price,
            hold.counted(),
            usage,
            status,
            self.settings.reservations.overrun,
        )
        // Usage is bounded by limits.tokens_max and prices are validated
        // against it, so the cost fits in 64 bits.
        .expect("a settlement within limits fits in 64 bits")
    }

    /// Expires up to `limit` holds idle for longer than the ttl, settling
    /// each at its counted usage. Holds locked by another transaction are
    /// skipped, so several sweepers never expire one hold twice, and so
    /// are holds whose account another transaction has locked.
    ///
    /// Each hold is settled under a savepoint. A hold whose settlement
    /// fails for good, such as a charge that would take the balance past
    /// the 64-bit range, is rolled back alone, logged and left open, so it
    /// does not keep every other idle hold from expiring. Holds in `skip`,
    /// those that failed earlier in the same sweep, are not tried again.
    pub async fn expire_idle(
        &self,
        conn: &mut PgConnection,
        limit: i64,
        skip: &[Uuid],
    ) -> Result<Expiry, LedgerError> {
        // A hold whose account another session has locked is passed over
        // like a locked hold, so that one account locked for long does
        // not stall expiry for every user. The sweep then waits for no
        // hold's or account's row lock.
        let query = format!(
            "SELECT {HOLD_COLUMNS} FROM holds \
             WHERE settled_at IS NULL AND last_event_at < now() - make_interval(secs => $1) \
                 AND reservation_id <> ALL($3) \
                 AND EXISTS (SELECT 1 FROM accounts WHERE accounts.user_id = holds.user_id \
                     FOR UPDATE SKIP LOCKED) \
             ORDER BY last_event_at LIMIT $2 FOR UPDATE SKIP LOCKED"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(self.settings.reservations.ttl_seconds as f64)
            .bind(limit)
            .bind(skip)
            .fetch_all(&mut *conn)
            .await?;

        let mut expiry = Expiry::default();
        for row in &rows {
            let hold = Hold::from_row(row)?;
            let mut savepoint = conn.begin().await?;
            match self.settle_hold(&mut savepoint, &hold, SettleStatus::Expired, None).await {
                Ok(settled) => {
                    savepoint.commit().await?;
                    expiry.outgoing.extend(settled);
                    expiry.expired += 1;
                }
                Err(error) if error.is_retryable() => return Err(error),
                Err(error) => {
                    savepoint.rollback().await?;
                    expiry.failed.push(hold.reservation_id);
                    warn!(
                        %error,
                        user.id = %hold.user_id,
                        reservation.id = %hold.reservation_id,
                        "failed to expire an idle hold, which stays open until the next sweep tries again"
                    );
                }
            }
        }
        Ok(expiry)
    }
}

/// The outcome of one page of the expiry sweep.
#[derive(Debug, Default)]
pub struct Expiry {
    /// The settlement events to publish.
    pub outgoing: Vec<Outgoing>,
    /// The number of holds expired.
    pub expired: usize,
    /// Reservation ids of the holds whose settlement failed for good,
    /// which stay open.
    pub failed: Vec<Uuid>,
}

/// Chunk counts of one stream that the batch has not written yet.
struct PendingCounts {
    /// The locked hold; its `reserved` and `extensions` follow every
    /// growth, which is written at once.
    hold: Hold,
    counted_completion_tokens: u64,
    chunks: u64,
    signalled: bool,
    /// A growth in this batch found no credits to take.
    growth_failed: bool,
}

impl PendingCounts {
    fn new(hold: Hold) -> Self {
        Self {
            counted_completion_tokens: hold.counted_completion_tokens,
            hold,
            chunks: 0,
            signalled: false,
            growth_failed: false,
        }
    }
}

/// A message id processed before.
struct Seen {
    /// The type of the message that used the id.
    kind: String,
    /// A start's stored reply.
    reply: Option<serde_json::Value>,
}

impl Seen {
    fn new(kind: &str, reply: Option<serde_json::Value>) -> Self {
        Self { kind: kind.to_owned(), reply }
    }
}

/// A start waiting in a batch to be placed with others, at `index` of
/// the batch's results.
struct GroupedStart<'a> {
    index: usize,
    start: &'a StreamStarted,
    reply_to: &'a ReplyTo,
    sized: SizedStart,
}

/// Starts of distinct users to place in one statement, and their users.
#[derive(Default)]
struct StartGroup<'a> {
    starts: Vec<GroupedStart<'a>>,
    users: HashSet<String>,
}

/// The array parameters of [`Ledger::reserve_many`]: the starts by
/// ordinal, then their outbox rows.
#[derive(Default)]
struct GroupColumns<'a> {
    ord: Vec<i32>,
    user_id: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    message_id: Vec<&'a str>,
    reserved: Vec<i64>,
    model: Vec<&'a str>,
    input_per_million: Vec<i64>,
    output_per_million: Vec<i64>,
    cached_input_per_million: Vec<Option<i64>>,
    encoding: Vec<&'a str>,
    prompt_tokens: Vec<i64>,
    max_output_tokens: Vec<i64>,
    sized_by: Vec<&'static str>,
    reservation_id: Vec<Uuid>,
    event_id: Vec<Uuid>,
    body: Vec<String>,
    target_ord: Vec<i32>,
    destination: Vec<&'static str>,
    routing_key: Vec<String>,
    correlation_id: Vec<Option<String>>,
}

/// Builds the grant of a start with its new ids. The statement that
/// places the hold sets `available_after` and `expires_at`.
fn new_grant(start: &StreamStarted, allowance: Allowance) -> ReservationGranted {
    ReservationGranted {
        kind: Default::default(),
        event_id: Uuid::now_v7(),
        user_id: start.user_id.clone(),
        stream_id: start.stream_id.clone(),
        reservation_id: Uuid::now_v7(),
        model: start.model.clone(),
        reserved: allowance.reserved.0,
        prompt_tokens: allowance.prompt_tokens,
        max_output_tokens: allowance.max_output_tokens,
        available_after: 0,
        expires_at: DateTime::UNIX_EPOCH,
        sized_by: allowance.sized_by,
    }
}

/// Returns a placed hold's grant and the messages that send it.
fn placed_grant(
    outbox: OutboxRows,
    ids: StoredRows,
    body: serde_json::Value,
) -> (serde_json::Value, Vec<Outgoing>) {
    assert!(
        body["available_after"].as_i64().is_some_and(|available| available >= 0),
        "a hold never takes available below zero"
    );
    let outgoing = outbox.outgoing(ids, &body);
    (body, outgoing)
}

/// What a batch has applied but not yet written.
#[derive(Default)]
struct BatchState {
    /// Processed ids of the batch's messages; grows as the batch applies
    /// messages.
    known: HashMap<(String, String), Seen>,
    /// Counts by (user, stream).
    pending: HashMap<(String, String), PendingCounts>,
    /// Streams of the batch's starts that had no hold when it began. The
    /// first start of such a stream takes it out, so any later start of
    /// the stream in the batch looks for the hold again.
    without_hold: HashSet<(String, String)>,
    /// Processed-message rows to insert: user, message id, type, reply.
    processed: Vec<(String, String, &'static str, Option<serde_json::Value>)>,
    /// The transaction's start time on the database clock, which
    /// PostgreSQL keeps the same for the whole transaction.
    now: DateTime<Utc>,
    /// The sizing of the batch's one start, read before the batch began.
    sized: Option<SizedStart>,
}

impl BatchState {

    /// Reads, in one statement, the transaction's clock, which of the
    /// batch's messages were processed before (with the type of message
    /// that used each id, and a start's stored reply), and the holds of every stream the batch has chunks or
    /// starts for, locked. A chunk whose hold does not exist yet, because
    /// its start is in this batch or has not arrived, looks it up again.
    ///
    /// Each array of keys is joined to its table through a `LATERAL …
    /// LIMIT 1` subquery. A plain join lets PostgreSQL cache a plan made
    /// while the table was small, which hashes the whole table, and keep
    /// using it long after the table has grown.
    async fn read(conn: &mut PgConnection, messages: &[(&Inbound, &ReplyTo)]) -> Result<Self, LedgerError> {
        let users: Vec<&str> = messages.iter().map(|(message, _)| message.user_id()).collect();
        let ids: Vec<&str> = messages.iter().map(|(message, _)| message.message_id()).collect();
        let mut streams: Vec<(&str, &str)> = messages
            .iter()
            .filter_map(|(message, _)| match message {
                Inbound::ChunkEmitted(chunk) => Some((chunk.user_id.as_str(), chunk.stream_id.as_str())),
                Inbound::StreamStarted(start) => Some((start.user_id.as_str(), start.stream_id.as_str())),
                _ => None,
            })
            .collect();
        streams.sort_unstable();
        streams.dedup();
        let (stream_users, stream_ids): (Vec<&str>, Vec<&str>) = streams.into_iter().unzip();

        // Every row carries the clock and the processed ids. The holds
        // come one to a row, locked in the order of the sorted keys, and
        // with no hold found the one row has empty hold columns. Counting
        // never reads the stored grant, so it is not sent.
        let query = concat!(
            "SELECT now() AS batch_now, \
                 (SELECT coalesce(jsonb_agg(jsonb_build_array(p.user_id, p.message_id, p.kind, p.reply)), '[]') \
                  FROM unnest($1::text[], $2::text[]) AS k(user_id, message_id) \
                  CROSS JOIN LATERAL (SELECT user_id, message_id, kind, reply FROM processed_messages \
                      WHERE user_id = k.user_id AND message_id = k.message_id LIMIT 1) AS p) AS processed, \
                 h.* \
             FROM (VALUES (1)) AS one(row) LEFT JOIN LATERAL ( \
                 SELECT locked.* FROM unnest($3::text[], $4::text[]) AS s(user_id, stream_id) \
                 CROSS JOIN LATERAL (SELECT ",
            hold_columns_no_grant!(),
            ", 'null'::jsonb AS grant_reply FROM holds \
                     WHERE user_id = s.user_id AND stream_id = s.stream_id LIMIT 1 FOR UPDATE) AS locked \
             ) AS h ON true"
        );
        let rows = sqlx::query(query)
            .bind(&users)
            .bind(&ids)
            .bind(&stream_users)
            .bind(&stream_ids)
            .fetch_all(&mut *conn)
            .await?;
        let first = rows.first().expect("a select from one row returns a row");
        // The processed ids come as `[user_id, message_id, kind, reply]`
        // arrays.
        let processed: Vec<(String, String, String, Option<serde_json::Value>)> =
            serde_json::from_value(first.try_get("processed")?)
                .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
        let mut batch = BatchState {
            now: first.try_get("batch_now")?,
            known: processed
                .into_iter()
                .map(|(user_id, message_id, kind, reply)| ((user_id, message_id), Seen { kind, reply }))
                .collect(),
            ..BatchState::default()
        };
        for row in &rows {
            if row.try_get::<Option<Uuid>, _>("reservation_id")?.is_none() {
                continue;
            }
            let hold = Hold::from_row(row)?;
            let key = (hold.user_id.clone(), hold.stream_id.clone());
            batch.pending.insert(key, PendingCounts::new(hold));
        }
        for (user_id, stream_id) in stream_users.iter().zip(&stream_ids) {
            let key = ((*user_id).to_owned(), (*stream_id).to_owned());
            if !batch.pending.contains_key(&key) {
                batch.without_hold.insert(key);
            }
        }
        Ok(batch)
    }

    /// Records the id of a message that applied, unless the batch already
    /// has it, as it has a start's id that the start's statement recorded.
    fn record_applied(
        &mut self,
        key: (String, String),
        kind: &'static str,
        outcome: &Outcome,
        reply: Option<serde_json::Value>,
    ) {
        if *outcome == Outcome::Applied && !self.known.contains_key(&key) {
            self.record(key, kind, reply);
        }
    }

    fn record(&mut self, key: (String, String), kind: &'static str, reply: Option<serde_json::Value>) {
        self.processed.push((key.0.clone(), key.1.clone(), kind, reply.clone()));
        self.known.insert(key, Seen::new(kind, reply));
    }

    /// Writes one stream's pending counts, so that a message that reads
    /// the hold sees every chunk before it.
    async fn flush_stream(
        &mut self,
        conn: &mut PgConnection,
        user_id: &str,
        stream_id: &str,
    ) -> Result<(), LedgerError> {
        let key = (user_id.to_owned(), stream_id.to_owned());
        if let Some(pending) = self.pending.remove(&key) {
            write_counts(conn, &[pending]).await?;
        }
        Ok(())
    }

    /// Writes every pending count and processed id, in one statement.
    async fn flush(mut self, conn: &mut PgConnection) -> Result<(), LedgerError> {
        let pending: Vec<PendingCounts> = self.pending.drain().map(|(_, counts)| counts).collect();
        let counts = CountColumns::new(&pending);
        if counts.ids.is_empty() && self.processed.is_empty() {
            return Ok(());
        }
        let mut users = Vec::with_capacity(self.processed.len());
        let mut ids = Vec::with_capacity(self.processed.len());
        let mut kinds = Vec::with_capacity(self.processed.len());
        let mut replies = Vec::with_capacity(self.processed.len());
        for (user_id, message_id, kind, reply) in self.processed {
            users.push(user_id);
            ids.push(message_id);
            kinds.push(kind);
            replies.push(reply);
        }
        // A data-modifying WITH runs to the end whether or not the rest of
        // the statement reads it.
        let query = concat!(
            "WITH counted AS (",
            counts_update!(),
            ") INSERT INTO processed_messages (user_id, message_id, kind, reply) \
             SELECT * FROM unnest($5::text[], $6::text[], $7::text[], $8::jsonb[])"
        );
        counts
            .bind(sqlx::query(query))
            .bind(users)
            .bind(ids)
            .bind(kinds)
            .bind(replies)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Grows a locked open hold by up to `request.credits` from its user's
/// available credits, writes the hold and stores a `reservation.extended`
/// event. Returns the event to publish, or `None` when the user has no
/// credits available.
async fn grow_hold(
    conn: &mut PgConnection,
    hold: &mut Hold,
    request: holds::GrowthRequest,
    cost_so_far: Credits,
    counted_completion_tokens: u64,
) -> Result<Option<Vec<Outgoing>>, LedgerError> {
    let mut added = request.credits;
    let mut limited_by = request.limited_by;
    // Usually the whole request is available and one guarded update, as
    // for a new hold, takes it.
    let mut available_after = reserve_more(conn, &hold.user_id, added).await?;
    if available_after.is_none() {
        // Less is available: lock the account row, so that what it shows
        // stays available, and take what there is.
        let available: i64 = sqlx::query_scalar(
            "SELECT balance - reserved FROM accounts WHERE user_id = $1 FOR UPDATE",
        )
        .bind(&hold.user_id)
        .fetch_one(&mut *conn)
        .await?;
        if available <= 0 {
            return Ok(None);
        }
        if available < added.0 {
            added = Credits(available);
            limited_by = Some(GrowthLimit::AvailableCredits);
        }
        available_after = reserve_more(conn, &hold.user_id, added).await?;
    }
    let available_after =
        available_after.expect("the locked account row still has the credits it showed");
    assert!(available_after >= 0, "a growth never takes available below zero");

    sqlx::query(
        "UPDATE holds SET reserved = reserved + $2, extensions = extensions + 1 \
         WHERE reservation_id = $1 AND settled_at IS NULL",
    )
    .bind(hold.reservation_id)
    .bind(added.0)
    .execute(&mut *conn)
    .await?;
    let reason = if cost_so_far > hold.reserved {
        ExtensionReason::OverReservation
    } else {
        ExtensionReason::UsageThreshold
    };
    hold.reserved = Credits(hold.reserved.0 + added.0);
    hold.extensions += 1;

    let event = ReservationExtended {
        kind: Default::default(),
        event_id: Uuid::now_v7(),
        user_id: hold.user_id.clone(),
        stream_id: hold.stream_id.clone(),
        reservation_id: hold.reservation_id,
        added: added.0,
        reserved: hold.reserved.0,
        available_after,
        reason,
        limited_by,
        extensions: hold.extensions,
        cost_so_far: cost_so_far.0,
        prompt_tokens: hold.prompt_tokens,
        counted_completion_tokens,
    };
    let body = serde_json::to_value(&event).expect("events serialize");
    let outgoing = enqueue(
        conn,
        event.event_id,
        "reservation.extended",
        Some(hold.reservation_id),
        &body,
        &ReplyTo::default(),
    )
    .await?;
    Ok(Some(outgoing))
}

/// Adds `credits` to a user's reserved credits when that many are
/// available, and returns the credits available after; `None` otherwise.
/// PostgreSQL re-checks the guard after waiting for a concurrent writer's
/// row lock, so no race can overdraw.
async fn reserve_more(
    conn: &mut PgConnection,
    user_id: &str,
    credits: Credits,
) -> Result<Option<i64>, LedgerError> {
    Ok(sqlx::query_scalar(
        "UPDATE accounts SET reserved = reserved + $2, updated_at = now() \
         WHERE user_id = $1 AND balance - reserved >= $2 RETURNING balance - reserved",
    )
    .bind(user_id)
    .bind(credits.0)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Writes the new counts of several streams in one statement.
async fn write_counts(conn: &mut PgConnection, pending: &[PendingCounts]) -> Result<(), LedgerError> {
    let counts = CountColumns::new(pending);
    if counts.ids.is_empty() {
        return Ok(());
    }
    counts.bind(sqlx::query(counts_update!())).execute(&mut *conn).await?;
    Ok(())
}

/// Counts of the holds that counted chunks, as the array parameters $1
/// to $4 of `counts_update!`.
struct CountColumns {
    ids: Vec<Uuid>,
    counted: Vec<i64>,
    chunks: Vec<i64>,
    signalled: Vec<bool>,
}

impl CountColumns {
    fn new(pending: &[PendingCounts]) -> Self {
        let written: Vec<&PendingCounts> = pending.iter().filter(|counts| counts.chunks > 0).collect();
        Self {
            ids: written.iter().map(|counts| counts.hold.reservation_id).collect(),
            counted: written.iter().map(|counts| to_i64(counts.counted_completion_tokens)).collect(),
            chunks: written.iter().map(|counts| to_i64(counts.chunks)).collect(),
            signalled: written.iter().map(|counts| counts.signalled).collect(),
        }
    }

    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query.bind(self.ids).bind(self.counted).bind(self.chunks).bind(self.signalled)
    }
}


fn count_prompt(price: &ModelPrice, start: &StreamStarted) -> u64 {
    let bpe = tokens::encoder(&price.encoding).expect("model encodings are validated at start");
    match start.prompt_input() {
        PromptInput::Tokens(tokens) => tokens,
        PromptInput::Text(text) => tokens::count_text(bpe, text),
        PromptInput::Messages(messages) => tokens::count_chat(
            bpe,
            messages.iter().map(|message| tokens::ChatText {
                role: &message.role,
                name: message.name.as_deref(),
                content: &message.content,
            }),
        ),
    }
}

fn cost_or_max(price: &ModelPrice, prompt_tokens: u64, completion_tokens: u64) -> Credits {
    price
        .cost(TokenUsage {
            prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens,
        })
        .unwrap_or(Credits(i64::MAX))
}

fn unknown_stream() -> Rejection {
    Rejection {
        reason: RejectReason::UnknownStream,
        detail: "no reservation exists for this user_id and stream_id".to_owned(),
        partial: Default::default(),
    }
}

async fn lock_hold(
    conn: &mut PgConnection,
    user_id: &str,
    stream_id: &str,
) -> Result<Option<Hold>, LedgerError> {
    let query = format!(
        "SELECT {HOLD_COLUMNS} FROM holds WHERE user_id = $1 AND stream_id = $2 FOR UPDATE"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(user_id)
        .bind(stream_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.as_ref().map(Hold::from_row).transpose()?)
}

struct LedgerEntry<'a> {
    user_id: &'a str,
    kind: &'static str,
    amount: i64,
    balance_after: i64,
    reservation_id: Option<Uuid>,
    message_id: Option<&'a str>,
    reason: Option<&'a str>,
}

async fn insert_ledger_entry(
    conn: &mut PgConnection,
    entry: LedgerEntry<'_>,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO ledger (user_id, kind, amount, balance_after, reservation_id, message_id, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry.user_id)
    .bind(entry.kind)
    .bind(entry.amount)
    .bind(entry.balance_after)
    .bind(entry.reservation_id)
    .bind(entry.message_id)
    .bind(entry.reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The outbox rows of one event: once for the results exchange and, when
/// the delivery asked for a reply, once more for its `reply_to` queue.
struct OutboxRows {
    event_type: &'static str,
    targets: Vec<(Destination, String, Option<String>)>,
}

impl OutboxRows {
    /// The reply comes first, so that it is sent first: its producer is
    /// waiting for it.
    fn new(event_type: &'static str, reply_to: &ReplyTo) -> Self {
        let mut targets = Vec::with_capacity(2);
        if let Some(queue) = &reply_to.queue {
            targets.push((Destination::Reply, queue.clone(), reply_to.correlation_id.clone()));
        }
        targets.push((Destination::Event, event_type.to_owned(), None));
        Self { event_type, targets }
    }

    /// Binds $1 to $7 of `outbox_insert!` to `query`, $7 being `body`.
    fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
        event_id: Uuid,
        reservation_id: Option<Uuid>,
        body: &'q serde_json::Value,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        let destinations: Vec<&str> = self.targets.iter().map(|target| target.0.code()).collect();
        let routing_keys: Vec<&str> = self.targets.iter().map(|target| target.1.as_str()).collect();
        let correlation_ids: Vec<Option<&str>> = self.targets.iter().map(|target| target.2.as_deref()).collect();
        query
            .bind(event_id)
            .bind(destinations)
            .bind(routing_keys)
            .bind(correlation_ids)
            .bind(self.event_type)
            .bind(reservation_id)
            .bind(body)
    }

    /// Returns the messages to publish, each with the id of its stored row.
    fn outgoing(self, ids: StoredRows, body: &serde_json::Value) -> Vec<Outgoing> {
        let event_type = self.event_type;
        self.targets
            .into_iter()
            .map(|(destination, routing_key, correlation_id)| {
                let outbox_id = ids
                    .iter()
                    .find(|(_, code)| code == destination.code())
                    .map(|(id, _)| *id)
                    .expect("one outbox row per destination");
                Outgoing {
                    outbox_id: Some(outbox_id),
                    destination,
                    routing_key,
                    correlation_id,
                    event_type: event_type.to_owned(),
                    body: body.clone(),
                }
            })
            .collect()
    }
}

/// The outbox rows that a statement stored for one event: each row's id
/// and the code of its destination.
type StoredRows = Vec<(i64, String)>;

/// Stores an event in the outbox and returns the messages to publish.
async fn enqueue(
    conn: &mut PgConnection,
    event_id: Uuid,
    event_type: &'static str,
    reservation_id: Option<Uuid>,
    body: &serde_json::Value,
    reply_to: &ReplyTo,
) -> Result<Vec<Outgoing>, LedgerError> {
    let outbox = OutboxRows::new(event_type, reply_to);
    let query = concat!("WITH event AS (SELECT $7::jsonb AS body) ", outbox_insert!());
    let ids = outbox
        .bind(sqlx::query_as(query), event_id, reservation_id, body)
        .fetch_all(&mut *conn)
        .await?;
    Ok(outbox.outgoing(ids, body))
}

/// The stored reply of a start, addressed to this delivery's `reply_to`.
fn resend_reply(reply: serde_json::Value, reply_to: &ReplyTo) -> Option<Outgoing> {
    let queue = reply_to.queue.clone()?;
    let event_type = reply
        .get("type")
        .and_then(|kind| kind.as_str())
        .unwrap_or("reservation.granted")
        .to_owned();
    Some(Outgoing {
        outbox_id: None,
        destination: Destination::Reply,
        routing_key: queue,
        correlation_id: reply_to.correlation_id.clone(),
        event_type,
        body: reply,
    })
}

/// Marks outbox rows as published, inside the caller's transaction.
///
/// The transaction commits without waiting for its WAL to reach the
/// disk. A mark lost in a server crash only makes the relay send its rows
/// again, with their event ids, which consumers drop. A mark that waited
/// would share the disk flush with the reservations committing at the
/// same time and delay their replies.
pub async fn mark_published(conn: &mut PgConnection, outbox_ids: &[i64]) -> Result<(), LedgerError> {
    if outbox_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *conn).await?;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE outbox_id = ANY($1)")
        .bind(outbox_ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Locks up to `limit` outbox rows that were not published within
/// `age_seconds` of being written, for a relay to publish. Rows locked by
/// another relay are skipped.
pub async fn lock_unpublished(
    conn: &mut PgConnection,
    age_seconds: f64,
    limit: i64,
) -> Result<Vec<Outgoing>, LedgerError> {
    let rows = sqlx::query(
        "SELECT outbox_id, destination, routing_key, correlation_id, event_type, body \
         FROM outbox WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1) \
         ORDER BY outbox_id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(age_seconds)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Outgoing {
                outbox_id: Some(row.try_get("outbox_id")?),
                destination: Destination::from_code(row.try_get("destination")?),
                routing_key: row.try_get("routing_key")?,
                correlation_id: row.try_get("correlation_id")?,
                event_type: row.try_get("event_type")?,
                body: row.try_get("body")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(LedgerError::from)
}

/// An account as the CLI and the HTTP endpoint show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct AccountView {
    pub user_id: String,
    pub balance: i64,
    pub reserved: i64,
    pub available: i64,
}

/// Reads one account; `None` for a user never granted credits.
pub async fn account(conn: &mut PgConnection, user_id: &str) -> Result<Option<AccountView>, LedgerError> {
    let row = sqlx::query("SELECT balance, reserved FROM accounts WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let balance: i64 = row.try_get("balance")?;
    let reserved: i64 = row.try_get("reserved")?;
    Ok(Some(AccountView {
        user_id: user_id.to_owned(),
        balance,
        reserved,
        available: balance - reserved,
    }))
}
