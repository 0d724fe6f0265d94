//! Wire types: inbound messages, replies and outcome events, and the
//! decoder that turns a delivery body into a validated inbound message.
//!
//! The decoder checks fields by hand rather than through serde's errors,
//! so that every rejection names the field and the rule it broke without
//! quoting any of the message's text.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::error::Category;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::settings::LimitSettings;

/// Defines a one-value enum that serialises as a fixed `type` string.
macro_rules! type_tag {
    ($name:ident, $value:literal) => {
        #[doc = concat!("The `type` value `", $value, "`.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        pub enum $name {
            #[default]
            #[serde(rename = $value)]
            Tag,
        }
    };
}

type_tag!(CreditsGrantedType, "credits.granted");
type_tag!(StreamStartedType, "stream.started");
type_tag!(ChunkEmittedType, "chunk.emitted");
type_tag!(StreamEndedType, "stream.ended");
type_tag!(ReservationGrantedType, "reservation.granted");
type_tag!(ReservationDeniedType, "reservation.denied");
type_tag!(ReservationSettledType, "reservation.settled");
type_tag!(ReservationAdjustedType, "reservation.adjusted");
type_tag!(UsageOverReservationType, "usage.over_reservation");
type_tag!(ReservationExtendedType, "reservation.extended");

/// `credits.granted`: adds credits to a user's balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CreditsGranted {
    #[serde(rename = "type")]
    pub kind: CreditsGrantedType,
    pub message_id: String,
    pub user_id: String,
    /// Credits to add; at least 1.
    #[schemars(range(min = 1))]
    pub amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChatMessage {
    pub role: String,
    /// The message's text. Absent, it counts as empty, as in an assistant
    /// message that only calls tools.
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `stream.started`: asks for a hold before the model is called. The
/// prompt is given as `messages`, `prompt` or `prompt_tokens`; when more
/// than one is present, `prompt_tokens` wins, then `messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamStarted {
    #[serde(rename = "type")]
    pub kind: StreamStartedType,
    pub message_id: String,
    pub user_id: String,
    pub stream_id: String,
    pub model: String,
    /// The prompt in chat form: at least one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Output allowance to hold; the model's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_output_tokens: Option<u64>,
    pub occurred_at: DateTime<Utc>,
}

/// The prompt of a `stream.started`, in the form that will be counted.
#[derive(Debug, Clone, Copy)]
pub enum PromptInput<'a> {
    Tokens(u64),
    Messages(&'a [ChatMessage]),
    Text(&'a str),
}

impl StreamStarted {
    /// The prompt in the form that decides its token count.
    pub fn prompt_input(&self) -> PromptInput<'_> {
        if let Some(tokens) = self.prompt_tokens {
            PromptInput::Tokens(tokens)
        } else if let Some(messages) = &self.messages {
            PromptInput::Messages(messages)
        } else {
            PromptInput::Text(self.prompt.as_deref().unwrap_or_default())
        }
    }
}

/// `chunk.emitted`: one text delta of a running stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChunkEmitted {
    #[serde(rename = "type")]
    pub kind: ChunkEmittedType,
    pub message_id: String,
    pub user_id: String,
    pub stream_id: String,
    /// Position in the stream, from 0, rising by 1.
    pub seq: u64,
    pub delta: String,
    /// The delta's token count when the producer counted it; used instead
    /// of counting `delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    pub occurred_at: DateTime<Utc>,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EndStatus {
    Completed,
    Cancelled,
    Failed,
}

/// The provider's own token count for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    /// Every billed output token, reasoning included.
    pub completion_tokens: u64,
    /// The part of `prompt_tokens` served from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_prompt_tokens: Option<u64>,
}

/// `stream.ended`: the stream is over and can be settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamEnded {
    #[serde(rename = "type")]
    pub kind: StreamEndedType,
    pub message_id: String,
    pub user_id: String,
    pub stream_id: String,
    pub status: EndStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub occurred_at: DateTime<Utc>,
}

/// A validated inbound message.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    CreditsGranted(CreditsGranted),
    StreamStarted(StreamStarted),
    ChunkEmitted(ChunkEmitted),
    StreamEnded(StreamEnded),
}

impl Inbound {
    /// The idempotency key.
    pub fn message_id(&self) -> &str {
        match self {
            Self::CreditsGranted(m) => &m.message_id,
            Self::StreamStarted(m) => &m.message_id,
            Self::ChunkEmitted(m) => &m.message_id,
            Self::StreamEnded(m) => &m.message_id,
        }
    }

    /// The user the message is about, which is also its routing key.
    pub fn user_id(&self) -> &str {
        match self {
            Self::CreditsGranted(m) => &m.user_id,
            Self::StreamStarted(m) => &m.user_id,
            Self::ChunkEmitted(m) => &m.user_id,
            Self::StreamEnded(m) => &m.user_id,
        }
    }

