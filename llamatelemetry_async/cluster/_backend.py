"""``RayBackend``: an engine backend whose llama-server runs in a Ray actor on some node.

Routing treats it as a remote server (``RemoteBackend``: probes, cool-down, slots from
``/props``); what it adds is the actor's life. It asks the actor to start its server, learns
the URL and key over Ray, and serves; a second task waits on the actor, and when the actor
(or its node) dies, serving stops, requests in flight fail as ``ServerCrashedError``, and the
backend asks Ray's restarted actor for its new URL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from .._errors import LlamaError, ServerCrashedError
from ..engine import BackendContext, RemoteBackend, ServerInfo

__all__ = ["RayBackend", "ensure_ray", "ray_result"]

_init_lock = threading.Lock()


def ensure_ray(address: str | None) -> None:
    """Connect this process to the Ray cluster at ``address`` (once; blocking: a thread)."""
    import ray

    with _init_lock:
        if not ray.is_initialized():
            ray.init(
                address=address or "auto",
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=False,
            )


async def ray_result(ref: Any) -> Any:
    """The value of a Ray ``ObjectRef``, without blocking the event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: a worker thread waits (abandoned on cancellation)
        import ray

        return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)
    return await asyncio.wrap_future(ref.future())


class RayBackend(RemoteBackend):
    """One llama-server in a Ray actor (see the module)."""

    kind = "ray"

    def __init__(self, name: str, make_actor: Callable[[], Any], address: str | None) -> None:
        super().__init__(name, "", None)
        self._make_actor = make_actor
        self._address = address
        self._actor: Any = None
        self._died = anyio.Event()
        self.node_id: str | None = None
        self.pid: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's URL on its node, once started (``""`` before)."""
        return self._url

    async def run(self, ctx: BackendContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the actor's server, serve it, and again after each actor restart."""
        import ray

        await anyio.to_thread.run_sync(ensure_ray, self._address)
        self._actor = self._make_actor()
        started = False
        delay = 0.1
        try:
            while True:
                try:
                    info = await ray_result(self._actor.start.remote())
                except Exception as exc:  # Ray's errors: the start failed, or the actor died
                    self._failed(ctx, exc)
                    self.state_text = "starting"
                    if not started:
                        started = True
                        task_status.started()
                    await anyio.sleep(delay)
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
                        except Exception:  # the actor (or its node) died
                            pass
                        self._died.set()
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch)
                    await tg.start(super().run, ctx)
                    if not started:
                        started = True
                        task_status.started()
                self.state_text = "restarting"  # Ray brings the actor back; start() again
        finally:
            try:
                ray.kill(self._actor, no_restart=True)  # its server dies with it
            except Exception:  # already gone
                pass

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
        base = super().info()
        return ServerInfo(
            name=base.name,
            url=self.url or None,
            pid=self.pid,
            gpus=self.gpus,
            state=base.state,
            slots=base.slots,
            outstanding=base.outstanding,
            served=base.served,
            starts=self.starts,
            exit_code=None,
            recent_logs=(),
            last_error=base.last_error,
            kind=self.kind,
            node=self.node_id,
        )
