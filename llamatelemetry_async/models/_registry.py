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

import difflib
from dataclasses import dataclass
from typing import Final

__all__ = ["RegistryModel", "close_model_names", "find_model", "list_models"]

_GIB: Final = 1 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryModel:
    """One well-known GGUF model: where it lives on the Hub and what it needs.

    ``name`` is the registry key (lower case); ``repo_id`` and ``filename`` locate the file
    on the Hugging Face Hub; ``size_bytes`` is its download size, ``min_vram_bytes`` a rough
    minimum of GPU memory to offload all of it with a 4096-token context; ``parameters`` the
    parameter count; ``quantization`` the llama.cpp file type (``"Q4_K_M"``).
    """

    name: str
    repo_id: str
    filename: str
    size_bytes: int
    min_vram_bytes: int
    parameters: int
    quantization: str
    description: str

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
) -> RegistryModel:
    return RegistryModel(
        name=name,
        repo_id=repo_id,
        filename=filename,
        size_bytes=round(size_gb * 1e9),
        min_vram_bytes=round(min_vram_gib * _GIB),
        parameters=parameters,
        quantization="Q4_K_M",
        description=description,
    )


# Sizes are those the Hub lists for each file; parameter counts those of the base models.
_MODELS: Final[tuple[RegistryModel, ...]] = (
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
    [m.name for m in list_models()][:2]  # ['qwen2.5-0.5b-instruct', 'tinyllama-1.1b-chat']
    ```
    """
    return sorted(_MODELS, key=lambda m: m.size_bytes)


def find_model(name: str) -> RegistryModel | None:
    """The registry entry called ``name`` (case-insensitive), or ``None``."""
    return _BY_NAME.get(name.strip().lower())


def close_model_names(name: str, n: int = 3) -> list[str]:
    """Registry names that look like ``name`` (difflib), best first; for error messages."""
    return difflib.get_close_matches(name.strip().lower(), list(_BY_NAME), n=n, cutoff=0.5)