    /// The stream, for every type but `credits.granted`.
    pub fn stream_id(&self) -> Option<&str> {
        match self {
            Self::CreditsGranted(_) => None,
            Self::StreamStarted(m) => Some(&m.stream_id),
            Self::ChunkEmitted(m) => Some(&m.stream_id),
            Self::StreamEnded(m) => Some(&m.stream_id),
        }
    }

    /// The `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::CreditsGranted(_) => "credits.granted",
            Self::StreamStarted(_) => "stream.started",
            Self::ChunkEmitted(_) => "chunk.emitted",
            Self::StreamEnded(_) => "stream.ended",
        }
    }
}

/// Why a delivery was rejected as bad input. The codes are the values of
/// the `x-stream-credits-error` dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    InvalidJson,
    InvalidUtf8,
    TooLarge,
    UnknownType,
    InvalidField,
    UnknownStream,
    RetriesExhausted,
}

impl RejectReason {
    /// Every reason, in the order operators read them.
    pub const ALL: [Self; 7] = [
        Self::InvalidJson,
        Self::InvalidUtf8,
        Self::TooLarge,
        Self::UnknownType,
        Self::InvalidField,
        Self::UnknownStream,
        Self::RetriesExhausted,
    ];

    /// The header value.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TooLarge => "too_large",
            Self::UnknownType => "unknown_type",
            Self::InvalidField => "invalid_field",
            Self::UnknownStream => "unknown_stream",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }

    /// Parses a header value.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

/// A delivery that cannot be applied, with a one-line detail that quotes
/// no message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.code())]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    /// What the decoder could read of the message, for a denial reply.
    /// Boxed, so that a result carrying a rejection stays small.
    pub partial: Box<PartialIds>,
}

/// Ids read from a message that failed validation, when they were valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialIds {
    pub type_name: Option<String>,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    pub stream_id: Option<String>,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            partial: Box::default(),
        }
    }
}

/// Decodes and validates one delivery body.
pub fn decode(body: &[u8], limits: &LimitSettings) -> Result<Inbound, Rejection> {
    if body.len() > limits.message_bytes_max {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "body is {} bytes, more than the limit of {} bytes",
                body.len(),
                limits.message_bytes_max
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|error| {
        Rejection::new(
            RejectReason::InvalidUtf8,
            format!("body is not UTF-8: invalid byte at offset {}", error.valid_up_to()),
        )
    })?;
    let UniqueKeysValue(value) = serde_json::from_str(text).map_err(json_rejection)?;
    let Value::Object(object) = value else {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "body is JSON but not an object",
        ));
    };

    let fields = Fields {
        object: &object,
        limits,
    };
    let partial = fields.partial_ids();
    fields.decode().map_err(|mut rejection| {
        rejection.partial = Box::new(partial);
        rejection
    })
}

/// Parses `body` as JSON in which no object has a key twice, or returns
/// `None`. Code that reads a field of a body the worker may have refused
/// parses it here, so that it never picks one of two values.
pub fn unique_keys_json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok().map(|UniqueKeysValue(value)| value)
}

/// Builds the rejection of a body that serde_json could not read. A data
/// error can only come from [`UniqueKeysVisitor`], whose message names the
/// repeated key. Every other error is a syntax error, which serde_json
/// states in fixed words (such as "unexpected end of hex escape")
/// with the line and column, never quoting the body.
fn json_rejection(error: serde_json::Error) -> Rejection {
    let detail = match error.classify() {
        Category::Data => error.to_string(),
        Category::Io | Category::Syntax | Category::Eof => format!("body is not JSON: {error}"),
    };
    Rejection::new(RejectReason::InvalidJson, detail)
}

/// Maximum characters of a repeated key shown in a rejection's detail, so
/// that a key of any length keeps the detail to one short line.
const DETAIL_KEY_CHARS_MAX: usize = 64;

/// A JSON value whose objects, at every level, have no key twice.
/// `serde_json::Value` keeps the last of two equal keys, which would let
/// `{"amount": 1, "amount": 1000000}` pass for whichever value a reader
/// happens to take.
struct UniqueKeysValue(Value);

impl<'de> Deserialize<'de> for UniqueKeysValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeysValue)
    }
}

/// Builds a `serde_json::Value` as serde_json's own visitor does, but
/// fails on the second occurrence of a key in one object.
struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeysValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!(
                    "body has the key {} twice",
                    quote_key(&key)
                )));
            }
            let UniqueKeysValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Quotes a key for a rejection's detail: escaped, so it stays on one
/// line, and cut after [`DETAIL_KEY_CHARS_MAX`] characters.
fn quote_key(key: &str) -> String {
    let shown: String = key.chars().take(DETAIL_KEY_CHARS_MAX).collect();
    let cut = if shown.len() < key.len() { "..." } else { "" };
    format!("`{}{cut}`", shown.escape_debug())
}

