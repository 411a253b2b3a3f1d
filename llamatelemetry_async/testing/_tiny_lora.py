"""A tiny LoRA adapter for the tiny model, in llama.cpp's LoRA GGUF format.

llama.cpp loads an adapter (``--lora file.gguf``) when ``general.type`` is ``adapter``,
``adapter.type`` is ``lora`` and ``general.architecture`` is the model's; ``adapter.lora.alpha``
scales it (``alpha / rank``). Each adapted weight ``W`` (ggml shape ``[n_in, n_out]``) gets
``W.lora_a`` of shape ``[n_in, rank]`` and ``W.lora_b`` of shape ``[rank, n_out]``
(``src/llama-adapter.cpp``); numpy shapes are the reverse.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import gguf
import numpy as np

from .._errors import ConfigError
from ._tiny_model import write_atomically

__all__ = ["write_tiny_lora"]

# The weights of one tiny-model block a LoRA may adapt: name -> (n_in, n_out) per ggml.
_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_tiny_lora(
    path: str | os.PathLike[str],
    *,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 1,
    std: float = 0.5,
    targets: Sequence[str] = ("attn_q", "attn_v", "ffn_down"),
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
) -> pathlib.Path:
    """Write a LoRA adapter for ``write_tiny_model`` (same shape arguments) and return it.

    Random ``lora_a`` and ``lora_b`` (standard deviation ``std``, float32) on ``targets`` of
    every block: large enough that greedy output with the adapter on differs from the
    output with it off. Written under a temporary name and renamed into place.
    """
    unknown = [t for t in targets if t not in _TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets must be some of {_TARGETS}, got {list(targets)}")
    kv_dim = n_head_kv * (n_embd // n_head)
    shapes = {  # ggml (n_in, n_out) of each weight
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd, kv_dim),
        "attn_v": (n_embd, kv_dim),
        "attn_output": (n_embd, n_embd),
        "ffn_gate": (n_embd, n_ff),
        "ffn_up": (n_embd, n_ff),
        "ffn_down": (n_ff, n_embd),
    }
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name("llamatelemetry-tiny-lora")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for i in range(n_layer):
        for target in targets:
            n_in, n_out = shapes[target]
            name = f"blk.{i}.{target}.weight"
            a = (rng.standard_normal((rank, n_in)) * std).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)

    return write_atomically(writer, pathlib.Path(path))
