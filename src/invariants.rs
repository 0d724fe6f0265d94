//! Checks of the ledger's invariants over the whole database.
//!
//! For every user: the balance equals the sum of the user's ledger
//! entries, `reserved` equals the sum of open holds, `holds_open` equals
//! their number, and `available` is below zero only after a charge beyond
//! a hold. For every hold: it is charged and settled at most once, a
//! settled hold has exactly one charge entry and one settlement event, and
//! an adjusted hold has one adjustment entry. Its charge is the one the
//! settlement rules give for its usage under one of the overrun policies.

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::messages::{SettleStatus, Usage, UsageSource};
use crate::pricing::{CostOverflow, Credits, ModelPrice};
use crate::settings::Overrun;
use crate::settlement::{self, Counted, Settlement};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which invariant, such as `balance_equals_ledger_sum`.
    pub invariant: &'static str,
    /// The account concerned, also for a check of one hold.
    pub user_id: String,
    /// The account or hold concerned.
    pub subject: String,
    /// The figures that disagree.
    pub detail: String,
}

/// Each check is a query returning (user, subject, detail) rows that
/// break it.
const CHECKS: &[(&str, &str)] = &[
    (
        "balance_equals_ledger_sum",
        "SELECT a.user_id, a.user_id, \
         format('balance %s, ledger sum %s', a.balance, coalesce(l.total, 0)) \
         FROM accounts a LEFT JOIN (SELECT user_id, sum(amount) AS total FROM ledger \
         GROUP BY user_id) l USING (user_id) WHERE a.balance <> coalesce(l.total, 0)",
    ),
    (
        "reserved_equals_open_holds",
        "SELECT a.user_id, a.user_id, \
         format('reserved %s, open holds %s (%s of them), holds_open %s', \
         a.reserved, coalesce(h.total, 0), coalesce(h.n, 0), a.holds_open) \
         FROM accounts a LEFT JOIN (SELECT user_id, sum(reserved) AS total, count(*) AS n \
         FROM holds WHERE settled_at IS NULL GROUP BY user_id) h USING (user_id) \
         WHERE a.reserved <> coalesce(h.total, 0) OR a.holds_open <> coalesce(h.n, 0)",
    ),
    (
        "ledger_entries_chain",
        "SELECT user_id, user_id, format('entry %s has balance_after %s, running sum %s', \
         entry_id, balance_after, running) FROM (SELECT user_id, entry_id, balance_after, \
         sum(amount) OVER (PARTITION BY user_id ORDER BY entry_id) AS running FROM ledger) e \
         WHERE balance_after <> running",
    ),
    (
        // A hold never takes available below zero, and neither does a
        // settlement within its hold. Only a charge beyond a hold (the
        // `debit` policy) or a late end that charged more can.
        "available_negative_only_after_overrun",
        "SELECT a.user_id, a.user_id, format('available %s, but no charge exceeded its hold \
         and no adjustment charged more', a.balance - a.reserved) FROM accounts a \
         WHERE a.balance - a.reserved < 0 AND NOT EXISTS (SELECT 1 FROM ledger l \
         JOIN holds h ON h.reservation_id = l.reservation_id WHERE l.user_id = a.user_id \
         AND ((l.kind = 'charge' AND -l.amount > h.reserved) \
         OR (l.kind = 'adjustment' AND l.amount < 0)))",
    ),
    (
        "settled_hold_charged_once",
        "SELECT h.user_id, h.reservation_id::text, format('%s charge entries', count(l.entry_id)) \
         FROM holds h LEFT JOIN ledger l ON l.reservation_id = h.reservation_id \
         AND l.kind = 'charge' WHERE h.settled_at IS NOT NULL \
         GROUP BY h.reservation_id, h.user_id HAVING count(l.entry_id) <> 1",
    ),
    (
        "open_hold_not_charged",
        "SELECT h.user_id, h.reservation_id::text, 'open hold has a charge entry' FROM holds h \
         JOIN ledger l ON l.reservation_id = h.reservation_id WHERE h.settled_at IS NULL",
    ),
    (
        "adjusted_hold_has_one_adjustment",
        "SELECT h.user_id, h.reservation_id::text, format('adjusted_at %s, %s adjustment \
         entries', coalesce(h.adjusted_at::text, 'not set'), count(l.entry_id)) FROM holds h \
         LEFT JOIN ledger l ON l.reservation_id = h.reservation_id AND l.kind = 'adjustment' \
         GROUP BY h.reservation_id, h.user_id, h.adjusted_at \
         HAVING count(l.entry_id) <> (CASE WHEN h.adjusted_at IS NULL THEN 0 ELSE 1 END)",
    ),
    (
        "hold_settled_once",
        "SELECT h.user_id, o.reservation_id::text, format('%s settlement events', count(*)) \
         FROM outbox o JOIN holds h ON h.reservation_id = o.reservation_id \
         WHERE o.event_type = 'reservation.settled' AND o.destination = 'event' \
         GROUP BY o.reservation_id, h.user_id HAVING count(*) > 1",
    ),
    (
        "hold_charge_matches_ledger",
        "SELECT h.user_id, h.reservation_id::text, format('hold charged %s, ledger %s', \
         h.charged, -sum(l.amount)) FROM holds h \
         JOIN ledger l ON l.reservation_id = h.reservation_id \
         WHERE h.settled_at IS NOT NULL GROUP BY h.reservation_id, h.user_id, h.charged \
         HAVING h.charged <> -sum(l.amount)",
    ),
];