/// Checks an id against the contract's rules: 1 to `chars_max`
/// characters, none of them NUL. The error is the rule broken, worded to
/// follow the id's name, such as "must not be empty".
pub fn check_id(id: &str, chars_max: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    check_stored_text(id, chars_max)
}

/// Checks a text that the ledger stores: at most `chars_max` characters
/// and no NUL. PostgreSQL's `text` and `jsonb` types reject a NUL (SQLSTATE
/// 22021 and 22P05), so the message fails here at once rather than in
/// every retry of its transaction.
fn check_stored_text(text: &str, chars_max: usize) -> Result<(), String> {
    check_length(text, chars_max)?;
    if text.contains('\0') {
        return Err("contains a NUL character (U+0000), which PostgreSQL cannot store".to_owned());
    }
    Ok(())
}

fn check_length(text: &str, chars_max: usize) -> Result<(), String> {
    if text.chars().count() > chars_max {
        return Err(format!("is longer than {chars_max} characters"));
    }
    Ok(())
}

/// Field-by-field reader over one JSON object.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    limits: &'a LimitSettings,
}

impl Fields<'_> {
    fn decode(&self) -> Result<Inbound, Rejection> {
        let kind = match self.object.get("type") {
            None => return Err(invalid("missing field `type`")),
            Some(Value::String(kind)) => kind.as_str(),
            Some(_) => return Err(invalid("field `type` must be a string")),
        };
        match kind {
            "credits.granted" => self.credits_granted().map(Inbound::CreditsGranted),
            "stream.started" => self.stream_started().map(Inbound::StreamStarted),
            "chunk.emitted" => self.chunk_emitted().map(Inbound::ChunkEmitted),
            "stream.ended" => self.stream_ended().map(Inbound::StreamEnded),
            _ => Err(Rejection::new(
                RejectReason::UnknownType,
                format!(
                    "`type` is not one of credits.granted, stream.started, chunk.emitted, \
                     stream.ended ({} characters)",
                    kind.chars().count()
                ),
            )),
        }
    }

    fn partial_ids(&self) -> PartialIds {
        let id = |key| self.id(key).ok();
        PartialIds {
            type_name: self.object.get("type").and_then(Value::as_str).map(|kind| {
                kind.chars().take(self.limits.id_chars_max).collect()
            }),
            message_id: id("message_id"),
            user_id: id("user_id"),
            stream_id: id("stream_id"),
        }
    }

    fn credits_granted(&self) -> Result<CreditsGranted, Rejection> {
        let amount = self.integer("amount")?;
        if amount < 1 {
            return Err(invalid("field `amount` must be at least 1"));
        }
        Ok(CreditsGranted {
            kind: CreditsGrantedType::Tag,
            message_id: self.id("message_id")?,
            user_id: self.id("user_id")?,
            amount,
            reason: self.optional_stored_text("reason", self.limits.id_chars_max)?,
            occurred_at: self.timestamp("occurred_at")?,
        })
    }

    fn stream_started(&self) -> Result<StreamStarted, Rejection> {
        let messages = self.chat_messages()?;
        let prompt = self.optional_text("prompt", self.limits.message_bytes_max)?;
        let prompt_tokens = self.optional_tokens("prompt_tokens")?;
        if messages.is_none() && prompt.is_none() && prompt_tokens.is_none() {
            return Err(invalid(
                "one of `messages`, `prompt` or `prompt_tokens` is required",
            ));
        }
        let max_output_tokens = self.optional_tokens("max_output_tokens")?;
        if max_output_tokens == Some(0) {
            return Err(invalid("field `max_output_tokens` must be at least 1"));
        }
        Ok(StreamStarted {
            kind: StreamStartedType::Tag,
            message_id: self.id("message_id")?,
            user_id: self.id("user_id")?,
            stream_id: self.id("stream_id")?,
            model: self.id("model")?,
            messages,
            prompt,
            prompt_tokens,
            max_output_tokens,
            occurred_at: self.timestamp("occurred_at")?,
        })
    }

    fn chunk_emitted(&self) -> Result<ChunkEmitted, Rejection> {
        let seq = self.unsigned("seq")?;
        if seq >= self.limits.chunks_per_stream_max {
            return Err(invalid(format!(
                "field `seq` must be below limits.chunks_per_stream_max ({})",
                self.limits.chunks_per_stream_max
            )));
        }
        let delta = self
            .optional_text("delta", self.limits.message_bytes_max)?
            .ok_or_else(|| invalid("missing field `delta`"))?;
        Ok(ChunkEmitted {
            kind: ChunkEmittedType::Tag,
            message_id: self.id("message_id")?,
            user_id: self.id("user_id")?,
            stream_id: self.id("stream_id")?,
            seq,
            delta,
            tokens: self.optional_tokens("tokens")?,
            occurred_at: self.timestamp("occurred_at")?,
        })
    }

    fn stream_ended(&self) -> Result<StreamEnded, Rejection> {
        let status = match self.object.get("status").and_then(Value::as_str) {
            Some("completed") => EndStatus::Completed,
            Some("cancelled") => EndStatus::Cancelled,
            Some("failed") => EndStatus::Failed,
            Some(_) | None => {
                return Err(invalid(
                    "field `status` must be one of completed, cancelled, failed",
                ));
            }
        };
        Ok(StreamEnded {
            kind: StreamEndedType::Tag,
            message_id: self.id("message_id")?,
            user_id: self.id("user_id")?,
            stream_id: self.id("stream_id")?,
            status,
            usage: self.usage()?,
            occurred_at: self.timestamp("occurred_at")?,
        })
    }

    fn usage(&self) -> Result<Option<Usage>, Rejection> {
        let object = match self.object.get("usage") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(object)) => object,
            Some(_) => return Err(invalid("field `usage` must be an object")),
        };
        let nested = Fields {
            object,
            limits: self.limits,
        };
        let prompt_tokens = nested.tokens("prompt_tokens", "usage.")?;
        let cached_prompt_tokens = nested.optional_tokens_in("cached_prompt_tokens", "usage.")?;
        if cached_prompt_tokens.is_some_and(|cached| cached > prompt_tokens) {
            return Err(invalid(
                "field `usage.cached_prompt_tokens` must not exceed `usage.prompt_tokens`",
            ));
        }
        Ok(Some(Usage {
            prompt_tokens,
            completion_tokens: nested.tokens("completion_tokens", "usage.")?,
            cached_prompt_tokens,
        }))
    }

    fn chat_messages(&self) -> Result<Option<Vec<ChatMessage>>, Rejection> {
        let items = match self.object.get("messages") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(invalid("field `messages` must be an array")),
        };
        if items.is_empty() {
            return Err(invalid("field `messages` must hold at least one message"));
        }
        let mut messages = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let Value::Object(object) = item else {
                return Err(invalid(format!("`messages[{index}]` must be an object")));
            };
            let field = |key: &str| match object.get(key) {
                Some(Value::String(text)) => Ok(Some(text.clone())),
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(invalid(format!(
                    "`messages[{index}].{key}` must be a string"
                ))),
            };
            let role = field("role")?.ok_or_else(|| {
                invalid(format!("missing field `messages[{index}].role`"))
            })?;
            let content = match object.get("content") {
                Some(Value::Array(parts)) => text_parts(parts, index)?,
                _ => field("content")?.unwrap_or_default(),
            };
            messages.push(ChatMessage {
                role,
                content,
                name: field("name")?,
            });
        }
        Ok(Some(messages))
    }

    fn id(&self, key: &str) -> Result<String, Rejection> {
        self.checked_text(key, |id| check_id(id, self.limits.id_chars_max))?
            .ok_or_else(|| invalid(format!("missing field `{key}`")))
    }

    /// Reads an optional text that the ledger stores, such as a grant's
    /// `reason`.
    fn optional_stored_text(
        &self,
        key: &str,
        chars_max: usize,
    ) -> Result<Option<String>, Rejection> {
        self.checked_text(key, |text| check_stored_text(text, chars_max))
    }

    /// Reads an optional text that is only counted or parsed, never
    /// stored, so a NUL in it is kept.
    fn optional_text(&self, key: &str, chars_max: usize) -> Result<Option<String>, Rejection> {
        self.checked_text(key, |text| check_length(text, chars_max))
    }

    /// Reads an optional string and applies `check`, whose error is the
    /// rule the string broke.
    fn checked_text(
        &self,
        key: &str,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Option<String>, Rejection> {
        let Some(text) = self.optional_string(key)? else {
            return Ok(None);
        };
        check(text).map_err(|rule| invalid(format!("field `{key}` {rule}")))?;
        Ok(Some(text.to_owned()))
    }

    fn optional_string(&self, key: &str) -> Result<Option<&String>, Rejection> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(invalid(format!("field `{key}` must be a string"))),
        }
    }

    fn integer(&self, key: &str) -> Result<i64, Rejection> {
        match self.object.get(key) {
            None | Some(Value::Null) => Err(invalid(format!("missing field `{key}`"))),
            Some(Value::Number(number)) => number.as_i64().ok_or_else(|| {
                invalid(format!("field `{key}` must be a whole number within 64 bits"))
            }),
            Some(_) => Err(invalid(format!("field `{key}` must be a number"))),
        }
    }

    fn unsigned(&self, key: &str) -> Result<u64, Rejection> {
        let value = self.integer(key)?;
        u64::try_from(value).map_err(|_| invalid(format!("field `{key}` must not be negative")))
    }

    fn tokens(&self, key: &str, path: &str) -> Result<u64, Rejection> {
        self.optional_tokens_in(key, path)?
            .ok_or_else(|| invalid(format!("missing field `{path}{key}`")))
    }

    fn optional_tokens(&self, key: &str) -> Result<Option<u64>, Rejection> {
        self.optional_tokens_in(key, "")
    }

    fn optional_tokens_in(&self, key: &str, path: &str) -> Result<Option<u64>, Rejection> {
        if matches!(self.object.get(key), None | Some(Value::Null)) {
            return Ok(None);
        }
        let tokens = self
            .unsigned(key)
            .map_err(|rejection| prefix_detail(rejection, path))?;
        if tokens > self.limits.tokens_max {
            return Err(invalid(format!(
                "field `{path}{key}` is above limits.tokens_max ({})",
                self.limits.tokens_max
            )));
        }
        Ok(Some(tokens))
    }

    fn timestamp(&self, key: &str) -> Result<DateTime<Utc>, Rejection> {
        let text = self
            .optional_text(key, 64)?
            .ok_or_else(|| invalid(format!("missing field `{key}`")))?;
        DateTime::parse_from_rfc3339(&text)
            .map(|time| time.with_timezone(&Utc))
            .map_err(|_| invalid(format!("field `{key}` is not an RFC 3339 time")))
    }
}

