"""Kaggle, Colab and notebooks: where this runs, its GPUs, its secrets.

``detect_environment()`` tells Kaggle, Colab and a local machine apart, sees whether a
notebook kernel is running, lists the visible GPUs (NVML, in a worker thread) and recommends
a ``Placement`` preset (Kaggle's two T4s -> ``Placement.kaggle_t4x2()``);
``Environment.plan_presets(model_info)`` plans a model under every preset that fits the GPUs.
``load_secrets()`` copies notebook secrets such as ``HF_TOKEN`` into the environment
without printing them; ``kaggle_secret(name)`` reads one Kaggle secret. ``EnvironmentKind``
is the type of ``Environment.kind``: ``"kaggle"``, ``"colab"`` or ``"local"``.

Importing this package does nothing: no NVML, no platform client, no environment change.

```python
from llamatelemetry_async.environment import detect_environment, load_secrets

load_secrets()                      # ['HF_TOKEN'] on Kaggle with the secret attached
env = await detect_environment()
print(env.describe())               # Kaggle (notebook) / GPU 0: Tesla T4, 14.7 GiB / ...
```
"""

from __future__ import annotations

from ._detect import (
    Environment as Environment,
    EnvironmentKind as EnvironmentKind,
    GPUInfo as GPUInfo,
    detect_environment as detect_environment,
)
from ._secrets import kaggle_secret as kaggle_secret, load_secrets as load_secrets

__all__ = [
    "Environment",
    "EnvironmentKind",
    "GPUInfo",
    "detect_environment",
    "kaggle_secret",
    "load_secrets",
]
