//! Token counting with tiktoken encoders that are built once per process.
//!
//! User text is counted with `encode_ordinary`, so a prompt that contains
//! `<|endoftext|>` is counted as the plain text it is and never as a
//! special token.

use tiktoken_rs::CoreBPE;

/// Encodings a model entry may name.
pub const ENCODINGS: &[&str] = &[
    "o200k_base",
    "o200k_harmony",
    "cl100k_base",
    "p50k_base",
    "p50k_edit",
    "r50k_base",
];

/// Tokens that OpenAI's chat format adds around every message: a start
/// marker, the role separator and an end marker.
const FRAMING_TOKENS_PER_MESSAGE: u64 = 3;

/// Tokens that a message's optional `name` field adds.
const FRAMING_TOKENS_PER_NAME: u64 = 1;

/// Tokens that prime the assistant's reply after the last message.
const FRAMING_TOKENS_PER_REPLY: u64 = 3;

/// Returns the shared encoder of `encoding`, building it on first use.
/// Building one costs 40 to 100 ms, so each is built once per process.
pub fn encoder(encoding: &str) -> Option<&'static CoreBPE> {
    let bpe = match encoding {
        "o200k_base" => tiktoken_rs::o200k_base_singleton(),
        "o200k_harmony" => tiktoken_rs::o200k_harmony_singleton(),
        "cl100k_base" => tiktoken_rs::cl100k_base_singleton(),
        "p50k_base" => tiktoken_rs::p50k_base_singleton(),
        "p50k_edit" => tiktoken_rs::p50k_edit_singleton(),
        "r50k_base" => tiktoken_rs::r50k_base_singleton(),
        _ => return None,
    };
    Some(bpe)
}

/// Maximum run of whitespace counted in one call to the encoder. The
/// pattern that splits text into words fails on a run of 999,999 spaces
/// or tabs in the o200k encodings, and tiktoken-rs then panics. A 1 MiB
/// body can contain such a run, so a longer run is counted in parts.
/// Parts of a multiple of 128 characters, the longest run of spaces that
/// one token covers, keep the count of a run of spaces exact. A part
/// boundary inside a run that mixes kinds of whitespace can move the
/// count by one token.
const WHITESPACE_RUN_MAX: usize = 1 << 19;

/// Counts the tokens of plain text.
pub fn count_text(bpe: &CoreBPE, text: &str) -> u64 {
    count_in_parts(bpe, text, WHITESPACE_RUN_MAX)
}

/// Counts `text`, cutting every run of whitespace after each `run_max`
/// characters of it and counting the parts one by one.
fn count_in_parts(bpe: &CoreBPE, text: &str, run_max: usize) -> u64 {
    let encode = |part: &str| if part.is_empty() { 0 } else { bpe.encode_ordinary(part).len() as u64 };
    // A run is never longer than the text's length in bytes.
    if text.len() <= run_max {
        return encode(text);
    }
    let (mut total, mut part_start, mut run) = (0, 0, 0);
    for (offset, character) in text.char_indices() {
        if !character.is_whitespace() {
            run = 0;
            continue;
        }
        if run > 0 && run % run_max == 0 {
            total += encode(&text[part_start..offset]);
            part_start = offset;
        }
        run += 1;
    }
    total + encode(&text[part_start..])
}

/// One message of a chat prompt, borrowed from the inbound message.
#[derive(Debug, Clone, Copy)]
pub struct ChatText<'a> {
    pub role: &'a str,
    pub name: Option<&'a str>,
    pub content: &'a str,
}

/// Counts a chat prompt the way OpenAI bills it: each message's role, name
/// and content plus the framing tokens the chat format adds.
pub fn count_chat<'a>(bpe: &CoreBPE, messages: impl IntoIterator<Item = ChatText<'a>>) -> u64 {
    let mut total = FRAMING_TOKENS_PER_REPLY;
    for message in messages {
        total += FRAMING_TOKENS_PER_MESSAGE;
        total += count_text(bpe, message.role);
        total += count_text(bpe, message.content);
        if let Some(name) = message.name {
            total += FRAMING_TOKENS_PER_NAME + count_text(bpe, name);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k() -> &'static CoreBPE {
        encoder("o200k_base").unwrap()
    }

    fn user(content: &str) -> ChatText<'_> {
        ChatText {
            role: "user",
            name: None,
            content,
        }
    }

    #[test]
    fn chat_count_matches_openai_usage() {
        // Provider usage recorded for gpt-4o-2024-08-06 in the bundled
        // OpenAI captures: 9 and 14 prompt tokens.
        assert_eq!(count_chat(o200k(), [user("Say foo")]), 9);
        assert_eq!(
            count_chat(o200k(), [user("What's the weather like in SF?")]),
            14
        );
    }

    #[test]
    fn special_token_text_counts_as_plain_text() {
        assert!(count_text(o200k(), "<|endoftext|>") > 1);
    }

    #[test]
    fn empty_text_has_no_tokens() {
        assert_eq!(count_text(o200k(), ""), 0);
    }

    /// Runs of one kind of whitespace, before, between and after words,
    /// counted in parts of 1,024 characters, give every encoding's own
    /// count of the whole text.
    #[test]
    fn count_in_parts_matches_whole() {
        let texts = [
            " ".repeat(5_000),
            format!("word{}word", " ".repeat(5_000)),
            format!("word{}\nword", " ".repeat(4_999)),
            format!("{}x", "\t".repeat(3_000)),
            "\n".repeat(4_000),
            format!("a{}b{}!", " ".repeat(2_049), " ".repeat(3_071)),
        ];
        for name in ENCODINGS {
            let bpe = encoder(name).unwrap();
            for text in &texts {
                let whole = bpe.encode_ordinary(text).len() as u64;
                assert_eq!(count_in_parts(bpe, text, 1_024), whole, "{name}, {} bytes", text.len());
            }
        }
    }

    /// A million spaces, which `encode_ordinary` cannot split into words,
    /// fit in a 1 MiB chunk. Runs of 128 spaces are one token each in
    /// o200k, so 1,000,000 = 7,812 * 128 + 64 spaces are 7,813 tokens.
    #[test]
    fn count_text_million_spaces() {
        let spaces = " ".repeat(1_000_000);
        assert_eq!(count_text(o200k(), &spaces), 7_813);
        assert_eq!(count_text(o200k(), &" ".repeat(128 * 3)), 3);
    }

    #[test]
    fn every_listed_encoding_builds() {
        for name in ENCODINGS {
            assert!(encoder(name).is_some(), "{name}");
        }
        assert!(encoder("gpt2").is_none());
    }
}
