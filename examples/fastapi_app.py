"""A FastAPI app that streams llama-server tokens to its clients as Server-Sent Events.

The engine lives in the app's lifespan: its llama-servers start before the first request
and are stopped and reaped when the app shuts down. ``POST /generate`` relays tokens as
they are generated; when a client disconnects mid-stream, the engine stream is closed, so
llama-server stops generating and frees the slot for the next request.

Run it (``LLAMA_MODEL`` names the GGUF file)::

    pip install fastapi uvicorn
    LLAMA_MODEL=model.gguf uvicorn --app-dir examples fastapi_app:app
    curl -N localhost:8000/generate -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "n_predict": 64}'
    curl localhost:8000/stats

Optional settings: ``LLAMA_PARALLEL`` (slots per server, default 4) and ``LLAMA_CTX_SIZE``
(context tokens shared by a server's slots; default 0, the model's own).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    CompletionChunk,
    LlamaError,
    ServerConfig,
    TokenStream,
)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Start the engine before the app serves, stop it (reaping every server) after."""
    model = os.environ.get("LLAMA_MODEL")
    if not model:
        raise RuntimeError("set LLAMA_MODEL to the path of a .gguf file")
    # Our own key (the engine would make one up otherwise), so /stats can ask the servers.
    api_key = secrets.token_urlsafe(24)
    config = ServerConfig(
        n_parallel=int(os.environ.get("LLAMA_PARALLEL", "4")),
        ctx_size=int(os.environ.get("LLAMA_CTX_SIZE", "0")),
        api_key=api_key,
    )
    async with AsyncEngine(model, placement="auto", server=config) as engine:
        # Lifespan state: each request sees it as request.state.engine / .api_key.
        yield {"engine": engine, "api_key": api_key}


app = FastAPI(title="llamatelemetry_async + FastAPI", lifespan=lifespan)


class GenerateRequest(BaseModel):
    prompt: str
    n_predict: int = Field(128, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0)
    seed: int | None = None


def sse(payload: object) -> str:
    """One Server-Sent Event carrying JSON."""
    return f"data: {json.dumps(payload)}\n\n"


async def relay(stream: TokenStream[CompletionChunk]) -> AsyncIterator[str]:
    """The engine's tokens as SSE events, then the finish reason and usage, then [DONE].

    When the client goes away, Starlette cancels the response: leaving ``async with
    stream`` (by that cancellation, or by Python finalizing this generator when the
    cancellation arrives between two events) closes the request to llama-server, which
    stops generating and frees its slot.
    """
    try:
        async with stream:
            async for chunk in stream:
                yield sse({"text": chunk.text})
    except LlamaError as exc:  # the engine is busy, a server crashed ...: tell the client
        yield sse({"error": {"type": type(exc).__name__, "message": str(exc)}})
        return
    usage = stream.usage
    yield sse(
        {
            "finish_reason": stream.finish_reason,
            "usage": None if usage is None else {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            },
        }
    )  # fmt: skip
    yield "data: [DONE]\n\n"


@app.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Stream a completion of ``prompt`` as Server-Sent Events (``data: {"text": ...}``)."""
    engine: AsyncEngine = request.state.engine
    params: dict[str, Any] = {"n_predict": body.n_predict}
    if body.temperature is not None:
        params["temperature"] = body.temperature
    if body.seed is not None:
        params["seed"] = body.seed
    stream = engine.stream(body.prompt, **params)
    return StreamingResponse(
        relay(stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Per server: requests in flight in the engine, and what llama-server itself reports
    (slots busy generating, tokens predicted so far)."""
    engine: AsyncEngine = request.state.engine
    servers = []
    for info in engine.servers:
        entry: dict[str, Any] = {
            "name": info.name,
            "url": info.url,
            "pid": info.pid,
            "state": info.state,
            "in_flight": info.outstanding,
            "served": info.served,
        }
        if info.url is not None and info.state == "ready":
            async with AsyncLlamaClient(info.url, api_key=request.state.api_key) as client:
                slots = await client.slots()
                metrics = await client.metrics()
            entry["slots"] = len(slots)
            entry["slots_processing"] = sum(bool(slot.get("is_processing")) for slot in slots)
            entry["tokens_predicted_total"] = metrics.get("llamacpp:tokens_predicted_total")
        servers.append(entry)
    return {"servers": servers}
