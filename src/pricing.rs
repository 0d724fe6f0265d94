//! Model prices and the cost of token usage, in integer credits.
//!
//! One credit is the smallest unit the deployment bills in. The built-in
//! table counts one credit as one millionth of a US dollar, so a price of
//! 2,500,000 credits per million tokens is $2.50 per million tokens.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of credits. Negative only where a balance is allowed to go
/// below zero (an overrun under the `debit` policy).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Credits(pub i64);

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Token usage of one stream, as the provider reported it or as counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Every prompt token, cached ones included.
    pub prompt_tokens: u64,
    /// The part of `prompt_tokens` served from the provider's cache.
    pub cached_prompt_tokens: u64,
    /// Every billed output token, reasoning included.
    pub completion_tokens: u64,
}

/// Price and tokenizer of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// Credits per million prompt tokens.
    pub input_per_million: i64,
    /// Credits per million completion tokens.
    pub output_per_million: i64,
    /// Credits per million cached prompt tokens; unset means the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_million: Option<i64>,
    /// tiktoken encoding that counts this model's text.
    pub encoding: String,
    /// Output allowance held when `stream.started` gives none.
    pub max_output_tokens: u64,
}

/// The cost does not fit in 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cost overflows 64-bit credits")]
pub struct CostOverflow;

impl ModelPrice {
    /// Returns the price of `usage`, rounded up to whole credits.
    ///
    /// Cached prompt tokens above `prompt_tokens` are treated as all of the
    /// prompt, so a producer's inconsistent usage never lowers the price
    /// below that of the cached part.
    pub fn cost(&self, usage: TokenUsage) -> Result<Credits, CostOverflow> {
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens - cached;
        let cached_price = self.cached_input_per_million.unwrap_or(self.input_per_million);

        let micro_credits = u128::from(uncached) * price_u128(self.input_per_million)
            + u128::from(cached) * price_u128(cached_price)
            + u128::from(usage.completion_tokens) * price_u128(self.output_per_million);
        let credits = micro_credits.div_ceil(1_000_000);
        i64::try_from(credits).map(Credits).map_err(|_| CostOverflow)
    }

    /// Checks the prices, returning the bad field and why, or an empty
    /// field when the prices are wrong together. `tokens_max` is the
    /// largest token count a message may state: the cost of that many
    /// tokens of every kind must fit in 64 bits.
    pub fn validate(&self, tokens_max: u64) -> Result<(), (&'static str, String)> {
        let prices = [
            ("input_per_million", Some(self.input_per_million)),
            ("output_per_million", Some(self.output_per_million)),
            ("cached_input_per_million", self.cached_input_per_million),
        ];
        for (field, price) in prices {
            if let Some(price) = price
                && price < 0
            {
                return Err((field, format!("{price} is negative")));
            }
        }
        if crate::tokens::encoder(&self.encoding).is_none() {
            return Err((
                "encoding",
                format!(
                    "`{}` is not a tiktoken encoding; use one of {}",
                    self.encoding,
                    crate::tokens::ENCODINGS.join(", ")
                ),
            ));
        }
        if self.max_output_tokens == 0 || self.max_output_tokens > tokens_max {
            return Err((
                "max_output_tokens",
                format!("must be between 1 and limits.tokens_max ({tokens_max})"),
            ));
        }
        let worst = TokenUsage {
            prompt_tokens: tokens_max,
            cached_prompt_tokens: 0,
            completion_tokens: tokens_max,
        };
        let worst_cached = TokenUsage {
            cached_prompt_tokens: tokens_max,
            ..worst
        };
        if self.cost(worst).is_err() || self.cost(worst_cached).is_err() {
            return Err((
                "",
                format!(
                    "the cost of limits.tokens_max ({tokens_max}) tokens of prompt and of output \
                     overflows 64-bit credits; lower input_per_million, output_per_million, \
                     cached_input_per_million or limits.tokens_max"
                ),
            ));
        }
        Ok(())
    }
}

