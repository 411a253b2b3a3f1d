"""GGUF inspection on files the tests write, checked against hand-computed shapes and bytes,
and against what a real llama-server allocates for them."""

from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest

from llamatelemetry_async._errors import ModelFormatError, ModelNotFoundError
from llamatelemetry_async.models import ModelInfo, _gguf, inspect_model, kv_cells, read_model_info
from llamatelemetry_async.models._gguf import cache_type_bytes
from llamatelemetry_async.testing import TINY_MODEL_NAME, write_tiny_model
from llamatelemetry_async.testing._server import run_llama_server
from llamatelemetry_async.testing._tiny_lora import write_tiny_lora
from llamatelemetry_async.testing._tiny_model import CHAT_TEMPLATE


def test_tiny_model_shape_parameters_and_bytes(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    # write_tiny_model's defaults: n_embd 64, 2 layers, 4 heads, 2 KV heads, n_ff 128.
    assert (info.architecture, info.name, info.file_type) == ("llama", TINY_MODEL_NAME, "F16")
    assert (info.block_count, info.embedding_length, info.feed_forward_length) == (2, 64, 128)
    assert (info.head_count, info.head_count_kv, info.head_dim_k, info.head_dim_v) == (4, 2, 16, 16)
    assert info.context_length == 4096
    assert info.rope_freq_base == 10000.0
    assert info.rope_dimension_count == 16
    assert info.chat_template == CHAT_TEMPLATE
    assert (info.bos_token_id, info.bos_token, info.eos_token_id, info.eos_token) == (
        1,
        "<s>",
        2,
        "</s>",
    )
    assert info.file_size == tiny_model.stat().st_size

    n_vocab = info.vocab_size
    # Per block: 2 norms of 64 (F32), q 64x64, k 32x64, v 32x64, o 64x64, gate/up/down 64x128.
    block_matrix = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 64 * 128  # 36,864
    block_elements = block_matrix + 2 * 64
    embd = n_vocab * 64
    assert info.parameter_count == 2 * block_elements + embd + 64 + embd  # + output_norm, output
    assert info.tensor_count == 2 * 9 + 3
    assert info.layer_bytes == (block_matrix * 2 + 2 * 64 * 4,) * 2  # 74,240 each
    assert info.input_bytes == embd * 2  # token_embd, F16
    assert info.output_bytes == embd * 2 + 64 * 4  # output (F16) + output_norm (F32)
    assert not info.tied_embeddings
    assert info.output_device_bytes == info.output_bytes
    assert info.tensor_types["F16"].count == 2 * 7 + 2
    assert info.tensor_types["F16"].elements == 2 * block_matrix + 2 * embd
    assert info.tensor_types["F32"].nbytes == 5 * 64 * 4
    # Every byte of tensor data is accounted for: the data section ends the file.
    assert info.weight_bytes == sum(s.nbytes for s in info.tensor_types.values())
    assert info.weight_bytes <= info.file_size < info.weight_bytes + 64 * 1024

    # KV per token: 2 layers x (K row + V row) of 2 KV heads x 16 = 32 elements.
    assert info.kv_bytes_per_token("f16") == 2 * (32 * 2 + 32 * 2)  # 256
    assert info.kv_bytes_per_token("q8_0") == 2 * (34 + 34)  # one 32-element block each
    assert info.kv_bytes_per_token("q4_0") == 2 * (18 + 18)
    assert info.kv_bytes_per_token("q8_0", "f16") == 2 * (34 + 64)
    assert "2 layers" in info.summary()


def test_a_grouped_query_shape(tmp_path: Path) -> None:
    path = write_tiny_model(
        tmp_path / "gqa.gguf", n_embd=128, n_layer=3, n_head=4, n_head_kv=1, n_ff=256
    )
    info = read_model_info(path)
    assert (info.block_count, info.head_count, info.head_count_kv, info.head_dim_k) == (3, 4, 1, 32)
    # q 128x128, k and v 32x128, o 128x128, gate/up/down 128x256, F16; norms 2x128 F32.
    block = (2 * 128 * 128 + 2 * 32 * 128 + 3 * 128 * 256) * 2 + 2 * 128 * 4
    assert info.layer_bytes == (block,) * 3
    assert info.kv_bytes_per_token("f16") == 3 * (32 * 2 * 2)
    assert info.kv_bytes_per_token("q4_0") == 3 * (18 * 2)
    assert cache_type_bytes("q8_0", 4096) == 128 * 34


@pytest.mark.anyio
async def test_inspect_model_is_read_model_info_off_the_loop(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []

    def recorded(path: Path) -> ModelInfo:
        threads.append(threading.current_thread())
        return read_model_info(path)

    monkeypatch.setattr(_gguf, "read_model_info", recorded)
    assert await inspect_model(tiny_model) == read_model_info(tiny_model)
    assert len(threads) == 1
    assert threads[0] is not threading.current_thread()  # a worker thread parsed it


@pytest.mark.parametrize(
    ("args", "cache_type"),
    [(["-c", "2500", "-np", "3"], "f16"), (["-c", "5000", "-np", "2"], "q8_0")],
)
def test_kv_bytes_match_what_llama_server_allocates(
    tmp_path: Path, args: list[str], cache_type: str
) -> None:
    # Head dim 32: a quantized cache needs the head dim to be a multiple of its block (32).
    model = write_tiny_model(tmp_path / "m.gguf", n_embd=128, n_head=4, n_head_kv=2)
    ctx, slots = int(args[1]), int(args[3])
    extra = ["-ctk", cache_type, "-ctv", cache_type, "-fa", "on"] if cache_type != "f16" else []
    info = read_model_info(model)
    with run_llama_server(model, args=[*args, *extra, "-lv", "4"]) as server:
        log = server.log_tail(400)
    cells = kv_cells(ctx, slots)
    n_ctx = int(re.search(r"llama_context: n_ctx\s+= (\d+)", log).group(1))  # type: ignore[union-attr]
    assert n_ctx == cells
    # "size =    0.75 MiB (  1024 cells,   2 layers,  3/3 seqs)": cells per slot stream.
    line = re.search(
        r"llama_kv_cache: size =\s+([\d.]+) MiB "
        r"\(\s*(\d+) cells,\s+(\d+) layers,\s+(\d+)/(\d+) seqs",
        log,
    )
    assert line is not None, log
    mib, per_stream, layers, streams = (
        float(line.group(1)),
        int(line.group(2)),
        int(line.group(3)),
        int(line.group(5)),
    )
    assert (per_stream * streams, layers) == (cells, info.block_count)
    assert f"{mib:.2f}" == f"{info.kv_bytes_per_token(cache_type) * cells / 2**20:.2f}"


def _cut(src: Path, dst: Path, length: int) -> Path:
    dst.write_bytes(src.read_bytes()[:length])
    return dst


def test_unreadable_files_are_model_format_errors(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_model.read_bytes()
    garbled = bytearray(data)
    garbled[8:16] = struct.pack("<Q", 2**40)  # an absurd tensor count
    cases: dict[str, tuple[Path, str]] = {
        "empty": (tmp_path / "empty.gguf", "empty"),
        "text": (tmp_path / "notes.gguf", "not a GGUF file"),
        "magic only": (_cut(tiny_model, tmp_path / "m.gguf", 4), "truncated or corrupt"),
        "header cut": (_cut(tiny_model, tmp_path / "h.gguf", 100), "truncated or corrupt"),
        "tensor table cut": (_cut(tiny_model, tmp_path / "t.gguf", 19000), "truncated"),
        "data cut": (_cut(tiny_model, tmp_path / "d.gguf", len(data) - 1), "truncated"),
        "garbled header": (tmp_path / "g.gguf", "corrupt"),
        "directory": (tmp_path, "not a regular file"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["text"][0].write_text("these are my notes, not a model\n" * 4)
    cases["garbled header"][0].write_bytes(bytes(garbled))
    for what, (path, problem) in cases.items():
        with pytest.raises(ModelFormatError) as info:
            read_model_info(path)
        assert info.value.model == str(path), what
        assert problem in info.value.problem, (what, info.value.problem)
        assert str(path) in str(info.value), what


def test_an_adapter_is_not_a_model(tmp_path: Path) -> None:
    lora = write_tiny_lora(tmp_path / "lora.gguf")
    with pytest.raises(ModelFormatError, match="adapter") as info:
        read_model_info(lora)
    assert "--lora" in info.value.problem


@pytest.mark.anyio
async def test_a_missing_file_is_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        await inspect_model(missing)
    assert info.value.tried == [str(missing)]
    assert info.value.model == str(missing)


# -- files rewritten from the tiny model: split, other architectures, newer tensor types ----------


def _rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    extra: dict[str, tuple[object, gguf.GGUFValueType]] | None = None,
    drop: tuple[str, ...] = (),
    add_norms: tuple[str, ...] = (),
    split_max_tensors: int = 0,
) -> Path:
    """``src`` written again as ``dst``: another architecture name (``llama.*`` keys renamed),
    ``extra`` keys, tensors dropped, per-layer F32 norms added, or split into parts.

    Returns the path of the file (the first part when split)."""
    reader = gguf.GGUFReader(src)
    old_arch = str(reader.fields["general.architecture"].contents())
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, new_arch, split_max_tensors=split_max_tensors)
    for key, entry in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.replace(f"{old_arch}.", f"{new_arch}.", 1)
        sub = entry.types[-1] if entry.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, entry.contents(), entry.types[0], sub)
    for key, (val, vtype) in (extra or {}).items():
        writer.add_key_value(key.format(arch=new_arch), val, vtype)
    n_embd = int(reader.fields[f"{old_arch}.embedding_length"].contents())
    n_layer = int(reader.fields[f"{old_arch}.block_count"].contents())
    for tensor in reader.tensors:
        if tensor.name not in drop:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    for il in range(n_layer):
        for norm in add_norms:
            writer.add_tensor(f"blk.{il}.{norm}.weight", np.ones(n_embd, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return next(dst.parent.glob(f"{dst.stem}-00001-of-*.gguf"))
    return dst


def _kv_cache_lines(log: str) -> list[tuple[float, int, int, int]]:
    """Each ``llama_kv_cache: size = X MiB (N cells, L layers, s/S seqs)`` line's numbers."""
    pattern = (
        r"llama_kv_cache: size =\s+([\d.]+) MiB "
        r"\(\s*(\d+) cells,\s+(\d+) layers,\s+(\d+)/(\d+) seqs"
    )
    return [
        (float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(5)))
        for m in re.finditer(pattern, log)
    ]


def test_a_split_model_is_read_whole_and_llama_server_agrees(
    tiny_model: Path, tmp_path: Path
) -> None:
    whole = read_model_info(tiny_model)
    first = _rewrite(tiny_model, tmp_path / "tiny.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert [p.name for p in parts] == [f"tiny-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    info = read_model_info(first)
    # The first part alone holds 8 of 21 tensors; the model is all three.
    assert (info.split_count, info.tensor_count) == (3, whole.tensor_count)
    assert info.parameter_count == whole.parameter_count
    assert info.layer_bytes == whole.layer_bytes
    assert (info.input_bytes, info.output_bytes) == (whole.input_bytes, whole.output_bytes)
    assert info.tensor_types == whole.tensor_types
    assert info.file_size == sum(p.stat().st_size for p in parts)
    assert info.block_count == whole.block_count
    assert info.chat_template == whole.chat_template
    # llama-server loads the same three parts by the same names.
    with run_llama_server(first, args=["-c", "512", "-np", "1", "-lv", "4"]) as server:
        log = server.log_tail(400)
    assert "additional 2 GGUFs metadata loaded" in log, log

    # The second part is not a model to start from; the error names the first.
    with pytest.raises(ModelFormatError, match="pass its first part") as second:
        read_model_info(parts[1])
    assert "part 2 of 3" in second.value.problem
    assert str(parts[0]) in second.value.problem
    # A missing part, and a first part renamed so the others cannot be found.
    parts[2].rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(ModelFormatError, match="is missing") as missing:
        read_model_info(first)
    assert str(parts[2]) in missing.value.problem
    assert missing.value.model == str(first)
    parts[2].write_bytes(b"junk")
    with pytest.raises(ModelFormatError) as corrupt:
        read_model_info(first)
    assert f"its part {parts[2]} is not a GGUF file" in corrupt.value.problem
    renamed = first.rename(tmp_path / "tiny.gguf")
    with pytest.raises(ModelFormatError, match=r"-00001-of-00003\.gguf"):
        read_model_info(renamed)


def test_a_tensor_type_newer_than_the_gguf_package_says_so(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = bytearray(tiny_model.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims  # skip the dimensions: the tensor's type comes next
    assert struct.unpack_from("<I", data, at)[0] == gguf.GGMLQuantizationType.F16
    struct.pack_into("<I", data, at, 4242)  # a type id no gguf release knows
    newer = tmp_path / "newer.gguf"
    newer.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as info:
        read_model_info(newer)
    assert "uses ggml tensor type 4242" in info.value.problem
    assert "pip install -U gguf" in info.value.problem
    assert "truncated" not in info.value.problem


def test_sliding_window_layers_match_what_llama_server_allocates(
    tmp_path: Path,
) -> None:
    # A tiny Gemma-2: 4 layers, every other one sliding-window (llama.cpp's fixed pattern
    # for gemma2), a window of 256 tokens; tied embeddings, post-norms, as gemma2 has them.
    llama = write_tiny_model(tmp_path / "llama.gguf", n_embd=128, n_layer=4, n_head=4, n_head_kv=2)
    model = _rewrite(
        llama,
        tmp_path / "gemma2.gguf",
        arch="gemma2",
        extra={"{arch}.attention.sliding_window": (256, gguf.GGUFValueType.UINT32)},
        drop=("output.weight",),
        add_norms=("post_attention_norm", "post_ffw_norm"),
    )
    info = read_model_info(model)
    assert (info.architecture, info.sliding_window) == ("gemma2", 256)
    assert info.swa_layers == (True, False, True, False)
    assert info.tied_embeddings
    ctx, slots, ubatch = 4096, 2, 128
    # Full layers: 2 slots x 2048 cells; SWA layers: 2 x pad(min(2048, 256 + 128), 256) = 2 x 512.
    assert info.kv_cells_by_layer(ctx, slots, ubatch_size=ubatch) == (1024, 4096, 1024, 4096)
    assert info.kv_cells_by_layer(ctx, slots, ubatch_size=ubatch, swa_full=True) == (4096,) * 4
    row = info.kv_row_bytes("f16")
    assert row == 2 * (2 * 32 * 2)  # K and V rows of 2 KV heads x 32, f16
    expected = info.kv_cache_bytes(ctx, slots, ubatch_size=ubatch)
    assert expected == row * (2 * 1024 + 2 * 4096)
    assert expected < info.kv_bytes_per_token() * ctx  # less than every layer at full size
    args = ["-c", str(ctx), "-np", str(slots), "-ub", str(ubatch), "-b", str(ubatch), "-lv", "4"]
    with run_llama_server(model, args=args) as server:
        log = server.log_tail(400)
    lines = _kv_cache_lines(log)
    assert len(lines) == 2, log  # llama.cpp's two caches: full layers, then SWA layers
    allocated = sum(cells * streams * layers * row for _, cells, layers, streams in lines)
    assert allocated == expected
    assert sorted((cells * streams, layers) for _, cells, layers, streams in lines) == [
        (1024, 2),
        (4096, 2),
    ]


def test_mla_models_cache_no_v_rows_and_moe_fields(tiny_model: Path, tmp_path: Path) -> None:
    u32 = gguf.GGUFValueType.UINT32
    model = _rewrite(
        tiny_model,
        tmp_path / "mla.gguf",
        extra={
            "{arch}.attention.key_length_mla": (16, u32),
            "{arch}.attention.value_length_mla": (16, u32),
            "{arch}.expert_count": (8, u32),
            "{arch}.expert_used_count": (2, u32),
            "{arch}.expert_feed_forward_length": (96, u32),
        },
    )
    info = read_model_info(model)
    assert info.mla
    assert info.kv_row_bytes("f16") == 2 * 16 * 2  # K rows only: 2 KV heads x 16, f16
    assert info.kv_bytes_per_token("f16") == 2 * (2 * 16 * 2)
    assert (info.expert_count, info.expert_used_count, info.expert_feed_forward_length) == (
        8,
        2,
        96,
    )
    assert "2 of 8 experts" in info.summary()
    plain = read_model_info(tiny_model)
    assert (plain.mla, plain.expert_count, plain.swa_layers) == (False, 0, ())
