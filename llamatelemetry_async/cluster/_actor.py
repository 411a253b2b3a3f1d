"""``ServerActor``: one llama-server on a Ray node, run by the library's own ``LlamaServer``.

A Ray actor (``ray.remote(ServerActor)``, async): ``start()`` resolves the model and finds
(or builds, once, into the node's cache) the llama-server binary on its node, starts
llama-server on the node's address with a free port and a fresh random key, and returns
where it listens. The key travels back over Ray only, never on a
command line (the server reads it from its environment) or in a log.

The actor also runs a ``GPUSampler`` on its node; ``gpu_samples()`` hands the engine the
samples of the actor's GPUs, with wall-clock times (each node has its own monotonic clock).

When llama-server exits, the actor process exits too, so that Ray restarts the actor (its
``max_restarts`` bound the restarts) where its placement allows; the engine's backend then
calls ``start()`` on the new actor. The server is tied to the actor's process by the
parent-death signal: killing the actor (or its node) leaves no llama-server behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ..gpu import GPUSample, GPUSampler

__all__ = ["SamplesReply", "ServerActor"]

_FIRST_SAMPLES_S = 60.0  # how far back the first gpu_samples() call reaches


@dataclasses.dataclass(frozen=True)
class SamplesReply:
    """What ``gpu_samples()`` returns: whether the node's NVML works, and new samples."""

    available: bool
    reason: str | None
    interval: float
    samples: tuple[GPUSample, ...]  # ``t`` is wall-clock time (``time.time()``)


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


class ServerActor:
    """Runs one llama-server on the node Ray placed this actor on (see the module)."""

    def __init__(
        self,
        name: str,
        model: str,
        config: Any,
        binary: str | None,
        plan: dict[str, Any],
        sampler: dict[str, Any],
        build: str | None = None,
    ) -> None:
        self._name = name
        self._build = build  # None: find llama-server; "": build for the CPU; "90": CUDA
        self._model = model
        self._config = config
        self._binary = binary
        self._plan = plan  # tensor_split / split_mode of a pair
        self._sampler_options = sampler  # interval, nvml
        self._sampler: GPUSampler | None = None
        self._gpus: tuple[int, ...] = ()
        self._info: dict[str, Any] | None = None
        self._exited = asyncio.Event()
        self._sampling = asyncio.Event()  # the sampler has started (or found no NVML)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, Any]:
        """Start llama-server (once per actor life); where it listens, its key, its node."""
        if self._exited.is_set():  # between the server's exit and this actor's own
            raise RuntimeError(f"{self._name}: the server exited; the actor restarts")
        if self._info is not None:
            return self._info
        import anyio
        import ray

        from ..models import resolve_model
        from ..server import (
            LlamaServer,
            ServerPlan,
            build_llama_server,
            find_llama_server,
            server_command,
        )

        model = Path(self._model)
        if not await anyio.Path(model).is_file():
            model = await resolve_model(self._model)  # into this node's own cache
        if self._build is None:
            binary = await anyio.to_thread.run_sync(find_llama_server, self._binary)
        else:  # the library's own build, in this node's cache (built once, then found there)
            arch = self._build or None
            build = functools.partial(build_llama_server, cuda_arch=arch, progress=None)
            binary = await anyio.to_thread.run_sync(build)
        key = secrets.token_urlsafe(24)
        gpus = self._gpus = tuple(int(g) for g in ray.get_gpu_ids())
        config = dataclasses.replace(self._config, host=_node_ip(), port=0, api_key=key)
        plan = ServerPlan(name=self._name, gpus=gpus, **self._plan)
        argv, env = server_command(config, binary=binary, model=model, plan=plan)
        server = LlamaServer(argv, env, name=self._name, gpus=gpus)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def supervise() -> None:
            try:
                async with GPUSampler(**self._sampler_options) as sampler:
                    self._sampler = sampler
                    self._sampling.set()
                    async with anyio.create_task_group() as tg:
                        await tg.start(server.run)
                        started.set_result(None)
            except BaseException as exc:
                self._sampling.set()
                if not started.done():
                    started.set_exception(exc)
                    return
            self._exited.set()
            # The server is gone: so is this actor, and Ray restarts it where there is room.
            # The engine learns it either way: wait_exit() answers, or fails as the actor dies.
            os._exit(70)

        self._task = asyncio.create_task(supervise())
        await started
        self._info = {
            "url": server.url,
            "api_key": key,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": config.host,
            "pid": server.pid,
            "gpus": gpus,
        }
        return self._info

    async def wait_exit(self) -> None:
        """Returns only if the server exits; raises (Ray's actor error) if the actor dies."""
        await self._exited.wait()

    async def gpu_samples(self, after: float | None) -> SamplesReply:
        """The samples of this server's GPUs newer than ``after`` (wall-clock seconds),
        answered once per sampling period (the first call, ``after=None``, at once), so that
        the caller can simply ask again."""
        await self._sampling.wait()
        sampler = self._sampler
        if sampler is None or not sampler.available or not self._gpus:
            reason = sampler.reason if sampler is not None else "not started"
            return SamplesReply(False, reason or "no GPU for this server", 0.0, ())
        if after is not None:
            await asyncio.sleep(sampler.interval)  # the sampling period: one answer per tick
        offset = time.time() - time.monotonic()
        after = max(after or 0.0, time.time() - _FIRST_SAMPLES_S)
        samples = tuple(
            dataclasses.replace(s, t=s.t + offset)
            for gpu in self._gpus
            for s in sampler.samples(gpu)
            if s.t + offset > after
        )
        return SamplesReply(True, None, sampler.interval, samples)
