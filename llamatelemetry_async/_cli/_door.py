"""``serve`` with its front door: uvicorn serving a ``FrontDoor`` over the engine.

Order matters on the way out. SIGINT/SIGTERM (handled here, not by uvicorn) starts the
drain: the door answers 503 while requests in flight finish (``--drain-timeout``); then the
engine stops (any stream still open ends with an error event), and only then does uvicorn
stop, so no response is cut without a word.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn

from .._errors import UsageError
from .._placement import Placement
from ._common import (
    EXIT_OK,
    placement_from,
    private_dir,
    resolve,
    run,
    server_line,
    stderr,
    stop_on_signals,
    write_private,
)

if TYPE_CHECKING:
    from ..engine import AsyncEngine

__all__ = ["listen", "open_door_warning", "serve_door", "serving"]

_DEFAULT_PORT = 8080


def serve_door(args: argparse.Namespace) -> int:
    if args.no_auth:
        keys: list[str] = []
        source = "none (--no-auth): anyone who reaches the port may use it"
        return run(lambda a: _run(a, keys, source), args, fast_loop=True)
    with private_dir("llamatelemetry-serve-") as tmp:
        keys, source = _keys(args, tmp)
        return run(lambda a: _run(a, keys, source), args, fast_loop=True)


def _keys(args: argparse.Namespace, tmp: Path) -> tuple[list[str], str]:
    """The front door's keys and where they came from (said on the console, never the keys)."""
    import os

    if args.api_key_env:
        keys = [k.strip() for k in os.environ.get(args.api_key_env, "").split(",") if k.strip()]
        if not keys:
            raise UsageError(f"--api-key-env {args.api_key_env}: the variable is not set or empty")
        return keys, f"{len(keys)} from ${args.api_key_env}"
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        if path.exists():
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise UsageError(f"--api-key-file {path}: {exc.strerror or exc}") from exc
            keys = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
            if not keys:
                raise UsageError(f"--api-key-file {path}: no key in the file (one per line)")
            return keys, f"{len(keys)} from {path}"
        key = secrets.token_urlsafe(24)
        write_private(path, key)
        return [key], f"random, saved in {path} (mode 0600)"
    key = secrets.token_urlsafe(24)
    path = tmp / "api-key"
    write_private(path, key)
    return [key], f"random, saved in {path} (mode 0600; removed on exit)"


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus its signal handlers: this command drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    """uvicorn serving ``app`` on ``sock`` while the block runs (lifespan off: the block
    manages the app), then stopped."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # trust no X-Forwarded-* from clients by default
    )
    server = _Uvicorn(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield
        finally:
            server.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def open_door_warning(host: str, port: int, keys: list[str]) -> str | None:
    """What to say when the door listens beyond loopback with no key (else ``None``)."""
    if keys or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may well resolve beyond this machine
    return (
        f"warning: serving on {host} with no API key: anyone who can reach port {port} "
        "can use the servers; pass --api-key-env or --api-key-file"
    )


async def _run(args: argparse.Namespace, keys: list[str], key_source: str) -> int:
    from ..engine import AsyncEngine
    from ..server import ServerConfig
    from ._serve import engine_for, load_models_file, ray_model, ray_placement

    model: Path | str | None
    placement: Placement | None
    if args.models is not None:
        engine = AsyncEngine(
            models=await anyio.to_thread.run_sync(load_models_file, args.models),
            binary=args.llama_server,
            log_dir=args.log_dir,
            ready_timeout=args.ready_timeout,
            max_waiting=args.max_waiting,
        )
        return await _serve_engine(args, engine, keys, key_source)
    if args.ray is not None:  # the nodes resolve the model, each into its own cache
        model, placement = ray_model(args.model), ray_placement(args)
    else:
        model = await resolve(args.model) if args.model is not None else None
        placement = placement_from(args) if model is not None else None
    if args.remote:
        import os

        remote_key = os.environ.get(args.remote_api_key_env) if args.remote_api_key_env else None
        if args.remote_api_key_env and not remote_key:
            raise UsageError(f"--remote-api-key-env {args.remote_api_key_env}: not set or empty")
        remotes = Placement.remote(args.remote, api_key=remote_key)
        placement = remotes if placement is None else placement + remotes
    assert placement is not None
    config = ServerConfig(
        ctx_size=args.ctx_size, n_parallel=args.parallel, n_gpu_layers=args.n_gpu_layers
    )  # on free loopback ports, each with a random key of the engine's
    return await _serve_engine(args, engine_for(args, model, placement, config), keys, key_source)


async def _serve_engine(
    args: argparse.Namespace, engine: AsyncEngine, keys: list[str], key_source: str
) -> int:
    from ..frontdoor import FrontDoor

    if not args.max_body > 0:
        raise UsageError(f"--max-body must be a positive number of MiB, got {args.max_body}")
    door = FrontDoor(
        engine,
        api_keys=keys or None,
        auth=bool(keys),
        drain_timeout=args.drain_timeout,
        max_body=int(args.max_body * 1024 * 1024),
    )
    port = _DEFAULT_PORT if args.port is None else args.port
    sock = listen(args.host, port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    warning = open_door_warning(args.host, port, keys)
    if warning is not None:
        stderr(warning)
    stopping = anyio.Event()

    def stop(signum: signal.Signals) -> None:
        if not stopping.is_set():
            print(f"{signum.name}: draining (new requests get 503), then stopping", flush=True)
            stopping.set()
        else:  # a second signal: no more waiting for requests in flight
            print(f"{signum.name} again: stopping now", flush=True)
            door.cut_drain()

    with sock:  # the socket outlives the server that uses it
        async with (
            stop_on_signals(stop, signal.SIGINT, signal.SIGTERM),
            anyio.create_task_group() as tg,
            serving(door, sock),
        ):
            print(f"front door: http://{shown}:{port}  (OpenAI base URL: http://{shown}:{port}/v1)")
            print(f"api key: {key_source}")
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
            print(f"http: uvicorn {uvicorn.__version__} on the {loop} loop", flush=True)
            async with door:
                tg.start_soon(_announce, door)
                await stopping.wait()
                print(f"draining: {door.in_flight} request(s) in flight", flush=True)
    print("stopped: every server exited and was reaped")
    return EXIT_OK


async def _announce(door: object) -> None:
    from ..frontdoor import FrontDoor

    assert isinstance(door, FrontDoor)
    try:
        await door.wait_ready()
    except Exception:  # the door's own task group raises why; nothing to add here
        return
    engine = door.engine
    if engine.model is not None:
        print(f"model: {engine.model}")
    for name, state in engine.model_states.items():
        print(f"model {name}: {state}")
    for info in engine.servers:
        print(server_line(info))
    print(f"ready: {len(engine.servers)} server(s); Ctrl-C or SIGTERM drains and stops", flush=True)
