//! Replay of recorded LLM provider streams and OpenAssistant conversations.
//!
//! [`parse_recording`] reads one recorded streaming response, either a raw
//! `text/event-stream` body or one JSON event per line, and returns the output
//! text deltas in arrival order together with the provider's own token usage.
//! The wire format is detected from the events, not from a file name. Supported
//! formats are listed in [`Format`].
//!
//! Usage is normalised to [`ProviderUsage`], the numbers that billing settles
//! against. Each format module states how its fields map and why. The rules
//! shared by all formats are:
//!
//! - A usage field that appears on several events is a running total, so the
//!   last value seen wins and values are never summed across events.
//! - Reasoning tokens are added to the completion tokens unless the
//!   provider's completion count already contains them.
//! - `cached_prompt_tokens` is the part of `prompt_tokens` served from a cache.
//!
//! [`load_conversations`] flattens OpenAssistant message trees into
//! conversations, and [`token_sized_deltas`] splits a text into token-sized
//! pieces so that a conversation answer can be replayed as a stream.
//!
//! Nothing in this module prints or logs message text. Errors name line
//! numbers, columns, message ids and provider error types, never message text.

mod anthropic;
mod bedrock;
mod cohere;
mod events;
mod gemini;
mod oasst;
mod openai;
mod tokens;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

pub use oasst::{ChatTurn, Conversation, load_conversations};
pub use tokens::token_sized_deltas;

/// Wire format of a recorded provider stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// OpenAI chat completion chunks (`chat.completion.chunk`), also used by
    /// Azure, xAI, DeepSeek, Groq, Qwen, Mistral and Perplexity.
    OpenAiChat,
    /// OpenAI legacy completion chunks (`text_completion`).
    OpenAiCompletion,
    /// Anthropic Messages API stream events.
    Anthropic,
    /// Amazon Bedrock ConverseStream events.
    Bedrock,
    /// Cohere v2 chat stream events.
    Cohere,
    /// Google Gemini `streamGenerateContent` responses.
    Gemini,
}

impl fmt::Display for Format {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Format::OpenAiChat => "OpenAI chat completion",
            Format::OpenAiCompletion => "OpenAI legacy completion",
            Format::Anthropic => "Anthropic Messages",
            Format::Bedrock => "Bedrock ConverseStream",
            Format::Cohere => "Cohere v2 chat",
            Format::Gemini => "Gemini",
        };
        formatter.write_str(name)
    }
}

/// Provider usage normalised to the billing contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProviderUsage {
    /// All input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// All output tokens, reasoning tokens included.
    pub completion_tokens: u64,
    /// The part of `prompt_tokens` that the provider served from its cache.
    pub cached_prompt_tokens: u64,
}

/// One recorded provider stream, parsed.
///
/// The `Debug` output contains the message text in `deltas`, so log only
/// selected fields.
#[derive(Debug, Clone)]
pub struct Recording {
    pub format: Format,
    /// Model name as the provider wrote it, e.g. "gpt-4o-2024-08-06". `None`
    /// when the stream names no model, as in Cohere and Bedrock streams.
    pub model: Option<String>,
    /// Every non-empty output text delta in arrival order, from all choices.
    /// Reasoning text, refusals and tool call names and arguments are included.
    pub deltas: Vec<String>,
    /// `None` when the stream carries no usage.
    pub usage: Option<ProviderUsage>,
    /// The last finish or stop reason in the stream, as the provider wrote it.
    pub finish_reason: Option<String>,
}

/// Errors from reading a recording or an OpenAssistant file.
///
/// No variant contains message text, so these errors are safe to log.
/// `ProviderError` carries the provider's error type, such as
/// `overloaded_error`, and leaves out its error message.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The column counts bytes from 1 at the start of the JSON payload, which
    /// in an event stream begins after `data: `.
    #[error("invalid JSON on line {line}, column {column} ({category})")]
    InvalidJson {
        line: usize,
        column: usize,
        category: &'static str,
    },

    #[error("event on line {line} is not a JSON object")]
    NotAnObject { line: usize },

    #[error("invalid {format} event on line {line}: a field has an unexpected JSON type")]
    InvalidEvent { line: usize, format: Format },

    #[error("event on line {line} is a {found} event, but the recording started as {expected}")]
    MixedFormats {
        line: usize,
        expected: Format,
        found: Format,
    },

    #[error(
        "unknown format: no event matches the OpenAI, Anthropic, Bedrock, Cohere or Gemini stream formats, so check that the file is a recorded provider stream"
    )]
    UnknownFormat,

    #[error("recording contains no events")]
    Empty,

    #[error("provider sent an error event on line {line} (type {error_type})")]
    ProviderError { line: usize, error_type: String },

    #[error("invalid {format} usage: {reason}")]
    InvalidUsage { format: Format, reason: String },

    #[error("invalid message tree on line {line}: {reason}")]
    InvalidTree { line: usize, reason: String },
}

