//! A burst of starts for one user is granted exactly as far as the
//! balance reaches.

mod common;

use common::{Harness, Outbound, start};
use serde_json::{Value, json};

const USER: &str = "u-burst";
const STARTS: usize = 60;
const HOLDS_COVERED: usize = 7;
const MAX_OUTPUT_TOKENS: u64 = 1000;

/// Prompt tokens of one user message "Say foo" under o200k_base: the
/// tokens of role and content, plus 3 framing tokens for the message and
/// 3 that prime the reply.
const PROMPT_TOKENS: u64 = 9;

/// gpt-4o-mini costs 150,000 credits per million prompt tokens and
/// 600,000 per million completion tokens:
/// ceil((9 * 150,000 + 1000 * 600,000) / 1,000,000) = ceil(601.35).
const HOLD_COST: i64 = 602;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_grants_only_covered_holds() {
    let harness = Harness::start("burst", |_| {}).await;
    assert!(
        harness.settings.reservations.max_active_per_user as usize > HOLDS_COVERED,
        "the per-user hold limit must not be what denies the starts"
    );
    let balance = HOLD_COST * HOLDS_COVERED as i64;
    harness.fund(USER, "g-1", balance).await;

    let messages: Vec<Outbound> = (0..STARTS)
        .map(|index| {
            let mut body = start(
                USER,
                &format!("s-{index}"),
                &format!("m-{index}"),
                "gpt-4o-mini",
                0,
                MAX_OUTPUT_TOKENS,
            );
            let fields = body.as_object_mut().expect("a start is an object");
            fields.remove("prompt_tokens");
            fields.insert(
                "messages".to_owned(),
                json!([{"role": "user", "content": "Say foo"}]),
            );
            Outbound::request(&body, &format!("c-{index}"))
        })
        .collect();
    harness.publish_all(&messages).await;

    let mut replies: Vec<Value> = Vec::with_capacity(STARTS);
    for index in 0..STARTS {
        replies.push(harness.reply(&format!("c-{index}")).await);
    }
    let granted: Vec<&Value> = replies
        .iter()
        .filter(|reply| reply["type"] == "reservation.granted")
        .collect();
    let denied: Vec<&Value> = replies
        .iter()
        .filter(|reply| reply["type"] == "reservation.denied")
        .collect();
    assert_eq!(granted.len(), HOLDS_COVERED, "granted replies");
    assert_eq!(denied.len(), STARTS - HOLDS_COVERED, "denied replies");
    for reply in &granted {
        assert_eq!(reply["reserved"], HOLD_COST, "{reply}");
        assert_eq!(reply["prompt_tokens"], PROMPT_TOKENS, "{reply}");
        assert_eq!(reply["max_output_tokens"], MAX_OUTPUT_TOKENS, "{reply}");
    }
    for reply in &denied {
        assert_eq!(reply["reason"], "insufficient_credits", "{reply}");
        assert_eq!(reply["requested"], HOLD_COST, "{reply}");
        assert_eq!(reply["available"], 0, "{reply}");
    }

    let account = harness.account(USER).await;
    assert_eq!(account.available, 0);
    assert_eq!(account.reserved, balance);
    assert_eq!(account.balance, balance);
    let open_holds: i64 =
        sqlx::query_scalar("SELECT count(*) FROM holds WHERE user_id = $1 AND settled_at IS NULL")
            .bind(USER)
            .fetch_one(&harness.pool)
            .await
            .expect("count open holds");
    assert_eq!(open_holds, HOLDS_COVERED as i64);

    harness.finish().await;
}
