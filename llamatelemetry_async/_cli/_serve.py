"""``serve``: an engine behind its front door (or, ``--servers-only``, each server's own URL)
in the foreground until Ctrl-C or SIGTERM, which stop it cleanly."""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from .._errors import ConfigError, UsageError
from ._common import (
    EXIT_OK,
    add_placement_options,
    api_key_from,
    placement_from,
    private_dir,
    resolve,
    run,
    server_line,
    stop_on_signals,
    write_private,
)

if TYPE_CHECKING:
    from .._placement import Placement
    from ..engine import AsyncEngine, EngineModel
    from ..server import ServerConfig

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  llamatelemetry-async serve model.gguf --port 8080           one URL in front of every server
  llamatelemetry-async serve model.gguf --preset kaggle-t4x2  one server per T4, one front door
  llamatelemetry-async serve model.gguf --placement cpu:2 --parallel 4 --ctx-size 8192
  llamatelemetry-async serve --remote http://10.0.0.5:8080 --remote-api-key-env REMOTE_KEY
  llamatelemetry-async serve owner/repo:model.gguf --ray auto --ray-servers 4  on a Ray cluster
  FRONT_KEYS=k1,k2 llamatelemetry-async serve model.gguf --api-key-env FRONT_KEYS
  llamatelemetry-async serve model.gguf --servers-only        each server's own URL, no front door

The front door (default port 8080) is OpenAI-compatible: point a client at
http://HOST:PORT/v1 with the API key as its key (`Authorization: Bearer KEY`). The servers
behind it listen on free loopback ports with keys of their own. By default the front door's
key is random and saved in a private file (0600) that is removed on exit; its path is printed.
/health needs no key. --no-auth serves without a key (say it explicitly).

