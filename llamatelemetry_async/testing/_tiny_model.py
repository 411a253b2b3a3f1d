"""A tiny, real llama-architecture GGUF for tests: random weights, readable output.

The file is small (about 360 KB with the defaults), loads in llama-server in a fraction of a
second on a CPU and exercises the real code paths: a SentencePiece-style vocabulary with byte
fallback, ChatML control tokens and chat template, FIM tokens for ``/infill``. Its output
layer only gives whole words a non-zero logit, so sampled text reads as English words.
"""

from __future__ import annotations

import os
import pathlib
import string
import tempfile
from collections.abc import Callable

import gguf
import numpy as np
import numpy.typing as npt

from .._errors import ConfigError

__all__ = ["TINY_MODEL_NAME", "write_tiny_model"]

TINY_MODEL_NAME = "llamatelemetry-tiny"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SentencePiece marks the start of a word with U+2581 instead of a space.
_WS = "\u2581"

# (text, type) in id order: ids 0..7 are fixed so callers can rely on them.
_SPECIAL: tuple[tuple[str, gguf.TokenType], ...] = (
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", gguf.TokenType.CONTROL),
    ("</s>", gguf.TokenType.CONTROL),
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
    ("<|fim_prefix|>", gguf.TokenType.CONTROL),
    ("<|fim_suffix|>", gguf.TokenType.CONTROL),
    ("<|fim_middle|>", gguf.TokenType.CONTROL),
)
_UNK, _BOS, _EOS, _IM_START, _IM_END, _FIM_PRE, _FIM_SUF, _FIM_MID = range(len(_SPECIAL))

# Whole words the model emits; each becomes "▁word" plus the prefixes needed to spell it.
_WORD_TEXT = """
the a an and or but of to in on at by for with from as is was are were be been it its this
that these those there here he she they we you i his her their our my your me him them us
once upon time cat dog bird fish tree house road river sea sky sun moon star day night
morning little big old young good bad happy sad red blue green small long short new first
last one two three many all some every no not very so then when where what who why how
said says went came saw found made took gave looked ran walked jumped sat slept ate
played lived loved liked wanted knew thought had has have do did can could will would
should may might king queen boy girl man woman friend mother father child children world
hello story end way home water fire light dark tea bread apple garden forest city town
"""
_WORDS = tuple(_WORD_TEXT.split())

# Sentence starters get a capitalised piece too, so "Once upon a time" stays four tokens.
_CAPITALISED = ("once", "the", "a", "it", "he", "she", "they", "we", "i", "there", "then", "hello")

_SINGLE_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'\"-:;()"


def _vocabulary() -> tuple[list[str], list[float], list[int], set[int]]:
    """Build (tokens, scores, types, ids of whole words) in a fixed order."""
    tokens = [text for text, _ in _SPECIAL]
    types = [int(kind) for _, kind in _SPECIAL]
    scores = [0.0] * len(tokens)

    # Byte fallback: anything the pieces cannot spell still tokenizes (and "\n" needs <0x0A>).
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(int(gguf.TokenType.BYTE))
        scores.append(0.0)

    words = [_WS + w for w in _WORDS] + [_WS + w.capitalize() for w in _CAPITALISED]
    # llama.cpp's SPM tokenizer only merges two adjacent symbols when their concatenation is
    # itself a token, so every prefix of a word ("▁t", "▁th") must exist for "▁the" to form.
    pieces: dict[str, None] = dict.fromkeys([_WS, *_SINGLE_CHARS])
    for word in words:
        for end in range(2, len(word) + 1):
            pieces[word[:end]] = None

    word_set = set(words)
    word_ids: set[int] = set()
    for piece in pieces:
        if piece in word_set:
            word_ids.add(len(tokens))
        tokens.append(piece)
        types.append(int(gguf.TokenType.NORMAL))
        # Merges take the highest score first: longer pieces win.
        scores.append(float(len(piece)))
    return tokens, scores, types, word_ids


def _normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float
) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def llama_writer(
    name: str,
    *,
    n_ctx_train: int,
    n_embd: int,
    n_layer: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    vocabulary: tuple[list[str], list[float], list[int]],
    file_type: gguf.LlamaFileType,
) -> gguf.GGUFWriter:
    """A GGUF writer holding the llama hyperparameters and this project's tokenizer and
    chat template (shared by the tiny model and the big GPU-check model)."""
    tokens, scores, types = vocabulary
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(_UNK)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_eot_token_id(_IM_END)
    # llama.cpp also guesses FIM ids from token text; explicit ids make /infill independent
    # of that guesswork.
    writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, _FIM_PRE)
    writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, _FIM_SUF)
    writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, _FIM_MID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    return writer


def write_atomically(
    writer: gguf.GGUFWriter,
    out: pathlib.Path,
    body: Callable[[gguf.GGUFWriter], None] | None = None,
) -> pathlib.Path:
    """Write ``writer``'s GGUF to a temporary file beside ``out``, then rename it into place.

    ``body`` writes what follows the header (default: the metadata and the tensors added
    with ``add_tensor``); a reader never sees a half-written model.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        try:
            writer.write_header_to_file(tmp)
            if body is None:
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            else:
                body(writer)
        finally:
            writer.close()
        # mkstemp creates the file 0600; a model file is ordinary readable data.
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
) -> pathlib.Path:
    """Write the tiny model to ``path`` and return it; the bytes depend only on the arguments.

    The file is written under a temporary name and renamed into place, so concurrent test
    workers writing the same path never see a half-written file. The bytes are stable for a
    given numpy version (numpy does not promise its random streams across versions).
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ConfigError("n_embd must divide by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ConfigError("head dimension (n_embd / n_head) must be even for RoPE")

    out = pathlib.Path(path)
    tokens, scores, types, word_ids = _vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    writer = llama_writer(
        TINY_MODEL_NAME,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_layer=n_layer,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        vocabulary=(tokens, scores, types),
        file_type=gguf.LlamaFileType.MOSTLY_F16,
    )

    def matrix(rows: int, cols: int) -> npt.NDArray[np.float16]:
        # numpy shape is (rows, cols) = ggml ne reversed; 1/sqrt(fan_in) keeps activations O(1).
        return _normal(rng, (rows, cols), cols**-0.5).astype(np.float16)

    def ones(n: int) -> npt.NDArray[np.float32]:
        # Norm weights stay float32, as llama.cpp's converters write them.
        return np.ones(n, dtype=np.float32)

    kv_dim = n_head_kv * head_dim
    writer.add_tensor("token_embd.weight", _normal(rng, (n_vocab, n_embd), 1.0).astype(np.float16))
    for i in range(n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.attn_q.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", matrix(kv_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", matrix(kv_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.ffn_gate.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", matrix(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", ones(n_embd))

    # The final hidden state is RMS-normalised (norm ~ sqrt(n_embd)), so unit-variance rows give
    # word logits with a spread of ~sqrt(n_embd) while every other row gives exactly 0: sampling
    # picks whole words, never bytes, control tokens, word prefixes or EOS.
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    rows = sorted(word_ids)
    output[rows] = _normal(rng, (len(rows), n_embd), 1.0)
    writer.add_tensor("output.weight", output.astype(np.float16))

    return write_atomically(writer, out)
