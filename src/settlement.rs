//! Settlement arithmetic: what a finished or expired stream costs, what the
//! user pays and what goes back. Pure functions, no database.

use crate::messages::{SettleStatus, Usage, UsageSource};
use crate::pricing::{CostOverflow, Credits, ModelPrice, TokenUsage};
use crate::settings::Overrun;

/// What the worker counted for one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The outcome of settling one hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub usage: TokenUsage,
    pub usage_source: UsageSource,
    pub cost: Credits,
    pub charged: Credits,
    pub refunded: Credits,
    pub overrun: Credits,
    pub forgiven: Credits,
}

/// Settles a hold of `reserved` credits.
///
/// The provider's usage wins over the count. A failed stream without
/// provider usage costs nothing. A cost above the hold is charged in full
/// under `Overrun::Debit` and capped at the hold under `Overrun::Cap`.
pub fn settle(
    reserved: Credits,
    price: &ModelPrice,
    counted: Counted,
    provider: Option<Usage>,
    status: SettleStatus,
    policy: Overrun,
) -> Result<Settlement, CostOverflow> {
    assert!(reserved.0 >= 0, "a hold is never negative");

    let (usage, usage_source) = match provider {
        Some(usage) => (
            TokenUsage {
                prompt_tokens: usage.prompt_tokens,
                cached_prompt_tokens: usage.cached_prompt_tokens.unwrap_or(0),
                completion_tokens: usage.completion_tokens,
            },
            UsageSource::Provider,
        ),
        None => (
            TokenUsage {
                prompt_tokens: counted.prompt_tokens,
                cached_prompt_tokens: 0,
                completion_tokens: counted.completion_tokens,
            },
            UsageSource::Counted,
        ),
    };
    let free = status == SettleStatus::Failed && provider.is_none();
    let cost = if free { Credits(0) } else { price.cost(usage)? };

    let overrun = Credits((cost.0 - reserved.0).max(0));
    let charged = match policy {
        Overrun::Debit => cost,
        Overrun::Cap => Credits(cost.0.min(reserved.0)),
    };
    let settlement = Settlement {
        usage,
        usage_source,
        cost,
        charged,
        refunded: Credits((reserved.0 - charged.0).max(0)),
        overrun,
        forgiven: Credits(cost.0 - charged.0),
    };
    settlement.assert_consistent(reserved);
    Ok(settlement)
}

impl Settlement {
    fn assert_consistent(&self, reserved: Credits) {
        assert!(self.charged.0 >= 0, "a charge is never negative");
        assert!(self.refunded.0 <= reserved.0, "a refund never exceeds its hold");
        assert!(self.forgiven.0 >= 0, "nothing is forgiven below zero");
        assert!(self.forgiven.0 <= self.overrun.0, "only an overrun is forgiven");
        assert_eq!(self.charged.0 + self.forgiven.0, self.cost.0);
        if self.charged <= reserved {
            assert_eq!(self.charged.0 + self.refunded.0, reserved.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price() -> ModelPrice {
        // One credit per prompt token and two per completion token.
        ModelPrice {
            input_per_million: 1_000_000,
            output_per_million: 2_000_000,
            cached_input_per_million: Some(500_000),
            encoding: "o200k_base".to_owned(),
            max_output_tokens: 100,
        }
    }

    fn counted(prompt: u64, completion: u64) -> Counted {
        Counted {
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    fn provider(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: None,
        })
    }

    fn run(
        reserved: i64,
        counts: Counted,
        usage: Option<Usage>,
        status: SettleStatus,
        policy: Overrun,
    ) -> Settlement {
        settle(Credits(reserved), &price(), counts, usage, status, policy).unwrap()
    }

    #[test]
    fn provider_usage_wins_over_count() {
        let s = run(500, counted(10, 40), provider(120, 57), SettleStatus::Completed, Overrun::Debit);
        assert_eq!(s.usage_source, UsageSource::Provider);
        assert_eq!(s.cost, Credits(120 + 2 * 57));
        assert_eq!(s.refunded, Credits(500 - 234));
    }

    #[test]
    fn cancelled_without_usage_charges_count() {
        let s = run(500, counted(10, 10), None, SettleStatus::Cancelled, Overrun::Debit);
        assert_eq!(s.usage_source, UsageSource::Counted);
        assert_eq!(s.charged, Credits(30));
        assert_eq!(s.refunded, Credits(470));
    }

    #[test]
    fn failed_without_usage_charges_nothing() {
        let s = run(500, counted(10, 10), None, SettleStatus::Failed, Overrun::Debit);
        assert_eq!(s.charged, Credits(0));
        assert_eq!(s.refunded, Credits(500));
    }

    #[test]
    fn failed_with_usage_charges_usage() {
        let s = run(500, counted(10, 10), provider(10, 5), SettleStatus::Failed, Overrun::Debit);
        assert_eq!(s.charged, Credits(20));
    }

    #[test]
    fn debit_charges_the_whole_overrun() {
        let s = run(100, counted(0, 0), provider(50, 50), SettleStatus::Completed, Overrun::Debit);
        assert_eq!(s.cost, Credits(150));
        assert_eq!(s.charged, Credits(150));
        assert_eq!(s.overrun, Credits(50));
        assert_eq!(s.forgiven, Credits(0));
        assert_eq!(s.refunded, Credits(0));
    }

    #[test]
    fn cap_forgives_the_overrun() {
        let s = run(100, counted(0, 0), provider(50, 50), SettleStatus::Completed, Overrun::Cap);
        assert_eq!(s.charged, Credits(100));
        assert_eq!(s.overrun, Credits(50));
        assert_eq!(s.forgiven, Credits(50));
        assert_eq!(s.refunded, Credits(0));
    }

    #[test]
    fn cached_prompt_tokens_are_cheaper() {
        let usage = Some(Usage {
            prompt_tokens: 100,
            completion_tokens: 0,
            cached_prompt_tokens: Some(100),
        });
        let s = run(1000, counted(0, 0), usage, SettleStatus::Completed, Overrun::Debit);
        assert_eq!(s.cost, Credits(50));
    }
}
