//! Property tests of the settlement arithmetic and of a ledger built on it.
//!
//! Prices are drawn up to [`price_max`], the largest price at which
//! `ModelPrice::validate` still accepts every price of a model at
//! `limits.tokens_max`, and token counts up to `limits.tokens_max`, which is
//! what the decoder lets through.
//!
//! The ledger test replays random grants, holds, chunks, ends, expiries and
//! late ends on an in-memory account that settles with
//! `stream_credits::settlement::settle`, and checks the invariants that the
//! PostgreSQL ledger keeps after every step.

use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::sample::Index;
use stream_credits::messages::{SettleStatus, Usage, UsageSource};
use stream_credits::pricing::{CostOverflow, Credits, ModelPrice, TokenUsage};
use stream_credits::settings::{Overrun, Settings};
use stream_credits::settlement::{Counted, Settlement, settle};

/// Default settings, built once because every strategy and step reads them.
static DEFAULT_SETTINGS: LazyLock<Settings> = LazyLock::new(Settings::default);

/// `limits.tokens_max` of the default settings.
fn tokens_max() -> u64 {
    DEFAULT_SETTINGS.limits.tokens_max
}

/// Returns the largest price per million tokens that passes validation
/// when all three prices of a model equal it: `tokens_max` prompt tokens plus
/// `tokens_max` completion tokens at this price still fit in an `i64`.
fn price_max() -> i64 {
    let limit = u128::from(tokens_max());
    let max = i64::MAX as u128 * 1_000_000 / (2 * limit);
    i64::try_from(max).expect("the bound is below i64::MAX")
}

/// A list price of $100 per million tokens, above every built-in price.
const LIST_PRICE_MAX: i64 = 100_000_000;

/// Generates prices per million tokens up to `max`: often list-price sized,
/// often anywhere in range, and sometimes exactly zero or `max`.
fn price_per_million(max: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0..=LIST_PRICE_MAX.min(max),
        4 => 0..=max,
        1 => Just(0i64),
        1 => Just(max),
    ]
}

fn model_price(max: i64) -> impl Strategy<Value = ModelPrice> {
    (
        price_per_million(max),
        price_per_million(max),
        proptest::option::of(price_per_million(max)),
        1..=tokens_max(),
    )
        .prop_map(|(input, output, cached, max_output_tokens)| ModelPrice {
            input_per_million: input,
            output_per_million: output,
            cached_input_per_million: cached,
            encoding: "o200k_base".to_owned(),
            max_output_tokens,
        })
}

/// Generates token counts within `limits.tokens_max`, biased towards both
/// ends.
fn token_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=10_000u64,
        4 => 0..=tokens_max(),
        1 => Just(0u64),
        1 => Just(tokens_max()),
    ]
}

/// Generates provider usage within the limits. The cached part may exceed
/// the prompt, which `ModelPrice::cost` must still price sensibly.
fn any_usage() -> impl Strategy<Value = Usage> {
    (
        token_count(),
        token_count(),
        proptest::option::of(token_count()),
    )
        .prop_map(
            |(prompt_tokens, completion_tokens, cached_prompt_tokens)| Usage {
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens,
            },
        )
}

/// Generates provider usage as the decoder accepts it, with the cached
/// part at most the prompt.
fn decoded_usage() -> impl Strategy<Value = Usage> {
    (token_count(), token_count(), any::<Option<Index>>()).prop_map(
        |(prompt_tokens, completion_tokens, cached)| Usage {
            prompt_tokens,
            completion_tokens,
            cached_prompt_tokens: cached.map(|index| {
                let choices = usize::try_from(prompt_tokens + 1).expect("fits in usize");
                index.index(choices) as u64
            }),
        },
    )
}

fn counted() -> impl Strategy<Value = Counted> {
    (token_count(), token_count()).prop_map(|(prompt_tokens, completion_tokens)| Counted {
        prompt_tokens,
        completion_tokens,
    })
}

fn settle_status() -> impl Strategy<Value = SettleStatus> {
    prop_oneof![
        Just(SettleStatus::Completed),
        Just(SettleStatus::Cancelled),
        Just(SettleStatus::Failed),
        Just(SettleStatus::Expired),
    ]
}

fn overrun_policy() -> impl Strategy<Value = Overrun> {
    prop_oneof![Just(Overrun::Debit), Just(Overrun::Cap)]
}

