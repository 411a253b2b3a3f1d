"""Does a llama-server binary carry code for these GPUs? Checked before a server starts.

A CUDA binary holds, per architecture it was built for, SASS (machine code for ``sm_XY``)
and/or PTX (``compute_XY``, compiled by the driver at load time). What runs where
(NVIDIA's CUDA C++ Programming Guide, "Binary Compatibility" and "PTX Compatibility"):

* SASS ``sm_XY`` runs on compute capability ``X.Z`` with ``Z >= Y`` (same major only).
* PTX ``compute_XY`` is JIT-compiled for any compute capability ``>= X.Y``.
* The architecture-specific ``XYa`` (SASS or PTX) runs on exactly ``X.Y``; the family
  ``XYf`` on ``X.Z`` with ``Z >= Y``.

CMake's ``CMAKE_CUDA_ARCHITECTURES`` says which it builds: ``75`` is both ``75-real`` (SASS)
and ``75-virtual`` (PTX); ``90-real`` only SASS, ``90-virtual`` only PTX; ``native``, ``all``
and ``all-major`` are resolved by CMake. llama.cpp b11434 replaces a plain ``12X`` with
``12Xa``. The build records the list CMake used (``build.json``: ``cuda_architectures``);
for a binary from elsewhere, ``cuobjdump --list-elf``/``--list-ptx`` (CUDA toolkit) tells,
when it is installed. Otherwise the architectures are unknown and nothing is checked: the
check exists to turn llama-server's late "no kernel image is available" into an early error
that says what to build, never to refuse a binary it cannot read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._errors import CUDAArchitectureError, LlamaWarning

__all__ = [
    "CUDAArchitectureError",
    "CUDATarget",
    "binary_cuda_targets",
    "check_cuda_compatibility",
    "parse_cuda_architectures",
    "runs_on",
]

logger = logging.getLogger("llamatelemetry_async.server")

_CMAKE_ITEM = re.compile(r"^(\d+)([af]?)(?:-(real|virtual))?$")
_CUOBJDUMP_ITEM = re.compile(r"\.sm_(\d+)([af]?)\.(cubin|ptx)\s*$")


@dataclass(frozen=True, slots=True, order=True)
class CUDATarget:
    """One architecture a binary carries code for: ``sm_75`` (SASS) or ``compute_75`` (PTX)."""

    arch: int
    """The architecture number: 75 for compute capability 7.5, 120 for 12.0."""
    suffix: Literal["", "a", "f"] = ""
    """``"a"``: architecture-specific (exactly this CC); ``"f"``: family-specific."""
    ptx: bool = False
    """PTX (JIT-compiled by the driver, so it also serves newer GPUs) rather than SASS."""

    def __str__(self) -> str:
        return f"{'compute' if self.ptx else 'sm'}_{self.arch}{self.suffix}"

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of compute capability ``(major, minor)`` can run this code."""
        major, minor = divmod(self.arch, 10)
        if self.suffix == "a":
            return capability == (major, minor)
        if self.suffix == "f" or not self.ptx:
            return capability[0] == major and capability[1] >= minor
        return capability >= (major, minor)


def parse_cuda_architectures(
    spec: str | Iterable[str | int],
) -> tuple[CUDATarget, ...] | None:
    """The targets a ``CMAKE_CUDA_ARCHITECTURES`` value builds (``"75;90-real"``).

    ``None`` when it cannot be told from the value alone (``native``, ``all``, ``all-major``,
    anything unrecognised): such a binary is not checked.
    """
    # A build record written by hand may hold a JSON list, of numbers as often as strings.
    joined = spec if isinstance(spec, str) else ";".join(str(item) for item in spec)
    items = joined.replace(",", ";").split(";")
    targets: set[CUDATarget] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        match = _CMAKE_ITEM.match(item)
        if match is None:
            return None
        arch, suffix, kind = int(match.group(1)), match.group(2), match.group(3)
        if 120 <= arch <= 129 and not suffix:
            suffix = "a"  # llama.cpp's ggml-cuda CMakeLists turns 12X into 12Xa
        if kind in (None, "real"):
            targets.add(CUDATarget(arch, suffix, ptx=False))  # type: ignore[arg-type]
        if kind in (None, "virtual"):
            targets.add(CUDATarget(arch, suffix, ptx=True))  # type: ignore[arg-type]
    return tuple(sorted(targets)) or None


