//! `stream-credits report` against streams the test drove through the
//! worker: three settled by their end (one above its hold), one expired,
//! one expired and then adjusted by a late end, a denied start and two
//! dead letters. Every figure is checked against sums the test computes
//! from what it sent. An account corrupted by hand makes the report exit
//! 1 naming it, and an unreachable broker or a dead-letter queue that no
//! worker declared makes it exit 1 after printing the database figures.
//! Grants whose sum passes the i64 range are summed exactly.

mod common;

use common::{Harness, Outbound, ROUND_MODEL, chunk, end, free_local_address, run_binary, start};
use serde_json::Value;
use stream_credits::messages::EndStatus;

const USER: &str = "u-report";
/// Funded too little for any hold, so its start is denied.
const POOR: &str = "u-report-poor";
const BALANCE: i64 = 10_000;
const POOR_BALANCE: i64 = 5;
const PROMPT_TOKENS: u64 = 10;
const TTL_SECONDS: u64 = 1;

/// Exit code of a runtime failure, such as a broken invariant.
const RUNTIME_FAILURE: i32 = 1;
/// Exit code of bad usage.
const USAGE_ERROR: i32 = 2;

/// Credits added to the poor account by hand to break its invariant.
const CORRUPTION: i64 = 7;

/// One stream the test drives, with what it sends.
struct Stream {
    id: &'static str,
    max_output_tokens: u64,
    /// Tokens stated by each chunk.
    chunks: &'static [u64],
    /// Provider usage (prompt, completion) of its end; `None` without usage.
    usage: Option<(u64, u64)>,
    /// Whether the stream goes idle until its hold expires. An expiring
    /// stream with `usage` gets its end after expiry.
    expires: bool,
}

const STREAMS: [Stream; 5] = [
    Stream {
        id: "s-provider",
        max_output_tokens: 100,
        chunks: &[3, 4, 5],
        usage: Some((10, 14)),
        expires: false,
    },
    Stream {
        id: "s-counted",
        max_output_tokens: 100,
        chunks: &[5, 5],
        usage: None,
        expires: false,
    },
    // No chunks, so the count never nears the hold; the provider's usage
    // at the end costs more than the hold.
    Stream {
        id: "s-overrun",
        max_output_tokens: 5,
        chunks: &[],
        usage: Some((10, 20)),
        expires: false,
    },
    Stream {
        id: "s-expired",
        max_output_tokens: 100,
        chunks: &[2],
        usage: None,
        expires: true,
    },
    Stream {
        id: "s-late",
        max_output_tokens: 100,
        chunks: &[3, 4, 5],
        usage: Some((10, 40)),
        expires: true,
    },
];

/// Price of usage under the round-price model: 1 credit per prompt token
/// and 2 per completion token.
fn round_cost(prompt_tokens: u64, completion_tokens: u64) -> i64 {
    (prompt_tokens + 2 * completion_tokens) as i64
}

impl Stream {
    fn reserved(&self) -> i64 {
        round_cost(PROMPT_TOKENS, self.max_output_tokens)
    }

    fn counted_completion(&self) -> u64 {
        self.chunks.iter().sum()
    }

    /// Returns the expiry charge: the price of the counted usage.
    fn expiry_charge(&self) -> i64 {
        round_cost(PROMPT_TOKENS, self.counted_completion())
    }

    /// Returns the final charge under the default `debit` policy.
    fn charged(&self) -> i64 {
        match self.usage {
            Some((prompt, completion)) => round_cost(prompt, completion),
            None => self.expiry_charge(),
        }
    }

    fn adjusted(&self) -> bool {
        self.expires && self.usage.is_some()
    }

    fn messages(&self) -> Vec<Outbound> {
        let body = start(
            USER,
            self.id,
            &format!("{}-start", self.id),
            ROUND_MODEL,
            PROMPT_TOKENS,
            self.max_output_tokens,
        );
        let mut messages = vec![Outbound::request(&body, self.id)];
        for (seq, tokens) in self.chunks.iter().enumerate() {
            let body = chunk(USER, self.id, seq as u64, "words", Some(*tokens));
            messages.push(Outbound::json(&body));
        }
        if !self.expires {
            messages.push(Outbound::json(&self.end()));
        }
        messages
    }

