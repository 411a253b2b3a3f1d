"""Servers on a Ray cluster (``pip install llamatelemetry_async[ray]``).

```python
from llamatelemetry_async import AsyncEngine
from llamatelemetry_async.cluster import ray_servers

placement = ray_servers(4, gpus_per_server=1)  # four servers, one GPU each, spread over nodes
async with AsyncEngine("model.gguf", placement=placement) as engine:
    ...
```

Each server is a Ray actor (``ServerActor``) that runs llama-server on its node with the
library's own ``LlamaServer``; the engine routes to it as to a remote server
(``RayBackend``). Importing this package does not import Ray; using it does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import ConfigError
from .._placement import Placement
from ._actor import ServerActor as ServerActor
from ._backend import RayBackend as RayBackend

__all__ = ["RayBackend", "RayServers", "ServerActor", "ray_servers"]


@dataclass(frozen=True)
class RayServers:
    """How many servers to place on Ray, and how (see ``ray_servers``)."""

    count: int
    gpus_per_server: float = 1
    resources: tuple[Mapping[str, float], ...] = ()
    strategy: Literal["SPREAD", "PACK"] = "SPREAD"
    max_restarts: int = 3
    address: str | None = None

    def backends(self, model: str | None, config: object, binary: str | None) -> list[object]:
        """One ``RayBackend`` per server; the actors start when the engine runs them."""
        if model is None:
            raise ConfigError(
                "servers on Ray need a model: a path every node has, or a spec each node "
                "resolves (owner/repo:file.gguf, a registry name)",
                field="model",
            )
        backends: list[object] = []
        for i in range(self.count):
            options: dict[str, Any] = {
                "num_gpus": self.gpus_per_server,
                "num_cpus": 0 if self.gpus_per_server else 1,
                "max_restarts": self.max_restarts,
                "max_task_retries": 0,  # a request is never sent twice
                "scheduling_strategy": "SPREAD" if self.strategy == "SPREAD" else "DEFAULT",
            }
            if self.resources:
                options["resources"] = dict(self.resources[i % len(self.resources)])
            backends.append(
                RayBackend(
                    f"ray{i}", _maker(f"ray{i}", model, config, binary, options), self.address
                )
            )
        return backends


def _maker(
    name: str, model: str, config: object, binary: str | None, options: dict[str, Any]
) -> Any:
    def make() -> Any:
        import ray

        return ray.remote(ServerActor).options(**options).remote(name, model, config, binary)

    return make


def ray_servers(
    count: int = 1,
    *,
    gpus_per_server: float = 1,
    resources: Sequence[Mapping[str, float]] = (),
    strategy: Literal["SPREAD", "PACK"] = "SPREAD",
    max_restarts: int = 3,
    address: str | None = None,
) -> Placement:
    """``count`` llama-servers as Ray actors on the cluster at ``address`` (``None``: the
    one this process is connected to, or ``RAY_ADDRESS``).

    ``gpus_per_server``: 1 (one server per GPU), 2 (a tensor-split pair), 0 (CPU).
    ``resources``: custom Ray resources each server needs (cycled over the servers), to pin
    servers to nodes. ``strategy``: ``"SPREAD"`` over nodes, or ``"PACK"``. A server whose
    actor dies is restarted by Ray, at most ``max_restarts`` times.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be an int >= 1, got {count!r}", field="count")
    return Placement.provided(
        RayServers(count, gpus_per_server, tuple(resources), strategy, max_restarts, address)
    )
