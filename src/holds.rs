//! Hold sizing, growth and retry estimates: the output allowance of a new
//! hold, the growth of a hold while its stream runs, and the wait of a
//! user at the stream limit.
//!
//! The arithmetic is pure. The reads take the most recent completed
//! streams of one user or one model through the partial indexes
//! `holds_history_by_user` and `holds_history_by_model`, so a start reads
//! at most `reservations.history_streams` index entries per history.

use sqlx::{PgConnection, Row};

use crate::ledger::LedgerError;
use crate::messages::{GrowthLimit, SizedBy};
use crate::pricing::Credits;
use crate::settings::ReservationSettings;

/// Completion sizes and durations of the recent completed streams of one
/// user or one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct History {
    /// Completed streams read, at most `reservations.history_streams`.
    pub streams: i64,
    /// The `reservations.history_percentile` of their completion tokens;
    /// `None` without streams.
    pub completion_tokens: Option<i64>,
    /// Their median time from grant to settlement; `None` without streams.
    pub duration_seconds: Option<f64>,
}

impl History {
    /// Returns whether enough streams were read for the history to be used.
    fn is_enough(&self, settings: &ReservationSettings) -> bool {
        self.streams >= i64::from(settings.history_streams_min)
    }
}

/// Builds the history query of one user or one model, keyed by `$1` in
/// `$column`: the `$2` most recent completed streams, their count, the
/// `$3` percentile of their completion tokens and their median duration.
macro_rules! history_query {
    ($column:literal) => {
        concat!(
            "SELECT count(*) AS streams, ",
            "percentile_disc($3) WITHIN GROUP (ORDER BY completion_tokens) AS completion_tokens, ",
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_seconds) AS duration_seconds ",
            "FROM (SELECT completion_tokens, ",
            "extract(epoch FROM settled_at - opened_at)::float8 AS duration_seconds ",
            "FROM holds WHERE ",
            $column,
            " = $1 AND settle_status = 'completed' AND completion_tokens IS NOT NULL ",
            "ORDER BY settled_at DESC LIMIT $2) recent"
        )
    };
}

const USER_HISTORY: &str = history_query!("user_id");
const MODEL_HISTORY: &str = history_query!("model");

/// Reads the history of the user or model `key` with `query`, one of
/// [`USER_HISTORY`] and [`MODEL_HISTORY`].
async fn read_history(
    conn: &mut PgConnection,
    query: &'static str,
    key: &str,
    settings: &ReservationSettings,
) -> Result<History, LedgerError> {
    let row = sqlx::query(query)
        .bind(key)
        .bind(i64::from(settings.history_streams))
        .bind(f64::from(settings.history_percentile) / 100.0)
        .fetch_one(&mut *conn)
        .await?;
    Ok(History {
        streams: row.try_get("streams")?,
        completion_tokens: row.try_get("completion_tokens")?,
        duration_seconds: row.try_get("duration_seconds")?,
    })
}

/// Chooses the output allowance of a new hold and returns it with its
/// source.
///
/// The start's own `max_output_tokens` wins. Without it, and with
/// `reservations.size_from_history` on, the allowance is the
/// `history_percentile` of the user's recent completions, else of the
/// model's across users, each used only with at least
/// `history_streams_min` streams and bounded by `model_max_output_tokens`.
/// Otherwise the model's maximum is held.
pub async fn output_allowance(
    conn: &mut PgConnection,
    settings: &ReservationSettings,
    user_id: &str,
    model: &str,
    requested: Option<u64>,
    model_max_output_tokens: u64,
) -> Result<(u64, SizedBy), LedgerError> {
    if let Some(tokens) = requested {
        return Ok((tokens, SizedBy::MaxOutputTokens));
    }
    if !settings.size_from_history {
        return Ok((model_max_output_tokens, SizedBy::ModelDefault));
    }

    let user = read_history(conn, USER_HISTORY, user_id, settings).await?;
    if let Some(tokens) = sized_allowance(&user, settings, model_max_output_tokens) {
        return Ok((tokens, SizedBy::UserHistory));
    }
    let model = read_history(conn, MODEL_HISTORY, model, settings).await?;
    if let Some(tokens) = sized_allowance(&model, settings, model_max_output_tokens) {
        return Ok((tokens, SizedBy::ModelHistory));
    }
    Ok((model_max_output_tokens, SizedBy::ModelDefault))
}

/// Returns the allowance a history supports, from 1 token to the model's
/// maximum, or `None` when the history is too short.
fn sized_allowance(
    history: &History,
    settings: &ReservationSettings,
    model_max_output_tokens: u64,
) -> Option<u64> {
    if !history.is_enough(settings) {
        return None;
    }
    let tokens = u64::try_from(history.completion_tokens?).ok()?;
    Some(tokens.clamp(1, model_max_output_tokens))
}