fn price_u128(price: i64) -> u128 {
    // Prices are validated non-negative at start; a negative one here is a
    // programming error, not bad input.
    u128::try_from(price).expect("model prices are validated non-negative")
}

/// Looks up `model` in `models`, falling back to its undated name
/// (`gpt-4o-2024-08-06` to `gpt-4o`, `claude-sonnet-4-5-20250929` to
/// `claude-sonnet-4-5`). Returns the name of the entry used and its price.
pub fn lookup<'a>(
    models: &'a BTreeMap<String, ModelPrice>,
    model: &str,
) -> Option<(&'a str, &'a ModelPrice)> {
    let model = model.to_ascii_lowercase();
    if let Some((name, price)) = models.get_key_value(model.as_str()) {
        return Some((name.as_str(), price));
    }
    // A version after a colon (`gpt-3.5-turbo-instruct:20230824-v2`)
    // names a snapshot of the model before it.
    let base = model.split_once(':').map_or(model.as_str(), |(base, _)| base);
    let candidates = [Some(base), undated_name(base)];
    candidates
        .into_iter()
        .flatten()
        .find_map(|name| models.get_key_value(name))
        .map(|(name, price)| (name.as_str(), price))
}

/// Strips a trailing date stamp: `-YYYY-MM-DD` or `-YYYYMMDD`.
fn undated_name(model: &str) -> Option<&str> {
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if let Some(head) = model.len().checked_sub(11).map(|at| model.split_at(at)) {
        let (name, stamp) = head;
        let parts: Vec<&str> = stamp.split('-').collect();
        if let ["", year, month, day] = parts.as_slice()
            && year.len() == 4
            && month.len() == 2
            && day.len() == 2
            && is_digits(year)
            && is_digits(month)
            && is_digits(day)
        {
            return Some(name);
        }
    }
    let (name, stamp) = model.rsplit_once('-')?;
    (stamp.len() == 8 && is_digits(stamp)).then_some(name)
}

/// One row of the built-in table, in US dollars per million tokens.
struct Listed {
    name: &'static str,
    input_usd: f64,
    output_usd: f64,
    cached_usd: Option<f64>,
    encoding: &'static str,
    max_output_tokens: u64,
}

const O200K: &str = "o200k_base";
const CL100K: &str = "cl100k_base";

