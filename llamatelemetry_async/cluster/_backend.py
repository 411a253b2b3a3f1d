"""``RayBackend``: an engine backend whose llama-server runs in a Ray actor on some node.

Routing treats it as a remote server (``RemoteBackend``: probes, cool-down, slots from
``/props``); what it adds is the actor's life. It asks the actor to start its server, learns
the URL and key over Ray, and serves; a second task waits on the actor, and when the actor
(or its node) dies, serving stops, requests in flight fail as ``ServerCrashedError``, and the
backend asks Ray's restarted actor for its new URL. A third task mirrors the actor's GPU
samples, so that the engine measures each request's energy on the node that served it.

The servers of one ``ray_servers`` placement share a Ray placement group (``_Group``): the
first backend to run creates it, the last to stop removes it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from .._errors import LlamaError, ServerCrashedError, ServerStartError
from ..engine import BackendContext, EnergyBook, RemoteBackend, ServerInfo
from ..gpu import GPUSample
from ._actor import SamplesReply

__all__ = ["RayBackend", "ensure_ray", "ray_result"]

logger = logging.getLogger("llamatelemetry_async.cluster")

_init_lock = threading.Lock()


def ensure_ray(address: str | None) -> None:
    """Connect this process to the Ray cluster at ``address`` (once; blocking: a thread).

    Raises ``ServerStartError`` saying what to do when there is no cluster there: at once
    when nothing listens at ``host:port`` (Ray itself would retry for minutes).
    """
    import ray

    with _init_lock:
        if ray.is_initialized():
            return
        where = address or "auto"
        try:
            if ":" in where and "://" not in where:
                host, _, port = where.rpartition(":")
                socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
            ray.init(
                address=where,
                logging_level=logging.ERROR,
                log_to_driver=False,
                configure_logging=False,
            )
        except (OSError, ValueError, RuntimeError) as exc:  # ConnectionError is an OSError
            raise ServerStartError(
                f"no Ray cluster at {where!r} ({exc}): start one (`ray start --head`), or pass "
                "the head's host:port as address= (--ray ADDRESS), or set RAY_ADDRESS",
                server="ray",
                exit_code=None,
            ) from exc


async def ray_result(ref: Any) -> Any:
    """The value of a Ray ``ObjectRef``, without blocking the event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: a worker thread waits (abandoned on cancellation)
        import ray

        return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)
    return await asyncio.wrap_future(ref.future())


class _Group:
    """The placement group the servers of one placement share (see the module)."""

    def __init__(
        self, bundles: list[dict[str, float]], strategy: str, address: str | None, timeout: float
    ) -> None:
        self.bundles = bundles
        self.strategy = strategy
        self.address = address
        self.timeout = timeout
        self.pg: Any = None
        self._users = 0
        self._ready: anyio.Event | None = None

    async def enter(self) -> Any:
        """The placement group, created (and waited for) by the first caller."""
        from ray.util.placement_group import placement_group, remove_placement_group

        self._users += 1
        if self._ready is None:
            self._ready = anyio.Event()
            try:
                await anyio.to_thread.run_sync(ensure_ray, self.address)
                pg = placement_group(self.bundles, strategy=self.strategy)
                with anyio.move_on_after(self.timeout):
                    await ray_result(pg.ready())
                    self.pg = pg
                if self.pg is None:
                    remove_placement_group(pg)
            finally:
                self._ready.set()
        await self._ready.wait()
        if self.pg is None:
            raise ServerStartError(
                f"the Ray cluster had no room for {len(self.bundles)} server(s) "
                f"{self.bundles} ({self.strategy}) within {self.timeout:g} s: add nodes, "
                "lower count or gpus_per_server, or use a softer strategy ('SPREAD', 'PACK')",
                server="ray",
                exit_code=None,
            )
        return self.pg

    def leave(self) -> None:
        """The last user removes the placement group (Ray frees its resources)."""
        self._users -= 1
        if self._users == 0:
            self._ready = None
        if self._users == 0 and self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            pg, self.pg = self.pg, None
            try:
                remove_placement_group(pg)
            except Exception:  # the cluster is gone: nothing is held any more
                pass


class _RemoteSamples:
    """A mirror of the ``GPUSampler`` in a server's actor (what an ``EnergyBook`` reads)."""

    def __init__(self, capacity: int = 3600) -> None:
        self.available = False
        self.interval = 0.5
        self.reason: str | None = "not started"
        self._rings: dict[int, collections.deque[GPUSample]] = {}
        self._capacity = capacity
        self.newest = 0.0  # wall-clock time of the newest sample

    def samples(self, gpu: int) -> list[GPUSample]:
        return list(self._rings.get(gpu, ()))

    def add(self, reply: SamplesReply) -> None:
        """Samples from the node, their wall-clock times moved onto this process's clock."""
        self.available, self.reason = reply.available, reply.reason
        if reply.interval:
            self.interval = reply.interval
        offset = time.monotonic() - time.time()
        for sample in reply.samples:
            ring = self._rings.setdefault(sample.index, collections.deque(maxlen=self._capacity))
            ring.append(_moved(sample, offset))
            self.newest = max(self.newest, sample.t)