/// Runs every check and returns what failed; empty means all hold.
pub async fn check(conn: &mut PgConnection) -> Result<Vec<Violation>, sqlx::Error> {
    let mut violations = Vec::new();
    for (invariant, query) in CHECKS {
        let rows = sqlx::query(*query).fetch_all(&mut *conn).await?;
        for row in rows {
            violations.push(Violation {
                invariant,
                user_id: row.try_get(0)?,
                subject: row.try_get(1)?,
                detail: row.try_get(2)?,
            });
        }
    }

    let mut holds = settled_holds(conn, None);
    while let Some(hold) = holds.next().await {
        violations.extend(check_settlement(&hold?));
    }
    Ok(violations)
}

/// Checks that a settled hold has its settlement event and charged what
/// the rules give for its usage.
fn check_settlement(hold: &SettledHold) -> Option<Violation> {
    let violation = |invariant, detail| Violation {
        invariant,
        user_id: hold.user_id.clone(),
        subject: hold.reservation_id.to_string(),
        detail,
    };
    let Some(decided_by) = &hold.decided_by else {
        let event = if hold.adjusted {
            "reservation.adjusted"
        } else {
            "reservation.settled"
        };
        let detail = format!("no {event} event in the outbox");
        return Some(violation("settled_hold_has_settlement_event", detail));
    };
    let Some(Ok(settlement)) = hold.resettle() else {
        let detail = format!("the cost of {decided_by:?} overflows 64-bit credits");
        return Some(violation("charge_within_rules", detail));
    };

    // `debit` charges the whole cost and `cap` at most the hold; the
    // policy may have changed since, so either one is allowed.
    let cost = settlement.cost.0;
    let capped = cost.min(hold.reserved);
    if hold.charged == cost || hold.charged == capped {
        return None;
    }
    let detail = format!(
        "charged {}, but a {:?} settlement with {:?} usage costs {cost} ({capped} capped at \
         the hold of {})",
        hold.charged, decided_by.status, decided_by.usage_source, hold.reserved
    );
    Some(violation("charge_within_rules", detail))
}

/// Status and usage of the settlement that decided a hold's charge, as
/// its outcome event recorded them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct DecidingUsage {
    pub status: SettleStatus,
    pub usage_source: UsageSource,
    pub prompt_tokens: u64,
    #[serde(default)]
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A settled hold with what decided its charge.
#[derive(Debug, Clone)]
pub struct SettledHold {
    pub reservation_id: Uuid,
    pub user_id: String,
    pub model: String,
    /// The hold when settled.
    pub reserved: i64,
    /// The hold as granted, before it grew while its stream ran.
    pub granted: i64,
    /// Total the user paid, adjustment included.
    pub charged: i64,
    /// Whether a late `stream.ended` corrected what expiry charged.
    pub adjusted: bool,
    /// The worker's count when the hold was settled.
    pub counted: Counted,
    /// From the `reservation.adjusted` event of an adjusted hold, else
    /// from the `reservation.settled` event; `None` when that event is
    /// missing.
    pub decided_by: Option<DecidingUsage>,
    price: ModelPrice,
}

