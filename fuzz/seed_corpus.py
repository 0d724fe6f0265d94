#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets from the captures in data/.

Usage: python3 fuzz/seed_corpus.py (from any directory).

Writes fuzz/corpus/decode/ and fuzz/corpus/replay_parsers/, which git
ignores. Existing files of the same name are overwritten and every other
file in those folders is kept, so a corpus grown by earlier runs survives.
"""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CORPUS = ROOT / "fuzz" / "corpus"

# Must equal the -max_len given to libFuzzer in docs/fuzzing.md, because
# libFuzzer cuts every longer input to that size.
SEED_BYTES_MAX = 16 * 1024

# Events kept from each end of a capture that is longer than
# SEED_BYTES_MAX. The head has the model and format, the tail the usage.
EDGE_EVENTS = 6

# OpenAssistant trees turned into seeds. The messages of every tree have
# the same shapes, so more trees mostly add text.
TREES_MAX = 25

# Characters of a prompt or answer copied into one inbound message.
TEXT_CHARS_MAX = 2000

TIMESTAMPS = [
    "2026-12-04T10:00:00Z",
    "2026-12-04T10:00:00.5+02:00",
    "2026-12-04t10:00:00.123456789z",
]


def split_events(text):
    """Returns the events of a capture and the separator that joins them."""
    if text.lstrip().startswith("data:"):
        return [event for event in text.split("\n\n") if event.strip()], "\n\n"
    return [line for line in text.splitlines() if line.strip()], "\n"


def shortened(text):
    """Returns the capture, or its first and last events when too long."""
    if len(text.encode()) <= SEED_BYTES_MAX:
        return text
    events, separator = split_events(text)
    edge_events = events[:EDGE_EVENTS] + events[-EDGE_EVENTS:]
    return separator.join(edge_events) + separator


def captures():
    """Yields (name, text) of every recorded provider stream in data/."""
    patterns = [
        "vercel-ai-fixtures/*.chunks.txt",
        "openai-python-snapshots/*.sse.txt",
    ]
    for pattern in patterns:
        for path in sorted(DATA.glob(pattern)):
            yield path.name, path.read_text(encoding="utf-8")


def conversations():
    """Yields (index, prompt, answer) of the first OpenAssistant trees."""
    path = DATA / "oasst-en100" / "en_100_tree.jsonl"
    with path.open(encoding="utf-8") as trees:
        for index, line in enumerate(trees):
            if index >= TREES_MAX:
                return
            prompt = json.loads(line)["prompt"]
            answers = [reply for reply in prompt["replies"] if reply["role"] == "assistant"]
            answer = answers[0]["text"] if answers else ""
            yield index, prompt["text"][:TEXT_CHARS_MAX], answer[:TEXT_CHARS_MAX]


def write(folder, name, content):
    folder.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    (folder / name).write_bytes(data)


def replay_seeds():
    folder = CORPUS / "replay_parsers"
    count = 0
    for name, text in captures():
        write(folder, f"capture-{name}", shortened(text))
        count += 1
    for index, prompt, answer in conversations():
        write(folder, f"oasst-{index:03}-prompt.txt", prompt)
        write(folder, f"oasst-{index:03}-answer.txt", answer)
        count += 2
    return count


def decode_messages(index, prompt, answer):
    """Returns contract messages of one chat built from one tree."""
    user = f"user-{index}"
    stream = f"stream-{index}"
    time = TIMESTAMPS[index % len(TIMESTAMPS)]
    prompt_tokens = len(prompt.split())
    answer_tokens = len(answer.split())

    def message(kind, suffix, **fields):
        body = {"type": kind, "message_id": f"{kind}-{index}-{suffix}", "user_id": user}
        body.update(fields)
        body["occurred_at"] = time
        return body

    started = {"stream_id": stream, "model": "gpt-4o-mini", "max_output_tokens": 512}
    return {
        "grant": message("credits.granted", "a", amount=1_000_000, reason="seed grant"),
        "start-messages": message(
            "stream.started",
            "a",
            messages=[{"role": "user", "content": prompt, "name": "seed"}],
            **started,
        ),
        "start-parts": message(
            "stream.started",
            "b",
            messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}],
            **started,
        ),
        "start-prompt": message("stream.started", "c", prompt=prompt, **started),
        "start-tokens": message("stream.started", "d", prompt_tokens=prompt_tokens, **started),
        "chunk": message("chunk.emitted", "a", stream_id=stream, seq=0, delta=answer),
        "chunk-tokens": message(
            "chunk.emitted", "b", stream_id=stream, seq=1, delta=answer[:40], tokens=7
        ),
        "end-completed": message(
            "stream.ended",
            "a",
            stream_id=stream,
            status="completed",
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": answer_tokens,
                "cached_prompt_tokens": prompt_tokens // 2,
            },
        ),
        "end-cancelled": message("stream.ended", "b", stream_id=stream, status="cancelled"),
        "end-failed": message(
            "stream.ended", "c", stream_id=stream, status="failed", usage=None
        ),
    }


def decode_seeds():
    folder = CORPUS / "decode"
    count = 0
    for index, prompt, answer in conversations():
        for name, body in decode_messages(index, prompt, answer).items():
            write(folder, f"oasst-{index:03}-{name}.json", json.dumps(body))
            count += 1
    # Provider events are JSON objects of another shape: every one is a
    # rejection that the decoder must still reach without panicking.
    for name, text in captures():
        events, _ = split_events(text)
        first = events[0].removeprefix("data:").strip()
        write(folder, f"capture-{name}.json", first)
        count += 1
    return count


def main():
    print(f"decode: {decode_seeds()} seeds in {CORPUS / 'decode'}")
    print(f"replay_parsers: {replay_seeds()} seeds in {CORPUS / 'replay_parsers'}")


if __name__ == "__main__":
    main()