/// List prices of common models as published by their providers in 2026,
/// in dollars per million tokens. Models without a public tiktoken
/// encoding are counted with `o200k_base`, which stays within about 1 % of
/// their own tokenizers on the bundled captures.
#[rustfmt::skip]
const LISTED: &[Listed] = &[
    // OpenAI
    Listed { name: "gpt-5", input_usd: 1.25, output_usd: 10.0, cached_usd: Some(0.125), encoding: O200K, max_output_tokens: 16_384 },
    Listed { name: "gpt-5-mini", input_usd: 0.25, output_usd: 2.0, cached_usd: Some(0.025), encoding: O200K, max_output_tokens: 16_384 },
    Listed { name: "gpt-5-nano", input_usd: 0.05, output_usd: 0.40, cached_usd: Some(0.005), encoding: O200K, max_output_tokens: 16_384 },
    Listed { name: "gpt-4.1", input_usd: 2.0, output_usd: 8.0, cached_usd: Some(0.50), encoding: O200K, max_output_tokens: 4_096 },
    Listed { name: "gpt-4.1-mini", input_usd: 0.40, output_usd: 1.60, cached_usd: Some(0.10), encoding: O200K, max_output_tokens: 4_096 },
    Listed { name: "gpt-4.1-nano", input_usd: 0.10, output_usd: 0.40, cached_usd: Some(0.025), encoding: O200K, max_output_tokens: 4_096 },
    Listed { name: "gpt-4o", input_usd: 2.50, output_usd: 10.0, cached_usd: Some(1.25), encoding: O200K, max_output_tokens: 4_096 },
    Listed { name: "gpt-4o-mini", input_usd: 0.15, output_usd: 0.60, cached_usd: Some(0.075), encoding: O200K, max_output_tokens: 4_096 },
    Listed { name: "o3", input_usd: 2.0, output_usd: 8.0, cached_usd: Some(0.50), encoding: O200K, max_output_tokens: 16_384 },
    Listed { name: "o4-mini", input_usd: 1.10, output_usd: 4.40, cached_usd: Some(0.275), encoding: O200K, max_output_tokens: 16_384 },
    Listed { name: "gpt-4-turbo", input_usd: 10.0, output_usd: 30.0, cached_usd: None, encoding: CL100K, max_output_tokens: 4_096 },
    Listed { name: "gpt-3.5-turbo", input_usd: 0.50, output_usd: 1.50, cached_usd: None, encoding: CL100K, max_output_tokens: 4_096 },
    Listed { name: "gpt-3.5-turbo-instruct", input_usd: 1.50, output_usd: 2.0, cached_usd: None, encoding: CL100K, max_output_tokens: 4_096 },
    // Anthropic: the cached price is that of a cache read.
    Listed { name: "claude-opus-4-5", input_usd: 5.0, output_usd: 25.0, cached_usd: Some(0.50), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-opus-4-1", input_usd: 15.0, output_usd: 75.0, cached_usd: Some(1.50), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-sonnet-4-5", input_usd: 3.0, output_usd: 15.0, cached_usd: Some(0.30), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-sonnet-4", input_usd: 3.0, output_usd: 15.0, cached_usd: Some(0.30), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-haiku-4-5", input_usd: 1.0, output_usd: 5.0, cached_usd: Some(0.10), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-3-5-haiku", input_usd: 0.80, output_usd: 4.0, cached_usd: Some(0.08), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "claude-3-haiku", input_usd: 0.25, output_usd: 1.25, cached_usd: Some(0.03), encoding: O200K, max_output_tokens: 4_096 },
    // Other providers seen in the bundled captures.
    Listed { name: "grok-4", input_usd: 3.0, output_usd: 15.0, cached_usd: Some(0.75), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "grok-3-mini", input_usd: 0.30, output_usd: 0.50, cached_usd: Some(0.075), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "deepseek-chat", input_usd: 0.28, output_usd: 0.42, cached_usd: Some(0.028), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "deepseek-reasoner", input_usd: 0.28, output_usd: 0.42, cached_usd: Some(0.028), encoding: O200K, max_output_tokens: 32_768 },
    Listed { name: "llama-3.3-70b-versatile", input_usd: 0.59, output_usd: 0.79, cached_usd: None, encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "qwen3-max", input_usd: 1.20, output_usd: 6.0, cached_usd: None, encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "mistral-small-latest", input_usd: 0.10, output_usd: 0.30, cached_usd: None, encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "sonar", input_usd: 1.0, output_usd: 1.0, cached_usd: None, encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "gemini-3-pro-preview", input_usd: 2.0, output_usd: 12.0, cached_usd: Some(0.20), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "gemini-2.5-flash", input_usd: 0.30, output_usd: 2.50, cached_usd: Some(0.03), encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "command-a", input_usd: 2.50, output_usd: 10.0, cached_usd: None, encoding: O200K, max_output_tokens: 8_192 },
    Listed { name: "amazon-nova-lite", input_usd: 0.06, output_usd: 0.24, cached_usd: Some(0.015), encoding: O200K, max_output_tokens: 5_000 },
];

/// The built-in price table, in credits (micro-dollars) per million tokens.
pub fn builtin_models() -> BTreeMap<String, ModelPrice> {
    // Dollars become whole credits once, here, when the table is built;
    // no floating point is used in any later money arithmetic.
    let credits = |usd: f64| (usd * 1_000_000.0).round() as i64;
    LISTED
        .iter()
        .map(|row| {
            let price = ModelPrice {
                input_per_million: credits(row.input_usd),
                output_per_million: credits(row.output_usd),
                cached_input_per_million: row.cached_usd.map(credits),
                encoding: row.encoding.to_owned(),
                max_output_tokens: row.max_output_tokens,
            };
            (row.name.to_owned(), price)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: i64, output: i64, cached: Option<i64>) -> ModelPrice {
        ModelPrice {
            input_per_million: input,
            output_per_million: output,
            cached_input_per_million: cached,
            encoding: O200K.to_owned(),
            max_output_tokens: 1024,
        }
    }

    fn usage(prompt: u64, cached: u64, completion: u64) -> TokenUsage {
        TokenUsage {
            prompt_tokens: prompt,
            cached_prompt_tokens: cached,
            completion_tokens: completion,
        }
    }

    #[test]
    fn cost_rounds_up_to_whole_credits() {
        let model = price(150_000, 600_000, None);
        // 12 * 0.15 + 340 * 0.6 = 205.8 credits.
        assert_eq!(model.cost(usage(12, 0, 340)), Ok(Credits(206)));
        assert_eq!(model.cost(usage(1, 0, 0)), Ok(Credits(1)));
        assert_eq!(model.cost(usage(0, 0, 0)), Ok(Credits(0)));
    }

    #[test]
    fn cached_tokens_use_the_cached_price() {
        let model = price(1_000_000, 0, Some(100_000));
        assert_eq!(model.cost(usage(100, 60, 0)), Ok(Credits(46)));
    }

    #[test]
    fn cached_price_defaults_to_input_price() {
        let model = price(1_000_000, 0, None);
        assert_eq!(model.cost(usage(100, 60, 0)), Ok(Credits(100)));
    }

    #[test]
    fn overflowing_cost_is_an_error() {
        let model = price(i64::MAX, i64::MAX, None);
        assert_eq!(model.cost(usage(u64::MAX, 0, u64::MAX)), Err(CostOverflow));
    }

    #[test]
    fn negative_price_fails_validation() {
        let model = price(-1, 1, None);
        assert_eq!(model.validate(1000).unwrap_err().0, "input_per_million");
    }

    #[test]
    fn huge_price_fails_validation() {
        let model = price(1, i64::MAX / 2, None);
        let (field, reason) = model.validate(10_000_000).unwrap_err();
        assert_eq!(field, "", "the prices are wrong together, not one field");
        assert!(reason.contains("overflows 64-bit credits"), "{reason}");
    }

    #[test]
    fn unknown_encoding_fails_validation() {
        let mut model = price(1, 1, None);
        model.encoding = "nope".to_owned();
        assert_eq!(model.validate(1000).unwrap_err().0, "encoding");
    }

    #[test]
    fn dated_names_fall_back_to_undated() {
        let models = builtin_models();
        assert_eq!(lookup(&models, "gpt-4o-2024-08-06").unwrap().0, "gpt-4o");
        assert_eq!(
            lookup(&models, "claude-sonnet-4-5-20250929").unwrap().0,
            "claude-sonnet-4-5"
        );
        assert_eq!(lookup(&models, "GPT-4o-mini").unwrap().0, "gpt-4o-mini");
        assert_eq!(
            lookup(&models, "gpt-3.5-turbo-instruct:20230824-v2").unwrap().0,
            "gpt-3.5-turbo-instruct"
        );
        assert!(lookup(&models, "gpt-4o-2024").is_none());
        assert!(lookup(&models, "no-such-model").is_none());
    }

    #[test]
    fn builtin_table_is_valid() {
        for (name, model) in builtin_models() {
            assert!(model.validate(10_000_000).is_ok(), "{name}");
        }
        assert_eq!(builtin_models()["gpt-4o"].input_per_million, 2_500_000);
    }
}
