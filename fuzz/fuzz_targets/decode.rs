//! Feeds arbitrary delivery bodies to the inbound message decoder.
//!
//! Checks, for every input: `decode` returns instead of panicking, the ids
//! kept from a rejected message respect `limits.id_chars_max`, and an
//! accepted message serialises to JSON that decodes to the same message.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use stream_credits::messages::{Inbound, decode};
use stream_credits::settings::{LimitSettings, Settings};

static LIMITS: LazyLock<LimitSettings> = LazyLock::new(|| Settings::default().limits);

fuzz_target!(|data: &[u8]| {
    match decode(data, &LIMITS) {
        Ok(message) => check_round_trip(&message),
        Err(rejection) => {
            let partial = rejection.partial;
            let kept_ids = [
                partial.type_name,
                partial.message_id,
                partial.user_id,
                partial.stream_id,
            ];
            for id in kept_ids.iter().flatten() {
                assert!(id.chars().count() <= LIMITS.id_chars_max);
            }
        }
    }
});

/// Serialises an accepted message as a producer would and decodes it again.
fn check_round_trip(message: &Inbound) {
    let body = match message {
        Inbound::CreditsGranted(inner) => serde_json::to_vec(inner),
        Inbound::StreamStarted(inner) => serde_json::to_vec(inner),
        Inbound::ChunkEmitted(inner) => serde_json::to_vec(inner),
        Inbound::StreamEnded(inner) => serde_json::to_vec(inner),
    }
    .expect("decoded messages serialise");
    // A timestamp can grow when serialised (`.1Z` becomes `.100Z`), so the
    // body size limit is lifted for the second decode. Every other limit
    // counts characters or tokens, which serialising keeps.
    let limits = LimitSettings {
        message_bytes_max: usize::MAX,
        ..LIMITS.clone()
    };
    let again = decode(&body, &limits).expect("a serialised message decodes");
    assert!(&again == message, "round trip changed the message");
}
