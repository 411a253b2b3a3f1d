"""Every endpoint method, called once against a real llama-server started with its flag."""

from __future__ import annotations

import pytest

from llamatelemetry_async import AsyncLlamaClient, HTTPStatusError
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.testing import TINY_MODEL_NAME
from llamatelemetry_async.testing._server import RunningServer

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_server_state_endpoints(llama_server: RunningServer, client_backend: Backend) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        assert (await client.health()).status == "ok"

        props = await client.props()
        assert props["total_slots"] == 4
        assert "build_info" in props
        changed = await client.set_props()
        assert isinstance(changed, dict)

        slots = await client.slots()
        assert [s["id"] for s in slots] == [0, 1, 2, 3]

        await client.completion("the old cat", n_predict=4, id_slot=1, cache_prompt=True)
        saved = await client.save_slot(1, "one.bin")
        assert saved["id_slot"] == 1
        assert saved["n_saved"] > 0
        restored = await client.restore_slot(2, "one.bin")
        assert restored["n_restored"] == saved["n_saved"]
        erased = await client.erase_slot(2)
        assert erased["id_slot"] == 2

        metrics = await client.metrics()
        assert metrics["llamacpp:tokens_predicted_total"] >= 4
        assert "llamacpp:requests_processing" in metrics

        assert await client.lora_adapters() == []
        assert await client.set_lora_adapters([]) is not None

        models = await client.models()
        assert len(models) == 1
        assert models[0].id


async def test_text_tool_endpoints(llama_server: RunningServer, client_backend: Backend) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        tokens = await client.tokenize("hello world")
        assert len(tokens) == 2
        assert (await client.detokenize(tokens)).strip() == "hello world"
        prompt = await client.apply_template(MESSAGES)
        assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        raw = await client.request("GET", "/props")
        assert raw["total_slots"] == 4
        props = await client.props()
        assert TINY_MODEL_NAME in str(props) or props["model_path"].endswith(".gguf")


async def test_generation_endpoints(llama_server: RunningServer, client_backend: Backend) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        completion = await client.completion("Once upon a time", n_predict=5)
        assert completion.usage.completion_tokens == 5
        assert completion.timings is not None
        chat = await client.chat(MESSAGES, max_tokens=5)
        assert chat.usage.completion_tokens == 5
        assert chat.text
        text = await client.openai_completion("Once", max_tokens=3)
        assert text.usage.completion_tokens == 3
        assert text.text
        infill = await client.infill("def f(", ")", n_predict=3)
        assert infill.usage.completion_tokens == 3


async def test_embedding_endpoints(
    embedding_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(embedding_server.url, backend=client_backend) as client:
        native = await client.embedding("the old cat")
        assert len(native[0]["embedding"][0]) == 64
        vectors = await client.embeddings(["the cat", "the dog"])
        assert [len(v) for v in vectors.vectors] == [64, 64]
        assert vectors.usage.prompt_tokens > 0


async def test_rerank_endpoint(rerank_server: RunningServer, client_backend: Backend) -> None:
    async with AsyncLlamaClient(rerank_server.url, backend=client_backend) as client:
        results = await client.rerank("cat", ["the cat", "a dog", "the sky"], top_n=2)
        assert len(results) == 2
        assert {r.index for r in results} <= {0, 1, 2}


async def test_endpoint_without_its_flag(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        with pytest.raises(HTTPStatusError, match="--embeddings") as info:
            await client.embeddings("x")
    assert info.value.status_code == 501


async def test_per_request_options_against_a_real_server(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    # strict: every name below must be in the known-parameter table, or this raises.
    async with AsyncLlamaClient(llama_server.url, backend=client_backend, strict=True) as client:
        completion = await client.completion(
            "Once upon a time",
            n_predict=3,
            samplers=["top_k", "temperature"],
            timeout=60,
            extra_headers={"X-Request-Id": "r1"},
            extra_body={"n_probs": 1},
        )
        assert completion.usage.completion_tokens == 3
        async with client.stream(
            "Once upon a time", n_predict=3, timeout=60, deadline=60
        ) as stream:
            async for _ in stream:
                pass
        assert stream.finish_reason == "length"
        async with client.stream_chat(MESSAGES, max_tokens=3, timeout=60, deadline=60) as chat:
            async for _ in chat:
                pass
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 3
        assert (await client.health(timeout=5)).status == "ok"


async def test_a_server_side_validation_error_still_reaches_the_caller(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    # The client refuses messages that are not a list itself; extra_body sends them anyway.
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        with pytest.raises(HTTPStatusError) as info:
            async for _ in client.stream_chat([], max_tokens=2, extra_body={"messages": "x"}):
                pass
    assert info.value.status_code == 400
    assert info.value.message == "Expected 'messages' to be an array"