impl SettledHold {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let decided_by: Option<serde_json::Value> = row.try_get("decided_by")?;
        let decided_by = decided_by
            .map(serde_json::from_value)
            .transpose()
            .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
        Ok(Self {
            reservation_id: row.try_get("reservation_id")?,
            user_id: row.try_get("user_id")?,
            model: row.try_get("model")?,
            reserved: row.try_get("reserved")?,
            granted: row.try_get("granted")?,
            charged: row.try_get("charged")?,
            adjusted: row.try_get("adjusted")?,
            counted: Counted {
                prompt_tokens: token_count(row, "prompt_tokens")?,
                completion_tokens: token_count(row, "counted_completion_tokens")?,
            },
            decided_by,
            price: ModelPrice {
                input_per_million: row.try_get("input_per_million")?,
                output_per_million: row.try_get("output_per_million")?,
                cached_input_per_million: row.try_get("cached_input_per_million")?,
                encoding: row.try_get("encoding")?,
                max_output_tokens: token_count(row, "max_output_tokens")?,
            },
        })
    }

    /// Settles the hold again from its stored price, count and deciding
    /// usage under the `debit` policy, whose charge is the whole cost.
    /// Returns `None` when the deciding event is missing.
    pub fn resettle(&self) -> Option<Result<Settlement, CostOverflow>> {
        let decided = self.decided_by?;
        let provider = (decided.usage_source == UsageSource::Provider).then_some(Usage {
            prompt_tokens: decided.prompt_tokens,
            completion_tokens: decided.completion_tokens,
            cached_prompt_tokens: Some(decided.cached_prompt_tokens),
        });
        let reserved = Credits(self.reserved);
        let settled = settlement::settle(
            reserved,
            &self.price,
            self.counted,
            provider,
            decided.status,
            Overrun::Debit,
        );
        Some(settled)
    }
}

fn token_count(row: &PgRow, column: &str) -> Result<u64, sqlx::Error> {
    let count: i64 = row.try_get(column)?;
    Ok(u64::try_from(count).expect("token columns are CHECKed non-negative"))
}

/// Reads every hold settled at or after `since` (every settled hold for
/// `None`), one row at a time.
///
/// NOTE: the deciding usage is read from the event bodies in the outbox.
/// A job that deletes published outbox rows would make these holds fail
/// `settled_hold_has_settlement_event`, so such a job must keep settlement
/// events or first move their usage into the holds table.
pub fn settled_holds(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> impl Stream<Item = Result<SettledHold, sqlx::Error>> + '_ {
    sqlx::query(
        "SELECT h.reservation_id, h.user_id, h.model, h.reserved, \
         (h.grant_reply ->> 'reserved')::bigint AS granted, h.charged, h.prompt_tokens, \
         h.counted_completion_tokens, h.input_per_million, h.output_per_million, \
         h.cached_input_per_million, h.encoding, h.max_output_tokens, \
         h.adjusted_at IS NOT NULL AS adjusted, \
         CASE WHEN h.adjusted_at IS NULL THEN s.body ELSE a.body END AS decided_by \
         FROM holds h \
         LEFT JOIN outbox s ON s.reservation_id = h.reservation_id \
         AND s.event_type = 'reservation.settled' AND s.destination = 'event' \
         LEFT JOIN outbox a ON a.reservation_id = h.reservation_id \
         AND a.event_type = 'reservation.adjusted' AND a.destination = 'event' \
         WHERE h.settled_at IS NOT NULL AND ($1::timestamptz IS NULL OR h.settled_at >= $1)",
    )
    .bind(since)
    .fetch(conn)
    .map(|row| SettledHold::from_row(&row?))
}
