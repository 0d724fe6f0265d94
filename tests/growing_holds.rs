//! A hold grows from the user's available credits while its stream runs,
//! so a long answer on a funded account never outruns its hold; a hold
//! that cannot grow sends `usage.over_reservation` once.
//!
//! Every stream here is the longest answer of the bundled OpenAssistant
//! conversations, sent as token-sized deltas that the worker counts.

mod common;

use std::path::Path;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;
use stream_credits::settings::Settings;
use stream_credits::{replay, tokens};

/// The round-price hold: 20 prompt tokens + 2 × 256 output tokens.
const PROMPT_TOKENS: u64 = 20;
const MAX_OUTPUT_TOKENS: u64 = 256;
const INITIAL: i64 = 20 + 2 * 256;

/// Default growth settings: grow at 80 % of the hold, by steps of half the
/// granted hold.
const THRESHOLD_PERCENT: i64 = 80;
const STEP: i64 = INITIAL / 2;

/// The longest answer of the bundled conversations, as deltas with the
/// token count the worker gives each.
struct Answer {
    deltas: Vec<String>,
    tokens: Vec<u64>,
}

impl Answer {
    fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/oasst-en100/en_100_tree.jsonl");
        let conversations =
            replay::load_conversations(&path).expect("load the bundled conversations");
        let bpe = tokens::encoder("o200k_base").expect("o200k_base is built in");
        let longest = conversations
            .iter()
            .max_by_key(|conversation| tokens::count_text(bpe, &conversation.answer))
            .expect("the bundled file has conversations");
        let deltas = replay::token_sized_deltas(&longest.answer, bpe);
        let tokens = deltas
            .iter()
            .map(|delta| tokens::count_text(bpe, delta))
            .collect();
        Self { deltas, tokens }
    }

    fn completion_tokens(&self) -> u64 {
        self.tokens.iter().sum()
    }

    /// Running cost after each chunk, at 1 credit per prompt token and 2
    /// per completion token.
    fn running_costs(&self) -> Vec<(u64, i64)> {
        let mut counted = 0;
        self.tokens
            .iter()
            .map(|tokens| {
                counted += tokens;
                (counted, cost(counted))
            })
            .collect()
    }
}

fn cost(completion_tokens: u64) -> i64 {
    PROMPT_TOKENS as i64 + 2 * completion_tokens as i64
}

/// One expected `reservation.extended`: added, reserved after, counted
/// completion tokens and cost at the chunk that caused it.
#[derive(Debug, PartialEq, Eq)]
struct Extension {
    added: i64,
    reserved: i64,
    counted_completion_tokens: u64,
    cost_so_far: i64,
}

/// Simulates growth one step at a time on an unlimited account, without
/// the worker's formula: after each chunk, while usage is at or above the
/// threshold, one more step.
fn expected_extensions(answer: &Answer, hold_max: i64) -> Vec<Extension> {
    let mut reserved = INITIAL;
    let mut extensions = Vec::new();
    for (counted, cost) in answer.running_costs() {
        let before = reserved;
        while cost * 100 >= reserved * THRESHOLD_PERCENT && reserved < hold_max {
            reserved = (reserved + STEP).min(hold_max);
        }
        if reserved > before {
            extensions.push(Extension {
                added: reserved - before,
                reserved,
                counted_completion_tokens: counted,
                cost_so_far: cost,
            });
        }
    }
    extensions
}

fn as_extension(event: &Value) -> Extension {
    Extension {
        added: event["added"].as_i64().expect("added"),
        reserved: event["reserved"].as_i64().expect("reserved"),
        counted_completion_tokens: event["counted_completion_tokens"]
            .as_u64()
            .expect("counted_completion_tokens"),
        cost_so_far: event["cost_so_far"].as_i64().expect("cost_so_far"),
    }
}

/// One stream of the longest answer through its own worker.
struct Run {
    harness: Harness,
    answer: Answer,
    user: String,
    stream: String,
    /// The `reservation.settled` event.
    settled: Value,
    /// Price of the prompt and the whole answer.
    total_cost: i64,
}

