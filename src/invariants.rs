//! Checks of the ledger's invariants over the whole database.
//!
//! For every user: the balance equals the sum of the user's ledger
//! entries, `reserved` equals the sum of open holds, `holds_open` equals
//! their number; no hold is charged or settled twice; a settled hold has
//! exactly one charge entry.

use serde::Serialize;
use sqlx::{PgConnection, Row};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which invariant, such as `balance_equals_ledger_sum`.
    pub invariant: &'static str,
    /// The account or hold concerned.
    pub subject: String,
    /// The figures that disagree.
    pub detail: String,
}

/// Each check is a query returning (subject, detail) rows that break it.
const CHECKS: &[(&str, &str)] = &[
    (
        "balance_equals_ledger_sum",
        "SELECT a.user_id, format('balance %s, ledger sum %s', a.balance, coalesce(l.total, 0)) \
         FROM accounts a LEFT JOIN (SELECT user_id, sum(amount) AS total FROM ledger \
         GROUP BY user_id) l USING (user_id) WHERE a.balance <> coalesce(l.total, 0)",
    ),
    (
        "reserved_equals_open_holds",
        "SELECT a.user_id, format('reserved %s, open holds %s (%s of them), holds_open %s', \
         a.reserved, coalesce(h.total, 0), coalesce(h.n, 0), a.holds_open) \
         FROM accounts a LEFT JOIN (SELECT user_id, sum(reserved) AS total, count(*) AS n \
         FROM holds WHERE settled_at IS NULL GROUP BY user_id) h USING (user_id) \
         WHERE a.reserved <> coalesce(h.total, 0) OR a.holds_open <> coalesce(h.n, 0)",
    ),
    (
        "ledger_entries_chain",
        "SELECT user_id, format('entry %s has balance_after %s, running sum %s', entry_id, \
         balance_after, running) FROM (SELECT user_id, entry_id, balance_after, \
         sum(amount) OVER (PARTITION BY user_id ORDER BY entry_id) AS running FROM ledger) e \
         WHERE balance_after <> running",
    ),
    (
        "settled_hold_charged_once",
        "SELECT h.reservation_id::text, format('%s charge entries', count(l.entry_id)) \
         FROM holds h LEFT JOIN ledger l ON l.reservation_id = h.reservation_id \
         AND l.kind = 'charge' WHERE h.settled_at IS NOT NULL \
         GROUP BY h.reservation_id HAVING count(l.entry_id) <> 1",
    ),
    (
        "open_hold_not_charged",
        "SELECT h.reservation_id::text, 'open hold has a charge entry' FROM holds h \
         JOIN ledger l ON l.reservation_id = h.reservation_id WHERE h.settled_at IS NULL",
    ),
    (
        "hold_settled_once",
        "SELECT reservation_id::text, format('%s settlement events', count(*)) FROM outbox \
         WHERE event_type = 'reservation.settled' AND destination = 'event' \
         GROUP BY reservation_id HAVING count(*) > 1",
    ),
    (
        "hold_charge_matches_ledger",
        "SELECT h.reservation_id::text, format('hold charged %s, ledger %s', h.charged, \
         -sum(l.amount)) FROM holds h JOIN ledger l ON l.reservation_id = h.reservation_id \
         WHERE h.settled_at IS NOT NULL GROUP BY h.reservation_id, h.charged \
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
                subject: row.try_get(0)?,
                detail: row.try_get(1)?,
            });
        }
    }
    Ok(violations)
}