/// How a test picks the hold: any non-negative amount, or one within a
/// few credits of the cost, so that both sides of `cost <= reserved` and
/// the equal case come up often.
#[derive(Debug, Clone, Copy)]
enum HoldChoice {
    Amount(i64),
    NearCost(i64),
}

fn hold_choice() -> impl Strategy<Value = HoldChoice> {
    prop_oneof![
        (0..=i64::MAX).prop_map(HoldChoice::Amount),
        (0..=1_000_000i64).prop_map(HoldChoice::Amount),
        (-3..=3i64).prop_map(HoldChoice::NearCost),
    ]
}

/// Returns the usage that `settle` prices: the provider's when given, else
/// the count.
fn billed_usage(counted: Counted, provider: Option<Usage>) -> TokenUsage {
    match provider {
        Some(usage) => token_usage(usage),
        None => TokenUsage {
            prompt_tokens: counted.prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens: counted.completion_tokens,
        },
    }
}

fn token_usage(usage: Usage) -> TokenUsage {
    TokenUsage {
        prompt_tokens: usage.prompt_tokens,
        cached_prompt_tokens: usage.cached_prompt_tokens.unwrap_or(0),
        completion_tokens: usage.completion_tokens,
    }
}

fn reserved_for(choice: HoldChoice, cost: Credits) -> Credits {
    match choice {
        HoldChoice::Amount(amount) => Credits(amount),
        HoldChoice::NearCost(offset) => Credits(cost.0.saturating_add(offset).max(0)),
    }
}

/// Computes the exact price of `usage` in millionths of a credit, apart
/// from `ModelPrice::cost`.
fn exact_micro_credits(price: &ModelPrice, usage: TokenUsage) -> u128 {
    let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
    let uncached = usage.prompt_tokens - cached;
    let cached_price = price
        .cached_input_per_million
        .unwrap_or(price.input_per_million);
    let micro = |tokens: u64, price: i64| u128::from(tokens) * price as u128;
    micro(uncached, price.input_per_million)
        + micro(cached, cached_price)
        + micro(usage.completion_tokens, price.output_per_million)
}

#[test]
fn price_max_is_the_validation_bound() {
    let at_bound = ModelPrice {
        input_per_million: price_max(),
        output_per_million: price_max(),
        cached_input_per_million: Some(price_max()),
        encoding: "o200k_base".to_owned(),
        max_output_tokens: 1,
    };
    assert_eq!(at_bound.validate(tokens_max()), Ok(()));

    // One credit more on every price overflows, so the bound is exact.
    let above = ModelPrice {
        input_per_million: price_max() + 1,
        output_per_million: price_max() + 1,
        cached_input_per_million: Some(price_max() + 1),
        ..at_bound
    };
    assert!(above.validate(tokens_max()).is_err());
}