/// Credits a hold requests from its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrowthRequest {
    pub credits: Credits,
    /// `Some(GrowthLimit::HoldMaxCredits)` when `hold_max_credits` cut the
    /// request below the steps the hold needs.
    pub limited_by: Option<GrowthLimit>,
}

/// Returns what a hold of `reserved` credits, granted at `initial`, should
/// grow by now that its stream's usage costs `cost_so_far`. Returns `None`
/// when growth is off, usage is below the threshold or the hold is at its
/// maximum.
///
/// A hold grows once usage reaches `growth_threshold_percent` of it, by
/// the fewest whole steps of `growth_step_percent` of `initial` (at least
/// one credit) that bring usage below the threshold again, and never
/// above `hold_max_credits`.
pub fn growth_request(
    settings: &ReservationSettings,
    reserved: Credits,
    initial: Credits,
    cost_so_far: Credits,
) -> Option<GrowthRequest> {
    assert!(
        reserved.0 >= 0 && initial.0 >= 0,
        "a hold is never negative"
    );
    if !settings.growth || cost_so_far.0 <= 0 {
        return None;
    }
    // Amounts are non-negative i64 values, so their products with
    // percentages fit in u128 without overflow.
    let cost = u128::try_from(cost_so_far.0).expect("checked positive above");
    let held = u128::try_from(reserved.0).expect("asserted non-negative above");
    let threshold = u128::from(settings.growth_threshold_percent);
    if cost * 100 < held * threshold {
        return None;
    }
    let max = u128::try_from(settings.hold_max_credits).expect("settings keep it positive");
    let room = max.saturating_sub(held);
    if room == 0 {
        return None;
    }

    let initial = u128::try_from(initial.0).expect("asserted non-negative above");
    let step = (initial * u128::from(settings.growth_step_percent))
        .div_ceil(100)
        .max(1);
    // The smallest hold at which usage is below the threshold, which is
    // above `held` because usage has reached the threshold of `held`.
    let target = cost * 100 / threshold + 1;
    let wanted = (target - held).div_ceil(step) * step;
    let (credits, limited_by) = if wanted > room {
        (room, Some(GrowthLimit::HoldMaxCredits))
    } else {
        (wanted, None)
    };
    let credits = i64::try_from(credits).expect("at most hold_max_credits, an i64");
    Some(GrowthRequest {
        credits: Credits(credits),
        limited_by,
    })
}

/// Estimates how many seconds a user at `max_active_per_user` should wait
/// before starting another stream; `None` when the user has no open hold.
///
/// The oldest open stream is expected to end when it reaches the median
/// duration of the user's recent completed streams (the model's across
/// users when the user has too little history). The estimate is the time
/// until then, at least 1 second, and never later than the moment the
/// earliest open hold expires unless another event arrives for it.
pub async fn retry_after_seconds(
    conn: &mut PgConnection,
    settings: &ReservationSettings,
    user_id: &str,
    model: &str,
) -> Result<Option<u64>, LedgerError> {
    let row = sqlx::query(
        "SELECT extract(epoch FROM now() - min(opened_at))::float8 AS oldest_age_seconds, \
         extract(epoch FROM min(last_event_at) - now())::float8 + $2 AS until_expiry_seconds \
         FROM holds WHERE user_id = $1 AND settled_at IS NULL",
    )
    .bind(user_id)
    .bind(settings.ttl_seconds as f64)
    .fetch_one(&mut *conn)
    .await?;
    let oldest_age: Option<f64> = row.try_get("oldest_age_seconds")?;
    let until_expiry: Option<f64> = row.try_get("until_expiry_seconds")?;
    let (Some(oldest_age), Some(until_expiry)) = (oldest_age, until_expiry) else {
        return Ok(None);
    };

    let mut typical = read_history(conn, USER_HISTORY, user_id, settings).await?;
    if !typical.is_enough(settings) {
        typical = read_history(conn, MODEL_HISTORY, model, settings).await?;
    }
    let typical_seconds = typical
        .is_enough(settings)
        .then_some(typical.duration_seconds)
        .flatten();
    Ok(Some(estimate_retry_after(
        oldest_age,
        until_expiry,
        typical_seconds,
        settings.ttl_seconds,
    )))
}

