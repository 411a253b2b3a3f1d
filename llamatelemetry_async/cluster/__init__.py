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

``ray_unique_id`` and ``ray_communicator`` form an NCCL communicator across Ray actors (rank
0's unique id shared through Ray). ``Strategy`` names how a placement's servers spread over
nodes (its Ray placement group's strategy); ``NAMESPACE`` is the Ray namespace of the
library's actors.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import ConfigError
from .._placement import PairSplitMode, Placement
from ._actor import ServerActor as ServerActor
from ._backend import RayBackend as RayBackend, _Group
from ._rendezvous import ray_communicator, ray_unique_id

__all__ = [
    "NAMESPACE",
    "RayBackend",
    "RayServers",
    "ServerActor",
    "Strategy",
    "ray_communicator",
    "ray_servers",
    "ray_unique_id",
]

NAMESPACE = "llamatelemetry"
"""The Ray namespace of the library's actors (named ``llama-server.<token>.ray<i>``)."""

Strategy = Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"]
_STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


@dataclass(frozen=True)
class RayServers:
    """How many servers to place on Ray, and how (see ``ray_servers``)."""

    count: int
    gpus_per_server: int = 1
    cpus_per_server: float = 1
    tensor_split: tuple[float, float] = (0.5, 0.5)
    split_mode: PairSplitMode = "layer"
    resources: tuple[Mapping[str, float], ...] = ()
    strategy: Strategy = "SPREAD"
    max_restarts: int = 3
    address: str | None = None
    placement_timeout: float = 60.0
    sampler_interval: float = 0.5
    nvml: Any = None
    build: str | None = None

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per server: its GPUs, CPUs and custom resources."""
        bundles = []
        for i in range(self.count):
            bundle: dict[str, float] = {"CPU": self.cpus_per_server}
            if self.gpus_per_server:
                bundle["GPU"] = self.gpus_per_server
            if self.resources:
                bundle.update(self.resources[i % len(self.resources)])
            bundles.append({k: v for k, v in bundle.items() if v})
        return bundles

    def backends(self, model: str | None, config: object, binary: str | None) -> list[object]:
        """One ``RayBackend`` per server, sharing one placement group; the actors start when
        the engine runs them."""
        if model is None:
            raise ConfigError(
                "servers on Ray need a model: a path every node has, or a spec each node "
                "resolves (owner/repo:file.gguf, a registry name)",
                field="model",
            )
        if self.build is not None and binary is not None:
            raise ConfigError(
                "give the engine a llama-server binary or ask the nodes to build one "
                "(ray_servers(build=...)), not both",
                field="build",
            )
        bundles = self.bundles()
        group = _Group(bundles, self.strategy, self.address, self.placement_timeout)
        plan: dict[str, object] = (
            {"tensor_split": self.tensor_split, "split_mode": self.split_mode}
            if self.gpus_per_server == 2
            else {}
        )
        # As many threads as the CPUs Ray reserves for the server (the config's win): servers
        # that Ray packs onto one node then share its cores instead of each taking them all.
        plan["threads"] = max(1, int(self.cpus_per_server))
        sampler = {"interval": self.sampler_interval, "nvml": self.nvml}
        # Named actors (in the "llamatelemetry" namespace): `ray list actors`, the dashboard
        # and ray.util.list_named_actors show whose they are; the token tells engines apart.
        token = secrets.token_hex(4)
        backends: list[object] = []
        for i, bundle in enumerate(bundles):
            name = f"ray{i}"
            args = (name, model, config, binary, plan, sampler, self.build)
            actor = f"llama-server.{token}.{name}"
            make = _maker(actor, args, bundle, self.max_restarts)
            backends.append(RayBackend(name, make, group, i))
        return backends


def _maker(name: str, args: tuple[Any, ...], bundle: dict[str, float], max_restarts: int) -> Any:
    def make(pg: Any, index: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        return (
            ray.remote(ServerActor)
            .options(
                name=name,
                namespace=NAMESPACE,
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                resources=custom,
                max_restarts=max_restarts,
                max_task_retries=0,  # a request is never sent twice
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=index
                ),
            )
            .remote(*args)
        )

    return make


def ray_servers(
    count: int = 1,
    *,
    gpus_per_server: int = 1,
    cpus_per_server: float = 1,
    tensor_split: tuple[float, float] = (0.5, 0.5),
    split_mode: PairSplitMode = "layer",
    resources: Sequence[Mapping[str, float]] = (),
    strategy: Strategy = "SPREAD",
    max_restarts: int = 3,
    address: str | None = None,
    placement_timeout: float = 60.0,
    sampler_interval: float = 0.5,
    nvml: Any = None,
    build: bool | str = False,
) -> Placement:
    """``count`` llama-servers as Ray actors on the cluster at ``address`` (``None``: the
    one this process is connected to, or ``RAY_ADDRESS``), as an engine placement.

    ``gpus_per_server``: 1 (one server per GPU), 2 (a tensor-split pair, split by
    ``tensor_split`` and ``split_mode`` as ``Placement.pairs`` does), 0 (a CPU server).
    ``cpus_per_server``: the CPUs Ray reserves for each, and the threads each computes with
    (at least 1; ``ServerConfig.threads`` wins). ``resources``: custom Ray resources
    each server needs (cycled over the servers), e.g. to pin servers to labelled nodes.
    ``strategy``: how the placement group (one bundle per server) spreads over nodes:
    ``"SPREAD"`` (over nodes when it can), ``"STRICT_SPREAD"`` (one per node, or fail),
    ``"PACK"``/``"STRICT_PACK"`` (onto few nodes / one node). The engine's start fails with
    ``ServerStartError`` when the cluster has no room within ``placement_timeout`` seconds.
    A server whose actor (or node) dies is restarted by Ray, at most ``max_restarts`` times.
    Each actor samples its GPUs every ``sampler_interval`` seconds with NVML (``nvml``: the
    binding, default ``pynvml``; tests pass a fake) for the engine's per-request energy.
    Each node finds its llama-server (``find_llama_server``: ``$LLAMA_SERVER_PATH``, ``PATH``,
    the build cache), or, with ``build``, uses the library's own build in its cache, built
    there on first use (minutes, once per node and version): ``True`` for the CPU, or a CUDA
    architecture (``"75"`` T4, ``"90"`` H100).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be an int >= 1, got {count!r}", field="count")
    if gpus_per_server not in (0, 1, 2) or isinstance(gpus_per_server, bool):
        raise ConfigError(
            "gpus_per_server must be 0 (CPU), 1 (one GPU each) or 2 (a tensor-split pair), "
            f"got {gpus_per_server!r}",
            field="gpus_per_server",
        )
    if not isinstance(cpus_per_server, int | float) or cpus_per_server < 0:
        raise ConfigError(f"cpus_per_server must be >= 0, got {cpus_per_server!r}",
                          field="cpus_per_server")  # fmt: skip
    if not gpus_per_server and not cpus_per_server:
        raise ConfigError(
            "a CPU server (gpus_per_server=0) needs cpus_per_server > 0", field="cpus_per_server"
        )
    if strategy not in _STRATEGIES:
        raise ConfigError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}",
                          field="strategy")  # fmt: skip
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
        raise ConfigError(f"max_restarts must be an int >= -1 (-1: no bound), got "
                          f"{max_restarts!r}", field="max_restarts")  # fmt: skip
    for name, value in (("placement_timeout", placement_timeout),
                        ("sampler_interval", sampler_interval)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value!r}", field=name)
    if not isinstance(build, bool | str) or build == "":
        raise ConfigError(
            f'build must be False, True (CPU) or a CUDA architecture like "90", got {build!r}',
            field="build",
        )
    # The pair's split is checked as Placement.pairs checks it (one place for that rule).
    pairs = Placement.pairs([(0, 1)], tensor_split=tensor_split, split_mode=split_mode)
    return Placement.provided(
        RayServers(
            count,
            gpus_per_server,
            cpus_per_server,
            pairs.tensor_split,
            split_mode,
            tuple(dict(r) for r in resources),
            strategy,
            max_restarts,
            address,
            float(placement_timeout),
            float(sampler_interval),
            nvml,
            None if build is False else "" if build is True else build,
        )
    )