#[test]
fn counted_usage_above_limit_overflows() {
    // Validation allows an output price of twice price_max when input is
    // free. The worker does not bound counted tokens by tokens_max, so a
    // stream that counts twice the limit costs more than an i64 can hold,
    // and `settle` returns an error instead of a wrong amount.
    let price = ModelPrice {
        input_per_million: 0,
        output_per_million: 2 * price_max(),
        cached_input_per_million: None,
        encoding: "o200k_base".to_owned(),
        max_output_tokens: 1,
    };
    assert_eq!(price.validate(tokens_max()), Ok(()));

    let counted = Counted {
        prompt_tokens: 0,
        completion_tokens: 2 * tokens_max(),
    };
    let result = settle(
        Credits(1),
        &price,
        counted,
        None,
        SettleStatus::Expired,
        Overrun::Debit,
    );
    assert_eq!(result, Err(CostOverflow));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn generated_prices_validate(price in model_price(price_max())) {
        prop_assert_eq!(price.validate(tokens_max()), Ok(()));
    }

    #[test]
    fn settlement_balances(
        price in model_price(price_max()),
        hold in hold_choice(),
        counted in counted(),
        provider in proptest::option::of(any_usage()),
        status in settle_status(),
        policy in overrun_policy(),
    ) {
        let full_cost = price
            .cost(billed_usage(counted, provider))
            .expect("a validated price within tokens_max fits in 64 bits");
        let reserved = reserved_for(hold, full_cost);

        let settlement = settle(reserved, &price, counted, provider, status, policy)
            .expect("settling usage within tokens_max succeeds");
        let Settlement { cost, charged, refunded, overrun, forgiven, .. } = settlement;

        prop_assert!(charged.0 >= 0, "charged {charged} is negative");
        prop_assert!(refunded.0 >= 0, "refunded {refunded} is negative");
        prop_assert!(refunded <= reserved, "refunded {refunded} above reserved {reserved}");
        prop_assert!(forgiven.0 >= 0, "forgiven {forgiven} is negative");
        prop_assert_eq!(charged.0 + forgiven.0, cost.0);
        prop_assert_eq!(overrun.0, (cost.0 - reserved.0).max(0));
        if cost <= reserved {
            prop_assert_eq!(refunded.0 + charged.0, reserved.0);
            prop_assert_eq!(forgiven, Credits(0));
        }
        match policy {
            Overrun::Cap => {
                prop_assert!(charged <= reserved, "cap charged {charged} above {reserved}");
                prop_assert_eq!(forgiven, overrun);
            }
            Overrun::Debit => {
                prop_assert_eq!(charged, cost);
                prop_assert_eq!(forgiven, Credits(0));
            }
        }
    }

    #[test]
    fn settlement_prices_the_right_usage(
        price in model_price(price_max()),
        reserved in 0..=i64::MAX,
        counted in counted(),
        provider in proptest::option::of(any_usage()),
        status in settle_status(),
        policy in overrun_policy(),
    ) {
        let settlement = settle(Credits(reserved), &price, counted, provider, status, policy)
            .expect("settling usage within tokens_max succeeds");
        let usage = billed_usage(counted, provider);

        prop_assert_eq!(settlement.usage, usage);
        let source = if provider.is_some() { UsageSource::Provider } else { UsageSource::Counted };
        prop_assert_eq!(settlement.usage_source, source);
        if status == SettleStatus::Failed && provider.is_none() {
            prop_assert_eq!(settlement.cost, Credits(0));
        } else {
            prop_assert_eq!(Ok(settlement.cost), price.cost(usage));
        }
    }

    #[test]
    fn cost_rounds_up_the_exact_price(price in model_price(price_max()), usage in any_usage()) {
        let usage = token_usage(usage);
        let cost = price.cost(usage).expect("a validated price within tokens_max fits");
        let exact = exact_micro_credits(&price, usage);
        let cost_micro = u128::try_from(cost.0).expect("a cost is never negative") * 1_000_000;

        prop_assert!(cost_micro >= exact, "cost {cost} is below the exact price {exact}");
        prop_assert!(cost_micro < exact + 1_000_000, "cost {cost} rounds up more than once");
    }

    #[test]
    fn cost_is_monotonic_in_token_counts(
        price in model_price(price_max()),
        usage in any_usage(),
        more_prompt in token_count(),
        more_completion in token_count(),
        more_cached in token_count(),
    ) {
        let base = token_usage(usage);
        let cost = |usage: TokenUsage| price.cost(usage).expect("within limits the cost fits");
        let grown = |value: u64, more: u64| (value + more).min(tokens_max());

        let more_prompt_usage = TokenUsage {
            prompt_tokens: grown(base.prompt_tokens, more_prompt),
            ..base
        };
        prop_assert!(cost(more_prompt_usage) >= cost(base), "more prompt tokens cost less");

        let more_completion_usage = TokenUsage {
            completion_tokens: grown(base.completion_tokens, more_completion),
            ..base
        };
        prop_assert!(cost(more_completion_usage) >= cost(base), "more completion tokens cost less");

        // A cached token replaces an uncached one, so the cost moves the
        // way the cached price differs from the input price.
        let more_cached_usage = TokenUsage {
            cached_prompt_tokens: grown(base.cached_prompt_tokens, more_cached),
            ..base
        };
        let cached_price = price.cached_input_per_million.unwrap_or(price.input_per_million);
        if cached_price <= price.input_per_million {
            prop_assert!(cost(more_cached_usage) <= cost(base), "more cached tokens cost more");
        } else {
            prop_assert!(cost(more_cached_usage) >= cost(base), "more cached tokens cost less");
        }
    }
}

// ---------------------------------------------------------------------
// Ledger model
// ---------------------------------------------------------------------

/// Returns the maximum number of open holds per user:
/// `reservations.max_active_per_user` of the default settings.
fn holds_open_max() -> usize {
    DEFAULT_SETTINGS.reservations.max_active_per_user as usize
}

/// One message or sweep applied to the model account.
#[derive(Debug, Clone)]
enum Step {
    Grant(i64),
    Start {
        price: Index,
        prompt_tokens: u64,
        max_output_tokens: Option<u64>,
    },
    Chunk {
        hold: Index,
        tokens: u64,
    },
    End {
        hold: Index,
        status: SettleStatus,
        usage: Option<Usage>,
    },
    Expire {
        hold: Index,
    },
}

