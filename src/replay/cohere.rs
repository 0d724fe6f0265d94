//! Cohere v2 chat stream events.

use serde::Deserialize;
use serde_json::Number;

use super::events::Event;
use super::{Format, ProviderUsage, Recording, RecordingBuilder, ReplayError, require_field};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum StreamEvent {
    ContentStart {
        delta: Option<Delta>,
    },
    ContentDelta {
        delta: Option<Delta>,
    },
    ToolPlanDelta {
        delta: Option<Delta>,
    },
    ToolCallStart {
        delta: Option<Delta>,
    },
    ToolCallDelta {
        delta: Option<Delta>,
    },
    MessageEnd {
        delta: Option<MessageEndDelta>,
    },
    /// `message-start`, `content-end`, citation events and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct Delta {
    message: Option<DeltaMessage>,
}

#[derive(Deserialize)]
struct DeltaMessage {
    content: Option<DeltaContent>,
    tool_plan: Option<String>,
    tool_calls: Option<ToolCalls>,
}

#[derive(Deserialize)]
struct DeltaContent {
    text: Option<String>,
    thinking: Option<String>,
}

/// Cohere streams one tool call object per event. A list is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum ToolCalls {
    One(ToolCall),
    Many(Vec<ToolCall>),
}

#[derive(Deserialize)]
struct ToolCall {
    function: Option<ToolFunction>,
}

#[derive(Deserialize)]
struct ToolFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct MessageEndDelta {
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    billed_units: Option<BilledUnits>,
}

/// Counts read as JSON numbers, so that `12.0` is accepted as well as `12`.
#[derive(Deserialize)]
struct BilledUnits {
    input_tokens: Option<Number>,
    output_tokens: Option<Number>,
}

/// Parses a stream of Cohere v2 chat events. Cohere streams name no model.
pub(super) fn parse(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::Cohere;
    let mut builder = RecordingBuilder::new(format);
    let mut billed_units = None;

    for event in events {
        let event = event.decode::<StreamEvent>(format)?;
        match event {
            StreamEvent::ContentStart { delta }
            | StreamEvent::ContentDelta { delta }
            | StreamEvent::ToolPlanDelta { delta }
            | StreamEvent::ToolCallStart { delta }
            | StreamEvent::ToolCallDelta { delta } => {
                if let Some(message) = delta.and_then(|delta| delta.message) {
                    push_message_delta(&mut builder, message);
                }
            }
            StreamEvent::MessageEnd { delta: Some(delta) } => {
                builder.set_finish_reason(delta.finish_reason);
                if let Some(units) = delta.usage.and_then(|usage| usage.billed_units) {
                    billed_units = Some(units);
                }
            }
            StreamEvent::MessageEnd { delta: None } | StreamEvent::Other => {}
        }
    }

    let usage = billed_units
        .map(|units| to_usage(format, units))
        .transpose()?;
    Ok(builder.build(usage))
}

fn push_message_delta(builder: &mut RecordingBuilder, message: DeltaMessage) {
    if let Some(content) = message.content {
        builder.push_delta(content.thinking);
        builder.push_delta(content.text);
    }
    builder.push_delta(message.tool_plan);

    let tool_calls = match message.tool_calls {
        None => Vec::new(),
        Some(ToolCalls::One(tool_call)) => vec![tool_call],
        Some(ToolCalls::Many(tool_calls)) => tool_calls,
    };
    for function in tool_calls
        .into_iter()
        .filter_map(|tool_call| tool_call.function)
    {
        builder.push_delta(function.name);
        builder.push_delta(function.arguments);
    }
}

/// Converts Cohere's `billed_units`, the counts that Cohere charges for.
///
/// The `tokens` object next to it counts more than Cohere bills (507 input
/// tokens against 12 billed in the bundled recording). The `cached_tokens`
/// field (448 there) belongs to those larger counts and exceeds the billed
/// input, so it cannot be the cached part of `billed_units` and the cached
/// count stays 0.
fn to_usage(format: Format, units: BilledUnits) -> Result<ProviderUsage, ReplayError> {
    let input = require_field(
        format,
        units
            .input_tokens
            .map(|count| whole_count(format, &count))
            .transpose()?,
        "usage.billed_units.input_tokens",
    )?;
    let output = require_field(
        format,
        units
            .output_tokens
            .map(|count| whole_count(format, &count))
            .transpose()?,
        "usage.billed_units.output_tokens",
    )?;
    ProviderUsage {
        prompt_tokens: input,
        completion_tokens: output,
        cached_prompt_tokens: 0,
    }
    .validated(format)
}

/// Reads a token count written as an integer or as a float with no fraction.
fn whole_count(format: Format, count: &Number) -> Result<u64, ReplayError> {
    if let Some(count) = count.as_u64() {
        return Ok(count);
    }
    // 2^64 as f64; counts at or above it do not fit in a u64.
    const U64_LIMIT: f64 = 18_446_744_073_709_551_616.0;
    match count.as_f64() {
        Some(value) if value >= 0.0 && value.fract() == 0.0 && value < U64_LIMIT => {
            Ok(value as u64)
        }
        _ => Err(ReplayError::InvalidUsage {
            format,
            reason: format!("billed token count {count} is not a whole non-negative number"),
        }),
    }
}