    fn end(&self) -> Value {
        let id = format!("{}-end", self.id);
        end(USER, self.id, &id, EndStatus::Completed, self.usage)
    }
}

/// Figures the test expects, computed from [`STREAMS`] alone.
struct Expected {
    reserved: i64,
    charged: i64,
    released: i64,
    overrun_charged: i64,
    ledger_charged: i64,
    ledger_adjusted: i64,
    hold_to_charge_median: f64,
    hold_to_charge_p90: f64,
    overrun_share: f64,
    compared_streams: u64,
    counted_completion: u64,
    provider_completion: u64,
    completion_diff_percent: f64,
    provider_prompt: u64,
}

fn expected() -> Expected {
    let mut ratios: Vec<f64> = STREAMS
        .iter()
        .map(|stream| stream.reserved() as f64 / stream.charged() as f64)
        .collect();
    ratios.sort_by(f64::total_cmp);
    // Nearest rank of 5 values: the 3rd for the median, the 5th for p90.
    assert_eq!(ratios.len(), 5);

    // Streams settled by their own end with provider usage.
    let compared: Vec<&Stream> = STREAMS
        .iter()
        .filter(|stream| !stream.expires && stream.usage.is_some())
        .collect();
    let provider = |stream: &Stream| stream.usage.expect("compared streams have usage");
    let percents: Vec<f64> = compared
        .iter()
        .map(|stream| {
            let counted = stream.counted_completion() as f64;
            let reported = provider(stream).1 as f64;
            (counted - reported).abs() / reported * 100.0
        })
        .collect();

    let sum = |value: fn(&Stream) -> i64| STREAMS.iter().map(value).sum::<i64>();
    Expected {
        reserved: sum(Stream::reserved),
        charged: sum(Stream::charged),
        released: sum(|stream| (stream.reserved() - stream.charged()).max(0)),
        overrun_charged: sum(|stream| (stream.charged() - stream.reserved()).max(0)),
        ledger_charged: sum(|stream| {
            if stream.expires {
                stream.expiry_charge()
            } else {
                stream.charged()
            }
        }),
        ledger_adjusted: sum(|stream| {
            if stream.adjusted() {
                stream.charged() - stream.expiry_charge()
            } else {
                0
            }
        }),
        hold_to_charge_median: ratios[2],
        hold_to_charge_p90: ratios[4],
        overrun_share: STREAMS
            .iter()
            .filter(|s| s.charged() > s.reserved())
            .count() as f64
            / 5.0,
        compared_streams: compared.len() as u64,
        counted_completion: compared
            .iter()
            .map(|stream| stream.counted_completion())
            .sum(),
        provider_completion: compared.iter().map(|stream| provider(stream).1).sum(),
        completion_diff_percent: percents.iter().sum::<f64>() / percents.len() as f64,
        provider_prompt: compared.iter().map(|stream| provider(stream).0).sum(),
    }
}