SIGTERM or Ctrl-C drains: /health and new requests get 503, requests in flight may finish
for --drain-timeout seconds, then every server stops and is reaped, and the command exits 0.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve MODEL behind one OpenAI-compatible URL until Ctrl-C",
        description="Start an engine of llama-servers on MODEL (restarted if they crash) and "
        "serve one OpenAI-compatible front door in front of them until Ctrl-C or SIGTERM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="a .gguf path, owner/repo:file.gguf or a registry name (none with --remote only)",
    )
    add_placement_options(serve)
    serve.add_argument(
        "--models",
        metavar="FILE",
        help="several models behind the door, from a TOML file instead of MODEL: a "
        "[models.NAME] table each (model, placement, ttl, preload, and a [models.NAME.server] "
        "table of ServerConfig settings); requests choose by their model field",
    )
    remote = serve.add_argument_group("servers the engine did not start")
    remote.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="URL",
        help="a running llama-server to route to as well (repeat for several)",
    )
    remote.add_argument("--remote-api-key-env", metavar="VAR", help="their API key, from $VAR")
    ray = serve.add_argument_group("servers on a Ray cluster (the [ray] extra)")
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="place the servers on the Ray cluster at ADDRESS (host:port, or auto: "
        "$RAY_ADDRESS or the cluster on this machine) instead of starting them here; MODEL "
        "is then a path every node has, or a spec each node resolves",
    )
    ray.add_argument(
        "--ray-servers", type=int, default=1, metavar="N", help="servers to place (default 1)"
    )
    ray.add_argument(
        "--ray-gpus-per-server",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0: a CPU server, 1: one GPU each (default), 2: a tensor-split pair",
    )
    ray.add_argument(
        "--ray-strategy",
        choices=("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"),
        default="SPREAD",
        help="how the servers spread over nodes (default SPREAD)",
    )
    net = serve.add_argument_group("network and API keys")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    net.add_argument(
        "--port",
        type=int,
        default=None,
        help="port of the front door (default 8080; 0 picks a free one); with --servers-only, "
        "the port of a single server",
    )
    keys = net.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key-env", metavar="VAR", help="take the API key(s) from $VAR (comma-separated)"
    )
    keys.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="read the API keys from PATH (one per line); if it does not exist, write a random "
        "key there, readable only by you, and keep it",
    )
    keys.add_argument(
        "--no-auth", action="store_true", help="serve the front door without an API key"
    )
    net.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds requests in flight may take to finish on SIGTERM (default 30)",
    )
    net.add_argument(
        "--max-body",
        type=float,
        default=8.0,
        metavar="MIB",
        help="largest request body in MiB, beyond: 413 (default 8; images in chat need more)",
    )
    net.add_argument(
        "--max-waiting",
        type=int,
        default=10_000,
        metavar="N",
        help="requests that may wait for a free slot; beyond, 429 (default 10000)",
    )
    net.add_argument(
        "--servers-only",
        action="store_true",
        help="no front door: print each server's own URL (they then bind --host)",
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
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.models is not None:
        others = [
            flag
            for flag, given in (
                ("MODEL", args.model is not None),
                ("--remote", bool(args.remote)),
                ("--ray", args.ray is not None),
                ("--servers-only", args.servers_only),
            )
            if given
        ]
        if others:
            raise UsageError(
                f"--models names every model and where it runs; leave out {', '.join(others)}"
            )
    elif args.ray is not None and args.model is None:
        raise UsageError("--ray needs MODEL: a path every node has, or a spec each resolves")
    if args.model is None and not args.remote and args.models is None:
        raise UsageError("serve needs MODEL, or --remote URL for servers already running")
    if args.servers_only:
        if args.ray is not None:
            raise UsageError("--servers-only starts servers here; leave out --ray")
        if args.remote:
            raise UsageError("--servers-only starts servers of its own; leave out --remote")
        if args.no_auth:
            raise UsageError("--no-auth is for the front door; the servers always have a key")
        return _servers_only(args)
    from ._door import serve_door

    return serve_door(args)


def _servers_only(args: argparse.Namespace) -> int:
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
    from ..gpu import visible_gpus
    from ..server import ServerConfig

    model = await resolve(args.model)
    placement = placement_from(args)
    port = args.port or 0
    if port:
        gpus = await anyio.to_thread.run_sync(visible_gpus)
        count = len(placement.plans(gpus))
        if count != 1:
            raise UsageError(
                f"--port {port} needs a single server, and this placement starts {count}; "
                "use --placement cpu:1 or --preset single-gpu, or leave --port out "
                "(each server then binds a free port and prints its URL)"
            )
    config = ServerConfig(
        ctx_size=args.ctx_size,
        n_parallel=args.parallel,
        n_gpu_layers=args.n_gpu_layers,
        host=args.host,
        port=port,
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
        async with (
            stop_on_signals(stop, signal.SIGINT, signal.SIGTERM),
            engine_for(args, model, placement, config) as engine,
        ):
            print(f"model: {model}")
            for info in engine.servers:
                print(server_line(info))
            print(f"api key: {key_source}")
            print(f"ready: {len(engine.servers)} server(s); Ctrl-C or SIGTERM stops them")
            await _report_restarts(engine)
    if stopped_by:
        print("stopped: every server exited and was reaped")
    return EXIT_OK


def load_models_file(path: str | os.PathLike[str]) -> dict[str, EngineModel]:
    """The models of ``serve --models FILE``: a TOML file, one table per model.

    ```toml
    [models.chat]
    model = "qwen2.5-7b-instruct-q4_k_m.gguf"   # a path, registry name or owner/repo:file
    placement = "per-gpu:0"                      # as --placement (auto, cpu:N, per-gpu, pairs)
    [models.chat.server]                         # ServerConfig's fields
    ctx_size = 8192

    [models.small]
    model = "smollm2"
    placement = "cpu:1"
    ttl = 300                                    # stopped after 300 s without a request
    preload = false                              # started by its first request
    ```

    A missing file, bad TOML or an unknown key raises ``ConfigError`` naming the place.
    """
    import tomllib

    from ..engine import EngineModel
    from ..server import ServerConfig

    where = os.fspath(path)
    try:
        with open(where, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"--models {where}: cannot read it: {exc.strerror}", field="models"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--models {where}: not valid TOML: {exc}", field="models") from None
    tables = document.get("models")
    if not isinstance(tables, dict) or not tables or set(document) - {"models"}:
        raise ConfigError(
            f"--models {where}: expected only [models.NAME] tables, one per model",
            field="models",
        )
    models: dict[str, EngineModel] = {}
    for name, table in tables.items():
        place = f"--models {where}: [models.{name}]"
        if not isinstance(table, dict) or "model" not in table:
            raise ConfigError(f'{place}: needs model = "path or spec"', field="models")
        unknown = set(table) - {"model", "placement", "ttl", "preload", "server"}
        if unknown:
            raise ConfigError(
                f"{place}: unknown key(s) {', '.join(sorted(unknown))}; known: model, "
                "placement, ttl, preload, server",
                field="models",
            )
        server = table.get("server", {})
        fields = {f.name for f in dataclasses.fields(ServerConfig)}
        if not isinstance(server, dict) or set(server) - fields:
            bad = sorted(set(server) - fields) if isinstance(server, dict) else [repr(server)]
            raise ConfigError(
                f"{place}.server: not ServerConfig settings: {', '.join(bad)}", field="models"
            )
        try:
            models[name] = EngineModel(
                table["model"],
                placement=_placement_of(table.get("placement", "auto")),
                server=ServerConfig(**server),
                ttl=table.get("ttl"),
                preload=table.get("preload", True),
            )
        except ConfigError as exc:
            raise ConfigError(f"{place}: {exc}", field="models") from None
    return models


def _placement_of(text: object) -> Placement:
    from ._common import parse_placement

    if not isinstance(text, str):
        raise ConfigError(f"placement is a string like cpu:1 or per-gpu:0, got {text!r}")
    return parse_placement(text)


def engine_for(
    args: argparse.Namespace,
    model: Path | str | None,
    placement: Placement,
    config: ServerConfig,
) -> AsyncEngine:
    """The engine ``serve`` runs, from its options."""
    from ..engine import AsyncEngine

    return AsyncEngine(
        model,
        placement=placement,
        server=config,
        binary=args.llama_server,
        log_dir=args.log_dir,
        ready_timeout=args.ready_timeout,
        max_waiting=args.max_waiting,
    )


def ray_placement(args: argparse.Namespace) -> Placement:
    """The servers ``--ray`` and its options place on the Ray cluster."""
    from ..cluster import ray_servers

    address = None if args.ray == "auto" else args.ray
    return ray_servers(
        args.ray_servers,
        gpus_per_server=args.ray_gpus_per_server,
        strategy=args.ray_strategy,
        address=address,
    )


def ray_model(spec: str) -> str:
    """MODEL for the nodes: a file here as an absolute path (shared storage), else the spec."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_file() else spec


async def _report_restarts(engine: AsyncEngine) -> NoReturn:
    """Print each server that exits and each restart (a new pid, and a new URL with port 0)."""
    running = {info.name: info.pid for info in engine.servers}
    while True:
        await anyio.sleep(0.25)  # how often the servers' states are looked at
        for info in engine.servers:
            was = running[info.name]
            if info.state == "ready" and info.pid != was:
                running[info.name] = info.pid
                print(f"{server_line(info)}: restarted")
            elif info.state != "ready" and was is not None:
                running[info.name] = None
                print(f"server {info.name}: exited (code {info.exit_code}); restarting")
