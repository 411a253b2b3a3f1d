"""``serve``: an engine in the foreground until Ctrl-C or SIGTERM, which stop it cleanly."""

from __future__ import annotations

import argparse
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from .._errors import UsageError
from ._common import (
    EXIT_OK,
    add_placement_options,
    api_key_from,
    placement_from,
    private_dir,
    resolve,
    run,
    stop_on_signals,
    write_private,
)

if TYPE_CHECKING:
    from ..engine import AsyncEngine, ServerInfo

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  llamatelemetry-async serve model.gguf                       one server per GPU, or the CPU
  llamatelemetry-async serve model.gguf --preset kaggle-t4x2  one server per T4
  llamatelemetry-async serve model.gguf --preset kaggle-t4x2-pair:60/40
  llamatelemetry-async serve model.gguf --placement cpu:2 --parallel 4 --ctx-size 8192
  LLAMA_API_KEY=s3cret llamatelemetry-async serve model.gguf --api-key-env LLAMA_API_KEY \\
      --port 8080 --placement cpu:1

Each server binds a free port (or --port, for a single server) and prints its URL. Clients
present the API key as `Authorization: Bearer KEY`. By default the key is random and saved
in a private file (0600) that is removed on exit; its path is printed.

Ctrl-C (SIGINT) or SIGTERM stops every server, reaps it, and exits 0.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run llama-servers in the foreground until Ctrl-C",
        description="Start an engine of llama-servers on MODEL and keep them running "
        "(restarted if they crash) until Ctrl-C or SIGTERM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model", metavar="MODEL", help="a .gguf path, owner/repo:file.gguf or a registry name"
    )
    add_placement_options(serve)
    net = serve.add_argument_group("network and API key")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    net.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to bind, with a single server only (default 0: a free port each)",
    )
    keys = net.add_mutually_exclusive_group()
    keys.add_argument("--api-key-env", metavar="VAR", help="take the API key from $VAR")
    keys.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="write the (random) API key to PATH, readable only by you, and keep it",
    )
    serve.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds each server may take to load the model (default 120)",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    key = api_key_from(args.api_key_env, None)
    with private_dir("llamatelemetry-serve-") as tmp:
        if key is not None:
            source = f"from ${args.api_key_env}"
        else:
            key = secrets.token_urlsafe(24)
            path = Path(args.api_key_file).expanduser() if args.api_key_file else tmp / "api-key"
            write_private(path, key)
            kept = "" if args.api_key_file else "; removed on exit"
            source = f"random, saved in {path} (mode 0600{kept})"
        return run(lambda a: _run(a, key, source), args)


async def _run(args: argparse.Namespace, key: str, key_source: str) -> int:
    from ..engine import AsyncEngine
    from ..gpu import visible_gpus
    from ..server import ServerConfig

    model = await resolve(args.model)
    placement = placement_from(args)
    if args.port:
        gpus = await anyio.to_thread.run_sync(visible_gpus)
        count = len(placement.plans(gpus))
        if count != 1:
            raise UsageError(
                f"--port {args.port} needs a single server, and this placement starts {count}; "
                "use --placement cpu:1 or --preset single-gpu, or leave --port out "
                "(each server then binds a free port and prints its URL)"
            )
    config = ServerConfig(
        ctx_size=args.ctx_size,
        n_parallel=args.parallel,
        n_gpu_layers=args.n_gpu_layers,
        host=args.host,
        port=args.port,
        api_key=key,
    )
    stopped_by: list[str] = []
    with anyio.CancelScope() as scope:

        def stop(signum: signal.Signals) -> None:
            if not stopped_by:
                stopped_by.append(signum.name)
                print(f"{stopped_by[0]}: stopping every server...", flush=True)
            scope.cancel()  # the engine's exit stops and reaps each server

        # The handlers stay installed until the engine is fully shut down: a second Ctrl-C
        # cannot interrupt the reaping.
        async with stop_on_signals(stop, signal.SIGINT, signal.SIGTERM):
            engine = AsyncEngine(
                model,
                placement=placement,
                server=config,
                binary=args.llama_server,
                log_dir=args.log_dir,
                ready_timeout=args.ready_timeout,
            )
            async with engine:
                print(f"model: {model}")
                for info in engine.servers:
                    print(_describe(info))
                print(f"api key: {key_source}")
                print(f"ready: {len(engine.servers)} server(s); Ctrl-C or SIGTERM stops them")
                await _report_restarts(engine)
    if stopped_by:
        print("stopped: every server exited and was reaped")
    return EXIT_OK


def _describe(info: ServerInfo) -> str:
    where = "GPU " + ",".join(map(str, info.gpus)) if info.gpus else "CPU"
    return f"server {info.name}: {info.url}  (pid {info.pid}, {where}, {info.slots} slots)"


async def _report_restarts(engine: AsyncEngine) -> NoReturn:
    """Print each server that exits and each restart (a new pid, and a new URL with port 0)."""
    running = {info.name: info.pid for info in engine.servers}
    while True:
        await anyio.sleep(0.25)  # how often the servers' states are looked at
        for info in engine.servers:
            was = running[info.name]
            if info.state == "ready" and info.pid != was:
                running[info.name] = info.pid
                print(f"{_describe(info)}: restarted")
            elif info.state != "ready" and was is not None:
                running[info.name] = None
                print(f"server {info.name}: exited (code {info.exit_code}); restarting")
