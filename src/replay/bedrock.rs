//! Amazon Bedrock ConverseStream events, one event type key per event.

use serde::Deserialize;

use super::events::Event;
use super::{
    Format, ProviderUsage, Recording, RecordingBuilder, ReplayError, checked_sum, keep_last,
    require_field,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamEvent {
    content_block_start: Option<ContentBlockStart>,
    content_block_delta: Option<ContentBlockDelta>,
    message_stop: Option<MessageStop>,
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct ContentBlockStart {
    start: Option<BlockStart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockStart {
    tool_use: Option<ToolUseStart>,
}

#[derive(Deserialize)]
struct ToolUseStart {
    name: Option<String>,
}

#[derive(Deserialize)]
struct ContentBlockDelta {
    delta: Option<BlockDelta>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockDelta {
    text: Option<String>,
    reasoning_content: Option<ReasoningDelta>,
    tool_use: Option<ToolUseDelta>,
}

#[derive(Deserialize)]
struct ReasoningDelta {
    text: Option<String>,
}

#[derive(Deserialize)]
struct ToolUseDelta {
    input: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageStop {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct Metadata {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

/// Parses a stream of ConverseStream events. Bedrock streams name no model.
pub(super) fn parse(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::Bedrock;
    let mut builder = RecordingBuilder::new(format);
    let mut usage = UsageTotals::default();

    for event in events {
        let event = event.decode::<StreamEvent>(format)?;

        if let Some(start) = event.content_block_start.and_then(|block| block.start) {
            builder.push_delta(start.tool_use.and_then(|tool_use| tool_use.name));
        }
        if let Some(delta) = event.content_block_delta.and_then(|block| block.delta) {
            builder.push_delta(delta.reasoning_content.and_then(|reasoning| reasoning.text));
            builder.push_delta(delta.text);
            builder.push_delta(delta.tool_use.and_then(|tool_use| tool_use.input));
        }
        if let Some(stop) = event.message_stop {
            builder.set_finish_reason(stop.stop_reason);
        }
        if let Some(metadata_usage) = event.metadata.and_then(|metadata| metadata.usage) {
            usage.update(metadata_usage);
        }
    }

    let usage = usage.finish(format)?;
    Ok(builder.build(usage))
}

/// Last value seen of each usage field. Bedrock sends usage once, in the
/// final `metadata` event.
#[derive(Default)]
struct UsageTotals {
    seen: bool,
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
}

impl UsageTotals {
    fn update(&mut self, usage: Usage) {
        self.seen = true;
        keep_last(&mut self.input, usage.input_tokens);
        keep_last(&mut self.output, usage.output_tokens);
        keep_last(&mut self.total, usage.total_tokens);
        keep_last(&mut self.cache_read, usage.cache_read_input_tokens);
        keep_last(&mut self.cache_write, usage.cache_write_input_tokens);
    }

    fn finish(self, format: Format) -> Result<Option<ProviderUsage>, ReplayError> {
        if !self.seen {
            return Ok(None);
        }
        let input = require_field(format, self.input, "metadata.usage.inputTokens")?;
        let output = require_field(format, self.output, "metadata.usage.outputTokens")?;
        let cache_read = self.cache_read.unwrap_or(0);
        let cache_write = self.cache_write.unwrap_or(0);

        // Whether `inputTokens` contains the cache reads and writes depends on
        // the model, so the sum decides. When input + output alone equals
        // `totalTokens`, the cache tokens are already inside `inputTokens`.
        // Otherwise they are added, as for Anthropic's `input_tokens`.
        // NOTE: no bundled recording has cache tokens, so this rule has not
        // been checked against a live Bedrock response.
        let total_without_cache = checked_sum(format, &[input, output])?;
        let prompt = if self.total == Some(total_without_cache) {
            input
        } else {
            checked_sum(format, &[input, cache_read, cache_write])?
        };

        let usage = ProviderUsage {
            prompt_tokens: prompt,
            completion_tokens: output,
            cached_prompt_tokens: cache_read,
        };
        usage.validated(format).map(Some)
    }
}