/// Parses one recorded provider stream.
///
/// `text` is either a raw `text/event-stream` body (`data: {...}` lines with
/// blank lines between events, optionally ending with `data: [DONE]`) or one
/// JSON event per line. The wire format is detected from the event contents.
pub fn parse_recording(text: &str) -> Result<Recording, ReplayError> {
    let events = events::split_events(text)?;
    if events.is_empty() {
        return Err(ReplayError::Empty);
    }
    events::reject_provider_errors(&events)?;

    let format = events::detect_format(&events)?;
    match format {
        Format::OpenAiChat => openai::parse_chat(events),
        Format::OpenAiCompletion => openai::parse_completion(events),
        Format::Anthropic => anthropic::parse(events),
        Format::Bedrock => bedrock::parse(events),
        Format::Cohere => cohere::parse(events),
        Format::Gemini => gemini::parse(events),
    }
}

/// Reads and parses one recorded provider stream, as [`parse_recording`] does.
pub fn parse_recording_file(path: &Path) -> Result<Recording, ReplayError> {
    let text = read_text(path)?;
    parse_recording(&text)
}

fn read_text(path: &Path) -> Result<String, ReplayError> {
    std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Recording fields that every format fills in the same way.
struct RecordingBuilder {
    format: Format,
    model: Option<String>,
    deltas: Vec<String>,
    finish_reason: Option<String>,
}

impl RecordingBuilder {
    fn new(format: Format) -> Self {
        Self {
            format,
            model: None,
            deltas: Vec::new(),
            finish_reason: None,
        }
    }

    /// Appends a delta unless it is missing or empty.
    fn push_delta(&mut self, text: Option<String>) {
        if let Some(text) = text.filter(|text| !text.is_empty()) {
            self.deltas.push(text);
        }
    }

    /// Keeps the first non-empty model name, because some streams open with an
    /// event whose `model` is empty (Azure's prompt filter results).
    fn set_model(&mut self, model: Option<String>) {
        if self.model.is_none() {
            self.model = model.filter(|model| !model.is_empty());
        }
    }

    /// Keeps the last non-empty finish reason.
    fn set_finish_reason(&mut self, reason: Option<String>) {
        if let Some(reason) = reason.filter(|reason| !reason.is_empty()) {
            self.finish_reason = Some(reason);
        }
    }

    fn build(self, usage: Option<ProviderUsage>) -> Recording {
        Recording {
            format: self.format,
            model: self.model,
            deltas: self.deltas,
            usage,
            finish_reason: self.finish_reason,
        }
    }
}

/// Overwrites `slot` when the event carries a value, so the last value seen
/// wins. Usage fields are running totals, never increments.
fn keep_last(slot: &mut Option<u64>, value: Option<u64>) {
    if value.is_some() {
        *slot = value;
    }
}

/// Returns a usage field that the format requires, or an error naming it.
fn require_field(format: Format, value: Option<u64>, field: &str) -> Result<u64, ReplayError> {
    value.ok_or_else(|| ReplayError::InvalidUsage {
        format,
        reason: format!("missing `{field}`"),
    })
}

/// Adds token counts, rejecting a sum that does not fit in a `u64`.
fn checked_sum(format: Format, counts: &[u64]) -> Result<u64, ReplayError> {
    counts
        .iter()
        .try_fold(0u64, |sum, &count| sum.checked_add(count))
        .ok_or_else(|| ReplayError::InvalidUsage {
            format,
            reason: "token count does not fit in 64 bits".to_string(),
        })
}

impl ProviderUsage {
    /// Rejects usage whose cached part is larger than the prompt it belongs to.
    fn validated(self, format: Format) -> Result<Self, ReplayError> {
        if self.cached_prompt_tokens > self.prompt_tokens {
            return Err(ReplayError::InvalidUsage {
                format,
                reason: format!(
                    "cached prompt tokens ({}) exceed prompt tokens ({})",
                    self.cached_prompt_tokens, self.prompt_tokens
                ),
            });
        }
        Ok(self)
    }
}