/// Drives every stream, the denied start and the dead letters, and
/// returns how many barriers the test sent: each is an `unknown_model`
/// denial.
async fn drive(harness: &Harness) -> i64 {
    harness.fund(USER, "g-1", BALANCE).await;
    harness.fund(POOR, "g-poor", POOR_BALANCE).await;
    let mut barriers = 2;

    let messages: Vec<Outbound> = STREAMS.iter().flat_map(Stream::messages).collect();
    harness.publish_all(&messages).await;
    for stream in &STREAMS {
        let reply = harness.reply(stream.id).await;
        assert_eq!(
            reply["type"], "reservation.granted",
            "{}: {reply}",
            stream.id
        );
        assert_eq!(
            reply["reserved"],
            stream.reserved(),
            "{}: {reply}",
            stream.id
        );
        let settled = harness.event("reservation.settled", stream.id).await;
        let status = if stream.expires {
            "expired"
        } else {
            "completed"
        };
        assert_eq!(settled["status"], status, "{}: {settled}", stream.id);
    }

    // The late end of an expired stream.
    for stream in STREAMS.iter().filter(|stream| stream.adjusted()) {
        harness.publish(&stream.end()).await;
        let adjusted = harness.event("reservation.adjusted", stream.id).await;
        assert_eq!(
            adjusted["charged"],
            stream.charged(),
            "{}: {adjusted}",
            stream.id
        );
    }

    let denied_start = start(
        POOR,
        "s-poor",
        "s-poor-start",
        ROUND_MODEL,
        PROMPT_TOKENS,
        100,
    );
    let reply = harness.request(&denied_start, "s-poor").await;
    assert_eq!(reply["reason"], "insufficient_credits", "{reply}");

    let unknown_stream = chunk(USER, "s-nowhere", 0, "words", Some(1));
    let not_json = Outbound {
        routing_key: USER.to_owned(),
        body: b"{\"type\": ".to_vec(),
        message_id: Some("not-json".to_owned()),
        correlation_id: None,
    };
    harness
        .publish_all(&[Outbound::json(&unknown_stream), not_json])
        .await;
    harness.barrier(USER).await;
    barriers += 1;
    harness.wait_dead_letter_count(2).await;
    barriers
}

/// Runs `report` with `args` and the test's settings plus `env`, and
/// returns its exit code, standard output and standard error.
async fn report(harness: &Harness, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut settings = harness.cli_env();
    for (key, value) in env {
        settings.retain(|(existing, _)| existing != key);
        settings.push((key.to_string(), value.to_string()));
    }
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let mut command = vec!["report"];
    command.extend_from_slice(args);
    let output = run_binary(&command, &settings).await;
    let code = output.status.code().expect("the report exited by itself");
    let stdout = String::from_utf8(output.stdout).expect("the output is UTF-8");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (code, stdout, stderr)
}

/// Runs `report --json` and returns its exit code and document.
async fn report_json(harness: &Harness, args: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
    let mut command = vec!["--json"];
    command.extend_from_slice(args);
    let (code, stdout, stderr) = report(harness, &command, env).await;
    let document = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("report --json printed no JSON ({error}): {stdout}{stderr}")
    });
    (code, document)
}

fn assert_close(actual: &Value, expected: f64, what: &str) {
    let actual = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {actual}"));
    assert!(
        (actual - expected).abs() < 1e-9,
        "{what}: {actual}, expected {expected}"
    );
}

fn check_holds(report: &Value) {
    let holds = &report["holds"];
    let expiring = STREAMS.iter().filter(|stream| stream.expires).count();
    let adjusted = STREAMS.iter().filter(|stream| stream.adjusted()).count();
    assert_eq!(holds["opened"], STREAMS.len(), "{holds}");
    assert_eq!(holds["settled"], STREAMS.len(), "{holds}");
    assert_eq!(
        holds["settled_by_status"]["completed"],
        STREAMS.len() - expiring,
        "{holds}"
    );
    assert_eq!(holds["settled_by_status"]["expired"], expiring, "{holds}");
    assert_eq!(holds["expired"], expiring, "{holds}");
    assert_eq!(holds["adjusted"], adjusted, "{holds}");
    assert_eq!(holds["open"], 0, "{holds}");
    assert_eq!(holds["open_reserved"], 0, "{holds}");
}

