//! Tests against the bundled provider recordings and small inline streams.
//!
//! Expected numbers were read from the recordings by hand: usage from the
//! provider's usage fields, delta counts by counting the non-empty text fields.

use std::path::Path;

use super::*;

const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");

struct Expected {
    format: Format,
    model: Option<&'static str>,
    deltas: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_prompt_tokens: u64,
    finish_reason: &'static str,
}

fn assert_capture(relative_path: &str, expected: Expected) {
    let path = Path::new(DATA_DIR).join(relative_path);
    let recording = parse_recording_file(&path).expect("bundled recording parses");

    assert_eq!(recording.format, expected.format, "format");
    assert_eq!(recording.model.as_deref(), expected.model, "model");
    assert_eq!(recording.deltas.len(), expected.deltas, "delta count");
    assert!(
        recording.deltas.iter().all(|delta| !delta.is_empty()),
        "no delta is empty"
    );
    assert_eq!(
        recording.finish_reason.as_deref(),
        Some(expected.finish_reason),
        "finish reason"
    );

    let usage = recording.usage.expect("recording carries usage");
    assert_eq!(usage.prompt_tokens, expected.prompt_tokens, "prompt tokens");
    assert_eq!(
        usage.completion_tokens, expected.completion_tokens,
        "completion tokens"
    );
    assert_eq!(
        usage.cached_prompt_tokens, expected.cached_prompt_tokens,
        "cached prompt tokens"
    );
}

fn parse_error(text: &str) -> ReplayError {
    parse_recording(text).expect_err("recording is rejected")
}

// Recordings from the Vercel AI SDK fixtures, one JSON event per line.

#[test]
fn alibaba_qwen_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/alibaba--alibaba-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("qwen3-max"),
            deltas: 171,
            prompt_tokens: 18,
            completion_tokens: 779,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn bedrock_converse_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/amazon-bedrock--amazon-bedrock-text.chunks.txt",
        Expected {
            format: Format::Bedrock,
            model: None,
            deltas: 12,
            prompt_tokens: 22,
            completion_tokens: 55,
            cached_prompt_tokens: 0,
            finish_reason: "end_turn",
        },
    );
}

#[test]
fn anthropic_delta_replaces_input_tokens() {
    // message_start reports 43 input tokens and message_delta reports 61.
    assert_capture(
        "vercel-ai-fixtures/anthropic--anthropic-message-delta-input-tokens.chunks.txt",
        Expected {
            format: Format::Anthropic,
            model: Some("claude-opus-4-5-20251101"),
            deltas: 2,
            prompt_tokens: 61,
            completion_tokens: 2,
            cached_prompt_tokens: 0,
            finish_reason: "end_turn",
        },
    );
}

#[test]
fn anthropic_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/anthropic--anthropic-text.chunks.txt",
        Expected {
            format: Format::Anthropic,
            model: Some("claude-sonnet-4-5-20250929"),
            deltas: 6,
            prompt_tokens: 12,
            completion_tokens: 30,
            cached_prompt_tokens: 0,
            finish_reason: "end_turn",
        },
    );
}

#[test]
fn anthropic_duplicate_start_counts_once() {
    assert_capture(
        "vercel-ai-fixtures/anthropic--duplicate-message-start.chunks.txt",
        Expected {
            format: Format::Anthropic,
            model: Some("claude-3-haiku-20240307"),
            deltas: 1,
            prompt_tokens: 17,
            completion_tokens: 227,
            cached_prompt_tokens: 0,
            finish_reason: "end_turn",
        },
    );
}

#[test]
fn cohere_uses_billed_units() {
    // `tokens` reports 507/10 with 448 cached, `billed_units` reports 12/7.
    assert_capture(
        "vercel-ai-fixtures/cohere--cohere-text.chunks.txt",
        Expected {
            format: Format::Cohere,
            model: None,
            deltas: 7,
            prompt_tokens: 12,
            completion_tokens: 7,
            cached_prompt_tokens: 0,
            finish_reason: "COMPLETE",
        },
    );
}