def _moved(sample: GPUSample, offset: float) -> GPUSample:
    return dataclasses.replace(sample, t=sample.t + offset)


class RayBackend(RemoteBackend):
    """One llama-server in a Ray actor (see the module)."""

    kind = "ray"

    def __init__(
        self, name: str, make_actor: Callable[[Any, int], Any], group: _Group, index: int
    ) -> None:
        super().__init__(name, "", None)
        self._make_actor = make_actor
        self._group = group
        self._index = index  # the bundle of the placement group it runs in
        self._actor: Any = None
        self._died = anyio.Event()
        self._gpu = _RemoteSamples()
        self.energy = EnergyBook(self._gpu)
        self.node_id: str | None = None
        self.pid: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's URL on its node, once started (``""`` before)."""
        return self._url

    async def run(self, ctx: BackendContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the actor's server, serve it, and again after each actor restart."""
        import ray.exceptions

        try:
            pg = await self._group.enter()
            self._actor = self._make_actor(pg, self._index)
            started = False
            delay = 0.1
            while True:
                try:
                    info = await ray_result(self._actor.start.remote())
                except Exception as exc:  # Ray's errors: the start failed, or the actor died
                    if not started:  # as a local server's first start: the engine's fails
                        raise self._start_error(exc) from exc
                    logger.warning("%s: its restarted Ray actor did not start: %s", self.name, exc)
                    self._failed(ctx, exc)
                    self.state_text = "starting"
                    await anyio.sleep(delay)  # a backoff: Ray may still be restarting it
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.1
                self.starts += 1
                self._url, self._api_key = info["url"], info["api_key"]
                self.node_id, self.pid, self.gpus = info["node_id"], info["pid"], info["gpus"]
                self._died = anyio.Event()
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        try:
                            await ray_result(self._actor.wait_exit.remote())
                        except ray.exceptions.RayActorError:  # the actor (or its node) died
                            pass
                        self._died.set()
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch)
                    await tg.start(self._mirror)  # whether it measures, before any request
                    await tg.start(super().run, ctx)
                    if not started:
                        started = True
                        task_status.started()
                self.state_text = "restarting"  # Ray brings the actor back; start() again
        finally:
            actor, self._actor = self._actor, None
            try:
                if actor is not None:
                    ray.kill(actor, no_restart=True)  # its server dies with it
            except Exception:  # already gone
                pass
            self._group.leave()

    def _start_error(self, exc: Exception) -> LlamaError:
        """The error a failed first start raises: the library's own, raised in the actor
        (model or binary not found on the node, llama-server exiting), when there is one."""
        cause = getattr(exc, "cause", None)  # a RayTaskError carries the actor's exception
        if isinstance(cause, LlamaError):
            return cause
        return ServerStartError(
            f"{self.name}: its Ray actor could not start llama-server: {exc}",
            server=self.name,
            exit_code=None,
        )

    async def _mirror(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep asking the actor for its GPU samples (it answers once per sampling period);
        started once the first answer says whether its node can measure."""
        import ray.exceptions

        after: float | None = None  # the first call is answered at once
        while True:
            try:
                reply = await ray_result(self._actor.gpu_samples.remote(after))
            except ray.exceptions.RayActorError:  # it died: watch() ends this life
                reply = None
            if reply is not None:
                self._gpu.add(reply)
            if after is None:
                task_status.started()
            if reply is None or not reply.available:
                return  # no NVML on that node (or a CPU server): nothing to mirror
            after = self._gpu.newest

    async def failure(self, exc: LlamaError) -> LlamaError:
        """A request broken because the actor died is a server crash."""
        with anyio.move_on_after(3.0):  # the actor's death reaches us a little after the socket's
            await self._died.wait()
        if self._died.is_set():
            return ServerCrashedError(
                f"{self.name}: its Ray actor (node {self.node_id}) died with the request in "
                "flight; Ray restarts it, retry the request",
                server=self.name,
                exit_code=None,
            )
        return exc

    def info(self) -> ServerInfo:
        """A snapshot for ``AsyncEngine.servers`` (with the node's id)."""
        return dataclasses.replace(
            super().info(),
            url=self.url or None,
            pid=self.pid,
            gpus=self.gpus,
            starts=self.starts,
            node=self.node_id,
        )
