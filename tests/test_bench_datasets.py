"""Datasets of the benchmark: ShareGPT files, multi-turn replay with the growing prefix,
synthetic prompts with a shared prefix (llama.cpp's prompt cache), sampled lengths."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import anyio
import pytest

from llamatelemetry_async import ConfigError, PromptFileError
from llamatelemetry_async._cli._bench import add_arguments, config_from_args, run_from_args
from llamatelemetry_async.bench import (
    BenchConfig,
    Conversation,
    PromptSource,
    RequestRecord,
    load_sharegpt,
    load_sharegpt_conversations,
    parse_sharegpt,
    run_bench,
)
from llamatelemetry_async.testing._replay import recorded_requests
from llamatelemetry_async.testing._server import RunningServer

_SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "human", "value": "Hello there"},
            {"from": "gpt", "value": "Hi! How can I help?"},
            {"from": "human", "value": "Tell me a story"},
            {"from": "gpt", "value": "Once upon a time..."},
        ],
    },
    {"id": "b", "conversations": [{"from": "gpt", "value": "no user turn: skipped"}]},
    {
        "id": "c",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Why is the sky blue?"},
        ],
    },
]


# --------------------------------------------------------------------- ShareGPT files
def test_sharegpt_json_and_jsonl_give_the_same_conversations(tmp_path: Path) -> None:
    array = tmp_path / "sharegpt.json"
    array.write_text(json.dumps(_SHAREGPT, indent=2))
    lines = tmp_path / "sharegpt.jsonl"
    lines.write_text("\n".join(json.dumps(c) for c in _SHAREGPT) + "\n")
    conversations = load_sharegpt_conversations(array)
    assert conversations == load_sharegpt_conversations(lines)
    assert conversations == (
        Conversation(("Hello there", "Tell me a story")),
        Conversation(("Why is the sky blue?",), system="Be brief."),
    )
    prompts = load_sharegpt(array)
    assert [p.messages for p in prompts] == [
        ({"role": "user", "content": "Hello there"},),
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ),
    ]
    assert len(load_sharegpt(array, limit=1)) == 1


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[\n  {"conversations": []},\n  {"conversations": 3}\n]', 3, "no 'conversations'"),
        ('[\n  {"conversations": [\n    {"from": "human"}\n  ]}\n]', 2, "'from' and a 'value'"),
        ('[\n  {"conversations": [{"from": "robot", "value": "x"}]}\n]', 2, "unknown role"),
        ('[\n  {"conversations": []},\n  {"conversations": [}\n]', 3, "not valid JSON"),
        ('[\n  {"conversations": []}\n  {"conversations": []}\n]', 3, "expected ','"),
        ('[\n  "just text"\n]', 2, "expected a JSON object"),
        ('{"conversations": []}\n{"conversations": [\n', 2, "not valid JSON"),
    ],
)
def test_a_bad_sharegpt_entry_names_its_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PromptFileError) as info:
        load_sharegpt_conversations(path)
    assert info.value.path == path
    assert info.value.line == line
    assert problem in info.value.problem
    assert f"{path}:{line}" in str(info.value)
    # What the file should hold is ShareGPT's shape, not the JSONL prompts format.
    assert "ShareGPT file is a JSON array" in str(info.value)
    assert '"prompt"' not in str(info.value)


def test_sharegpt_missing_empty_or_without_users(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="cannot read") as info:
        load_sharegpt_conversations(tmp_path / "nope.json")
    assert info.value.line is None
    with pytest.raises(PromptFileError, match="empty"):
        parse_sharegpt(b"  \n")
    with pytest.raises(PromptFileError, match="no conversation with a user turn"):
        parse_sharegpt(json.dumps([_SHAREGPT[1]]))
    assert parse_sharegpt(json.dumps(_SHAREGPT), limit=1) == (
        Conversation(("Hello there", "Tell me a story")),
    )


def test_new_config_fields_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        BenchConfig(prefix_tokens=-1)
    assert info.value.field == "prefix_tokens"
    with pytest.raises(ConfigError) as info:
        BenchConfig(range_ratio=1.0)
    assert info.value.field == "range_ratio"
    conversations = (Conversation(("hi",)),)
    with pytest.raises(ConfigError, match="fixed concurrency"):
        BenchConfig(conversations=conversations, rate=1.0)
    with pytest.raises(ConfigError, match="max_tokens"):
        Conversation(("a", "b"), max_tokens=(1,))
    with pytest.raises(ConfigError, match="one or more"):
        Conversation(())


# --------------------------------------------------------------------- synthetic prompts
def test_shared_prefix_and_sampled_lengths_of_synthetic_prompts() -> None:
    vocabulary = list(range(100, 400))
    config = BenchConfig(
        input_tokens=20, output_tokens=40, prefix_tokens=16, range_ratio=0.5, seed=7
    )
    source = PromptSource(config, vocabulary)
    prompts = [source.next() for _ in range(50)]
    prefixes = {p.prompt[:16] for p in prompts if isinstance(p.prompt, tuple)}
    assert len(prefixes) == 1  # the same 16 ids in front of every prompt
    rests = [p.prompt[16:] for p in prompts if isinstance(p.prompt, tuple)]
    assert len(set(rests)) == 50  # and a different prompt after it
    lengths = [len(r) for r in rests]
    assert min(lengths) >= 10
    assert max(lengths) <= 30
    assert len(set(lengths)) > 5  # sampled, not fixed
    outputs = [p.max_tokens or 0 for p in prompts]
    assert min(outputs) >= 20
    assert max(outputs) <= 60
    assert len(set(outputs)) > 5
    # Without a range: fixed lengths; the prefix does not depend on the rest's draws.
    fixed = PromptSource(BenchConfig(input_tokens=20, prefix_tokens=16, seed=7), vocabulary)
    first = fixed.next()
    assert isinstance(first.prompt, tuple)
    assert len(first.prompt) == 36
    assert first.prompt[:16] == next(iter(prefixes))


# --------------------------------------------------------------------- multi-turn replay
@pytest.mark.anyio
async def test_multi_turn_turns_wait_for_and_carry_the_previous_answers(replay_url: str) -> None:
    turns = ("a" * 40, "b" * 20, "c" * 8)
    config = BenchConfig(
        concurrency=2,
        requests=6,
        output_tokens=5,
        conversations=(Conversation(turns), Conversation(turns, max_tokens=(3, 4, 2))),
    )
    await anyio.to_thread.run_sync(lambda: recorded_requests(replay_url, reset=True))
    result = await run_bench(replay_url, config, progress=False)
    sent = await anyio.to_thread.run_sync(recorded_requests, replay_url)
    measured = [r for r in result.records if not r.warmup]
    assert len(measured) == 6
    # What went on the wire: each later turn carries every earlier turn and its answer.
    bodies = [r.json() for r in sent if r.target == "/v1/chat/completions"]
    longest = max(len(b["messages"]) for b in bodies)
    assert longest == 5  # turn 2: user, assistant, user, assistant, user
    for body in bodies:
        messages = body["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + [
            "user"
        ]
        assert [m["content"] for m in messages[::2]] == list(turns[: len(messages) // 2 + 1])
        for answer in messages[1::2]:  # the replay server's own answers, as they came back
            assert answer["content"] in {" tok" * n for n in (5, 3, 4, 2)}
    by_conversation: dict[int, list[RequestRecord]] = {}
    for r in measured:
        assert r.conversation is not None
        by_conversation.setdefault(r.conversation, []).append(r)
    assert set(by_conversation) == {0, 1}
    for number, records in by_conversation.items():
        ordered = sorted(records, key=lambda r: r.turn or 0)
        assert [r.turn for r in ordered] == [0, 1, 2]
        caps = (5, 5, 5) if number == 0 else (3, 4, 2)
        assert [r.output_tokens for r in ordered] == list(caps)
        # Each turn is sent after the previous answer ended.
        for before, after in itertools.pairwise(ordered):
            assert after.send >= before.end
        # The replay server counts a chat prompt as sum(len(content) // 4 + 1) + 4 per
        # message; its answers are " tok" per token. So each turn's prompt count says
        # exactly which messages it carried: every earlier turn and answer.
        answers = [" tok" * n for n in caps]
        for k, record in enumerate(ordered):
            contents = []
            for j in range(k):
                contents += [turns[j], answers[j]]
            contents.append(turns[k])
            expected = sum(len(c) // 4 + 1 for c in contents) + 4 * len(contents)
            assert record.prompt_tokens == expected


@pytest.mark.anyio
async def test_multi_turn_on_llama_server_reuses_the_prefix_with_its_answer(
    llama_server: RunningServer,
) -> None:
    # One conversation at a time: the second turn lands on the slot that holds the first.
    turns = ("the cat and the dog went to the river", "and then what did they see there")
    config = BenchConfig(
        concurrency=1,
        requests=2,
        output_tokens=12,
        conversations=(Conversation(turns),),
        params={"cache_prompt": True},
    )
    result = await run_bench(llama_server.url, config, progress=False)
    first, second = (r for r in result.records if not r.warmup)
    assert (first.turn, second.turn) == (0, 1)
    assert first.prompt_tokens is not None
    assert second.prompt_tokens is not None
    assert second.server_cache_n is not None
    # The second prompt holds the first turn, its 12-token answer and the new turn ...
    assert second.prompt_tokens > first.prompt_tokens + 12
    # ... and llama.cpp found more than the first prompt in its cache: the answer it
    # generated came back as the next prompt's prefix.
    assert second.server_cache_n > first.prompt_tokens


# --------------------------------------------------------------------- prompt cache
@pytest.mark.anyio
@pytest.mark.parametrize("cache_prompt", [True, False])
async def test_shared_prefix_prompt_tokens_processed_drop_with_the_prompt_cache(
    llama_server: RunningServer, cache_prompt: bool
) -> None:
    config = BenchConfig(
        concurrency=1,
        requests=6,
        input_tokens=8,
        output_tokens=2,
        prefix_tokens=96,
        params={"cache_prompt": cache_prompt},
    )
    result = await run_bench(llama_server.url, config, progress=False)
    side = result.server
    sent = side["prompt_tokens_sent"]
    assert sent == 6 * (96 + 8)
    processed = side["prompt_tokens_processed"]
    if cache_prompt:
        # The first prompt is processed whole; the next five only past the shared prefix
        # (a slot that never held it processes it once more).
        assert processed < 0.5 * sent
        assert side["prompt_cache_hit_rate"] > 0.5
        assert result.metrics.prompt_cache_hit_rate is not None
        assert result.metrics.prompt_cache_hit_rate > 0.5
    else:
        assert processed == sent
        assert side["prompt_cache_hit_rate"] == 0.0
        assert result.metrics.prompt_cache_hit_rate == 0.0


@pytest.mark.anyio
async def test_sampled_lengths_reach_the_server(llama_server: RunningServer) -> None:
    config = BenchConfig(
        concurrency=2, requests=10, input_tokens=20, output_tokens=10, range_ratio=0.5
    )
    result = await run_bench(llama_server.url, config, progress=False)
    inputs = [r.prompt_tokens or 0 for r in result.records]
    outputs = [r.output_tokens for r in result.records]
    assert all(10 <= n <= 30 for n in inputs)
    assert all(5 <= n <= 15 for n in outputs)
    assert len(set(inputs)) > 2
    assert len(set(outputs)) > 2
    assert all(r.requested_tokens == r.output_tokens for r in result.records)


# --------------------------------------------------------------------- command line
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.anyio
async def test_cli_replays_a_sharegpt_dataset_turn_by_turn(
    replay_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(_SHAREGPT))
    out = tmp_path / "out"
    common = ("--url", replay_url, "--dataset", str(dataset), "--requests", "3")
    tail = ("--output-tokens", "2", "--no-progress", "--no-plots", "--out", str(out))
    assert await run_from_args(_args(*common, "--multi-turn", *tail)) == 0
    data = json.loads((out / "result.json").read_text())
    assert data["config"]["conversations"] == 2
    turns = [(r["conversation"], r["turn"]) for r in data["records"] if not r["warmup"]]
    assert sorted(turns) == [(0, 0), (0, 1), (1, 0)]
    # Without --multi-turn: the first user turns, as single chat prompts.
    assert await run_from_args(_args(*common, *tail)) == 0
    data = json.loads((out / "result.json").read_text())
    assert data["config"]["prompts"] == "2 given"
    assert all(r["conversation"] is None for r in data["records"])
    assert "llamatelemetry_async bench" in capsys.readouterr().out


def test_cli_prompt_options_make_the_config(tmp_path: Path) -> None:
    config = config_from_args(
        _args("--url", "u", "--prefix-tokens", "64", "--range-ratio", "0.25", "--no-cache-prompt")
    )
    assert config.prefix_tokens == 64
    assert config.range_ratio == 0.25
    assert config.params == {"cache_prompt": False}
    assert config_from_args(_args("--url", "u")).params == {}


@pytest.mark.anyio
async def test_cli_refuses_multi_turn_without_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--multi-turn"):
        await run_from_args(_args("--url", "http://127.0.0.1:9", "--multi-turn"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="not both"):
        await run_from_args(
            _args("--url", "u", "--prompts", str(prompts), "--dataset", str(prompts))
        )