/// Joins the text parts of a multi-part chat content array.
fn text_parts(parts: &[Value], index: usize) -> Result<String, Rejection> {
    let mut content = String::new();
    for part in parts {
        match part.get("text") {
            Some(Value::String(text)) => content.push_str(text),
            None => {}
            Some(_) => {
                return Err(invalid(format!(
                    "`messages[{index}].content[].text` must be a string"
                )));
            }
        }
    }
    Ok(content)
}

fn invalid(detail: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidField, detail)
}

fn prefix_detail(mut rejection: Rejection, path: &str) -> Rejection {
    if !path.is_empty() {
        rejection.detail = rejection.detail.replacen('`', &format!("`{path}"), 1);
    }
    rejection
}

/// Why a reservation was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenialReason {
    InsufficientCredits,
    UnknownModel,
    TooManyActiveStreams,
    InvalidRequest,
}

impl DenialReason {
    /// The wire value.
    pub fn code(self) -> &'static str {
        match self {
            Self::InsufficientCredits => "insufficient_credits",
            Self::UnknownModel => "unknown_model",
            Self::TooManyActiveStreams => "too_many_active_streams",
            Self::InvalidRequest => "invalid_request",
        }
    }
}

/// Source of a hold's output allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SizedBy {
    /// The start's own `max_output_tokens`.
    MaxOutputTokens,
    /// A percentile of this user's recent completions.
    UserHistory,
    /// A percentile of this model's recent completions across users, for a
    /// user with too little history.
    ModelHistory,
    /// The model's `max_output_tokens` setting.
    ModelDefault,
}

