"""Where this code runs: Kaggle, Colab or a local machine; in a notebook or not; which GPUs.

``detect_environment()`` reads environment variables (no I/O), asks NVML for the GPUs in a
worker thread (``gpu.visible_gpus`` for which, ``gpu.read_gpu_memory`` for their names and
memory: the figures the VRAM planner uses), and recommends a ``Placement``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import anyio.to_thread

if TYPE_CHECKING:
    from .._errors import ModelDoesNotFitError
    from .._placement import Placement
    from ..models import GPUSpec, ModelInfo, VRAMPlan

__all__ = ["Environment", "EnvironmentKind", "GPUInfo", "detect_environment"]

EnvironmentKind: TypeAlias = Literal["kaggle", "colab", "local"]

# Kaggle sets these in every kernel (interactive and batch); Colab in every runtime.
_KAGGLE_VARS: Final = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE")
_COLAB_VARS: Final = ("COLAB_RELEASE_TAG", "COLAB_GPU")


@dataclass(frozen=True, slots=True)
class GPUInfo:
    """One visible GPU: its NVML index, name and memory in bytes (``None`` when unknown)."""

    index: int
    name: str
    memory_total: int | None = None
    memory_used: int | None = None

    @property
    def memory_free(self) -> int | None:
        """Total minus used memory in bytes, when NVML reported both."""
        if self.memory_total is None or self.memory_used is None:
            return None
        return self.memory_total - self.memory_used

    def spec(self) -> GPUSpec | None:
        """This GPU as the VRAM planner sees it (``None`` when its memory is unknown)."""
        from ..models import GPUSpec

        if self.memory_total is None:
            return None
        return GPUSpec(self.index, self.name, self.memory_total, free_bytes=self.memory_free)


@dataclass(frozen=True, slots=True, kw_only=True)
class Environment:
    """What ``detect_environment()`` found.

    ``kind`` is ``"kaggle"``, ``"colab"`` or ``"local"``; ``in_notebook`` is true inside a
    Jupyter/IPython kernel; ``gpus`` are the GPUs this process may use (``CUDA_VISIBLE_DEVICES``
    honoured), and ``gpu_note`` says why their details are missing when NVML gave none;
    ``placement`` is the recommended preset: two T4s (Kaggle) -> ``Placement.kaggle_t4x2()``,
    one GPU -> ``Placement.single_gpu(i)``, several -> ``Placement.per_gpu(...)``, none ->
    ``Placement.cpu()``. ``presets()`` lists every preset that fits these GPUs.
    """

    kind: EnvironmentKind
    in_notebook: bool
    gpus: tuple[GPUInfo, ...]
    placement: Placement
    gpu_note: str | None = None

    @property
    def is_kaggle_t4x2(self) -> bool:
        """Two visible Tesla T4s, numbered 0 and 1: the Kaggle "GPU T4 x2" accelerator."""
        return _is_t4_pair(self.gpus)

    def presets(self) -> dict[str, Placement]:
        """Every placement preset these GPUs can run, by name; the CPU one is always there.

        Two GPUs: ``"per_gpu"`` and the pair splits ``"pair 50/50"``, ``"pair 60/40"``,
        ``"pair 70/30"`` (the Kaggle presets on a T4 x2); one GPU: ``"single_gpu"``; more:
        ``"per_gpu"`` and ``"pairs"``.
        """
        from .._placement import Placement

        ids = [g.index for g in self.gpus]
        found: dict[str, Placement] = {}
        if len(ids) == 1:
            found["single_gpu"] = Placement.single_gpu(ids[0])
        elif len(ids) == 2:
            found["per_gpu"] = Placement.per_gpu(ids)
            for split in ("50/50", "60/40", "70/30"):
                if self.is_kaggle_t4x2:
                    found[f"pair {split}"] = Placement.kaggle_t4x2_pair(split)
                else:
                    a, b = (float(x) / 100 for x in split.split("/"))
                    found[f"pair {split}"] = Placement.pairs(
                        [(ids[0], ids[1])], tensor_split=(a, b)
                    )
        elif len(ids) > 2:
            found["per_gpu"] = Placement.per_gpu(ids)
            found["pairs"] = Placement.pairs()
        found["cpu"] = Placement.cpu()
        return found

    def plan_presets(
        self, model: ModelInfo, **settings: Any
    ) -> dict[str, VRAMPlan | ModelDoesNotFitError]:
        """Plan ``model`` under every preset of ``presets()``: what each would run, or why not.

        Each value is ``models.plan(model, gpus, placement=preset, **settings)`` on these
        GPUs' free memory, or the ``ModelDoesNotFitError`` saying what would fit instead.
        ``settings`` are ``plan``'s (``ctx_size``, ``n_parallel``, ``cache_type_k`` ...).
        GPUs whose memory NVML did not report are left out (with them, their presets).

        ```python
        info = await inspect_model(path)
        for name, vram in env.plan_presets(info, ctx_size=8192).items():
            print(name, vram.summary() if isinstance(vram, VRAMPlan) else f"no: {vram}")
        ```
        """
        from .._errors import ModelDoesNotFitError
        from ..models import plan

        specs = [spec for spec in (gpu.spec() for gpu in self.gpus) if spec is not None]
        known = {spec.index for spec in specs}
        found: dict[str, VRAMPlan | ModelDoesNotFitError] = {}
        for name, preset in self.presets().items():
            servers = preset.plans([gpu.index for gpu in self.gpus])
            if any(gpu not in known for server in servers for gpu in server.gpus):
                continue  # a GPU of this preset has no memory figures to plan with
            try:
                found[name] = plan(model, specs, placement=servers, **settings)
            except ModelDoesNotFitError as exc:
                found[name] = exc
        return found

    def describe(self) -> str:
        """A few lines for a notebook cell: where, which GPUs, which placement."""
        where = {"kaggle": "Kaggle", "colab": "Colab", "local": "local machine"}[self.kind]
        lines = [f"{where}{' (notebook)' if self.in_notebook else ''}"]
        for gpu in self.gpus:
            memory = f", {gpu.memory_total / 2**30:.1f} GiB" if gpu.memory_total else ""
            lines.append(f"  GPU {gpu.index}: {gpu.name}{memory}")
        if not self.gpus:
            lines.append("  no GPU" + (f" ({self.gpu_note})" if self.gpu_note else ""))
        elif self.gpu_note:
            lines.append(f"  ({self.gpu_note})")
        lines.append(f"  recommended placement: {self.placement}")
        return "\n".join(lines)


def _is_t4_pair(gpus: tuple[GPUInfo, ...]) -> bool:
    return [g.index for g in gpus] == [0, 1] and all("T4" in g.name for g in gpus)


def _kind(environ: Mapping[str, str]) -> EnvironmentKind:
    if any(environ.get(v) for v in _KAGGLE_VARS):
        return "kaggle"
    if any(v in environ for v in _COLAB_VARS) or sys.modules.get("google.colab") is not None:
        return "colab"
    return "local"


def _in_notebook() -> bool:
    # Only look at an IPython that is already loaded: importing it here would be slow and
    # would say nothing (a plain script has no shell).
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    # A kernel-backed shell (Jupyter, Kaggle, Colab) has a kernel; the terminal IPython not.
    return getattr(shell, "kernel", None) is not None


async def _gpus() -> tuple[tuple[GPUInfo, ...], str | None]:
    """The visible GPUs with NVML's name and memory; every NVML call off the event loop."""
    from ..gpu import read_gpu_memory, visible_gpus

    ids = await anyio.to_thread.run_sync(visible_gpus)
    if not ids:
        return (), "NVML sees no GPU and CUDA_VISIBLE_DEVICES names none"
    memory, why = await anyio.to_thread.run_sync(read_gpu_memory, ids)
    by_index = {gpu.index: gpu for gpu in memory}
    found = []
    for index in ids:
        read = by_index.get(index)
        if read is None:
            found.append(GPUInfo(index, "unknown GPU"))
        else:
            used = min(read.used_bytes, read.total_bytes)  # as the planner's free memory
            found.append(GPUInfo(index, read.name, read.total_bytes, used))
    note = None
    if not memory:
        note = f"GPU names and memory unknown: {why or 'NVML gave none'}"
    return tuple(found), note


def _recommend(gpus: tuple[GPUInfo, ...]) -> Placement:
    from .._placement import Placement

    if _is_t4_pair(gpus):
        return Placement.kaggle_t4x2()
    if len(gpus) == 1:
        return Placement.single_gpu(gpus[0].index)
    if gpus:
        return Placement.per_gpu([g.index for g in gpus])
    return Placement.cpu()


async def detect_environment() -> Environment:
    """Detect the platform, the notebook kernel and the GPUs; recommend a placement.

    Kaggle is recognised by ``KAGGLE_KERNEL_RUN_TYPE``/``KAGGLE_URL_BASE``, Colab by
    ``COLAB_RELEASE_TAG``/``COLAB_GPU``. GPUs come from NVML (in a worker thread) narrowed by
    ``CUDA_VISIBLE_DEVICES``; without NVML there are none, and ``gpu_note`` says why.

    ```python
    env = await detect_environment()
    print(env.describe())
    async with AsyncEngine(model, placement=env.placement) as engine: ...
    ```
    """
    gpus, note = await _gpus()
    return Environment(
        kind=_kind(os.environ),
        in_notebook=_in_notebook(),
        gpus=gpus,
        placement=_recommend(gpus),
        gpu_note=note,
    )
