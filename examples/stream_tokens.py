"""Stream tokens from a llama-server with ``async for``.

python examples/stream_tokens.py http://127.0.0.1:8080 "Once upon a time"
"""

from __future__ import annotations

import sys

import anyio

from llamatelemetry_async import AsyncLlamaClient


async def main(url: str, prompt: str) -> None:
    async with AsyncLlamaClient(url) as client:
        async with client.stream(prompt, n_predict=32, seed=1) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(f"\nfinish_reason={stream.finish_reason} usage={stream.usage}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Once upon a time")