fn end_status() -> impl Strategy<Value = SettleStatus> {
    prop_oneof![
        Just(SettleStatus::Completed),
        Just(SettleStatus::Cancelled),
        Just(SettleStatus::Failed),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => prop_oneof![1..=1_000_000i64, 1..=10_000_000_000i64].prop_map(Step::Grant),
        3 => (any::<Index>(), token_count(), proptest::option::of(1..=tokens_max())).prop_map(
            |(price, prompt_tokens, max_output_tokens)| Step::Start {
                price,
                prompt_tokens,
                max_output_tokens,
            }
        ),
        3 => (any::<Index>(), token_count())
            .prop_map(|(hold, tokens)| Step::Chunk { hold, tokens }),
        3 => (any::<Index>(), end_status(), proptest::option::of(decoded_usage()))
            .prop_map(|(hold, status, usage)| Step::End { hold, status, usage }),
        1 => any::<Index>().prop_map(|hold| Step::Expire { hold }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Grant,
    Charge,
    Adjustment,
}

/// One row of the model ledger.
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: EntryKind,
    amount: i64,
    hold: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Open,
    Settled {
        status: SettleStatus,
        charged: i64,
    },
    /// An expired hold that a late `stream.ended` corrected.
    Adjusted {
        charged: i64,
    },
}

#[derive(Debug, Clone)]
struct Hold {
    price: usize,
    reserved: Credits,
    counted: Counted,
    state: HoldState,
}

/// One account with its holds and ledger, changed the way the worker
/// changes the tables `accounts`, `holds` and `ledger`.
#[derive(Debug)]
struct Account {
    prices: Vec<ModelPrice>,
    policy: Overrun,
    balance: i64,
    reserved: i64,
    holds: Vec<Hold>,
    entries: Vec<Entry>,
    /// Whether a late end has charged more than expiry did, which may take
    /// `available` below zero under either policy.
    late_charge_seen: bool,
}

impl Account {
    fn available(&self) -> i64 {
        self.balance - self.reserved
    }

    fn open_holds(&self) -> usize {
        self.holds
            .iter()
            .filter(|hold| hold.state == HoldState::Open)
            .count()
    }

    fn settle(&self, hold: &Hold, status: SettleStatus, usage: Option<Usage>) -> Settlement {
        settle(
            hold.reserved,
            &self.prices[hold.price],
            hold.counted,
            usage,
            status,
            self.policy,
        )
        .expect("settling usage within tokens_max succeeds")
    }

    fn post(&mut self, kind: EntryKind, amount: i64, hold: Option<usize>) {
        self.balance += amount;
        self.entries.push(Entry { kind, amount, hold });
    }

    fn apply(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Grant(amount) => self.post(EntryKind::Grant, amount, None),
            Step::Start {
                price,
                prompt_tokens,
                max_output_tokens,
            } => {
                let price = price.index(self.prices.len());
                let model = &self.prices[price];
                let usage = TokenUsage {
                    prompt_tokens,
                    cached_prompt_tokens: 0,
                    completion_tokens: max_output_tokens.unwrap_or(model.max_output_tokens),
                };
                let requested = model.cost(usage).expect("a hold within tokens_max fits");
                // The same condition as the UPDATE that places a hold.
                if self.available() >= requested.0 && self.open_holds() < holds_open_max() {
                    self.reserved += requested.0;
                    self.holds.push(Hold {
                        price,
                        reserved: requested,
                        counted: Counted {
                            prompt_tokens,
                            completion_tokens: 0,
                        },
                        state: HoldState::Open,
                    });
                    prop_assert!(self.available() >= 0, "a hold took available below zero");
                }
            }
            Step::Chunk { hold, tokens } => {
                let Some(index) = self.pick(hold) else {
                    return Ok(());
                };
                let target = &mut self.holds[index];
                if target.state == HoldState::Open {
                    // NOTE: the worker adds chunk tokens without a bound, so a
                    // long stream can count more than tokens_max. The model
                    // stays within tokens_max, the range these tests cover.
                    let counted = target.counted.completion_tokens.saturating_add(tokens);
                    target.counted.completion_tokens = counted.min(tokens_max());
                }
            }
            Step::End {
                hold,
                status,
                usage,
            } => {
                let Some(index) = self.pick(hold) else {
                    return Ok(());
                };
                match self.holds[index].state {
                    HoldState::Open => self.close(index, status, usage),
                    HoldState::Settled {
                        status: SettleStatus::Expired,
                        charged,
                    } => {
                        self.adjust(index, charged, status, usage);
                    }
                    HoldState::Settled { .. } | HoldState::Adjusted { .. } => {}
                }
            }
            Step::Expire { hold } => {
                let Some(index) = self.pick(hold) else {
                    return Ok(());
                };
                if self.holds[index].state == HoldState::Open {
                    self.close(index, SettleStatus::Expired, None);
                }
            }
        }
        Ok(())
    }

    fn pick(&self, hold: Index) -> Option<usize> {
        (!self.holds.is_empty()).then(|| hold.index(self.holds.len()))
    }

    /// Settles an open hold: charges, releases the hold, writes one entry.
    fn close(&mut self, index: usize, status: SettleStatus, usage: Option<Usage>) {
        let settlement = self.settle(&self.holds[index], status, usage);
        let hold = &mut self.holds[index];
        hold.state = HoldState::Settled {
            status,
            charged: settlement.charged.0,
        };
        self.reserved -= hold.reserved.0;
        self.post(EntryKind::Charge, -settlement.charged.0, Some(index));
    }

    /// Corrects an expired hold by the difference to its late settlement.
    fn adjust(
        &mut self,
        index: usize,
        previously: i64,
        status: SettleStatus,
        usage: Option<Usage>,
    ) {
        let settlement = self.settle(&self.holds[index], status, usage);
        let difference = settlement.charged.0 - previously;
        if difference > 0 {
            self.late_charge_seen = true;
        }
        self.holds[index].state = HoldState::Adjusted {
            charged: settlement.charged.0,
        };
        self.post(EntryKind::Adjustment, -difference, Some(index));
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let entries: i64 = self.entries.iter().map(|entry| entry.amount).sum();
        prop_assert_eq!(
            self.balance,
            entries,
            "balance is not the sum of the ledger"
        );

        let open: i64 = self
            .holds
            .iter()
            .filter(|hold| hold.state == HoldState::Open)
            .map(|hold| hold.reserved.0)
            .sum();
        prop_assert_eq!(self.reserved, open, "reserved is not the sum of open holds");
        prop_assert!(self.reserved >= 0);
        prop_assert!(self.open_holds() <= holds_open_max());

        if self.policy == Overrun::Cap && !self.late_charge_seen {
            prop_assert!(self.available() >= 0, "a capped account went below zero");
        }

        for (index, hold) in self.holds.iter().enumerate() {
            let entries_of = |kind| {
                self.entries
                    .iter()
                    .filter(|entry| entry.hold == Some(index) && entry.kind == kind)
                    .map(|entry| entry.amount)
                    .collect::<Vec<_>>()
            };
            let charges = entries_of(EntryKind::Charge);
            let adjustments = entries_of(EntryKind::Adjustment);
            prop_assert!(charges.len() <= 1, "hold {} charged twice", index);
            prop_assert!(adjustments.len() <= 1, "hold {} adjusted twice", index);

            // The entries of a hold add up to the charge stored on the hold.
            let paid = -(charges.iter().sum::<i64>() + adjustments.iter().sum::<i64>());
            match hold.state {
                HoldState::Open => prop_assert!(charges.is_empty() && adjustments.is_empty()),
                HoldState::Settled { charged, .. } => {
                    prop_assert_eq!(paid, charged);
                    prop_assert!(adjustments.is_empty());
                }
                HoldState::Adjusted { charged } => {
                    prop_assert_eq!(paid, charged);
                    prop_assert_eq!(adjustments.len(), 1);
                }
            }
            if self.policy == Overrun::Cap {
                prop_assert!(
                    paid <= hold.reserved.0,
                    "hold {} paid above its reserve",
                    index
                );
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    // Prices stop at list-price size here: many debit overruns at prices
    // near price_max add up beyond 64 bits, which one settlement never does.
    #[test]
    fn ledger_model_keeps_invariants(
        prices in proptest::collection::vec(model_price(LIST_PRICE_MAX), 1..=3),
        policy in overrun_policy(),
        steps in proptest::collection::vec(step(), 1..=80),
    ) {
        let mut account = Account {
            prices,
            policy,
            balance: 0,
            reserved: 0,
            holds: Vec::new(),
            entries: Vec::new(),
            late_charge_seen: false,
        };
        for step in &steps {
            account.apply(step)?;
            account.check_invariants()?;
        }
    }
}