impl SizedBy {
    /// The wire value, also stored in the database.
    pub fn code(self) -> &'static str {
        match self {
            Self::MaxOutputTokens => "max_output_tokens",
            Self::UserHistory => "user_history",
            Self::ModelHistory => "model_history",
            Self::ModelDefault => "model_default",
        }
    }
}

/// Reply and event: a hold was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationGranted {
    #[serde(rename = "type")]
    pub kind: ReservationGrantedType,
    pub event_id: Uuid,
    pub user_id: String,
    pub stream_id: String,
    pub reservation_id: Uuid,
    pub model: String,
    pub reserved: i64,
    pub prompt_tokens: u64,
    /// Output allowance the hold covers.
    pub max_output_tokens: u64,
    pub available_after: i64,
    pub expires_at: DateTime<Utc>,
    /// Source of `max_output_tokens`. An addition to version 1 of the wire
    /// contract.
    pub sized_by: SizedBy,
}

/// Reply and event: no hold was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationDenied {
    #[serde(rename = "type")]
    pub kind: ReservationDeniedType,
    pub event_id: Uuid,
    /// Absent only when an invalid request carried no valid `user_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Absent only when an invalid request carried no valid `stream_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    pub reason: DenialReason,
    /// Credits the hold would have taken. Given, with `available`, for
    /// `insufficient_credits` and `too_many_active_streams` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    /// Credits the user had available. Given, with `requested`, for
    /// `insufficient_credits` and `too_many_active_streams` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// One line saying what was wrong with an invalid request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Estimated wait until one of the user's streams ends, for
    /// `too_many_active_streams` only. An addition to version 1 of the
    /// wire contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

/// Where the settled token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    Provider,
    Counted,
}

/// How a hold ended: the stream's own end status, or expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SettleStatus {
    Completed,
    Cancelled,
    Failed,
    Expired,
}

impl From<EndStatus> for SettleStatus {
    fn from(status: EndStatus) -> Self {
        match status {
            EndStatus::Completed => Self::Completed,
            EndStatus::Cancelled => Self::Cancelled,
            EndStatus::Failed => Self::Failed,
        }
    }
}

