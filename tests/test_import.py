"""Importing the package is cheap and has no side effects.

Each check runs ``import llamatelemetry_async`` in a fresh interpreter (this process has long
since imported everything) with the ways out of the process refused: sockets, subprocesses,
forks and native libraries. Import time is compared with ``import httpx`` in the same
interpreter, a ratio rather than a wall-clock bound, so a slow or busy machine does not fail it.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import llamatelemetry_async

INIT = Path(llamatelemetry_async.__file__)

# Loaded only when their feature is used: the OTel SDK and exporters when telemetry is set
# up, NVML when GPUs are read, the rest by features that need them.
HEAVY = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
    "numpy",
    "gguf",
    "pynvml",
    "huggingface_hub",
    "matplotlib",
    "prometheus_client",
    "psutil",
    "grpc",
    "google.protobuf",
)

# The package import should cost a small fraction of httpx's; before the import was made
# lazy it cost ~2.4x (215 ms against ~90 ms), now ~0.05x.
MAX_RATIO = 0.5

PROBE = r"""
import atexit, ctypes, json, logging, os, signal, socket, subprocess, sys, threading, time

refused = []

def refuse(what):
    def refuse(*args, **kwargs):
        refused.append(what)
        raise OSError(f"{what} during import")
    return refuse

socket.socket.connect = refuse("socket.connect")
socket.socket.connect_ex = refuse("socket.connect_ex")
socket.socket.sendto = refuse("socket.sendto")
socket.getaddrinfo = refuse("socket.getaddrinfo")
subprocess.Popen._execute_child = refuse("subprocess")
for name in ("system", "fork", "posix_spawn", "posix_spawnp", "execv", "execve"):
    setattr(os, name, refuse("os." + name))
ctypes.CDLL.__init__ = refuse("ctypes.CDLL")  # NVML, NCCL, libcudart

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP)

def state():
    return {
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "path": list(sys.path),
        "threads": threading.active_count(),
        "atexit": atexit._ncallbacks(),
        "log_handlers": [repr(h) for h in logging.root.handlers],
        "log_level": logging.root.level,
        "signals": [repr(signal.getsignal(s)) for s in SIGNALS],
        "excepthook": repr(sys.excepthook),
    }

before = state()
loaded = set(sys.modules)
start = time.perf_counter()
import llamatelemetry_async
package_s = time.perf_counter() - start
after = state()
by_import = sorted(set(sys.modules) - loaded)

start = time.perf_counter()
import httpx
httpx_s = time.perf_counter() - start