def runs_on(targets: Iterable[CUDATarget], capability: tuple[int, int]) -> bool:
    """Whether any of ``targets`` runs on a GPU of compute capability ``capability``."""
    return any(t.runs_on(capability) for t in targets)


Found = tuple[str, tuple[CUDATarget, ...] | None]
"""What a binary was found to be: ``(backend, targets)``."""

# (path, size, mtime_ns) -> what the binary was found to be; cuobjdump on a big CUDA binary
# takes a while, and every server start asks.
_cache: dict[tuple[str, int, int], Found] = {}
_cache_lock = threading.Lock()


def binary_cuda_targets(
    binary: str | os.PathLike[str],
) -> tuple[str, tuple[CUDATarget, ...] | None]:
    """``(backend, targets)`` of a llama-server binary; blocking (it may run cuobjdump).

    ``backend`` is ``"cuda"``, ``"cpu"`` (a build record says it has no CUDA) or
    ``"unknown"``. ``targets`` is ``None`` unless ``backend`` is ``"cuda"`` and they are known.
    Read from ``build.json`` in the binary's cache folder (``<key>/bin/llama-server`` ->
    ``<key>/build.json``), else from ``cuobjdump`` when it is on ``PATH`` or in
    ``$CUDA_HOME/bin``.
    """
    path = Path(binary)
    try:
        st = path.stat()
    except OSError:
        return "unknown", None
    real = path.resolve()  # a link to a cached build: its record is beside the target
    key = (os.fspath(real), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    found = _from_build_record(real)
    if found is None:
        found = _from_cuobjdump(real)
    with _cache_lock:
        _cache[key] = found
    return found


def _from_build_record(binary: Path) -> tuple[str, tuple[CUDATarget, ...] | None] | None:
    try:
        info = json.loads((binary.parent.parent / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("backend") == "cpu":
        return "cpu", None
    if info.get("backend") != "cuda":
        return None
    # The list CMake used (native resolved) when recorded; else what was asked for.
    spec = info.get("cuda_architectures") or info.get("cuda_arch")
    if isinstance(spec, str | list):
        return "cuda", parse_cuda_architectures(spec)
    return "cuda", None


def _cuobjdump() -> str | None:
    if found := shutil.which("cuobjdump"):
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "cuobjdump"
    return str(candidate) if os.access(candidate, os.X_OK) else None


def _from_cuobjdump(binary: Path) -> tuple[str, tuple[CUDATarget, ...] | None]:
    tool = _cuobjdump()
    if tool is None:
        return "unknown", None
    # A shared-library build keeps its CUDA code in libggml-cuda.so beside the binary.
    files = [binary, *sorted(binary.parent.glob("libggml-cuda*.so*"))]
    files += sorted((binary.parent.parent / "lib").glob("libggml-cuda*.so*"))
    targets: set[CUDATarget] = set()
    for file in files:
        for flag in ("--list-elf", "--list-ptx"):
            try:
                done = subprocess.run(
                    [tool, flag, os.fspath(file)],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    errors="replace",
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                logger.debug("cuobjdump %s %s failed: %s", flag, file, exc)
                continue
            for line in done.stdout.splitlines():
                if match := _CUOBJDUMP_ITEM.search(line):
                    arch, suffix, kind = int(match.group(1)), match.group(2), match.group(3)
                    targets.add(CUDATarget(arch, suffix, ptx=kind == "ptx"))  # type: ignore[arg-type]
    if not targets:
        # No device code, or none cuobjdump could read: not proof of a CPU build (a backend
        # loaded from elsewhere), so nothing is checked.
        return "unknown", None
    return "cuda", tuple(sorted(targets))


def _capabilities(gpus: Sequence[int], nvml: Any) -> dict[int, tuple[int, int]] | None:
    """Compute capability of each of ``gpus`` (NVML ids); ``None`` when NVML cannot tell."""
    from ..gpu import read_gpu_inventory

    inventory = read_gpu_inventory(nvml=nvml)
    if inventory is None or not inventory.names:
        return None
    if len(inventory.compute_capabilities) != len(inventory.names):
        return None  # some GPU did not report one: the ids no longer line up
    found: dict[int, tuple[int, int]] = {}
    for gpu in gpus:
        if 0 <= gpu < len(inventory.compute_capabilities):
            major, _, minor = inventory.compute_capabilities[gpu].partition(".")
            found[gpu] = (int(major), int(minor))
    return found


def _names(nvml: Any) -> tuple[str, ...]:
    from ..gpu import read_gpu_inventory

    inventory = read_gpu_inventory(nvml=nvml)
    return inventory.names if inventory is not None else ()


def check_cuda_compatibility(
    binary: str | os.PathLike[str],
    gpus: Sequence[int],
    *,
    name: str = "llama-server",
    nvml: Any = None,
) -> None:
    """Raise ``CUDAArchitectureError`` if ``binary`` has no code that ``gpus`` can run.

    ``gpus`` are physical ids (NVML order), as in ``ServerPlan.gpus``; ``nvml`` is the
    binding (default ``pynvml``; tests pass ``testing``'s fake). A binary whose
    architectures are unknown, or GPUs NVML cannot read, pass unchecked. A CPU build given
    GPUs that NVML sees warns (``LlamaWarning``): it serves correctly, on the CPU, so a
    scheduler that hands out GPU ids (Ray on a machine without any) is not refused.
    Blocking (NVML, maybe cuobjdump): async code runs it in a worker thread.
    """
    if not gpus:
        return
    backend, targets = binary_cuda_targets(binary)
    if backend == "unknown" or (backend == "cuda" and targets is None):
        return
    capabilities = _capabilities(gpus, nvml)
    if not capabilities:
        return  # no NVML, or not these GPUs: nothing to compare with
    if backend == "cpu":
        ids = ", ".join(str(g) for g in capabilities)
        message = (
            f"{name}: GPU(s) {ids} were given to a CPU build of llama-server ({binary}); it "
            "will run on the CPU. Build one for them: python -m llamatelemetry_async "
            f"build-server --cuda-arch {_arch_flag(capabilities.values())}"
        )
        logger.warning("%s", message)
        warnings.warn(message, LlamaWarning, stacklevel=2)
        return
    assert targets is not None
    bad = {g: cc for g, cc in capabilities.items() if not runs_on(targets, cc)}
    if not bad:
        return
    names = _names(nvml)
    gpu_text = ", ".join(
        f"GPU {g}{f' ({names[g]})' if g < len(names) else ''} has compute capability "
        f"{cc[0]}.{cc[1]}"
        for g, cc in bad.items()
    )
    built = ", ".join(str(t) for t in targets)
    want = _arch_flag(bad.values())
    raise CUDAArchitectureError(
        f"{name}: {gpu_text}, but {binary} was built for CUDA architectures {built} only "
        "(sm_XY runs on X.Y up to X.9, compute_XY on X.Y and newer), so llama-server would "
        f"fail to run its kernels. Build one for it: python -m llamatelemetry_async "
        f"build-server --cuda-arch {want} (or --cuda-arch '{want};"
        f"{_arch_flag(_target_capabilities(targets))}' for both), then point "
        "LLAMA_SERVER_PATH at it or leave it to the build cache",
        binary=os.fspath(binary),
        architectures=tuple(str(t) for t in targets),
        gpus=tuple(bad),
        compute_capabilities=tuple(f"{cc[0]}.{cc[1]}" for cc in bad.values()),
    )


def _arch_flag(capabilities: Iterable[tuple[int, int]]) -> str:
    return ";".join(str(a) for a in sorted({major * 10 + minor for major, minor in capabilities}))


def _target_capabilities(targets: Iterable[CUDATarget]) -> list[tuple[int, int]]:
    return [divmod(t.arch, 10) for t in targets]