fn check_credits(report: &Value, expected: &Expected) {
    let credits = &report["credits"];
    assert_eq!(credits["reserved"], expected.reserved, "{credits}");
    assert_eq!(credits["charged"], expected.charged, "{credits}");
    assert_eq!(credits["released"], expected.released, "{credits}");
    assert_eq!(
        credits["overrun_charged"], expected.overrun_charged,
        "{credits}"
    );
    assert_eq!(credits["forgiven"], 0, "{credits}");

    let ledger = &report["ledger"];
    assert_eq!(ledger["granted"], BALANCE + POOR_BALANCE, "{ledger}");
    assert_eq!(ledger["charged"], expected.ledger_charged, "{ledger}");
    assert_eq!(ledger["adjusted"], expected.ledger_adjusted, "{ledger}");
    assert_eq!(
        expected.ledger_charged + expected.ledger_adjusted,
        expected.charged,
        "ledger entries add up to the final charges"
    );
}

fn check_estimates(report: &Value, expected: &Expected) {
    let estimates = report["estimates"]
        .as_array()
        .expect("estimates is an array");
    assert_eq!(estimates.len(), 1, "{estimates:?}");
    let estimate = &estimates[0];
    assert_eq!(estimate["model"], ROUND_MODEL, "{estimate}");
    assert_eq!(estimate["holds"], STREAMS.len(), "{estimate}");
    assert_eq!(estimate["charged_nothing"], 0, "{estimate}");
    assert_eq!(estimate["grown"], 0, "{estimate}");
    let median = &estimate["hold_to_charge_median"];
    assert_close(median, expected.hold_to_charge_median, "hold/charge median");
    let p90 = &estimate["hold_to_charge_p90"];
    assert_close(p90, expected.hold_to_charge_p90, "hold/charge p90");
    assert_close(
        &estimate["overrun_share"],
        expected.overrun_share,
        "overrun share",
    );
}

fn check_token_counts(report: &Value, expected: &Expected) {
    let counts = report["token_counts"]
        .as_array()
        .expect("token_counts is an array");
    assert_eq!(counts.len(), 1, "{counts:?}");
    let count = &counts[0];
    assert_eq!(count["model"], ROUND_MODEL, "{count}");
    assert_eq!(count["streams"], expected.compared_streams, "{count}");

    let completion = &count["completion"];
    assert_eq!(
        completion["counted"], expected.counted_completion,
        "{count}"
    );
    assert_eq!(
        completion["provider"], expected.provider_completion,
        "{count}"
    );
    let percent = &completion["mean_abs_diff_percent"];
    assert_close(
        percent,
        expected.completion_diff_percent,
        "completion difference",
    );

    let prompt = &count["prompt"];
    assert_eq!(
        prompt["counted"],
        expected.compared_streams * PROMPT_TOKENS,
        "{count}"
    );
    assert_eq!(prompt["provider"], expected.provider_prompt, "{count}");
    assert_close(&prompt["mean_abs_diff_percent"], 0.0, "prompt difference");
}

fn check_dead_letters_and_denials(report: &Value, barriers: i64) {
    let denials = &report["denials"];
    assert_eq!(denials["insufficient_credits"], 1, "{denials}");
    assert_eq!(denials["unknown_model"], barriers, "{denials}");

    let letters = &report["dead_letters"];
    assert_eq!(letters["status"], "read", "{letters}");
    assert_eq!(letters["total"], 2, "{letters}");
    assert_eq!(letters["truncated"], false, "{letters}");
    assert_eq!(letters["by_reason"]["unknown_stream"], 1, "{letters}");
    assert_eq!(letters["by_reason"]["invalid_json"], 1, "{letters}");
}

fn check_invariants_hold(report: &Value) {
    let invariants = &report["invariants"];
    assert_eq!(
        invariants["violations"],
        serde_json::json!([]),
        "{invariants}"
    );
    assert_eq!(invariants["accounts_checked"], 2, "{invariants}");
    assert_eq!(invariants["holds_checked"], STREAMS.len(), "{invariants}");
}