#[test]
fn deepseek_reasoning_counted_once() {
    // 205 reasoning tokens are inside completion_tokens: 18 + 219 = 237 total.
    assert_capture(
        "vercel-ai-fixtures/deepseek--deepseek-reasoning.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("deepseek-reasoner"),
            deltas: 218,
            prompt_tokens: 18,
            completion_tokens: 219,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn deepseek_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/deepseek--deepseek-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("deepseek-chat"),
            deltas: 400,
            prompt_tokens: 13,
            completion_tokens: 400,
            cached_prompt_tokens: 0,
            finish_reason: "length",
        },
    );
}

#[test]
fn gemini_adds_thoughts_to_output() {
    // 23 candidate tokens plus 185 thought tokens.
    assert_capture(
        "vercel-ai-fixtures/google--google-text.chunks.txt",
        Expected {
            format: Format::Gemini,
            model: Some("gemini-3-pro-preview"),
            deltas: 2,
            prompt_tokens: 9,
            completion_tokens: 208,
            cached_prompt_tokens: 0,
            finish_reason: "STOP",
        },
    );
}

#[test]
fn groq_usage_read_once() {
    // The last chunk carries 45/662 in both `usage` and `x_groq.usage`.
    assert_capture(
        "vercel-ai-fixtures/groq--groq-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("llama-3.3-70b-versatile"),
            deltas: 661,
            prompt_tokens: 45,
            completion_tokens: 662,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn mistral_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/mistral--mistral-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("mistral-small-latest"),
            deltas: 6,
            prompt_tokens: 13,
            completion_tokens: 8,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn azure_prompt_filter_event_accepted() {
    // 78 completion tokens include 64 reasoning tokens: 15 + 78 = 93 total.
    assert_capture(
        "vercel-ai-fixtures/openai--azure-model-router.1.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-5-nano-2025-08-07"),
            deltas: 4,
            prompt_tokens: 15,
            completion_tokens: 78,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_legacy_completion_stream() {
    assert_capture(
        "vercel-ai-fixtures/openai--openai-completion-text.chunks.txt",
        Expected {
            format: Format::OpenAiCompletion,
            model: Some("gpt-3.5-turbo-instruct:20230824-v2"),
            deltas: 16,
            prompt_tokens: 14,
            completion_tokens: 16,
            cached_prompt_tokens: 0,
            finish_reason: "length",
        },
    );
}

#[test]
fn openai_chat_text_stream() {
    assert_capture(
        "vercel-ai-fixtures/openai--openai-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4.1-nano-2025-04-14"),
            deltas: 300,
            prompt_tokens: 16,
            completion_tokens: 300,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn xai_compatible_adds_reasoning_tokens() {
    // 2 completion tokens plus 340 reasoning tokens: 12 + 2 + 340 = 354 total.
    assert_capture(
        "vercel-ai-fixtures/openai-compatible--xai-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("grok-3-mini"),
            deltas: 342,
            prompt_tokens: 12,
            completion_tokens: 342,
            cached_prompt_tokens: 11,
            finish_reason: "stop",
        },
    );
}

#[test]
fn perplexity_running_usage_not_summed() {
    // Every chunk carries a growing usage, and the last one reports 11/434.
    assert_capture(
        "vercel-ai-fixtures/perplexity--perplexity-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("sonar"),
            deltas: 7,
            prompt_tokens: 11,
            completion_tokens: 434,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn xai_adds_reasoning_tokens() {
    // 1 completion token plus 290 reasoning tokens: 12 + 1 + 290 = 303 total.
    assert_capture(
        "vercel-ai-fixtures/xai--xai-text.chunks.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("grok-3-mini"),
            deltas: 6,
            prompt_tokens: 12,
            completion_tokens: 291,
            cached_prompt_tokens: 11,
            finish_reason: "stop",
        },
    );
}

// Raw event-stream bodies from the openai-python snapshots, all gpt-4o.

#[test]
fn openai_sse_refusal_stream() {
    assert_capture(
        "openai-python-snapshots/173417d553406f034f643e5db3f8d591fb691ebac56f5ae39a22cc7d455c5353.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 10,
            prompt_tokens: 79,
            completion_tokens: 11,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_tool_call_stream() {
    // One delta is the function name, seven are argument fragments.
    assert_capture(
        "openai-python-snapshots/2018feb66ae13fcf5333d61b95849decc68d3f63bd38172889367e1afb1e04f7.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 8,
            prompt_tokens: 44,
            completion_tokens: 16,
            cached_prompt_tokens: 0,
            finish_reason: "tool_calls",
        },
    );
}

#[test]
fn openai_sse_length_limited_stream() {
    assert_capture(
        "openai-python-snapshots/4cc50a6135d254573a502310e6af1246f55edb6ad95fa24059f160996b68866d.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 1,
            prompt_tokens: 79,
            completion_tokens: 1,
            cached_prompt_tokens: 0,
            finish_reason: "length",
        },
    );
}

#[test]
fn openai_sse_refusal_with_logprobs() {
    assert_capture(
        "openai-python-snapshots/569c877e69429d4cbc1577d2cd6dd33878095c68badc6b6654a69769b391a1c1.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 11,
            prompt_tokens: 79,
            completion_tokens: 12,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_json_schema_stream() {
    assert_capture(
        "openai-python-snapshots/7e5ea4d12e7cc064399b6631415e65923f182256b6e6b752950a3aaa2ad2320a.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 14,
            prompt_tokens: 79,
            completion_tokens: 14,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_logprobs_stream() {
    assert_capture(
        "openai-python-snapshots/83b060bae42eb41c4f1edbb7c1542b954b37d9dfd1910b964ddebc9677e6ae85.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 2,
            prompt_tokens: 9,
            completion_tokens: 2,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_second_tool_call() {
    assert_capture(
        "openai-python-snapshots/a247c49c5fcd492bfb7a02a3306ad615ed8d8f649888ebfddfbc3ee151f44d46.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 11,
            prompt_tokens: 48,
            completion_tokens: 19,
            cached_prompt_tokens: 0,
            finish_reason: "tool_calls",
        },
    );
}

#[test]
fn openai_sse_three_choices_billed() {
    // n=3: each choice streams 14 deltas, and usage covers all three.
    assert_capture(
        "openai-python-snapshots/a491adda08c3d4fde95f5b2ee3f60f7f745f1a56d82e62f58031cc2add502380.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 42,
            prompt_tokens: 79,
            completion_tokens: 42,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_strict_tool_call() {
    assert_capture(
        "openai-python-snapshots/c6aa7e397b7123c3501f25df3a05d4daf7e8ad6d61ffa406ab5361fe36a8d5b1.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 15,
            prompt_tokens: 76,
            completion_tokens: 24,
            cached_prompt_tokens: 0,
            finish_reason: "tool_calls",
        },
    );
}

#[test]
fn openai_sse_json_object_stream() {
    assert_capture(
        "openai-python-snapshots/d615580118391ee13492193e3a8bb74642d23ac1ca13fe37cb6e889b66f759f6.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 177,
            prompt_tokens: 19,
            completion_tokens: 177,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_plain_text_stream() {
    assert_capture(
        "openai-python-snapshots/e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 30,
            prompt_tokens: 14,
            completion_tokens: 30,
            cached_prompt_tokens: 0,
            finish_reason: "stop",
        },
    );
}

#[test]
fn openai_sse_parallel_tool_calls() {
    // Two tool calls: two name deltas and twenty argument fragments.
    assert_capture(
        "openai-python-snapshots/f82268f2fefd5cfbc7eeb59c297688be2f6ca0849a6e4f17851b517310841d9b.sse.txt",
        Expected {
            format: Format::OpenAiChat,
            model: Some("gpt-4o-2024-08-06"),
            deltas: 22,
            prompt_tokens: 149,
            completion_tokens: 60,
            cached_prompt_tokens: 0,
            finish_reason: "tool_calls",
        },
    );
}

// Errors.

#[test]
fn garbage_line_names_line_number() {
    let text = concat!(
        r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
        "\n\nsecret words here\n"
    );

    let error = parse_error(text);
    let message = error.to_string();

    assert!(matches!(error, ReplayError::InvalidJson { line: 3, .. }));
    assert!(message.contains("line 3"), "message names the line");
    assert!(
        !message.contains("secret"),
        "message leaves out the line's text"
    );
}

#[test]
fn garbage_sse_data_names_line() {
    let text = "data: {\"choices\":[]}\n\nevent: chunk\ndata: {oops secret\n\n";

    let error = parse_error(text);

    assert!(matches!(error, ReplayError::InvalidJson { line: 4, .. }));
    assert!(!error.to_string().contains("secret"));
}

#[test]
fn empty_file_is_rejected() {
    let dir = std::env::temp_dir().join(format!("replay-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory is writable");
    let path = dir.join("empty.chunks.txt");
    std::fs::write(&path, "").expect("temporary file is writable");

    let result = parse_recording_file(&path);
    std::fs::remove_dir_all(&dir).ok();

    assert!(matches!(result, Err(ReplayError::Empty)));
}

#[test]
fn blank_text_is_empty() {
    assert!(matches!(parse_error("\n  \n\r\n"), ReplayError::Empty));
}

#[test]
fn done_sentinel_alone_is_empty() {
    assert!(matches!(
        parse_error("data: [DONE]\n\n"),
        ReplayError::Empty
    ));
}

#[test]
fn missing_file_names_path() {
    let error = parse_recording_file(Path::new("/nonexistent/replay.chunks.txt"))
        .expect_err("missing file is rejected");
    assert!(error.to_string().contains("/nonexistent/replay.chunks.txt"));
}

#[test]
fn unknown_events_are_rejected() {
    assert!(matches!(
        parse_error("{\"hello\":\"world\"}\n"),
        ReplayError::UnknownFormat
    ));
}

#[test]
fn non_object_event_is_rejected() {
    assert!(matches!(
        parse_error("[1, 2, 3]\n"),
        ReplayError::NotAnObject { line: 1 }
    ));
}

#[test]
fn wrong_field_type_hides_value() {
    let text = r#"{"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":"secret","completion_tokens":1}}"#;

    let error = parse_error(text);

    assert!(matches!(
        error,
        ReplayError::InvalidEvent {
            line: 1,
            format: Format::OpenAiChat
        }
    ));
    assert!(!error.to_string().contains("secret"));
}

#[test]
fn mixed_formats_are_rejected() {
    let text = concat!(
        r#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":1,"output_tokens":1}}}"#,
        "\n",
        r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
    );

    assert!(matches!(
        parse_error(text),
        ReplayError::MixedFormats {
            line: 2,
            expected: Format::Anthropic,
            found: Format::OpenAiChat
        }
    ));
}

#[test]
fn anthropic_error_event_is_rejected() {
    let text = concat!(
        r#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":1,"output_tokens":1}}}"#,
        "\n",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );

    let error = parse_error(text);

    assert!(matches!(
        &error,
        ReplayError::ProviderError { line: 2, error_type } if error_type == "overloaded_error"
    ));
}

#[test]
fn bedrock_exception_is_rejected() {
    let text = concat!(
        r#"{"messageStart":{"role":"assistant"}}"#,
        "\n",
        r#"{"throttlingException":{"message":"slow down"}}"#,
    );

    assert!(matches!(
        parse_error(text),
        ReplayError::ProviderError { line: 2, .. }
    ));
}

#[test]
fn cached_above_prompt_is_rejected() {
    let text = r#"{"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":6}}}"#;

    assert!(matches!(
        parse_error(text),
        ReplayError::InvalidUsage {
            format: Format::OpenAiChat,
            ..
        }
    ));
}

#[test]
fn usage_without_prompt_is_rejected() {
    let text = r#"{"object":"chat.completion.chunk","choices":[],"usage":{"completion_tokens":1}}"#;

    let error = parse_error(text);

    assert!(matches!(error, ReplayError::InvalidUsage { .. }));
    assert!(error.to_string().contains("usage.prompt_tokens"));
}

// Parsing rules on inline streams.

#[test]
fn stream_without_usage_has_none() {
    let text = r#"{"object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;

    let recording = parse_recording(text).expect("stream parses");

    assert_eq!(recording.usage, None);
    assert_eq!(recording.deltas, vec!["hi"]);
}

#[test]
fn sse_joins_multiline_data() {
    let text = concat!(
        ": comment\n",
        "event: chunk\n",
        "data: {\"object\":\"chat.completion.chunk\",\n",
        "data: \"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n",
        "\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}",
    );

    let recording = parse_recording(text).expect("stream parses");

    assert_eq!(recording.deltas, vec!["a", "b"]);
}

#[test]
fn tool_name_repeated_counts_once() {
    let text = concat!(
        r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{"}}]}}]}"#,
        "\n",
        r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"}"}}]}}]}"#,
    );

    let recording = parse_recording(text).expect("stream parses");

    assert_eq!(recording.deltas, vec!["f", "{", "}"]);
}

#[test]
fn duplicate_reasoning_fields_count_once() {
    let text = r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"reasoning_content":"think","reasoning":"think"}}]}"#;

    let recording = parse_recording(text).expect("stream parses");

    assert_eq!(recording.deltas, vec!["think"]);
}

#[test]
fn reasoning_inside_completion_not_added() {
    // 10 + 50 = 60 total, so the 30 reasoning tokens are inside the 50.
    let text = r#"{"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60,"completion_tokens_details":{"reasoning_tokens":30}}}"#;

    let usage = parse_recording(text).expect("stream parses").usage;

    assert_eq!(usage.map(|usage| usage.completion_tokens), Some(50));
}

#[test]
fn anthropic_cache_tokens_join_prompt() {
    let text = r#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":200,"output_tokens":1}}}"#;

    let usage = parse_recording(text)
        .expect("stream parses")
        .usage
        .expect("usage");

    assert_eq!(usage.prompt_tokens, 305);
    assert_eq!(usage.cached_prompt_tokens, 200);
    assert_eq!(usage.completion_tokens, 1);
}

#[test]
fn bedrock_cache_outside_input_added() {
    // 5 + 7 + 100 + 20 = 132 total, so inputTokens leaves the cache out.
    let text = r#"{"metadata":{"usage":{"inputTokens":5,"outputTokens":7,"totalTokens":132,"cacheReadInputTokens":100,"cacheWriteInputTokens":20}}}"#;

    let usage = parse_recording(text)
        .expect("stream parses")
        .usage
        .expect("usage");

    assert_eq!(usage.prompt_tokens, 125);
    assert_eq!(usage.cached_prompt_tokens, 100);
}

#[test]
fn bedrock_cache_inside_input_kept() {
    // 125 + 7 = 132 total, so inputTokens already contains the cache.
    let text = r#"{"metadata":{"usage":{"inputTokens":125,"outputTokens":7,"totalTokens":132,"cacheReadInputTokens":100,"cacheWriteInputTokens":20}}}"#;

    let usage = parse_recording(text)
        .expect("stream parses")
        .usage
        .expect("usage");

    assert_eq!(usage.prompt_tokens, 125);
    assert_eq!(usage.cached_prompt_tokens, 100);
}

#[test]
fn gemini_function_call_becomes_deltas() {
    let text = r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"get_weather","args":{"city":"Paris"}}}]},"finishReason":"STOP"}],"modelVersion":"gemini-x"}"#;

    let recording = parse_recording(text).expect("stream parses");

    assert_eq!(recording.deltas, vec!["get_weather", r#"{"city":"Paris"}"#]);
}

#[test]
fn cohere_float_counts_accepted() {
    let text = r#"{"type":"message-end","delta":{"finish_reason":"COMPLETE","usage":{"billed_units":{"input_tokens":12.0,"output_tokens":7}}}}"#;

    let usage = parse_recording(text)
        .expect("stream parses")
        .usage
        .expect("usage");

    assert_eq!(usage.prompt_tokens, 12);
    assert_eq!(usage.completion_tokens, 7);
}

#[test]
fn cohere_fractional_count_rejected() {
    let text = r#"{"type":"message-end","delta":{"usage":{"billed_units":{"input_tokens":12.5,"output_tokens":7}}}}"#;

    assert!(matches!(
        parse_error(text),
        ReplayError::InvalidUsage {
            format: Format::Cohere,
            ..
        }
    ));
}