impl SettleStatus {
    /// The wire value, also stored in the database.
    pub fn code(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }
}

/// Event: a hold was settled. Published exactly once per hold (repeats
/// after a crash carry the same `event_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationSettled {
    #[serde(rename = "type")]
    pub kind: ReservationSettledType,
    pub event_id: Uuid,
    pub user_id: String,
    pub stream_id: String,
    pub reservation_id: Uuid,
    pub model: String,
    pub status: SettleStatus,
    pub reserved: i64,
    /// Price of the usage.
    pub cost: i64,
    /// What the user paid.
    pub charged: i64,
    /// `reserved - charged` when positive.
    pub refunded: i64,
    /// `cost - reserved` when positive.
    pub overrun: i64,
    /// Part of the overrun not charged under the `cap` policy.
    pub forgiven: i64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub counted_completion_tokens: u64,
    pub usage_source: UsageSource,
    pub balance_after: i64,
}

/// Event: a `stream.ended` arrived after its hold expired, and the charge
/// was corrected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationAdjusted {
    #[serde(rename = "type")]
    pub kind: ReservationAdjustedType,
    pub event_id: Uuid,
    pub user_id: String,
    pub stream_id: String,
    pub reservation_id: Uuid,
    pub status: SettleStatus,
    pub previously_charged: i64,
    pub charged: i64,
    /// Positive when more was charged, negative when credits came back.
    pub difference: i64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub usage_source: UsageSource,
    pub balance_after: i64,
}

/// Event: counted usage first cost more than the hold, and the hold could
/// not grow to cover it (growth is off, the user has no credits left or
/// the hold is at `reservations.hold_max_credits`). Sent once per stream;
/// the chat backend may stop the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageOverReservation {
    #[serde(rename = "type")]
    pub kind: UsageOverReservationType,
    pub event_id: Uuid,
    pub user_id: String,
    pub stream_id: String,
    pub reservation_id: Uuid,
    pub reserved: i64,
    /// Price of the prompt and the chunks counted so far.
    pub cost_so_far: i64,
    pub prompt_tokens: u64,
    pub counted_completion_tokens: u64,
}

/// Reason a hold grew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExtensionReason {
    /// Counted usage reached `reservations.growth_threshold_percent` of the
    /// hold.
    UsageThreshold,
    /// Counted usage had already passed the hold, because one chunk's
    /// tokens went past both the threshold and the hold, or because an
    /// earlier growth found no credits.
    OverReservation,
}

/// Limit that made a hold grow by less than it requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrowthLimit {
    /// The user had fewer credits available; none are left.
    AvailableCredits,
    /// The hold reached `reservations.hold_max_credits`.
    HoldMaxCredits,
}

