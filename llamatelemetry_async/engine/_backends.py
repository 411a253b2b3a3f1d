"""The servers an engine routes to: backends.

Two kinds today, behind one small base class that a third (a server on another machine,
placed by a cluster scheduler) can subclass without touching the router or the client:

- ``LocalBackend``: a llama-server process the engine started and supervises (restart with
  backoff, logs, parent-death signal, GPU figures).
- ``RemoteBackend``: a llama-server the engine did not start, given by URL and API key. The
  engine only watches it: a health probe, and a circuit breaker that cools a failing server
  down and probes it with backoff until it answers again.

Both share the failure bounds: a backend that fails ``max_start_failures`` times in a row is
``failed``; when every backend is failed (or gone), waiting requests fail with
``ServerUnavailableError``; a ``/health`` probe routes around a backend that stops answering.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc

from .._errors import LlamaError, ServerCrashedError
from ..client import AsyncLlamaClient
from ..server import LlamaServer
from ._energy_book import EnergyBook
from ._router import Member, Router

__all__ = ["Backend", "BackendContext", "LocalBackend", "RemoteBackend", "ServerInfo"]

logger = logging.getLogger("llamatelemetry_async.engine")

_PROBE_TIMEOUT = 1.0
_ADMIT_TIMEOUT = 5.0  # /props and the engine's preparations of a server that came back


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """A snapshot of one server of an engine."""

    name: str
    """The server's name: ``"gpu0"``, ``"gpu0+1"`` (a pair), ``"cpu0"``, ``"remote0"``."""
    url: str | None
    """Its base URL; ``None`` until a local server has bound a port."""
    pid: int | None
    """The llama-server process id; ``None`` while no process runs, or for a remote server."""
    gpus: tuple[int, ...]
    """Physical GPU ids it runs on (NVML order); ``()`` on the CPU or when unknown (remote)."""
    state: str
    """``"starting"``, ``"ready"``, ``"crashed"``, ``"stopped"`` (a ``ServerState`` value, for a
    local server), ``"unreachable"`` (a remote server cooling down), ``"unresponsive"``
    (running but not answering its health probe: it gets no new requests) or ``"failed"``
    (its last ``max_start_failures`` starts or probes failed: it is still retried)."""
    slots: int
    """Requests it decodes at once (llama-server's ``total_slots``)."""
    outstanding: int
    """Requests the engine has in flight on it now."""
    served: int
    """Requests the engine has sent it since the engine started."""
    starts: int
    """How many times it was started (1 + restarts); 0 for a remote server."""
    exit_code: int | None
    """The last exit code, when it has exited (negative: killed by that signal)."""
    recent_logs: tuple[str, ...]
    """Its last output lines, oldest first (local servers only)."""
    last_error: str | None = None
    """Why its last start or probe failed (``None``: no problem)."""
    kind: str = "local"
    """``"local"`` (a process the engine runs), ``"remote"`` (a server it only watches) or
    ``"ray"`` (a server in a Ray actor)."""
    node: str | None = None
    """The cluster node it runs on (Ray's node id), for servers placed on a cluster."""
    cores: tuple[int, ...] = ()
    """The CPU cores its process is pinned to (``()``: any core, or unknown)."""
    threads: int | None = None
    """The CPU threads it computes with (``--threads``; ``None``: llama-server's default)."""
    model: str | None = None
    """The model it serves, in an engine of several models (``None``: the engine's one)."""


@dataclasses.dataclass(frozen=True)
class BackendContext:
    """What a backend needs from its engine (and nothing more)."""

    router: Router
    client: Callable[[str, str | None], AsyncLlamaClient]
    """A client for ``(url, api_key)`` with the engine's timeout, strictness, telemetry."""
    on_ready: Callable[[AsyncLlamaClient], Awaitable[None]]
    """Prepare a server that just became ready (LoRA scales) before it takes requests."""
    on_down: Callable[[str], None]
    """A server stopped serving (its scraped metrics are dropped)."""
    availability: Callable[[], None]
    """Re-check whether any backend can still serve (after one failed or came back)."""
    max_start_failures: int
    health_interval: float | None
    hang_timeout: float | None


