//! Anthropic Messages API stream events.

use serde::Deserialize;

use super::events::Event;
use super::{
    Format, ProviderUsage, Recording, RecordingBuilder, ReplayError, checked_sum, keep_last,
    require_field,
};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        delta: BlockDelta,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        usage: Option<Usage>,
    },
    /// `ping`, `content_block_stop`, `message_stop` and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct Message {
    model: Option<String>,
    stop_reason: Option<String>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock {
    Text {
        text: Option<String>,
    },
    Thinking {
        thinking: Option<String>,
    },
    ToolUse {
        name: Option<String>,
    },
    ServerToolUse {
        name: Option<String>,
    },
    /// Redacted thinking and other blocks without output text.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: Option<String>,
    },
    ThinkingDelta {
        thinking: Option<String>,
    },
    InputJsonDelta {
        partial_json: Option<String>,
    },
    /// `signature_delta`, `citations_delta` and other deltas without output text.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDeltaBody {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// Parses a stream of Anthropic Messages events.
pub(super) fn parse(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::Anthropic;
    let mut builder = RecordingBuilder::new(format);
    let mut usage = UsageTotals::default();

    for event in events {
        let event = event.decode::<StreamEvent>(format)?;
        match event {
            StreamEvent::MessageStart { message } => {
                builder.set_model(message.model);
                builder.set_finish_reason(message.stop_reason);
                if let Some(message_usage) = message.usage {
                    usage.update(message_usage);
                }
            }
            StreamEvent::ContentBlockStart { content_block } => {
                let text = match content_block {
                    ContentBlock::Text { text } => text,
                    ContentBlock::Thinking { thinking } => thinking,
                    ContentBlock::ToolUse { name } | ContentBlock::ServerToolUse { name } => name,
                    ContentBlock::Other => None,
                };
                builder.push_delta(text);
            }
            StreamEvent::ContentBlockDelta { delta } => {
                let text = match delta {
                    BlockDelta::TextDelta { text } => text,
                    BlockDelta::ThinkingDelta { thinking } => thinking,
                    BlockDelta::InputJsonDelta { partial_json } => partial_json,
                    BlockDelta::Other => None,
                };
                builder.push_delta(text);
            }
            StreamEvent::MessageDelta {
                delta,
                usage: delta_usage,
            } => {
                builder.set_finish_reason(delta.stop_reason);
                if let Some(delta_usage) = delta_usage {
                    usage.update(delta_usage);
                }
            }
            StreamEvent::Other => {}
        }
    }

    let usage = usage.finish(format)?;
    Ok(builder.build(usage))
}

/// Last value seen of each usage field. `message_delta` carries the
/// cumulative `output_tokens` and may carry an `input_tokens` that replaces
/// the one from `message_start`. Taking the last value also keeps a repeated
/// `message_start` from counting twice.
#[derive(Default)]
struct UsageTotals {
    seen: bool,
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
}

impl UsageTotals {
    fn update(&mut self, usage: Usage) {
        self.seen = true;
        keep_last(&mut self.input, usage.input_tokens);
        keep_last(&mut self.output, usage.output_tokens);
        keep_last(&mut self.cache_creation, usage.cache_creation_input_tokens);
        keep_last(&mut self.cache_read, usage.cache_read_input_tokens);
    }

    fn finish(self, format: Format) -> Result<Option<ProviderUsage>, ReplayError> {
        if !self.seen {
            return Ok(None);
        }
        let input = require_field(format, self.input, "usage.input_tokens")?;
        // Thinking tokens are already inside `output_tokens`.
        let output = require_field(format, self.output, "usage.output_tokens")?;
        let cache_creation = self.cache_creation.unwrap_or(0);
        let cache_read = self.cache_read.unwrap_or(0);

        // `input_tokens` excludes both cache reads and cache writes, so the
        // whole prompt is the sum of the three.
        // NOTE: Anthropic bills cache writes above the base input price, but
        // here they are plain prompt tokens because ProviderUsage has no field
        // for them.
        let prompt = checked_sum(format, &[input, cache_creation, cache_read])?;

        let usage = ProviderUsage {
            prompt_tokens: prompt,
            completion_tokens: output,
            cached_prompt_tokens: cache_read,
        };
        usage.validated(format).map(Some)
    }
}