failed = []
by_name = {}
for name in llamatelemetry_async.__all__:
    seen = set(sys.modules)
    try:
        getattr(llamatelemetry_async, name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
    by_name[name] = sorted(set(sys.modules) - seen)
after_names = state()

print(json.dumps({
    "package_s": package_s,
    "httpx_s": httpx_s,
    "refused": refused,
    "before": before,
    "after": after,
    "after_names": after_names,
    "by_import": by_import,
    "by_name": by_name,
    "failed": failed,
}))
"""


def _probe(home: Path) -> dict[str, Any]:
    """Run PROBE in a fresh interpreter whose home, cache and working directory are ``home``."""
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=home,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _heavy(modules: list[str]) -> list[str]:
    """Which of HEAVY ``modules`` holds (the packages, not each of their modules)."""
    return [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One probe run (its report, and the home it ran in) shared by the checks below."""
    home = tmp_path_factory.mktemp("home")
    return _probe(home), home


def test_import_loads_nothing_heavy_and_only_the_standard_library(
    probed: tuple[dict[str, Any], Path],
) -> None:
    data, _ = probed
    assert _heavy(data["by_import"]) == []
    third_party = {
        m.split(".")[0]
        for m in data["by_import"]
        if m.split(".")[0] not in sys.stdlib_module_names
        and m.split(".")[0] != "llamatelemetry_async"
    }
    # Everything past the exception tree and the version is imported on first use.
    assert third_party == set()
    assert "llamatelemetry_async.client" not in data["by_import"]
    assert "llamatelemetry_async.engine" not in data["by_import"]


def test_import_has_no_side_effects(probed: tuple[dict[str, Any], Path]) -> None:
    data, home = probed
    assert data["refused"] == []
    for key in data["before"]:
        assert data["after"][key] == data["before"][key], key
    assert list(home.iterdir()) == []  # nothing written to the home, cache or cwd


def test_every_public_name_resolves_without_loading_heavy_modules(
    probed: tuple[dict[str, Any], Path],
) -> None:
    data, home = probed
    assert data["failed"] == []
    # Naming a class is not using it: no OTel SDK, NVML, numpy... until telemetry is set
    # up, GPUs are read or a model is inspected.
    pulled = {name: _heavy(modules) for name, modules in data["by_name"].items()}
    assert {name: heavy for name, heavy in pulled.items() if heavy} == {}
    assert data["refused"] == []
    for key in ("environ", "cwd", "path", "atexit", "log_handlers", "signals"):
        assert data["after_names"][key] == data["before"][key], key
    assert list(home.iterdir()) == []


def test_import_time_against_httpx(tmp_path: Path) -> None:
    ratios = []
    for _ in range(3):
        data = _probe(tmp_path)
        ratios.append(data["package_s"] / data["httpx_s"])
        print(
            f"import llamatelemetry_async {data['package_s'] * 1000:.1f} ms, "
            f"import httpx {data['httpx_s'] * 1000:.1f} ms"
        )
    ratio = statistics.median(ratios)
    print(f"median ratio {ratio:.3f} (bound {MAX_RATIO})")
    assert ratio < MAX_RATIO


def test_lazy_names_are_the_subpackages_objects() -> None:
    import llamatelemetry_async.engine
    import llamatelemetry_async.telemetry

    assert llamatelemetry_async.AsyncEngine is llamatelemetry_async.engine.AsyncEngine
    assert llamatelemetry_async.setup_telemetry is llamatelemetry_async.telemetry.setup_telemetry
    assert set(llamatelemetry_async.__all__) <= set(dir(llamatelemetry_async))
    namespace: dict[str, Any] = {}
    exec("from llamatelemetry_async import *", namespace)
    assert set(llamatelemetry_async.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchName"):
        llamatelemetry_async.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


def _static_exports(tree: ast.Module) -> dict[str, str]:
    """Name -> subpackage, from the imports under ``if TYPE_CHECKING:``."""
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.level == 1 and stmt.module:
                    for alias in stmt.names:
                        assert alias.asname == alias.name, f"{alias.name}: re-export as itself"
                        names[alias.name] = stmt.module
    return names


def test_the_imports_are_the_table_of_public_names() -> None:
    # One list: what type checkers see (the TYPE_CHECKING imports) plus the eager imports.
    # __all__ and the map __getattr__ loads from are derived from it, checked here against
    # a read of the file of this test's own.
    tree = ast.parse(INIT.read_text())
    static = _static_exports(tree)
    eager = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names
    }
    assert not eager.keys() & static.keys(), "a name is both eager and lazy"
    assert llamatelemetry_async._public() == {**eager, **static}
    assert sorted(llamatelemetry_async.__all__) == sorted({**eager, **static})
    for name, module in {**eager, **static}.items():
        source = importlib.import_module(f"llamatelemetry_async.{module}")
        assert getattr(llamatelemetry_async, name) is getattr(source, name), name


def test_the_table_is_read_on_first_use_not_at_import(tmp_path: Path) -> None:
    code = (
        "import sys, llamatelemetry_async as p; "
        "print(p._PUBLIC is None, 'ast' in sys.modules, '__all__' in vars(p)); "
        "p.__all__; print(p._PUBLIC is not None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert result.stdout.split() == ["True", "False", "False", "True"]


def test_token_events_keep_the_sdk_fast_path() -> None:
    # The SDK is no longer imported by the telemetry module; a span from an SDK provider
    # must still take the fast path (events made when the span is read), and a no-op span
    # gets no events built at all.
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llamatelemetry_async.client import CompletionChunk
    from llamatelemetry_async.telemetry import GenAIInstrumentation, _sdk

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider()
    inst = GenAIInstrumentation(tracer_provider=tracer_provider, meter_provider=meter_provider)
    observer = inst.start("text_completion", {"prompt": "x"}, stream=True)
    for i in range(3):
        observer.on_chunk(CompletionChunk(content="x", tokens_predicted=i + 1))
    observer.on_error(None)
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["gen_ai.token"] * 3
    assert [e.attributes["gen_ai.token.index"] for e in span.events if e.attributes] == [0, 1, 2]
    assert {type(e).__name__ for e in span.events} == {"TokenEvent"}  # the fast path's
    tracer_provider.shutdown()
    meter_provider.shutdown()

    noop = trace.NoOpTracerProvider().get_tracer("t").start_span("s")
    assert _sdk.span_events(noop).limit == 0
