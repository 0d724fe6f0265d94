//! Splitting a recording into JSON events and detecting its wire format.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Format, ReplayError};

/// One JSON event of a recording and the 1-based line where it starts.
pub(super) struct Event {
    pub line: usize,
    pub payload: Map<String, Value>,
}

impl Event {
    /// Deserializes the event into the typed event of `format`.
    ///
    /// The serde message is dropped because it can quote a value from the line.
    pub fn decode<T: DeserializeOwned>(self, format: Format) -> Result<T, ReplayError> {
        let line = self.line;
        serde_json::from_value(Value::Object(self.payload))
            .map_err(|_| ReplayError::InvalidEvent { line, format })
    }
}

/// Splits a recording into events, reading it as an event stream when its
/// first non-blank line is an SSE field and as one JSON event per line otherwise.
pub(super) fn split_events(text: &str) -> Result<Vec<Event>, ReplayError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first_line = text.lines().find(|line| !line.trim().is_empty());
    match first_line {
        None => Ok(Vec::new()),
        Some(line) if is_sse_line(line) => split_sse(text),
        Some(_) => split_json_lines(text),
    }
}

fn is_sse_line(line: &str) -> bool {
    line.starts_with(':')
        || ["data:", "event:", "id:", "retry:"]
            .iter()
            .any(|field| line.starts_with(field))
}

fn split_json_lines(text: &str) -> Result<Vec<Event>, ReplayError> {
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        events.push(parse_event(line, index + 1)?);
    }
    Ok(events)
}

/// Parses a `text/event-stream` body as the WHATWG HTML standard describes it:
/// `data` lines of one event are joined with newlines, a blank line ends the
/// event, and comments and other fields are ignored. The `[DONE]` sentinel of
/// OpenAI-style streams is skipped.
fn split_sse(text: &str) -> Result<Vec<Event>, ReplayError> {
    let mut events = Vec::new();
    let mut data = String::new();
    let mut data_line = None;

    for (index, line) in text.lines().enumerate() {
        if line.is_empty() {
            if let Some(start) = data_line.take() {
                push_sse_event(&mut events, &data, start)?;
                data.clear();
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }

        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field != "data" {
            continue;
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        if data_line.is_none() {
            data_line = Some(index + 1);
        } else {
            data.push('\n');
        }
        data.push_str(value);
    }

    // The standard drops an event that no blank line ends. A recorded body cut
    // right after its last `data` line still contains that event, so it is kept.
    if let Some(start) = data_line {
        push_sse_event(&mut events, &data, start)?;
    }
    Ok(events)
}

fn push_sse_event(events: &mut Vec<Event>, data: &str, line: usize) -> Result<(), ReplayError> {
    if data.trim() == "[DONE]" {
        return Ok(());
    }
    events.push(parse_event(data, line)?);
    Ok(())
}

/// Parses one JSON event whose text starts on `line`.
pub(super) fn parse_event(json: &str, line: usize) -> Result<Event, ReplayError> {
    let value: Value = serde_json::from_str(json).map_err(|error| json_error(&error, line))?;
    match value {
        Value::Object(payload) => Ok(Event { line, payload }),
        _ => Err(ReplayError::NotAnObject { line }),
    }
}

/// Converts a serde_json error into one that names the line and column but
/// keeps none of the input text.
pub(super) fn json_error(error: &serde_json::Error, line: usize) -> ReplayError {
    use serde_json::error::Category;

    let category = match error.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected data",
        Category::Eof => "unexpected end of input",
    };
    ReplayError::InvalidJson {
        line: line + error.line().saturating_sub(1),
        column: error.column(),
        category,
    }
}

/// Rejects a recording that contains a provider error event, because its
/// deltas and usage stop at the error and would replay a stream that failed.
///
/// OpenAI, Gemini and Anthropic send an `error` object (Anthropic inside an
/// event of type `error`). Bedrock sends a single key ending in `Exception`.
pub(super) fn reject_provider_errors(events: &[Event]) -> Result<(), ReplayError> {
    for event in events {
        if let Some(Value::Object(error)) = event.payload.get("error") {
            let error_type = ["type", "status", "code"]
                .iter()
                .find_map(|key| error.get(*key).and_then(scalar_to_string))
                .unwrap_or_else(|| "unknown".to_string());
            return Err(ReplayError::ProviderError {
                line: event.line,
                error_type,
            });
        }
        if let Some(key) = event.payload.keys().find(|key| key.ends_with("Exception")) {
            return Err(ReplayError::ProviderError {
                line: event.line,
                error_type: key.clone(),
            });
        }
    }
    Ok(())
}

fn scalar_to_string(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// Detects the format from the first event that identifies one, and rejects a
/// later event that identifies a different one. Events that fit any format,
/// such as Azure's opening event with empty `choices`, are skipped.
pub(super) fn detect_format(events: &[Event]) -> Result<Format, ReplayError> {
    let mut detected: Option<Format> = None;
    for event in events {
        let Some(format) = classify(&event.payload) else {
            continue;
        };
        match detected {
            None => detected = Some(format),
            Some(expected) if expected != format => {
                return Err(ReplayError::MixedFormats {
                    line: event.line,
                    expected,
                    found: format,
                });
            }
            Some(_) => {}
        }
    }
    detected.ok_or(ReplayError::UnknownFormat)
}

const ANTHROPIC_EVENT_TYPES: &[&str] = &[
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
];

const COHERE_EVENT_TYPES: &[&str] = &[
    "message-start",
    "content-start",
    "content-delta",
    "content-end",
    "tool-plan-delta",
    "tool-call-start",
    "tool-call-delta",
    "tool-call-end",
    "citation-start",
    "citation-end",
    "message-end",
    "debug",
];

const BEDROCK_EVENT_KEYS: &[&str] = &[
    "messageStart",
    "contentBlockStart",
    "contentBlockDelta",
    "contentBlockStop",
    "messageStop",
    "metadata",
];

/// Returns the format that an event belongs to, or `None` when the event
/// alone does not identify one.
fn classify(payload: &Map<String, Value>) -> Option<Format> {
    if let Some(Value::String(event_type)) = payload.get("type") {
        let event_type = event_type.as_str();
        if ANTHROPIC_EVENT_TYPES.contains(&event_type) {
            return Some(Format::Anthropic);
        }
        if COHERE_EVENT_TYPES.contains(&event_type) {
            return Some(Format::Cohere);
        }
    }

    if payload.len() == 1
        && payload
            .keys()
            .all(|key| BEDROCK_EVENT_KEYS.contains(&key.as_str()))
    {
        return Some(Format::Bedrock);
    }

    if ["candidates", "usageMetadata", "promptFeedback"]
        .iter()
        .any(|key| payload.contains_key(*key))
    {
        return Some(Format::Gemini);
    }

    classify_openai(payload)
}

fn classify_openai(payload: &Map<String, Value>) -> Option<Format> {
    if let Some(Value::String(object)) = payload.get("object") {
        if object == "text_completion" {
            return Some(Format::OpenAiCompletion);
        }
        // Perplexity ends its stream with `chat.completion.done`.
        if object.starts_with("chat.completion") {
            return Some(Format::OpenAiChat);
        }
    }

    let Some(Value::Array(choices)) = payload.get("choices") else {
        return None;
    };
    let first_choice = choices.first()?.as_object()?;
    if first_choice.contains_key("delta") {
        Some(Format::OpenAiChat)
    } else if first_choice.contains_key("text") {
        Some(Format::OpenAiCompletion)
    } else {
        None
    }
}
