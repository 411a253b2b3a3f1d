"""Placement: how many llama-servers to run, and on which GPUs.

A ``Placement`` is a small immutable recipe; ``plans(gpus)`` resolves it against the GPUs
that are actually available (``visible_gpus()``) into one ``ServerPlan`` per server. It is
pure: discovery happens elsewhere, so every rule here is tested without a GPU.

```python
Placement.per_gpu().plans([0, 1])
# [ServerPlan('gpu0', (0,)), ServerPlan('gpu1', (1,))]
Placement.kaggle_t4x2_pair("60/40", split_mode="row").plans([0, 1])
# [ServerPlan('gpu0+1', (0, 1), tensor_split=(0.6, 0.4), split_mode='row')]
Placement.auto().plans([])
# [ServerPlan('cpu0', ())]
Placement.cpu(2).plans([], cores=[0, 1, 2, 3])
# [ServerPlan('cpu0', (), cores=(0, 1), threads=2), ServerPlan('cpu1', (), cores=(2, 3), threads=2)]
```

With ``cores`` the plans also divide the CPU cores among the servers (``share_cores``), so
that servers on one machine do not spin threads against each other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, Protocol, TypeAlias

from ._errors import ConfigError
from .server import ServerPlan

__all__ = ["GPU_SERVER_THREADS", "Placement", "RemoteServer", "available_cores", "share_cores"]

PairSplitMode: TypeAlias = Literal["layer", "row", "tensor"]
KaggleSplit: TypeAlias = Literal["50/50", "60/40", "70/30"]

_PAIR_SPLIT_MODES: Final = ("layer", "row", "tensor")
_KAGGLE_SPLITS: Final[dict[str, tuple[float, float]]] = {
    "50/50": (0.5, 0.5),
    "60/40": (0.6, 0.4),
    "70/30": (0.7, 0.3),
}
_NO_GPUS_HINT: Final = (
    "no GPUs are visible (NVML found none and CUDA_VISIBLE_DEVICES names none); "
    "use Placement.cpu(n) to run on the CPU, or Placement.auto() to fall back to it"
)


def _fail(field: str, message: str) -> ConfigError:
    return ConfigError(f"{field}: {message}", field=field)


def _gpu_id(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(field, f"GPU ids are ints >= 0, got {value!r}")
    return value


class ServerProvider(Protocol):
    """Places servers somewhere the engine does not spawn them itself (a Ray cluster).

    ``backends`` returns engine backends (``llamatelemetry_async.engine.Backend``); this
    module, low in the package, knows them only as objects.
    """

    def backends(self, model: str | None, config: object, binary: str | None) -> list[object]: ...


@dataclass(frozen=True, slots=True)
class RemoteServer:
    """A llama-server the engine did not start: its base URL and API key."""

    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        url = self.url
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _fail("remote", f"a remote server is an http:// or https:// URL, got {url!r}")
        object.__setattr__(self, "url", url.rstrip("/"))
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise _fail("api_key", "the API key of a remote server is a str")

    def __repr__(self) -> str:  # the key is a secret
        key = ", api_key=***" if self.api_key else ""
        return f"RemoteServer({self.url!r}{key})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where the engine's servers run. Build one with a classmethod, not the constructor.

    - ``Placement.per_gpu(gpus)``: one server per GPU, pinned with ``CUDA_VISIBLE_DEVICES``.
    - ``Placement.pairs(pairs, tensor_split=..., split_mode=...)``: one server per GPU pair,
      the model split across both (``"tensor"`` is llama.cpp's experimental tensor
      parallelism, all-reducing over NCCL inside llama-server when built with NCCL).
    - ``Placement.cpu(n)``: ``n`` CPU servers (also how tests stand in for GPUs).
    - ``Placement.auto()`` (or the string ``"auto"``): ``per_gpu`` over every visible GPU,
      ``cpu(1)`` when there is none.
    - Presets: ``kaggle_t4x2()``, ``kaggle_t4x2_pair("60/40")``, ``single_gpu(0)``.
    - ``Placement.remote(urls, api_key=...)``: servers the engine did not start, watched and
      routed to like its own; mixable with local ones: ``Placement.cpu(1) +
      Placement.remote(["http://10.0.0.5:8080"])``.
    """

    kind: Literal["per_gpu", "pairs", "cpu", "auto", "remote"]
    gpus: tuple[int, ...] | None = None
    gpu_pairs: tuple[tuple[int, int], ...] | None = None
    tensor_split: tuple[float, float] = (0.5, 0.5)
    split_mode: PairSplitMode = "layer"
    n: int = 1
    remotes: tuple[RemoteServer, ...] = ()
    providers: tuple[ServerProvider, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("per_gpu", "pairs", "cpu", "auto", "remote"):
            raise _fail("kind", f"must be per_gpu, pairs, cpu, auto or remote, got {self.kind!r}")
        if self.kind == "remote" and not (self.remotes or self.providers):
            raise _fail("remote", "Placement.remote needs at least one URL")
        if self.gpus is not None:
            gpus = tuple(_gpu_id("gpus", gpu) for gpu in self.gpus)
            if not gpus:
                raise _fail("gpus", f"per_gpu needs at least one GPU; {_NO_GPUS_HINT}")
            if len(set(gpus)) != len(gpus):
                raise _fail("gpus", f"lists a GPU twice: {gpus}")
            object.__setattr__(self, "gpus", gpus)
        if self.gpu_pairs is not None:
            object.__setattr__(self, "gpu_pairs", _check_pairs(self.gpu_pairs))
        split = self.tensor_split
        if (
            isinstance(split, str)
            or not isinstance(split, Sequence)
            or len(split) != 2
            or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in split
            )
        ):
            raise _fail("tensor_split", f"a pair split is two positive proportions, got {split!r}")
        object.__setattr__(self, "tensor_split", (float(split[0]), float(split[1])))
        if self.split_mode not in _PAIR_SPLIT_MODES:
            raise _fail(
                "split_mode",
                f"must be one of {', '.join(_PAIR_SPLIT_MODES)} for a GPU pair, "
                f"got {self.split_mode!r}",
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise _fail("n", f"the number of CPU servers must be an int >= 1, got {self.n!r}")

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def per_gpu(cls, gpus: Sequence[int] | None = None) -> Placement:
        """One server per GPU; ``None`` means every visible GPU."""
        return cls(kind="per_gpu", gpus=None if gpus is None else tuple(gpus))

    @classmethod
    def pairs(
        cls,
        pairs: Sequence[tuple[int, int]] | None = None,
        *,
        tensor_split: tuple[float, float] = (0.5, 0.5),
        split_mode: PairSplitMode = "layer",
    ) -> Placement:
        """One server per GPU pair; ``None`` pairs the visible GPUs in order: (0, 1), (2, 3)...

        With an odd number of visible GPUs the last one is left out; name the pairs, or use
        ``per_gpu``, to use it.
        """
        return cls(
            kind="pairs",
            gpu_pairs=None if pairs is None else tuple(pairs),
            tensor_split=tensor_split,
            split_mode=split_mode,
        )

    @classmethod
    def cpu(cls, n: int = 1) -> Placement:
        """``n`` servers on the CPU (no GPU offload)."""
        return cls(kind="cpu", n=n)

    @classmethod
    def auto(cls) -> Placement:
        """One server per visible GPU, or one CPU server when there is none."""
        return cls(kind="auto")

    @classmethod
    def kaggle_t4x2(cls) -> Placement:
        """Kaggle's two Tesla T4s, one server on each."""
        return cls.per_gpu((0, 1))

    @classmethod
    def kaggle_t4x2_pair(
        cls, split: KaggleSplit = "50/50", split_mode: PairSplitMode = "layer"
    ) -> Placement:
        """Kaggle's two Tesla T4s as one server, the model split ``split`` between them."""
        if split not in _KAGGLE_SPLITS:
            raise _fail("split", f"must be one of {', '.join(_KAGGLE_SPLITS)}, got {split!r}")
        return cls.pairs([(0, 1)], tensor_split=_KAGGLE_SPLITS[split], split_mode=split_mode)

    @classmethod
    def single_gpu(cls, gpu: int = 0) -> Placement:
        """One server on one GPU (a single-GPU notebook)."""
        return cls.per_gpu((gpu,))

    @classmethod
    def remote(cls, urls: Sequence[str] | str, *, api_key: str | None = None) -> Placement:
        """Servers the engine did not start, by base URL, all with ``api_key`` (or none).

        Give servers with different keys as ``RemoteServer(url, api_key)`` items.
        """
        items = [urls] if isinstance(urls, str) else list(urls)
        remotes = tuple(
            item if isinstance(item, RemoteServer) else RemoteServer(item, api_key)
            for item in items
        )
        return cls(kind="remote", remotes=remotes)

    @classmethod
    def provided(cls, provider: ServerProvider) -> Placement:
        """Servers that ``provider`` places elsewhere (a cluster scheduler), as engine backends.

        The engine calls ``provider.backends(...)`` once it knows its model and server
        settings; ``llamatelemetry_async.cluster.ray_servers`` is one such provider.
        """
        return cls(kind="remote", providers=(provider,))

    @property
    def has_local(self) -> bool:
        """True if the engine starts servers of its own with this placement."""
        return self.kind != "remote"

    def __add__(self, other: Placement) -> Placement:
        """Local servers and remote ones together (at most one local placement)."""
        if not isinstance(other, Placement):
            return NotImplemented
        if self.has_local and other.has_local:
            raise _fail("placement", "two local placements cannot be added; add remote ones")
        local = self if self.has_local else other
        return replace(
            local,
            remotes=self.remotes + other.remotes,
            providers=self.providers + other.providers,
        )

    @classmethod
    def coerce(cls, value: Placement | str) -> Placement:
        """``value`` itself, or the placement a string names (only ``"auto"`` for now)."""
        if isinstance(value, Placement):
            return value
        if value == "auto":
            return cls.auto()
        raise _fail(
            "placement",
            f'unknown placement {value!r}; use "auto" or a Placement '
            "(Placement.per_gpu(), Placement.pairs(), Placement.cpu(n), presets)",
        )

    # -- resolution -----------------------------------------------------------------------

    def plans(self, gpus: Sequence[int], *, cores: Sequence[int] | None = None) -> list[ServerPlan]:
        """One ``ServerPlan`` per server, given the visible GPU ids (``visible_gpus()``).

        ``cores``: the CPU cores the servers may use (``available_cores()``), divided among
        them by ``share_cores``; ``None`` leaves threads and pinning to llama-server.
        Raises ``ConfigError`` when a named GPU is not visible, or when a GPU placement
        finds no GPUs (the message suggests ``Placement.cpu``).
        """
        plans = self._plans(gpus)
        return plans if cores is None else share_cores(plans, cores)

    def _plans(self, gpus: Sequence[int]) -> list[ServerPlan]:
        available = list(dict.fromkeys(_gpu_id("gpus", gpu) for gpu in gpus))
        if self.kind == "remote":
            return []
        if self.kind == "cpu" or (self.kind == "auto" and not available):
            return [ServerPlan(f"cpu{i}", ()) for i in range(self.n)]
        if self.kind in ("per_gpu", "auto"):
            targets = list(self.gpus) if self.gpus is not None else available
            if not targets:
                raise _fail("gpus", _NO_GPUS_HINT)
            _check_available("gpus", targets, available)
            return [ServerPlan(f"gpu{gpu}", (gpu,)) for gpu in targets]
        if self.gpu_pairs is not None:
            pairs = list(self.gpu_pairs)
        else:
            if len(available) < 2:
                raise _fail(
                    "pairs",
                    f"a GPU pair needs 2 visible GPUs, found {len(available)} {available}; "
                    "use Placement.per_gpu() for one GPU, or Placement.cpu(n) for none",
                )
            pairs = list(zip(available[0::2], available[1::2], strict=False))
        _check_available("pairs", [gpu for pair in pairs for gpu in pair], available)
        return [
            ServerPlan(
                f"gpu{a}+{b}", (a, b), tensor_split=self.tensor_split, split_mode=self.split_mode
            )
            for a, b in pairs
        ]


GPU_SERVER_THREADS: Final = 4
"""Threads a GPU server gets at most: with its layers on the GPU, the CPU only samples and
runs the few operations left to it. Partial offload runs layers on the CPU: set
``ServerConfig(threads=...)`` for it."""


def available_cores() -> list[int]:
    """The CPU cores this process may run on: its affinity mask (containers and CI runners
    limit it), else every core; under a cgroup CPU quota (``docker --cpus=2``: every core
    in the mask, two cores' worth of time), only as many of them as the quota pays for."""
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
    else:
        cores = list(range(os.cpu_count() or 1))
    quota = _cpu_quota()
    # Threads beyond the quota are throttled mid-step, and llama.cpp's threads wait for
    # each other: one thread per core the quota pays for is faster than one per core seen.
    return cores if quota is None else cores[: max(1, quota)]


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")


def _cpu_quota() -> int | None:
    """Cores' worth of CPU time this process's cgroup (or one above it) allows, rounded
    up; ``None`` without a quota or off Linux."""
    v2_path, v1_path = "", ""
    try:
        for line in _PROC_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2_path = path.strip("/")
            elif "cpu" in controllers.split(","):
                v1_path = path.strip("/")
    except (OSError, ValueError):
        pass
    found: list[float] = []
    for mount, path, read in (
        (_CGROUP_ROOT, v2_path, _v2_quota),
        (_CGROUP_ROOT / "cpu", v1_path, _v1_quota),
    ):
        own = mount / path if path and (mount / path).is_dir() else mount
        while True:
            quota = read(own)
            if quota is not None:
                found.append(quota)
            if own == mount or own == own.parent:
                break
            own = own.parent
    return math.ceil(min(found) - 1e-9) if found else None


def _v2_quota(cgroup: Path) -> float | None:
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(cgroup: Path) -> float | None:
    try:
        limit = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period


def share_cores(plans: Sequence[ServerPlan], cores: Sequence[int]) -> list[ServerPlan]:
    """``plans`` with the CPU ``cores`` divided among their servers. Pure.

    - Each GPU server gets ``GPU_SERVER_THREADS`` cores, or its fair share if that is less.
    - CPU servers divide the rest evenly (the first ones get one more when it does not
      divide), so two CPU servers never compute on the same core.
    - Each server is pinned to its own contiguous run of cores, with one thread per core.
    - With more servers than cores, each server gets one thread, the cores are dealt round
      the servers, and ``poll=0``: a thread that polls for work takes its core from the
      server it shares it with.

    Cores nobody gets (GPU servers only, on a big machine) stay free for the application.

    ```python
    share_cores([ServerPlan("gpu0", (0,)), ServerPlan("cpu0", ())], range(8))
    # [ServerPlan('gpu0', (0,), cores=(0, 1, 2, 3), threads=4),
    #  ServerPlan('cpu0', (), cores=(4, 5, 6, 7), threads=4)]
    ```
    """
    pool = sorted({_core_id(core) for core in cores})
    if not plans or not pool:
        return list(plans)
    if len(pool) < len(plans):
        return [
            replace(plan, cores=(pool[i % len(pool)],), threads=1, poll=0)
            for i, plan in enumerate(plans)
        ]
    fair = len(pool) // len(plans)
    sizes = [min(GPU_SERVER_THREADS, fair) if plan.gpus else 0 for plan in plans]
    cpu_servers = [i for i, plan in enumerate(plans) if not plan.gpus]
    if cpu_servers:
        left = len(pool) - sum(sizes)
        each, extra = divmod(left, len(cpu_servers))
        for rank, i in enumerate(cpu_servers):
            sizes[i] = each + (rank < extra)
    shared: list[ServerPlan] = []
    start = 0
    for plan, size in zip(plans, sizes, strict=True):
        shared.append(replace(plan, cores=tuple(pool[start : start + size]), threads=size))
        start += size
    return shared


def _core_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail("cores", f"CPU core ids are ints >= 0, got {value!r}")
    return value


def _check_pairs(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    if not pairs:
        raise _fail("pairs", "needs at least one (gpu, gpu) pair")
    seen: set[int] = set()
    checked = []
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise _fail("pairs", f"each pair is two GPU ids, got {pair!r}")
        a, b = _gpu_id("pairs", pair[0]), _gpu_id("pairs", pair[1])
        if a == b:
            raise _fail("pairs", f"a pair needs two different GPUs, got {pair!r}")
        for gpu in (a, b):
            if gpu in seen:
                raise _fail("pairs", f"GPU {gpu} is in two pairs; each GPU serves one server")
            seen.add(gpu)
        checked.append((a, b))
    return tuple(checked)


def _check_available(field: str, wanted: Sequence[int], available: Sequence[int]) -> None:
    missing = [gpu for gpu in wanted if gpu not in available]
    if missing:
        shown = ", ".join(map(str, missing))
        raise _fail(
            field,
            f"GPU {shown} not visible (visible GPUs: {list(available)}; "
            "check CUDA_VISIBLE_DEVICES and nvidia-smi)",
        )