/// With a period that starts after everything happened, only the current
/// state is left: dead letters and invariants.
fn check_empty_period(report: &Value) {
    let holds = &report["holds"];
    assert_eq!(holds["opened"], 0, "{holds}");
    assert_eq!(holds["settled"], 0, "{holds}");
    assert_eq!(report["credits"]["charged"], 0, "{report}");
    assert_eq!(report["ledger"]["granted"], 0, "{report}");
    assert_eq!(report["estimates"], serde_json::json!([]), "{report}");
    assert_eq!(report["denials"], serde_json::json!({}), "{report}");
    assert_eq!(report["dead_letters"]["total"], 2, "{report}");
    assert_eq!(
        report["invariants"]["holds_checked"],
        STREAMS.len(),
        "{report}"
    );
}

async fn set_poor_balance_offset(harness: &Harness, offset: i64) {
    sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE user_id = $1")
        .bind(POOR)
        .bind(offset)
        .execute(&harness.pool)
        .await
        .expect("change the balance by hand");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_matches_driven_streams() {
    let harness = Harness::start("report", |settings| {
        settings.reservations.ttl_seconds = TTL_SECONDS;
        settings.reservations.sweep_interval_seconds = 1;
    })
    .await;
    let barriers = drive(&harness).await;
    let expected = expected();

    let (code, document) = report_json(&harness, &[], &[]).await;
    assert_eq!(code, 0, "{document}");
    check_holds(&document);
    check_credits(&document, &expected);
    check_estimates(&document, &expected);
    check_token_counts(&document, &expected);
    check_dead_letters_and_denials(&document, barriers);
    check_invariants_hold(&document);
    assert_eq!(document["since"], Value::Null);

    // An age that covers the whole test gives the same figures.
    let (code, recent) = report_json(&harness, &["--since", "1h"], &[]).await;
    assert_eq!(code, 0, "{recent}");
    check_holds(&recent);
    check_credits(&recent, &expected);
    assert!(recent["since"].is_string(), "{recent}");

    let (code, later) = report_json(&harness, &["--since", "2999-01-01T00:00:00Z"], &[]).await;
    assert_eq!(code, 0, "{later}");
    check_empty_period(&later);

    // The report read the dead letters without removing them.
    harness.wait_dead_letter_count(2).await;

    let (code, text, stderr) = report(&harness, &[], &[]).await;
    assert_eq!(code, 0, "{text}{stderr}");
    for expected in [
        "Estimate accuracy by model",
        ROUND_MODEL,
        "unknown_stream",
        "invalid_request denials are not recorded",
        "every check holds",
    ] {
        assert!(
            text.contains(expected),
            "the text report lacks `{expected}`: {text}"
        );
    }

    check_unreachable_broker(&harness).await;
    check_undeclared_queue(&harness).await;
    check_corrupted_account(&harness).await;
    harness.wait_dead_letter_count(2).await;
    harness.finish().await;
}

/// Checks that without the broker the report still prints the database
/// figures, marks the dead letters unavailable and exits 1.
/// Checks that with a prefix no worker used, the report names the missing
/// dead-letter queue and the command that declares it.
async fn check_undeclared_queue(harness: &Harness) {
    let prefix = format!("{}-undeclared", harness.settings.topology.prefix);
    let env = [("STREAM_CREDITS__TOPOLOGY__PREFIX", prefix.as_str())];

    let (code, document) = report_json(harness, &[], &env).await;
    assert_eq!(code, RUNTIME_FAILURE, "{document}");
    assert_eq!(document["dead_letters"]["status"], "unavailable", "{document}");
    let error = document["dead_letters"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("queue `{prefix}.dead` does not exist")), "{document}");
    assert!(error.contains("stream-credits run"), "{document}");
    assert_eq!(document["holds"]["opened"], STREAMS.len(), "{document}");
}

