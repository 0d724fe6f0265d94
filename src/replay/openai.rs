//! OpenAI chat completion chunks, legacy completion chunks, and the providers
//! that copy the chat format (Azure, xAI, DeepSeek, Groq, Qwen, Mistral,
//! Perplexity).

use std::collections::HashSet;

use serde::Deserialize;

use super::events::Event;
use super::{
    Format, ProviderUsage, Recording, RecordingBuilder, ReplayError, checked_sum, keep_last,
    require_field,
};

#[derive(Deserialize)]
struct ChatChunk {
    model: Option<String>,
    choices: Option<Vec<ChatChoice>>,
    usage: Option<Usage>,
    x_groq: Option<GroqExtension>,
}

#[derive(Deserialize)]
struct ChatChoice {
    index: Option<u64>,
    delta: Option<ChatDelta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatDelta {
    /// Reasoning text from DeepSeek and xAI.
    reasoning_content: Option<String>,
    /// Reasoning text under the name that some other OpenAI-compatible
    /// servers use.
    reasoning: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: Option<u64>,
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

/// Groq's extension object, which repeats the chunk's usage.
#[derive(Deserialize)]
struct GroqExtension {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChunk {
    model: Option<String>,
    choices: Option<Vec<CompletionChoice>>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptTokensDetails>,
    completion_tokens_details: Option<CompletionTokensDetails>,
    /// DeepSeek's count of prompt tokens served from its disk cache.
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionTokensDetails {
    reasoning_tokens: Option<u64>,
}

/// Parses a stream of `chat.completion.chunk` events.
pub(super) fn parse_chat(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::OpenAiChat;
    let mut builder = RecordingBuilder::new(format);
    let mut usage = UsageTotals::default();
    let mut named_tool_calls = HashSet::new();

    for event in events {
        let chunk = event.decode::<ChatChunk>(format)?;
        builder.set_model(chunk.model);

        for choice in chunk.choices.unwrap_or_default() {
            let choice_index = choice.index.unwrap_or(0);
            if let Some(delta) = choice.delta {
                push_chat_delta(&mut builder, &mut named_tool_calls, choice_index, delta);
            }
            builder.set_finish_reason(choice.finish_reason);
        }

        // Groq sends the same usage in `usage` and `x_groq.usage`, so only one
        // of them is read. `x_groq.usage` is read only when `usage` is absent.
        let chunk_usage = chunk.usage.or(chunk.x_groq.and_then(|groq| groq.usage));
        if let Some(chunk_usage) = chunk_usage {
            usage.update(chunk_usage);
        }
    }

    let usage = usage.finish(format)?;
    Ok(builder.build(usage))
}

/// Appends the pieces of one choice's delta: reasoning, content, refusal, then
/// each tool call's name (the first time it appears) and arguments.
fn push_chat_delta(
    builder: &mut RecordingBuilder,
    named_tool_calls: &mut HashSet<(u64, u64)>,
    choice_index: u64,
    delta: ChatDelta,
) {
    // A server that sends the same reasoning text in both fields is billed
    // for it once.
    let reasoning = delta
        .reasoning
        .filter(|text| Some(text) != delta.reasoning_content.as_ref());
    builder.push_delta(delta.reasoning_content);
    builder.push_delta(reasoning);
    builder.push_delta(delta.content);
    builder.push_delta(delta.refusal);

    for (position, tool_call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let Some(function) = tool_call.function else {
            continue;
        };
        let tool_index = tool_call.index.unwrap_or(position as u64);
        if function
            .name
            .as_deref()
            .is_some_and(|name| !name.is_empty())
            && named_tool_calls.insert((choice_index, tool_index))
        {
            builder.push_delta(function.name);
        }
        builder.push_delta(function.arguments);
    }
}

/// Parses a stream of legacy `text_completion` events.
pub(super) fn parse_completion(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::OpenAiCompletion;
    let mut builder = RecordingBuilder::new(format);
    let mut usage = UsageTotals::default();

    for event in events {
        let chunk = event.decode::<CompletionChunk>(format)?;
        builder.set_model(chunk.model);

        for choice in chunk.choices.unwrap_or_default() {
            builder.push_delta(choice.text);
            builder.set_finish_reason(choice.finish_reason);
        }
        if let Some(chunk_usage) = chunk.usage {
            usage.update(chunk_usage);
        }
    }

    let usage = usage.finish(format)?;
    Ok(builder.build(usage))
}

/// Last value seen of each usage field. Perplexity sends a growing usage on
/// every chunk, and the last one is the total for the response.
#[derive(Default)]
struct UsageTotals {
    seen: bool,
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
    cached: Option<u64>,
    cache_hit: Option<u64>,
    reasoning: Option<u64>,
}

impl UsageTotals {
    fn update(&mut self, usage: Usage) {
        self.seen = true;
        keep_last(&mut self.prompt, usage.prompt_tokens);
        keep_last(&mut self.completion, usage.completion_tokens);
        keep_last(&mut self.total, usage.total_tokens);
        keep_last(&mut self.cache_hit, usage.prompt_cache_hit_tokens);
        if let Some(details) = usage.prompt_tokens_details {
            keep_last(&mut self.cached, details.cached_tokens);
        }
        if let Some(details) = usage.completion_tokens_details {
            keep_last(&mut self.reasoning, details.reasoning_tokens);
        }
    }

    fn finish(self, format: Format) -> Result<Option<ProviderUsage>, ReplayError> {
        if !self.seen {
            return Ok(None);
        }
        let prompt = require_field(format, self.prompt, "usage.prompt_tokens")?;
        let completion = require_field(format, self.completion, "usage.completion_tokens")?;
        let completion =
            completion_with_reasoning(format, prompt, completion, self.reasoning, self.total)?;

        // `prompt_tokens` already contains the cached tokens in OpenAI's usage.
        // DeepSeek splits its prompt into `prompt_cache_hit_tokens` and
        // `prompt_cache_miss_tokens`, so its hit count is the cached part too.
        let cached = self.cached.or(self.cache_hit).unwrap_or(0);

        let usage = ProviderUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
        };
        usage.validated(format).map(Some)
    }
}

/// Returns the completion tokens, adding the reasoning tokens when
/// `completion_tokens` leaves them out.
///
/// OpenAI and DeepSeek count reasoning inside `completion_tokens`, so prompt +
/// completion equals `total_tokens`. xAI leaves reasoning out (grok-3-mini
/// reported 12 prompt, 2 completion, 340 reasoning and 354 total), so there the
/// reasoning tokens are added. The sum against `total_tokens` decides, not the
/// provider's name. Without `total_tokens`, OpenAI's definition applies and the
/// reasoning tokens are taken to be inside `completion_tokens`.
fn completion_with_reasoning(
    format: Format,
    prompt: u64,
    completion: u64,
    reasoning: Option<u64>,
    total: Option<u64>,
) -> Result<u64, ReplayError> {
    let (Some(reasoning), Some(total)) = (reasoning, total) else {
        return Ok(completion);
    };
    let total_without_reasoning = checked_sum(format, &[prompt, completion])?;
    let total_with_reasoning = checked_sum(format, &[prompt, completion, reasoning])?;

    if total_without_reasoning != total && total_with_reasoning == total {
        return checked_sum(format, &[completion, reasoning]);
    }
    // NOTE: when neither sum matches `total_tokens`, `completion_tokens` is
    // billed as reported, which may miss reasoning tokens.
    Ok(completion)
}
