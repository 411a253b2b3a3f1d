"""One call for a notebook: ``engine = await AsyncEngine.auto(model)``.

It does what a Kaggle or Colab session needs before the first token, and says what it
chose and why:

1. copies the notebook's secrets (``HF_TOKEN``) into the environment (``load_secrets``);
2. finds the GPUs (``detect_environment``);
3. gets a llama-server for them: an explicit ``binary``, else a build archive named by
   ``$LLAMA_SERVER_ARCHIVE`` (unpacked into the cache, seconds), else the cache, else a
   build from source for the GPUs' compute capability (minutes, once per machine; export it
   with ``build-server --export`` for the next session);
4. resolves the model and plans it under every placement the GPUs allow
   (``Environment.plan_presets``), and picks the first that fits in this order: one server
   per GPU with every layer on its GPU (throughput), then one server across a GPU pair
   (a model too big for one GPU: Kaggle's T4 x2), then the CPU when there is no GPU;
5. starts the engine and prints its servers.

Outside Kaggle and Colab it does the same on a local machine. ``choose_placement`` is the
pure part of step 4.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from .._errors import ConfigError, LlamaServerNotFoundError, ModelDoesNotFitError, UsageError
from .._placement import Placement
from ..environment import Environment, detect_environment, load_secrets
from ..gpu import read_gpu_inventory
from ..models import VRAMPlan, inspect_model, resolve_model
from ..server import ServerConfig, build_llama_server, find_llama_server

if TYPE_CHECKING:
    from ..models import ModelInfo
    from ._engine import AsyncEngine

__all__ = ["auto_engine", "choose_placement"]

# The order in which presets are tried: throughput first, then room.
_PREFERENCE = ("per_gpu", "single_gpu", "pairs", "pair 50/50", "pair 60/40", "pair 70/30")


def choose_placement(env: Environment, model: ModelInfo, **settings: Any) -> tuple[Placement, str]:
    """The placement ``AsyncEngine.auto`` would start ``model`` with here, and why. Pure.

    Without GPUs (or without their memory figures): ``Placement.cpu()``. With GPUs: the
    first preset of ``env.presets()``, in the order one per GPU, one GPU, GPU pairs (split
    50/50, then 60/40, then 70/30), whose plan puts every layer on the GPUs; failing that,
    the first whose plan fits at all (partial offload). Raises the planner's
    ``ModelDoesNotFitError`` (with its suggestions) when nothing fits. ``settings`` are
    ``models.plan``'s (``ctx_size``, ``n_parallel``, ``cache_type_k``...).
    """
    if not env.gpus:
        return Placement.cpu(), "no GPU here: one CPU server" + (
            f" ({env.gpu_note})" if env.gpu_note else ""
        )
    plans = env.plan_presets(model, **settings)
    ordered = [name for name in _PREFERENCE if name in plans]
    if not ordered:  # GPUs without memory figures: nothing to plan with
        return env.placement, f"GPU memory unknown ({env.gpu_note}): {env.placement}"
    fitting = {name: p for name, p in plans.items() if isinstance(p, VRAMPlan)}
    for name in ordered:
        vram = fitting.get(name)
        if vram is not None and all(server.full_offload for server in vram.servers):
            return env.presets()[name], f"{name}: every layer on the GPU ({vram.summary()})"
    for name in ordered:
        vram = fitting.get(name)
        if vram is not None:
            return env.presets()[name], f"{name}: partial offload ({vram.summary()})"
    first = plans[ordered[0]]
    assert isinstance(first, ModelDoesNotFitError)
    raise first


async def auto_engine(
    model: str | os.PathLike[str],
    *,
    server: ServerConfig | None = None,
    binary: str | os.PathLike[str] | None = None,
    build: bool = True,
    say: Callable[[str], None] | None = print,
    plan_settings: Mapping[str, Any] | None = None,
    **engine_options: Any,
) -> AsyncEngine:
    """Secrets, GPUs, binary, model, placement, then a started engine (see the module doc).

    ``server`` configures the servers (the plan fills what it leaves unset); ``binary``
    skips the search; ``build=False`` raises ``LlamaServerNotFoundError`` instead of
    building; ``say`` receives each line of the explanation (``None``: quiet);
    ``plan_settings`` go to the planner when choosing (``ctx_size=16384``...); other
    keywords go to ``AsyncEngine``. Stop the engine with ``await engine.aclose()``.
    """
    from ._engine import AsyncEngine

    if "placement" in engine_options:
        raise ConfigError(
            "AsyncEngine.auto chooses the placement; to give one, use AsyncEngine(...) itself",
            field="placement",
        )

    if sniffio.current_async_library() != "asyncio":
        raise UsageError(
            "AsyncEngine.auto returns a started engine, which needs asyncio (a notebook's "
            "loop); under trio, use `async with AsyncEngine(...)`"
        )

    def tell(line: str) -> None:
        if say is not None:
            say(line)

    loaded = await anyio.to_thread.run_sync(load_secrets)
    if loaded:
        tell(f"secrets: {', '.join(loaded)} loaded into the environment")
    env = await detect_environment()
    tell(env.describe())
    found = binary if binary is not None else await _binary(env, build, tell)
    tell(f"llama-server: {found}")
    path = await resolve_model(model) if isinstance(model, str) else Path(model)
    info = await inspect_model(path)
    settings = dict(plan_settings or {})
    if server is not None:
        settings.update(
            {k: v for k in ("ctx_size", "n_parallel") if (v := getattr(server, k)) is not None}
        )
    placement, why = choose_placement(env, info, **settings)
    tell(f"placement: {why}")
    engine = AsyncEngine(path, placement=placement, server=server, binary=found, **engine_options)
    await engine.start()
    try:
        for info_line in engine.servers:
            tell(f"server {info_line.name}: {info_line.url} ({info_line.state})")
    except BaseException:
        # The caller never gets the engine (``say`` failed, or a cancel): stop its servers.
        with anyio.CancelScope(shield=True):
            await engine.aclose()
        raise
    return engine


async def _binary(env: Environment, build: bool, tell: Callable[[str], None]) -> Path:
    """The llama-server for ``env``'s GPUs: an archive or the cache first, a build if allowed."""
    arch = await _cuda_arch(env) if env.gpus else None
    if arch is None or not build:  # any binary will do (the start checks its CUDA code)
        try:
            return await anyio.to_thread.run_sync(find_llama_server)
        except LlamaServerNotFoundError:
            if not build:
                raise
    elif os.environ.get("LLAMA_SERVER_ARCHIVE"):
        # Unpacked into the cache: the build below then finds it there at once.
        await anyio.to_thread.run_sync(find_llama_server)
    what = f"CUDA {arch}" if arch else "the CPU"
    tell(
        f"llama-server for {what}: from the cache, or built now (minutes, once; carry it to "
        "the next session with build-server --export FILE and LLAMA_SERVER_ARCHIVE=FILE)"
    )
    return await anyio.to_thread.run_sync(lambda: build_llama_server(cuda_arch=arch, progress=tell))


async def _cuda_arch(env: Environment) -> str | None:
    """The CUDA architectures for ``env``'s GPUs, as cmake writes them (``"75"``, ``"75;90"``)."""
    inventory = await anyio.to_thread.run_sync(read_gpu_inventory)
    if inventory is None or not inventory.compute_capabilities:
        return None
    return ";".join(sorted({cc.replace(".", "") for cc in inventory.compute_capabilities}))