class Backend(abc.ABC):
    """One server the engine routes requests to."""

    kind = "local"

    def __init__(self, name: str, gpus: tuple[int, ...] = ()) -> None:
        self.name = name
        self.gpus = gpus
        self.member = Member(name, None, slots=1)
        self.client: AsyncLlamaClient | None = None
        """A client for this server while it can take requests."""
        self.failures = 0  # consecutive starts (or probes, remote) that failed
        self.last_error: str | None = None
        self.energy: EnergyBook | None = None
        """Its own GPU figures (a server on another node); ``None``: the engine's sampler."""

    @property
    @abc.abstractmethod
    def url(self) -> str | None:
        """The server's base URL, once known."""

    @abc.abstractmethod
    async def run(self, ctx: BackendContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Bring the server into service and keep it there until cancelled.

        ``task_status.started()`` once it is ready (or, remote, once its first probe is in).
        """

    @abc.abstractmethod
    def info(self) -> ServerInfo:
        """A snapshot for ``AsyncEngine.servers``."""

    @abc.abstractmethod
    def recent_logs(self, n: int) -> list[str]:
        """The server's last ``n`` output lines (none for a server the engine did not start)."""

    async def failure(self, exc: LlamaError) -> LlamaError:
        """What a request broken by ``exc`` on this server means (default: ``exc``)."""
        return exc

    def report(self, exc: LlamaError, ctx: BackendContext) -> None:
        """A request could not reach this server (refused, or 503 while loading).

        A local server's supervisor sees its process exit; nothing to do here.
        """
        return

    def state(self, base: str) -> str:
        """``base`` (the backend's own state), unless routing knows worse: failed, unresponsive."""
        member = self.member
        if member.failed:
            return "failed"
        if member.ready and not member.healthy:
            return "unresponsive"
        return base

    # ----------------------------------------------------------------- shared
    async def _admit(self, ctx: BackendContext, client: AsyncLlamaClient) -> None:
        """Into service through ``client``: slots from /props (again each time it comes
        back), the engine's preparations (LoRA scales), then routing."""
        props = await client.props()
        slots = props.get("total_slots")
        # A server that is not llama-server (or a hostile one) may send anything here.
        self.member.slots = slots if isinstance(slots, int) and slots > 0 else 1
        await ctx.on_ready(client)
        self.failures = 0
        self.last_error = None
        self.member.failed = False
        self.member.healthy = True
        ctx.router.set_ready(self.member, True)
        ctx.availability()

    async def _retire(self, ctx: BackendContext) -> None:
        """Out of service: no new requests, connections closed."""
        ctx.router.set_ready(self.member, False)
        client, self.client = self.client, None
        self.member.client = None
        ctx.on_down(self.name)
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _failed(self, ctx: BackendContext, exc: BaseException) -> None:
        """Count a failed start or probe; mark the backend failed after too many."""
        self.failures += 1
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.last_error = text
        if self.failures >= ctx.max_start_failures and not self.member.failed:
            self.member.failed = True
            ctx.availability()

    async def _watch(
        self, ctx: BackendContext, interval: float, on_hang: Callable[[], None]
    ) -> None:
        """Probe ``/health`` while ready; route around the server while it does not answer."""
        member = self.member
        silent_since: float | None = None
        while True:
            # A polling period, not synchronisation: probes are cheap, a busy server often.
            await anyio.sleep(interval if member.outstanding else interval * 4)
            client = self.client
            if client is None or not member.ready:
                silent_since = None
                continue
            problem = await probe(client)
            if problem is None:
                if not member.healthy:
                    logger.warning("%s answers its health probe again", self.name)
                    self.last_error = None
                    ctx.router.set_healthy(member, True)
                silent_since = None
                continue
            now = time.monotonic()
            if member.healthy:
                logger.warning("%s: %s; no new requests go to it", self.name, problem)
                self.last_error = problem
                silent_since = now
                ctx.router.set_healthy(member, False)
            elif (
                ctx.hang_timeout is not None
                and silent_since is not None
                and now - silent_since >= ctx.hang_timeout
            ):
                silent_since = None
                on_hang()


async def probe(client: AsyncLlamaClient) -> str | None:
    """``None`` if the server answers ``/health`` within a second, else what went wrong."""
    try:
        with anyio.fail_after(_PROBE_TIMEOUT):
            await client.health()
    except TimeoutError:
        return f"no answer to its health probe within {_PROBE_TIMEOUT:.0f} s"
    except LlamaError as exc:
        return f"its health probe failed ({exc})"
    return None


class LocalBackend(Backend):
    """A llama-server process the engine started: supervised and restarted with backoff."""

    def __init__(
        self,
        process: LlamaServer,
        *,
        api_key: str,
        ready_timeout: float,
        restart: bool,
        max_restart_delay: float,
    ) -> None:
        super().__init__(process.name, process.gpus)
        self.process = process
        self._api_key = api_key
        self._ready_timeout = ready_timeout
        self._restart = restart
        self._max_restart_delay = max_restart_delay

    @property
    def url(self) -> str | None:
        """The process's URL, once it has bound a port."""
        return self.process.url

    async def run(self, ctx: BackendContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run, watch and restart the process until cancelled (then it is stopped and reaped)."""
        async with anyio.create_task_group() as tg:
            if ctx.health_interval is not None:
                tg.start_soon(self._watch, ctx, ctx.health_interval, self._kill_hung)
            await self._supervise(ctx, task_status)
            tg.cancel_scope.cancel()

    def _kill_hung(self) -> None:
        logger.error("%s has not answered for too long: killing it to restart it", self.name)
        self.process.send_signal(signal.SIGKILL)

    async def _supervise(
        self, ctx: BackendContext, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        process, member = self.process, self.member
        delay = 0.5
        first = True

        async def on_ready() -> None:
            assert process.url is not None
            member.exited = process.exited
            client = self.client = member.client = ctx.client(process.url, self._api_key)
            await self._admit(ctx, client)  # a failure fails this start: _retire closes it

        while True:
            began = time.monotonic()
            try:
                await process.run(
                    ready_timeout=self._ready_timeout,
                    on_ready=on_ready,
                    on_exit=lambda: ctx.router.set_ready(member, False),
                    task_status=task_status if first else anyio.TASK_STATUS_IGNORED,
                )
            except Exception as exc:
                if first:
                    raise
                # A failed restart must not take the engine down: back off and try again.
                logger.exception("%s: restart failed", process.name)
                self._failed(ctx, exc)
            finally:
                await self._retire(ctx)
            first = False
            if not self._restart:
                member.dead = True
                ctx.availability()
                return
            if time.monotonic() - began > 60:
                delay = 0.5  # it ran for a while: this crash is news, not a crash loop
            logger.warning("%s: restarting in %.1f s", process.name, delay)
            await anyio.sleep(delay)  # backoff between restarts, not synchronisation
            delay = min(delay * 2, self._max_restart_delay)

    async def failure(self, exc: LlamaError) -> LlamaError:
        """``ServerCrashedError`` if the process died (the usual cause of a broken read)."""
        exited = self.member.exited
        if exited is None:
            return exc
        with anyio.move_on_after(1.0):  # the exit watcher may lag the broken socket a little
            await exited.wait()
        if not exited.is_set():
            return exc
        return ServerCrashedError(
            f"server {self.name} exited (code {self.process.exit_code}) during the request "
            f"({exc}); it is being restarted, retry the request",
            server=self.name,
            exit_code=self.process.exit_code,
        )

    def info(self) -> ServerInfo:
        """A snapshot for ``AsyncEngine.servers``."""
        process, member = self.process, self.member
        return ServerInfo(
            name=self.name,
            url=process.url,
            pid=process.pid,
            gpus=self.gpus,
            state=self.state(process.state.value),
            slots=member.slots,
            outstanding=member.outstanding,
            served=member.served,
            starts=process.starts,
            exit_code=process.exit_code,
            recent_logs=tuple(process.recent_logs(20)),
            last_error=self.last_error,
            kind=self.kind,
            cores=process.cores,
            threads=_threads(process.argv),
        )

    def recent_logs(self, n: int) -> list[str]:
        """The process's last ``n`` output lines."""
        return self.process.recent_logs(n)


class RemoteBackend(Backend):
    """A llama-server the engine did not start: watched, never supervised.

    While it answers, it takes requests. A refused connection, a 503 ("loading model") or a
    failed probe cools it down: no new requests, and probes with backoff (from
    ``health_interval`` up to ``max_cooldown`` seconds) until it answers again. Its slots come
    from ``/props`` each time it comes back.
    """

    kind = "remote"

    def __init__(self, name: str, url: str, api_key: str | None, *, max_cooldown: float = 2.0):
        super().__init__(name)
        self._url = url
        self._api_key = api_key
        self._max_cooldown = max_cooldown
        self._wake = anyio.Event()
        self.state_text = "starting"

    @property
    def url(self) -> str:
        """The server's base URL, as given."""
        return self._url

    async def run(self, ctx: BackendContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Probe, serve, cool down and probe again, until cancelled; the server keeps running.

        One client for the backend's whole life: cooling down stops new requests, never the
        ones in flight (their connections fail or finish on their own).
        """
        interval = ctx.health_interval if ctx.health_interval is not None else 0.5
        cooldown = interval
        started = False
        client = self.client = self.member.client = ctx.client(self._url, self._api_key)
        try:
            while True:
                problem = await probe(client)
                if problem is None:
                    try:
                        with anyio.fail_after(_ADMIT_TIMEOUT):
                            await self._admit(ctx, client)
                    except (LlamaError, TimeoutError) as exc:
                        problem = f"it answers /health but not /props: {exc}"
                if problem is None:
                    self.state_text = "ready"
                else:
                    self.state_text = "unreachable"
                    self._failed(ctx, _Problem(problem))
                    logger.warning("%s (%s): %s", self.name, self._url, self.last_error)
                if not started:
                    started = True
                    task_status.started()
                if problem is None:
                    served = time.monotonic()
                    await self._watch_until_down(ctx, client, interval)
                    ctx.router.set_ready(self.member, False)
                    self.state_text = "unreachable"
                    if time.monotonic() - served > 30:
                        cooldown = interval  # it served a while: this failure is news
                # Cooled down before the next probe, longer each time it fails again.
                await anyio.sleep(cooldown)
                cooldown = min(cooldown * 2, self._max_cooldown)
        finally:
            ctx.router.set_ready(self.member, False)
            self.client = self.member.client = None
            ctx.on_down(self.name)
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _watch_until_down(
        self, ctx: BackendContext, client: AsyncLlamaClient, interval: float
    ) -> None:
        """Probe a serving remote until a probe fails or a request reports it (``report``)."""
        wake = self._wake = anyio.Event()
        while True:
            # A polling period, not synchronisation: probes are cheap, a busy server often.
            with anyio.move_on_after(interval if self.member.outstanding else interval * 4):
                await wake.wait()
            if wake.is_set():
                return
            problem = await probe(client)
            if problem is not None:
                logger.warning("%s (%s): %s; cooling down", self.name, self._url, problem)
                self.last_error = problem
                return

    def report(self, exc: LlamaError, ctx: BackendContext) -> None:
        """A request could not reach it: out of rotation at once, cooled down, probed again."""
        if not self.member.ready:
            return  # cooling down already
        logger.warning("%s (%s) failed a request (%s): cooling down", self.name, self._url, exc)
        self.last_error = str(exc).splitlines()[0]
        ctx.router.set_ready(self.member, False)  # at once: no request waits for the probe
        self.state_text = "unreachable"
        self._wake.set()

    def info(self) -> ServerInfo:
        """A snapshot for ``AsyncEngine.servers``."""
        member = self.member
        return ServerInfo(
            name=self.name,
            url=self._url,
            pid=None,
            gpus=(),
            state=self.state(self.state_text),
            slots=member.slots,
            outstanding=member.outstanding,
            served=member.served,
            starts=0,
            exit_code=None,
            recent_logs=(),
            last_error=self.last_error,
            kind=self.kind,
        )

    def recent_logs(self, n: int) -> list[str]:
        """None: the engine does not see a remote server's output."""
        return []


def _threads(argv: Sequence[str]) -> int | None:
    """The ``--threads`` value in a llama-server argv (the last one, as llama-server reads)."""
    found = None
    for flag, value in itertools.pairwise(argv):
        if flag == "--threads":
            found = int(value)
    return found


class _Problem(Exception):
    """A probe's finding, counted like a failed start."""