/// Event: a hold grew from the user's available credits while its stream
/// ran. An addition to version 1 of the wire contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationExtended {
    #[serde(rename = "type")]
    pub kind: ReservationExtendedType,
    pub event_id: Uuid,
    pub user_id: String,
    pub stream_id: String,
    pub reservation_id: Uuid,
    /// Credits added to the hold.
    pub added: i64,
    /// The whole hold after this growth.
    pub reserved: i64,
    /// The user's available credits after this growth.
    pub available_after: i64,
    pub reason: ExtensionReason,
    /// Set when the hold grew by less than the steps it needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_by: Option<GrowthLimit>,
    /// Growths of this hold so far, this one included.
    pub extensions: u32,
    /// Price of the prompt and the chunks counted so far.
    pub cost_so_far: i64,
    pub prompt_tokens: u64,
    pub counted_completion_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> LimitSettings {
        crate::settings::Settings::default().limits
    }

    fn decode_value(value: Value) -> Result<Inbound, Rejection> {
        decode(value.to_string().as_bytes(), &limits())
    }

    fn reason_of(value: Value) -> RejectReason {
        decode_value(value).unwrap_err().reason
    }

    fn start() -> Value {
        json!({"type": "stream.started", "message_id": "m-1", "user_id": "u-1",
               "stream_id": "s-1", "model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": "Explain quicksort"}],
               "max_output_tokens": 1024, "occurred_at": "2026-12-04T10:00:01Z"})
    }

    #[test]
    fn contract_start_decodes() {
        let Inbound::StreamStarted(started) = decode_value(start()).unwrap() else {
            panic!("not a start");
        };
        assert_eq!(started.stream_id, "s-1");
        assert_eq!(started.max_output_tokens, Some(1024));
        assert!(matches!(started.prompt_input(), PromptInput::Messages(m) if m.len() == 1));
    }

    #[test]
    fn chat_message_without_content_counts_as_empty() {
        let mut value = start();
        value["messages"] = json!([{"role": "assistant"}, {"role": "user", "content": "hi"}]);
        let Inbound::StreamStarted(started) = decode_value(value).unwrap() else {
            panic!("not a start");
        };
        let PromptInput::Messages(messages) = started.prompt_input() else {
            panic!("the prompt is not in chat form");
        };
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].content, "");
    }

    #[test]
    fn empty_messages_are_invalid() {
        let mut value = start();
        value["messages"] = json!([]);
        let rejection = decode_value(value).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidField);
        assert!(rejection.detail.contains("`messages`"), "{}", rejection.detail);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut value = start();
        value["extra"] = json!({"anything": [1, 2]});
        assert!(decode_value(value).is_ok());
    }

    #[test]
    fn body_over_limit_is_too_large() {
        let body = vec![b' '; limits().message_bytes_max + 1];
        assert_eq!(decode(&body, &limits()).unwrap_err().reason, RejectReason::TooLarge);
    }

    #[test]
    fn non_utf8_body_is_invalid_utf8() {
        let rejection = decode(b"{\"type\": \"\xff\"}", &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidUtf8);
    }

    #[test]
    fn non_json_body_is_invalid_json() {
        let rejection = decode(b"not json", &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        let rejection = decode(b"[1]", &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
    }

    #[test]
    fn lone_surrogate_is_named_without_text() {
        let body = br#"{"type":"chunk.emitted","message_id":"c","user_id":"u",
            "stream_id":"s","seq":0,"delta":"secret \ud83d","occurred_at":"2026-12-04T10:00:00Z"}"#;
        let rejection = decode(body, &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        assert!(rejection.detail.contains("hex escape"), "{}", rejection.detail);
        assert!(!rejection.detail.contains("secret"), "{}", rejection.detail);
    }

    #[test]
    fn unknown_type_is_rejected() {
        let mut value = start();
        value["type"] = json!("stream.paused");
        assert_eq!(reason_of(value), RejectReason::UnknownType);
    }

    #[test]
    fn missing_and_negative_fields_are_invalid() {
        let mut missing = start();
        missing.as_object_mut().unwrap().remove("stream_id");
        assert_eq!(reason_of(missing), RejectReason::InvalidField);

        let mut negative = start();
        negative["max_output_tokens"] = json!(-5);
        let rejection = decode_value(negative).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidField);
        assert!(rejection.detail.contains("max_output_tokens"));

        let grant = json!({"type": "credits.granted", "message_id": "g", "user_id": "u",
                           "amount": -1, "occurred_at": "2026-12-04T10:00:00Z"});
        assert_eq!(reason_of(grant), RejectReason::InvalidField);
    }

    #[test]
    fn overlong_id_is_invalid() {
        let mut value = start();
        value["user_id"] = json!("u".repeat(201));
        assert_eq!(reason_of(value), RejectReason::InvalidField);
    }

    fn grant_value() -> Value {
        json!({"type": "credits.granted", "message_id": "g-1", "user_id": "u-1",
               "amount": 5, "reason": "purchase", "occurred_at": "2026-12-04T10:00:00Z"})
    }

    fn chunk_value() -> Value {
        json!({"type": "chunk.emitted", "message_id": "c-1", "user_id": "u-1",
               "stream_id": "s-1", "seq": 0, "delta": "Quick",
               "occurred_at": "2026-12-04T10:00:02Z"})
    }

    fn end_value() -> Value {
        json!({"type": "stream.ended", "message_id": "e-1", "user_id": "u-1",
               "stream_id": "s-1", "status": "completed",
               "occurred_at": "2026-12-04T10:00:03Z"})
    }

    #[test]
    fn nul_in_stored_field_is_invalid() {
        let cases = [
            (grant_value(), "message_id"),
            (grant_value(), "user_id"),
            (grant_value(), "reason"),
            (start(), "message_id"),
            (start(), "user_id"),
            (start(), "stream_id"),
            (start(), "model"),
            (chunk_value(), "message_id"),
            (chunk_value(), "user_id"),
            (chunk_value(), "stream_id"),
            (end_value(), "message_id"),
            (end_value(), "user_id"),
            (end_value(), "stream_id"),
        ];
        for (mut value, field) in cases {
            let kind = value["type"].clone();
            value[field] = json!("a\u{0}b");
            let rejection = decode_value(value).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::InvalidField, "{kind} {field}");
            assert!(
                rejection.detail.contains(&format!("`{field}`")),
                "{kind} {field}: {}",
                rejection.detail
            );
            assert!(rejection.detail.contains("NUL"), "{kind} {field}: {}", rejection.detail);
        }
    }

    #[test]
    fn nul_in_unstored_text_is_kept() {
        let mut value = chunk_value();
        value["delta"] = json!("a\u{0}b");
        let Inbound::ChunkEmitted(chunk) = decode_value(value).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(chunk.delta, "a\u{0}b");
    }

    #[test]
    fn rejection_with_nul_id_drops_that_id() {
        let mut value = start();
        value["stream_id"] = json!("s\u{0}");
        let rejection = decode_value(value).unwrap_err();
        assert_eq!(rejection.partial.stream_id, None);
        assert_eq!(rejection.partial.user_id.as_deref(), Some("u-1"));
    }

    #[test]
    fn id_check_names_each_rule() {
        assert_eq!(check_id("u-1", 200), Ok(()));
        assert_eq!(check_id("", 200).unwrap_err(), "must not be empty");
        assert!(check_id("abc", 2).unwrap_err().contains("longer than 2"));
        assert!(check_id("a\u{0}", 200).unwrap_err().contains("NUL"));
    }

    #[test]
    fn duplicate_top_level_key_is_invalid_json() {
        let body = br#"{"type":"credits.granted","message_id":"g","user_id":"u",
            "amount":1,"amount":1000000,"occurred_at":"2026-12-04T10:00:00Z"}"#;
        let rejection = decode(body, &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        assert!(rejection.detail.contains("`amount`"), "{}", rejection.detail);
        assert!(!rejection.detail.contains("1000000"), "{}", rejection.detail);
    }

    #[test]
    fn duplicate_nested_key_is_invalid_json() {
        let body = br#"{"type":"stream.ended","message_id":"e","user_id":"u",
            "stream_id":"s","status":"completed",
            "usage":{"prompt_tokens":5,"completion_tokens":1,"completion_tokens":9},
            "occurred_at":"2026-12-04T10:00:00Z"}"#;
        let rejection = decode(body, &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        assert!(rejection.detail.contains("`completion_tokens`"), "{}", rejection.detail);

        let in_array = br#"{"type":"stream.started","message_id":"m","user_id":"u",
            "stream_id":"s","model":"gpt-4o-mini",
            "messages":[{"role":"user","content":"a","content":"b"}],
            "occurred_at":"2026-12-04T10:00:00Z"}"#;
        let rejection = decode(in_array, &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        assert!(rejection.detail.contains("`content`"), "{}", rejection.detail);
    }

    #[test]
    fn duplicate_key_written_with_escapes_is_found() {
        let body = br#"{"type":"credits.granted","message_id":"g","user_id":"u",
            "amount":1,"amount":2,"occurred_at":"2026-12-04T10:00:00Z"}"#;
        let rejection = decode(body, &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
    }

    #[test]
    fn duplicate_key_detail_is_one_short_line() {
        let key = format!("k\n{}", "x".repeat(500));
        let body = format!(r#"{{"{key}":1,"{key}":2}}"#).replace('\n', "\\n");
        let rejection = decode(body.as_bytes(), &limits()).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidJson);
        assert!(!rejection.detail.contains('\n'), "{}", rejection.detail);
        assert!(rejection.detail.len() < 200, "{}", rejection.detail);
    }

    #[test]
    fn equal_keys_in_different_objects_are_accepted() {
        let mut value = start();
        value["extra"] = json!({"type": "x", "user_id": "y"});
        assert!(decode_value(value).is_ok());
    }

    #[test]
    fn rejection_detail_quotes_no_text() {
        let mut value = start();
        value["type"] = json!("secret prompt words");
        let rejection = decode_value(value).unwrap_err();
        assert!(!rejection.detail.contains("secret"), "{}", rejection.detail);

        let mut value = start();
        value["max_output_tokens"] = json!("secret words");
        let rejection = decode_value(value).unwrap_err();
        assert!(!rejection.detail.contains("secret"), "{}", rejection.detail);
    }

    #[test]
    fn rejection_keeps_valid_ids() {
        let mut value = start();
        value["model"] = json!(7);
        let rejection = decode_value(value).unwrap_err();
        assert_eq!(rejection.partial.user_id.as_deref(), Some("u-1"));
        assert_eq!(rejection.partial.stream_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn end_with_cached_above_prompt_is_invalid() {
        let end = json!({"type": "stream.ended", "message_id": "e", "user_id": "u",
                         "stream_id": "s", "status": "completed",
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                   "cached_prompt_tokens": 6},
                         "occurred_at": "2026-12-04T10:00:00Z"});
        assert_eq!(reason_of(end), RejectReason::InvalidField);
    }

    #[test]
    fn serialized_messages_decode_to_themselves() {
        let Inbound::StreamStarted(started) = decode_value(start()).unwrap() else {
            panic!("not a start");
        };
        let round = serde_json::to_value(&started).unwrap();
        assert_eq!(decode_value(round).unwrap(), Inbound::StreamStarted(started));
    }

    #[test]
    fn chat_content_parts_are_joined() {
        let mut value = start();
        value["messages"] = json!([{"role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        let Inbound::StreamStarted(started) = decode_value(value).unwrap() else {
            panic!("not a start");
        };
        assert_eq!(started.messages.unwrap()[0].content, "ab");
    }
}
