"""The front door: one OpenAI-compatible URL in front of an engine (an ASGI application).

```python
from llamatelemetry_async import AsyncEngine, Placement
from llamatelemetry_async.frontdoor import FrontDoor

engine = AsyncEngine("model.gguf", placement=Placement.cpu(2))
door = FrontDoor(engine, api_keys=["s3cret"])
# run it: uvicorn.run(door), or `llamatelemetry-async serve model.gguf --port 8080`;
# or mount it: app.mount("/llm", door) with `async with door:` in the app's lifespan
```

It serves ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``,
llama.cpp's ``/completion``, ``/infill``, ``/tokenize``, ``/detokenize``, ``/rerank``, and its
own ``/health``, ``/metrics`` (Prometheus) and ``/servers``, routed through the engine.
"""

from __future__ import annotations

from ._app import FrontDoor as FrontDoor

__all__ = ["FrontDoor"]
