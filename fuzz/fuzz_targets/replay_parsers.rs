//! Feeds arbitrary text to the recorded-stream parser and to the splitter
//! that cuts a text into token-sized deltas.
//!
//! Bytes that are not UTF-8 are converted lossily first, so valid UTF-8
//! reaches both functions unchanged. Checks, for every input:
//! `parse_recording` returns instead of panicking, a parsed recording has no
//! empty delta and no cached prompt tokens above its prompt tokens, and the
//! o200k_base deltas of the text concatenate to the text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stream_credits::replay::{parse_recording, token_sized_deltas};
use stream_credits::tokens::encoder;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if let Ok(recording) = parse_recording(&text) {
        assert!(recording.deltas.iter().all(|delta| !delta.is_empty()));
        if let Some(usage) = recording.usage {
            assert!(usage.cached_prompt_tokens <= usage.prompt_tokens);
        }
    }

    let bpe = encoder("o200k_base").expect("o200k_base is a listed encoding");
    let deltas = token_sized_deltas(&text, bpe);
    assert!(deltas.iter().all(|delta| !delta.is_empty()));
    // `assert!` rather than `assert_eq!`, so a failure does not print two
    // copies of a possibly long input.
    assert!(
        deltas.concat() == text,
        "deltas do not concatenate to the input"
    );
});