async fn check_unreachable_broker(harness: &Harness) {
    let nobody = format!("amqp://guest:guest@{}/%2f", free_local_address());
    let env = [("STREAM_CREDITS__AMQP__URL", nobody.as_str())];

    let (code, document) = report_json(harness, &[], &env).await;
    assert_eq!(code, RUNTIME_FAILURE, "{document}");
    assert_eq!(
        document["dead_letters"]["status"], "unavailable",
        "{document}"
    );
    assert_eq!(document["holds"]["opened"], STREAMS.len(), "{document}");
    assert_eq!(
        document["invariants"]["violations"],
        serde_json::json!([]),
        "{document}"
    );

    let (code, text, stderr) = report(harness, &[], &env).await;
    assert_eq!(code, RUNTIME_FAILURE, "{text}{stderr}");
    assert!(text.contains("UNAVAILABLE"), "{text}");
    assert!(text.contains("Estimate accuracy by model"), "{text}");
    assert!(
        stderr.contains("dead letters could not be read"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "the password leaked: {stderr}"
    );
}

/// Checks that a balance changed by hand breaks
/// `balance_equals_ledger_sum` for that account alone, and that the report
/// names it and exits 1.
async fn check_corrupted_account(harness: &Harness) {
    set_poor_balance_offset(harness, CORRUPTION).await;

    let (code, document) = report_json(harness, &[], &[]).await;
    assert_eq!(code, RUNTIME_FAILURE, "{document}");
    let invariants = &document["invariants"];
    assert_eq!(
        invariants["violating_accounts"],
        serde_json::json!([POOR]),
        "{invariants}"
    );
    let violations = invariants["violations"]
        .as_array()
        .expect("violations is an array");
    assert_eq!(violations.len(), 1, "{invariants}");
    assert_eq!(
        violations[0]["invariant"], "balance_equals_ledger_sum",
        "{invariants}"
    );
    assert_eq!(violations[0]["user_id"], POOR, "{invariants}");
    let detail = format!(
        "balance {}, ledger sum {POOR_BALANCE}",
        POOR_BALANCE + CORRUPTION
    );
    assert_eq!(violations[0]["detail"], detail, "{invariants}");

    let (code, text, stderr) = report(harness, &[], &[]).await;
    assert_eq!(code, RUNTIME_FAILURE, "{text}{stderr}");
    assert!(text.contains("VIOLATIONS"), "{text}");
    assert!(text.contains(POOR), "{text}");
    assert!(stderr.contains(POOR), "{stderr}");

    // Put the balance back, so the harness's own check passes.
    set_poor_balance_offset(harness, -CORRUPTION).await;
}

#[tokio::test]
async fn report_rejects_bad_since() {
    for since in ["yesterday", "24", "2026-13-01T00:00:00Z"] {
        let output = run_binary(&["report", "--since", since], &[]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(USAGE_ERROR), "{since}: {stderr}");
        assert!(stderr.contains("RFC 3339"), "{since}: {stderr}");
        assert!(stderr.contains("24h"), "{since}: {stderr}");
    }
}

/// Sum of the two grants of [`report_sums_beyond_64_bits`], past the i64
/// range: `i64::MAX + 1000`.
const HUGE_GRANTS_SUM: &str = "9223372036854776807";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_sums_beyond_64_bits() {
    let harness = Harness::start("reportbig", |_| {}).await;
    harness.fund("u-report-huge", "g-huge", i64::MAX).await;
    harness.fund("u-report-small", "g-small", 1000).await;
    let expected_sum = i128::from(i64::MAX) + 1000;
    assert_eq!(HUGE_GRANTS_SUM, expected_sum.to_string());

    let (code, document) = report_json(&harness, &[], &[]).await;
    assert_eq!(code, 0, "{document}");
    let ledger = &document["ledger"];
    assert_eq!(ledger["granted"], HUGE_GRANTS_SUM, "{ledger}");
    assert_eq!(ledger["charged"], 0, "{ledger}");
    assert_eq!(ledger["adjusted"], 0, "{ledger}");
    assert_eq!(document["holds"]["open_reserved"], 0, "{document}");

    let (code, text, stderr) = report(&harness, &[], &[]).await;
    assert_eq!(code, 0, "{text}{stderr}");
    assert!(text.contains(HUGE_GRANTS_SUM), "{text}");
    harness.finish().await;
}
