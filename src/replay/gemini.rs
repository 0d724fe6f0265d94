//! Google Gemini `streamGenerateContent` responses, one per event.

use serde::Deserialize;
use serde_json::Value;

use super::events::Event;
use super::{
    Format, ProviderUsage, Recording, RecordingBuilder, ReplayError, checked_sum, keep_last,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    candidates: Option<Vec<Candidate>>,
    usage_metadata: Option<UsageMetadata>,
    model_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    parts: Option<Vec<Part>>,
}

/// One content part. `thoughtSignature` is an opaque token for the next
/// request, not output text, so it is not read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    function_call: Option<FunctionCall>,
}

#[derive(Deserialize)]
struct FunctionCall {
    name: Option<String>,
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

/// Parses a stream of Gemini responses.
pub(super) fn parse(events: Vec<Event>) -> Result<Recording, ReplayError> {
    let format = Format::Gemini;
    let mut builder = RecordingBuilder::new(format);
    let mut usage = UsageTotals::default();

    for event in events {
        let chunk = event.decode::<Chunk>(format)?;
        builder.set_model(chunk.model_version);

        for candidate in chunk.candidates.unwrap_or_default() {
            let parts = candidate.content.and_then(|content| content.parts);
            for part in parts.unwrap_or_default() {
                builder.push_delta(part.text);
                if let Some(call) = part.function_call {
                    builder.push_delta(call.name);
                    // Gemini sends a function call whole, with its arguments as
                    // a JSON object, so they become one delta.
                    builder.push_delta(call.args.map(|args| args.to_string()));
                }
            }
            builder.set_finish_reason(candidate.finish_reason);
        }

        if let Some(metadata) = chunk.usage_metadata {
            usage.update(metadata);
        }
    }

    let usage = usage.finish(format)?;
    Ok(builder.build(usage))
}

/// Last value seen of each usage field. Gemini repeats `usageMetadata` with
/// running totals on every chunk.
#[derive(Default)]
struct UsageTotals {
    seen: bool,
    prompt: Option<u64>,
    candidates: Option<u64>,
    thoughts: Option<u64>,
    cached: Option<u64>,
}

impl UsageTotals {
    fn update(&mut self, metadata: UsageMetadata) {
        self.seen = true;
        keep_last(&mut self.prompt, metadata.prompt_token_count);
        keep_last(&mut self.candidates, metadata.candidates_token_count);
        keep_last(&mut self.thoughts, metadata.thoughts_token_count);
        keep_last(&mut self.cached, metadata.cached_content_token_count);
    }

    /// Converts the totals, reading a missing count as 0 because Gemini's JSON
    /// can leave out zero counts (the bundled recording has no
    /// `cachedContentTokenCount`).
    fn finish(self, format: Format) -> Result<Option<ProviderUsage>, ReplayError> {
        if !self.seen {
            return Ok(None);
        }
        // `candidatesTokenCount` leaves out the thinking tokens (9 + 23 + 185 =
        // 217 total in the bundled recording), so they are added.
        let completion = checked_sum(
            format,
            &[self.candidates.unwrap_or(0), self.thoughts.unwrap_or(0)],
        )?;

        // `promptTokenCount` already contains the cached content tokens.
        // NOTE: `toolUsePromptTokenCount` is not added to the prompt, and
        // whether Google bills those tokens as input has not been checked.
        let usage = ProviderUsage {
            prompt_tokens: self.prompt.unwrap_or(0),
            completion_tokens: completion,
            cached_prompt_tokens: self.cached.unwrap_or(0),
        };
        usage.validated(format).map(Some)
    }
}