/// Computes the estimate of [`retry_after_seconds`] in whole seconds,
/// rounded up.
fn estimate_retry_after(
    oldest_age_seconds: f64,
    until_expiry_seconds: f64,
    typical_seconds: Option<f64>,
    ttl_seconds: u64,
) -> u64 {
    let latest = until_expiry_seconds.clamp(1.0, ttl_seconds as f64);
    let estimate = match typical_seconds {
        Some(typical) => (typical - oldest_age_seconds).max(1.0).min(latest),
        None => latest,
    };
    estimate.ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ReservationSettings {
        crate::settings::Settings::default().reservations
    }

    fn request(reserved: i64, initial: i64, cost: i64) -> Option<GrowthRequest> {
        growth_request(
            &settings(),
            Credits(reserved),
            Credits(initial),
            Credits(cost),
        )
    }

    #[test]
    fn below_threshold_does_not_grow() {
        // 79 of 100 is below the default 80 %.
        assert_eq!(request(100, 100, 79), None);
    }

    #[test]
    fn threshold_grows_by_one_step() {
        // 80 of 100 reaches 80 %; one step of 50 puts it at 53 %.
        let grown = request(100, 100, 80).unwrap();
        assert_eq!(grown.credits, Credits(50));
        assert_eq!(grown.limited_by, None);
    }

    #[test]
    fn usage_far_above_grows_by_several_steps() {
        // 300 needs a hold above 375, and six steps of 50 take 100 to 400.
        let grown = request(100, 100, 300).unwrap();
        assert_eq!(grown.credits, Credits(300));
    }

    #[test]
    fn step_counts_from_the_initial_hold() {
        // After growing to 150, a step is still 50, not 75.
        let grown = request(150, 100, 120).unwrap();
        assert_eq!(grown.credits, Credits(50));
    }

    #[test]
    fn hold_max_cuts_the_step() {
        let mut settings = settings();
        settings.hold_max_credits = 120;
        let grown = growth_request(&settings, Credits(100), Credits(100), Credits(90)).unwrap();
        assert_eq!(grown.credits, Credits(20));
        assert_eq!(grown.limited_by, Some(GrowthLimit::HoldMaxCredits));
        let at_max = growth_request(&settings, Credits(120), Credits(100), Credits(119));
        assert_eq!(at_max, None);
    }

    #[test]
    fn growth_off_never_grows() {
        let mut settings = settings();
        settings.growth = false;
        assert_eq!(
            growth_request(&settings, Credits(100), Credits(100), Credits(500)),
            None
        );
    }

    #[test]
    fn free_usage_never_grows() {
        assert_eq!(request(0, 0, 0), None);
    }

    #[test]
    fn zero_hold_grows_by_one_credit_steps() {
        // A hold of 0 (a model with a zero output price) has 1-credit
        // steps; usage of 4 needs a hold above 5.
        let grown = request(0, 0, 4).unwrap();
        assert_eq!(grown.credits, Credits(6));
    }

    #[test]
    fn grown_hold_puts_usage_below_threshold() {
        let settings = settings();
        for initial in [1, 7, 50, 333, 10_000] {
            for cost in 1..3 * initial {
                let Some(grown) = request(initial, initial, cost) else {
                    assert!(
                        cost * 100 < initial * 80,
                        "no growth at {cost} of {initial}"
                    );
                    continue;
                };
                let reserved = initial + grown.credits.0;
                let threshold = i64::from(settings.growth_threshold_percent);
                assert!(cost * 100 < reserved * threshold, "{cost} of {reserved}");
                let step = (initial * 50 + 99) / 100;
                assert_eq!(grown.credits.0 % step, 0, "whole steps of {step}");
                let smaller = reserved - step;
                assert!(
                    cost * 100 >= smaller * threshold,
                    "one step fewer is enough"
                );
            }
        }
    }

    fn history(streams: i64, tokens: i64) -> History {
        History {
            streams,
            completion_tokens: Some(tokens),
            duration_seconds: Some(10.0),
        }
    }

    #[test]
    fn short_history_sizes_nothing() {
        assert_eq!(sized_allowance(&history(4, 300), &settings(), 4096), None);
    }

    #[test]
    fn history_sizes_within_model_maximum() {
        assert_eq!(
            sized_allowance(&history(5, 300), &settings(), 4096),
            Some(300)
        );
        assert_eq!(
            sized_allowance(&history(5, 9000), &settings(), 4096),
            Some(4096)
        );
        assert_eq!(sized_allowance(&history(5, 0), &settings(), 4096), Some(1));
    }

    #[test]
    fn retry_after_waits_for_typical_end() {
        // The oldest stream is 20 s old and streams take 60 s.
        assert_eq!(estimate_retry_after(20.0, 880.0, Some(60.0), 900), 40);
    }

    #[test]
    fn retry_after_never_passes_expiry() {
        assert_eq!(estimate_retry_after(20.0, 15.5, Some(60.0), 900), 16);
    }

    #[test]
    fn retry_after_of_late_stream_is_one_second() {
        assert_eq!(estimate_retry_after(90.0, 880.0, Some(60.0), 900), 1);
    }

    #[test]
    fn retry_after_without_history_is_expiry() {
        assert_eq!(estimate_retry_after(20.0, 880.0, None, 900), 880);
        assert_eq!(estimate_retry_after(20.0, -3.0, None, 900), 1);
    }
}
