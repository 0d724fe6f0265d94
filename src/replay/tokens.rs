//! Splitting a text into token-sized deltas.

use tiktoken_rs::CoreBPE;

/// Splits text into token-sized deltas with the given tiktoken encoder.
///
/// The text is encoded with `encode_ordinary`, so special-token text such as
/// `<|endoftext|>` is split like any other text. Each token is then decoded on
/// its own. A token whose bytes are not valid UTF-8 alone, such as part of a
/// multi-byte character, is joined with the following tokens until the bytes
/// form valid UTF-8. Every delta is therefore valid UTF-8, and concatenating
/// the deltas gives the original text back exactly.
pub fn token_sized_deltas(text: &str, bpe: &CoreBPE) -> Vec<String> {
    let mut deltas = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0;

    for token in bpe.encode_ordinary(text) {
        let Ok(bytes) = bpe.decode_bytes(&[token]) else {
            // The encoder only returns tokens it can decode, so this is not
            // expected. The rest of the text becomes one delta so that the
            // round trip still holds.
            deltas.push(text[consumed..].to_string());
            return deltas;
        };
        pending.extend_from_slice(&bytes);

        // `pending` always starts at a character boundary, so it fails to
        // decode only while it ends inside a multi-byte character.
        if let Ok(piece) = std::str::from_utf8(&pending) {
            consumed += piece.len();
            deltas.push(piece.to_string());
            pending.clear();
        }
    }

    // The tokens of a valid UTF-8 text end at a character boundary, so nothing
    // is left over. The check keeps the round trip exact if that ever fails.
    if consumed < text.len() {
        deltas.push(text[consumed..].to_string());
    }
    deltas
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tiktoken_rs::{cl100k_base_singleton, o200k_base_singleton};

    use super::*;
    use crate::replay::load_conversations;

    const TREES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/oasst-en100/en_100_tree.jsonl"
    );

    #[test]
    fn answers_round_trip_with_o200k() {
        let bpe = o200k_base_singleton();
        let conversations = load_conversations(Path::new(TREES)).expect("bundled trees load");
        for conversation in &conversations {
            let deltas = token_sized_deltas(&conversation.answer, bpe);
            // `assert!` rather than `assert_eq!`, so a failure prints the
            // message id and not the message text.
            assert!(
                deltas.concat() == conversation.answer,
                "answer {} does not round-trip",
                conversation.answer_message_id
            );
        }
    }

    #[test]
    fn answers_round_trip_with_cl100k() {
        let bpe = cl100k_base_singleton();
        let conversations = load_conversations(Path::new(TREES)).expect("bundled trees load");
        for conversation in &conversations {
            let deltas = token_sized_deltas(&conversation.answer, bpe);
            // `assert!` rather than `assert_eq!`, so a failure prints the
            // message id and not the message text.
            assert!(
                deltas.concat() == conversation.answer,
                "answer {} does not round-trip",
                conversation.answer_message_id
            );
        }
    }

    #[test]
    fn ascii_text_gives_one_delta_per_token() {
        let bpe = o200k_base_singleton();
        let text = "The quick brown fox jumps over the lazy dog, then counts to 12345.";
        let token_count = bpe.encode_ordinary(text).len();

        let deltas = token_sized_deltas(text, bpe);

        assert_eq!(deltas.len(), token_count);
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn split_characters_are_joined() {
        // cl100k_base encodes every character here as several tokens that are
        // not valid UTF-8 alone.
        let bpe = cl100k_base_singleton();
        let text = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦀🦀";

        let deltas = token_sized_deltas(text, bpe);

        assert!(deltas.len() < bpe.encode_ordinary(text).len());
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn empty_text_gives_no_deltas() {
        let deltas = token_sized_deltas("", o200k_base_singleton());
        assert!(deltas.is_empty());
    }
}
