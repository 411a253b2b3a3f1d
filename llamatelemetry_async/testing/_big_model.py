"""A random-weight llama-shaped GGUF big enough to load a GPU (~1B parameters by default).

The tiny model (``_tiny_model.py``) exercises the code paths; this one exercises the
hardware: with the defaults (2048-dim, 16 layers, 32 heads of which 8 for K/V, 8192-wide
feed-forward, 32,000-token vocabulary) it holds about 1.1 billion parameters, 2.2 GB in f16.
It shares the tiny model's tokenizer and chat template (its vocabulary is padded with unused
tokens up to ``n_vocab``), so prompts tokenize the same way and sampled text reads as words.

It is written for speed and bounded memory, not for realism:

- Tensors are streamed: the writer gets every tensor's shape first, then each tensor's data
  is made and written one at a time, so peak memory is about one tensor (the largest is the
  ``n_vocab x n_embd`` embedding: 131 MB with the defaults), not the file.
- Weights are not normal draws (a normal draw and a float16 cast cost ~25 ns per weight on
  one core, half a minute for 1B). Each weight is made from random bits: a random sign and
  mantissa under one fixed exponent per tensor, i.e. ``±a·(1 + u)`` with ``u`` uniform in
  ``[0, 1)`` and ``a`` a power of two; its RMS, ``a·sqrt(7/3)``, is within a factor of
  ``sqrt(2)`` of ``1/sqrt(fan_in)``. That is a few ns per weight.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

# The tokenizer and template are the tiny model's. ``_vocabulary`` and the id constants are
# private to that module; importing them here keeps one definition of the vocabulary.
from .._errors import ConfigError
from ._tiny_model import _vocabulary, llama_writer, write_atomically

__all__ = ["BIG_MODEL_NAME", "write_random_llama"]

BIG_MODEL_NAME = "llamatelemetry-random-llama"

WeightType = Literal["f16", "f32"]

# (unsigned view, mantissa bits, exponent bias) of each float type.
_BITS: dict[str, tuple[type[np.unsignedinteger], int, int]] = {
    "f16": (np.uint16, 10, 15),
    "f32": (np.uint32, 23, 127),
}
_FLOATS: dict[str, type[np.floating]] = {"f16": np.float16, "f32": np.float32}
_CHUNK_VALUES = 1 << 23  # values made per step: bounds the temporaries to 16-32 MB

Fill = Callable[[npt.NDArray[np.floating]], None]


def _random_fill(rng: np.random.Generator, std: float, dtype: str) -> Fill:
    """A filler writing ``±a·(1 + u)`` weights (RMS ~ ``std``) into an array, in chunks."""
    uint, mant_bits, bias = _BITS[dtype]
    # |x| uniform in [a, 2a) has E[x^2] = 7a^2/3; take the power of two nearest that RMS.
    exponent = round(math.log2(std * math.sqrt(3 / 7)))
    biased = exponent + bias
    if not 0 < biased < 2 * bias:
        raise ConfigError(f"weight scale {std!r} is out of range for {dtype}")
    itemsize = np.dtype(uint).itemsize
    sign = 1 << (8 * itemsize - 1)
    keep = uint(sign | ((1 << mant_bits) - 1))  # sign and mantissa stay random
    exp_bits = uint(biased << mant_bits)

    def fill(out: npt.NDArray[np.floating]) -> None:
        flat = out.reshape(-1).view(uint)
        for start in range(0, flat.size, _CHUNK_VALUES):
            part = flat[start : start + _CHUNK_VALUES]
            raw = np.frombuffer(rng.bytes(part.size * itemsize), dtype=uint)
            np.bitwise_and(raw, keep, out=part)
            part |= exp_bits

    return fill


def write_random_llama(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 2048,
    n_layer: int = 16,
    n_head: int = 32,
    n_head_kv: int = 8,
    n_ff: int = 8192,
    n_vocab: int = 32000,
    seed: int = 0,
    dtype: WeightType = "f16",
    n_ctx_train: int = 8192,
) -> pathlib.Path:
    """Write a random llama-architecture GGUF to ``path`` and return the path.

    The defaults give ~1.1B parameters (2.2 GB in f16). ``dtype`` is the type of the weight
    matrices ("f16" or "f32"); norm weights are always f32, as llama.cpp's converters write
    them. The bytes depend only on the arguments (and numpy's random stream). The file is
    written under a temporary name beside ``path`` and renamed into place.
    """
    if dtype not in _BITS:
        raise ConfigError(f"dtype must be 'f16' or 'f32', not {dtype!r}")
    if min(n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab) < 1:
        raise ConfigError("every size must be at least 1")
    if n_embd % n_head or n_head % n_head_kv:
        raise ConfigError("n_embd must divide by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ConfigError("head dimension (n_embd / n_head) must be even for RoPE")
    tokens, scores, types, word_ids = _vocabulary()
    if n_vocab < len(tokens):
        raise ConfigError(f"n_vocab must be at least {len(tokens)} (the tiny model's vocabulary)")
    # Pad with tokens no text can produce and the output layer never picks (its rows are 0).
    for i in range(len(tokens), n_vocab):
        tokens.append(f"<unused_{i}>")
        scores.append(0.0)
        types.append(int(gguf.TokenType.UNUSED))

    out = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    weight_type = _FLOATS[dtype]
    writer = llama_writer(
        BIG_MODEL_NAME,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_layer=n_layer,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        vocabulary=(tokens, scores, types),
        file_type=(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32),
    )

    # (name, numpy shape = ggml ne reversed, numpy dtype, how to fill it), in file order.
    plan: list[tuple[str, tuple[int, ...], type[np.floating], Fill]] = []

    def matrix(name: str, rows: int, cols: int, std: float | None = None) -> None:
        # 1/sqrt(fan_in) keeps activations O(1) through the residual stream.
        fill = _random_fill(rng, cols**-0.5 if std is None else std, dtype)
        plan.append((name, (rows, cols), weight_type, fill))

    def ones(name: str, n: int) -> None:
        plan.append((name, (n,), np.float32, lambda a: a.fill(1.0)))

    def output(a: npt.NDArray[np.floating]) -> None:
        # Only whole words get a non-zero logit (spread ~sqrt(n_embd) after the final RMS
        # norm): sampled text is words, never bytes, control tokens, padding or EOS.
        a.fill(0.0)
        rows = sorted(word_ids)
        block = np.empty((len(rows), n_embd), dtype=weight_type)
        _random_fill(rng, 1.0, dtype)(block)
        a[rows] = block

    kv_dim = n_head_kv * head_dim
    matrix("token_embd.weight", n_vocab, n_embd, std=1.0)
    for i in range(n_layer):
        blk = f"blk.{i}"
        ones(f"{blk}.attn_norm.weight", n_embd)
        matrix(f"{blk}.attn_q.weight", n_embd, n_embd)
        matrix(f"{blk}.attn_k.weight", kv_dim, n_embd)
        matrix(f"{blk}.attn_v.weight", kv_dim, n_embd)
        matrix(f"{blk}.attn_output.weight", n_embd, n_embd)
        ones(f"{blk}.ffn_norm.weight", n_embd)
        matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff)
    ones("output_norm.weight", n_embd)
    plan.append(("output.weight", (n_vocab, n_embd), weight_type, output))

    for name, shape, np_type, _ in plan:
        nbytes = math.prod(shape) * np.dtype(np_type).itemsize
        writer.add_tensor_info(name, shape, np.dtype(np_type), nbytes)

    def body(writer: gguf.GGUFWriter) -> None:
        # Tensor data streamed one tensor at a time: the model never sits in memory whole.
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape, np_type, fill in plan:
            data = np.empty(shape, dtype=np_type)
            fill(data)
            writer.write_tensor_data(data)
            del data

    write_atomically(writer, out, body)
    return out