impl Run {
    /// Starts a worker changed by `configure`, grants `balance` credits to
    /// the user `u-{test}` and streams the longest answer as `s-{test}`,
    /// publishing every chunk twice when `duplicates` is set.
    async fn stream_answer(
        test: &str,
        balance: i64,
        duplicates: bool,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let harness = Harness::start(test, configure).await;
        let user = format!("u-{test}");
        let stream = format!("s-{test}");
        harness.fund(&user, "g-1", balance).await;
        let answer = Answer::load();
        let total_cost = cost(answer.completion_tokens());

        let start_body = start(
            &user,
            &stream,
            &format!("{stream}-start"),
            ROUND_MODEL,
            PROMPT_TOKENS,
            MAX_OUTPUT_TOKENS,
        );
        let reply = harness
            .request(&start_body, &format!("{stream}-request"))
            .await;
        assert_eq!(reply["type"], "reservation.granted", "{reply}");
        assert_eq!(reply["reserved"], INITIAL, "{reply}");
        assert_eq!(reply["sized_by"], "max_output_tokens", "{reply}");

        let copies = if duplicates { 2 } else { 1 };
        let mut messages = Vec::new();
        for (seq, delta) in answer.deltas.iter().enumerate() {
            let body = chunk(&user, &stream, seq as u64, delta, None);
            for _ in 0..copies {
                messages.push(Outbound::json(&body));
            }
        }
        let end_id = format!("{stream}-end");
        let end_body = end(&user, &stream, &end_id, EndStatus::Completed, None);
        messages.push(Outbound::json(&end_body));
        harness.publish_all(&messages).await;
        let settled = harness.event("reservation.settled", &stream).await;

        Self {
            harness,
            answer,
            user,
            stream,
            settled,
            total_cost,
        }
    }

    /// Returns the received `reservation.extended` events, in order.
    fn extensions(&self) -> Vec<Value> {
        let mut events = self.harness.events("reservation.extended", &self.stream);
        events.sort_by_key(|event| event["extensions"].as_u64());
        events
    }

    /// Returns the one `usage.over_reservation` event, failing unless
    /// exactly one arrived.
    fn single_signal(&self) -> Value {
        let signals = self.harness.events("usage.over_reservation", &self.stream);
        assert_eq!(signals.len(), 1, "over-reservation events: {signals:?}");
        signals[0].clone()
    }

    /// Reads the hold's `reserved`, `initial_reserved` and `extensions`.
    async fn hold_row(&self) -> (i64, i64, i32) {
        sqlx::query_as(
            "SELECT reserved, initial_reserved, extensions FROM holds WHERE stream_id = $1",
        )
        .bind(&self.stream)
        .fetch_one(&self.harness.pool)
        .await
        .expect("read the hold")
    }

    /// Checks the settlement of a hold that ended at `reserved` with the
    /// default debit policy, and the user's balance after it.
    async fn assert_settled(&self, balance: i64, reserved: i64) {
        let settled = &self.settled;
        assert_eq!(settled["reserved"], reserved, "{settled}");
        assert_eq!(settled["cost"], self.total_cost, "{settled}");
        assert_eq!(settled["charged"], self.total_cost, "{settled}");
        let overrun = (self.total_cost - reserved).max(0);
        assert_eq!(settled["overrun"], overrun, "{settled}");
        assert_eq!(settled["forgiven"], 0, "{settled}");
        let refunded = (reserved - self.total_cost).max(0);
        assert_eq!(settled["refunded"], refunded, "{settled}");
        let counted = self.answer.completion_tokens();
        assert_eq!(settled["counted_completion_tokens"], counted, "{settled}");
        assert_eq!(
            settled["balance_after"],
            balance - self.total_cost,
            "{settled}"
        );

        let account = self.harness.account(&self.user).await;
        assert_eq!(account.balance, balance - self.total_cost);
        assert_eq!(account.reserved, 0);
        assert_eq!(account.available, balance - self.total_cost);
        assert_eq!(self.harness.ledger_rows(&self.user, "grant").await, 1);
        assert_eq!(self.harness.ledger_rows(&self.user, "charge").await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funded_long_answer_never_overruns() {
    const BALANCE: i64 = 100_000;
    // Every chunk is published twice: a repeated message id changes
    // nothing, so it never grows the hold twice.
    let run = Run::stream_answer("grow_funded", BALANCE, true, |_| {}).await;
    assert!(
        run.total_cost > 2 * INITIAL,
        "the answer costs {}, too short to grow",
        run.total_cost
    );

    let expected = expected_extensions(&run.answer, i64::MAX);
    assert!(
        expected.len() >= 3,
        "the answer grows the hold only {} times",
        expected.len()
    );
    let events = run.extensions();
    let received: Vec<Extension> = events.iter().map(as_extension).collect();
    assert_eq!(received, expected);
    let final_reserved = expected.last().expect("the hold grew").reserved;
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["extensions"], index + 1, "{event}");
        assert_eq!(event["reason"], "usage_threshold", "{event}");
        assert!(event.get("limited_by").is_none(), "{event}");
        assert_eq!(
            event["reservation_id"], run.settled["reservation_id"],
            "{event}"
        );
        let reserved = event["reserved"].as_i64().expect("reserved");
        assert_eq!(event["available_after"], BALANCE - reserved, "{event}");
    }
    let signals = run.harness.events("usage.over_reservation", &run.stream);
    assert!(signals.is_empty(), "a funded stream sent {signals:?}");

    run.assert_settled(BALANCE, final_reserved).await;
    let hold = run.hold_row().await;
    assert_eq!(hold, (final_reserved, INITIAL, expected.len() as i32));
    run.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_account_signals_once() {
    // Exactly the hold: nothing is left to grow it with.
    const BALANCE: i64 = INITIAL;
    let run = Run::stream_answer("grow_drained", BALANCE, false, |_| {}).await;

    assert!(run.extensions().is_empty(), "a drained account's hold grew");
    let signal = run.single_signal();
    let (first_over_tokens, first_over_cost) = run
        .answer
        .running_costs()
        .into_iter()
        .find(|(_, cost)| *cost > INITIAL)
        .expect("the answer outruns the hold");
    assert_eq!(signal["reserved"], INITIAL, "{signal}");
    assert_eq!(signal["cost_so_far"], first_over_cost, "{signal}");
    assert_eq!(
        signal["counted_completion_tokens"], first_over_tokens,
        "{signal}"
    );

    // Settlement keeps its rules: the default debit policy charges the
    // whole cost.
    run.assert_settled(BALANCE, INITIAL).await;
    assert_eq!(run.hold_row().await, (INITIAL, INITIAL, 0));
    run.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_account_grows_by_what_is_left() {
    const LEFT: i64 = 100;
    const BALANCE: i64 = INITIAL + LEFT;
    let run = Run::stream_answer("grow_short", BALANCE, false, |_| {}).await;

    let events = run.extensions();
    assert_eq!(events.len(), 1, "extensions: {events:?}");
    let event = &events[0];
    let first = &expected_extensions(&run.answer, i64::MAX)[0];
    assert_eq!(event["added"], LEFT, "{event}");
    assert_eq!(event["reserved"], BALANCE, "{event}");
    assert_eq!(event["available_after"], 0, "{event}");
    assert_eq!(event["limited_by"], "available_credits", "{event}");
    assert_eq!(event["cost_so_far"], first.cost_so_far, "{event}");

    let signal = run.single_signal();
    let first_over_cost = run
        .answer
        .running_costs()
        .into_iter()
        .map(|(_, cost)| cost)
        .find(|cost| *cost > BALANCE)
        .expect("the answer outruns the grown hold");
    assert_eq!(signal["reserved"], BALANCE, "{signal}");
    assert_eq!(signal["cost_so_far"], first_over_cost, "{signal}");

    run.assert_settled(BALANCE, BALANCE).await;
    assert_eq!(run.hold_row().await, (BALANCE, INITIAL, 1));
    run.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_stops_at_hold_max() {
    const BALANCE: i64 = 100_000;
    // One and a half steps above the granted hold.
    const HOLD_MAX: i64 = INITIAL + STEP + STEP / 2;
    let run = Run::stream_answer("grow_max", BALANCE, false, |settings| {
        settings.reservations.hold_max_credits = HOLD_MAX;
    })
    .await;

    let expected = expected_extensions(&run.answer, HOLD_MAX);
    let events = run.extensions();
    let received: Vec<Extension> = events.iter().map(as_extension).collect();
    assert_eq!(received, expected);
    let last = events.last().expect("the hold grew");
    assert_eq!(last["reserved"], HOLD_MAX, "{last}");
    assert_eq!(last["limited_by"], "hold_max_credits", "{last}");

    let signal = run.single_signal();
    assert_eq!(signal["reserved"], HOLD_MAX, "{signal}");
    run.assert_settled(BALANCE, HOLD_MAX).await;
    run.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_off_keeps_the_granted_hold() {
    const BALANCE: i64 = 100_000;
    let run = Run::stream_answer("grow_off", BALANCE, false, |settings| {
        settings.reservations.growth = false;
    })
    .await;

    assert!(run.extensions().is_empty(), "the hold grew with growth off");
    let signal = run.single_signal();
    assert_eq!(signal["reserved"], INITIAL, "{signal}");
    run.assert_settled(BALANCE, INITIAL).await;
    assert_eq!(run.hold_row().await, (INITIAL, INITIAL, 0));
    run.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_up_lets_hold_grow_again() {
    const USER: &str = "u-top-up";
    const STREAM: &str = "s-top-up";
    const TOP_UP: i64 = 10_000;
    let harness = Harness::start("grow_top_up", |_| {}).await;
    harness.fund(USER, "g-1", INITIAL).await;
    let start_body = start(
        USER,
        STREAM,
        "m-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        MAX_OUTPUT_TOKENS,
    );
    let reply = harness.request(&start_body, "c-start").await;
    assert_eq!(reply["reserved"], INITIAL, "{reply}");

    // 300 tokens cost 620, above the hold of 532, with nothing available.
    harness
        .publish(&chunk(USER, STREAM, 0, "text", Some(300)))
        .await;
    let signal = harness.event("usage.over_reservation", STREAM).await;
    assert_eq!(signal["cost_so_far"], cost(300), "{signal}");
    harness.fund(USER, "g-2", TOP_UP).await;

    // The next chunk's batch grows the hold again: 640 needs a hold above
    // 800, which two steps of 266 give.
    harness
        .publish(&chunk(USER, STREAM, 1, "text", Some(10)))
        .await;
    let extended = harness.event("reservation.extended", STREAM).await;
    assert_eq!(extended["reason"], "over_reservation", "{extended}");
    assert_eq!(extended["added"], 2 * STEP, "{extended}");
    assert_eq!(extended["reserved"], INITIAL + 2 * STEP, "{extended}");
    assert_eq!(extended["available_after"], TOP_UP - 2 * STEP, "{extended}");
    assert_eq!(extended["cost_so_far"], cost(310), "{extended}");
    assert!(extended.get("limited_by").is_none(), "{extended}");

    harness
        .publish(&end(USER, STREAM, "m-end", EndStatus::Completed, None))
        .await;
    let settled = harness.event("reservation.settled", STREAM).await;
    assert_eq!(settled["reserved"], INITIAL + 2 * STEP, "{settled}");
    assert_eq!(settled["charged"], cost(310), "{settled}");
    assert_eq!(settled["overrun"], 0, "{settled}");
    assert_eq!(
        settled["refunded"],
        INITIAL + 2 * STEP - cost(310),
        "{settled}"
    );
    assert_eq!(harness.events("usage.over_reservation", STREAM).len(), 1);
    let account = harness.account(USER).await;
    assert_eq!(account.balance, INITIAL + TOP_UP - cost(310));
    assert_eq!(account.reserved, 0);
    harness.finish().await;
}
