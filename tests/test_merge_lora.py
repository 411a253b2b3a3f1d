"""merge_lora(): the real llama-export-lora on the tiny model and its LoRA, served and compared.

The merged model must write what the base model writes with the adapter loaded (llama-server
``--lora``, through ``ServerConfig.lora``, at the same scale), and not what the base writes.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import gguf
import numpy as np
import pytest
from _procs import gone

from llamatelemetry_async._errors import (
    ConfigError,
    LlamaServerNotFoundError,
    ModelError,
    ModelFormatError,
    ModelNotFoundError,
)
from llamatelemetry_async.client import AsyncLlamaClient
from llamatelemetry_async.models import (
    MergeLoraError,
    MergeProgress,
    merge_lora,
    read_model_info,
)
from llamatelemetry_async.server import (
    LlamaServer,
    ServerConfig,
    ServerPlan,
    find_llama_export_lora,
    find_llama_server,
    server_command,
)
from llamatelemetry_async.testing._tiny_lora import write_tiny_lora

GREEDY: dict[str, Any] = {"n_predict": 16, "temperature": 0, "cache_prompt": False}
PROMPT = "Once upon a time"
TINY_TENSORS = 21  # 2 blocks x 9 tensors, plus token_embd, output_norm and output
ADAPTED = {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_v", "ffn_down")}


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora.gguf")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@asynccontextmanager
async def _serving(model: Path, config: ServerConfig) -> AsyncIterator[AsyncLlamaClient]:
    argv, env = server_command(
        config, binary=find_llama_server(), model=model, plan=ServerPlan("cpu0", ())
    )
    server = LlamaServer(argv, env, name=model.stem)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.url is not None
        async with AsyncLlamaClient(server.url) as client:
            yield client
        tg.cancel_scope.cancel()


async def _text(client: AsyncLlamaClient) -> str:
    return (await client.completion(PROMPT, **GREEDY)).content


def test_the_merged_model_writes_what_the_base_with_the_adapter_writes(
    tiny_model: Path, lora: Path, tmp_path: Path
) -> None:
    async def main() -> dict[str, str]:
        seen: list[MergeProgress] = []
        merged = await merge_lora(
            tiny_model, lora, tmp_path / "merged.gguf", on_progress=seen.append
        )
        half = await merge_lora(tiny_model, [(lora, 0.5)], tmp_path / "half.gguf", threads=1)
        # Two adapters of the same weights at once, each at 0.5 (scale= for those without one).
        other = write_tiny_lora(tmp_path / "other.gguf", seed=7)
        both = await merge_lora(tiny_model, [lora, other], tmp_path / "both.gguf", scale=0.5)
        assert [p.done for p in seen] == list(range(1, TINY_TENSORS + 1))
        assert {p.total for p in seen} == {TINY_TENSORS}
        assert {p.tensor for p in seen if p.merged} == ADAPTED
        assert seen[-1].fraction == 1.0

        texts: dict[str, str] = {}
        config = ServerConfig(ctx_size=256)
        loaded = ServerConfig(ctx_size=256, lora=(str(lora), str(other)))
        async with _serving(tiny_model, loaded) as client:
            await client.set_lora_adapters({0: 1.0, 1: 0.0})
            texts["adapter"] = await _text(client)
            await client.set_lora_adapters({0: 0.5, 1: 0.0})
            texts["adapter at 0.5"] = await _text(client)
            await client.set_lora_adapters({0: 0.5, 1: 0.5})
            texts["both at 0.5"] = await _text(client)
            await client.set_lora_adapters({0: 0.0, 1: 0.0})
            texts["adapter off"] = await _text(client)
        async with _serving(tiny_model, config) as client:
            texts["base"] = await _text(client)
        async with _serving(merged, config) as client:
            texts["merged"] = await _text(client)
        async with _serving(half, config) as client:
            texts["merged at 0.5"] = await _text(client)
        async with _serving(both, config) as client:
            texts["both merged at 0.5"] = await _text(client)
        return texts

    texts = anyio.run(main)
    assert all(texts.values()), texts
    assert texts["adapter off"] == texts["base"]
    assert texts["adapter"] != texts["base"]  # the adapter changes what the model writes
    assert texts["merged"] == texts["adapter"], texts
    assert texts["merged at 0.5"] == texts["adapter at 0.5"], texts
    assert texts["adapter at 0.5"] != texts["adapter"]
    assert texts["both merged at 0.5"] == texts["both at 0.5"], texts
    assert texts["both at 0.5"] != texts["adapter at 0.5"]  # the second adapter counts


@pytest.mark.anyio
async def test_the_merged_file_is_a_standalone_f16_model(
    tiny_model: Path, lora: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "merged.gguf"  # the folder is made
    assert await merge_lora(tiny_model, str(lora), out, scale=2.0) == out
    base, merged = _tensors(tiny_model), _tensors(out)
    assert sorted(merged) == sorted(base)
    for name, tensor in merged.items():
        if name in ADAPTED:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            assert (tensor.data != base[name].data).any(), name
        else:  # copied as it was
            assert tensor.tensor_type == base[name].tensor_type
            assert (tensor.data == base[name].data).all(), name
    # The base's metadata (vocabulary, chat template...) is carried over; the file type says F16.
    merged_fields, base_fields = gguf.GGUFReader(out).fields, gguf.GGUFReader(tiny_model).fields
    assert set(merged_fields) - {"general.file_type"} == set(base_fields) - {"general.file_type"}
    assert merged_fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert read_model_info(out).architecture == "llama"  # a model, not an adapter
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert _names(out.parent) == ["merged.gguf"]  # no .part left


@pytest.mark.anyio
async def test_adapters_that_cannot_be_merged_together_are_a_merge_error(
    tiny_model: Path, lora: Path, tmp_path: Path
) -> None:
    # llama-export-lora merges several adapters at once only when they adapt the same weights.
    other = write_tiny_lora(tmp_path / "other.gguf", targets=("attn_k",), seed=2)
    out = tmp_path / "merged.gguf"
    with pytest.raises(MergeLoraError) as info:
        await merge_lora(tiny_model, [lora, (other, 0.5)], out)
    err = info.value
    assert err.returncode == 1
    assert "do not have the same list of tensors" in err.log_tail
    assert err.log_tail in str(err)
    assert err.model == str(tiny_model)
    assert isinstance(err, ModelError)
    assert _names(tmp_path) == ["other.gguf"]


@pytest.mark.anyio
async def test_bad_arguments_are_typed_errors_before_anything_runs(
    tiny_model: Path, lora: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.gguf"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"adapters": []}, "adapters"),
        ({"adapters": [3]}, "adapters"),
        ({"adapters": [(lora, "high")]}, "adapters"),
        ({"adapters": lora, "scale": float("nan")}, "scale"),
        ({"adapters": lora, "scale": True}, "scale"),
        ({"adapters": lora, "threads": 0}, "threads"),
        ({"adapters": tiny_model}, "adapters"),  # a model, not an adapter
    ]
    for kwargs, field in cases:
        adapters = kwargs.pop("adapters")
        with pytest.raises(ConfigError) as info:
            await merge_lora(tiny_model, adapters, out, **kwargs)
        assert info.value.field == field, (kwargs, info.value)
    odd = tmp_path / "a,b.gguf"
    shutil.copyfile(lora, odd)
    with pytest.raises(ConfigError, match="rename or link"):
        await merge_lora(tiny_model, odd, out)
    with pytest.raises(ConfigError, match="is a directory") as info:
        await merge_lora(tiny_model, lora, tmp_path)
    assert info.value.field == "out"
    with pytest.raises(ModelNotFoundError):
        await merge_lora(tmp_path / "missing.gguf", lora, out)
    with pytest.raises(ModelFormatError, match="is an adapter"):
        await merge_lora(lora, lora, out)  # the arguments swapped
    assert not out.exists()


@pytest.mark.anyio
async def test_an_adapter_for_another_architecture_is_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    writer = gguf.GGUFWriter(None, "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), "float32"))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), "float32"))
    path = tmp_path / "qwen-lora.gguf"
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="architecture 'qwen2'") as info:
        await merge_lora(tiny_model, path, tmp_path / "x.gguf")
    assert info.value.field == "adapters"


def test_the_real_build_has_llama_export_lora_beside_llama_server() -> None:
    server = find_llama_server()
    merger = find_llama_export_lora()
    assert merger.parent == server.parent
    assert os.access(merger, os.X_OK)


def test_llama_export_lora_not_found_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    server = tmp_path / "bin" / "llama-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(server))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_EXPORT_LORA", raising=False)
    with pytest.raises(LlamaServerNotFoundError) as info:
        find_llama_export_lora()
    message = str(info.value)
    assert "LLAMA_EXPORT_LORA" in message
    assert "build-server" in message
    assert len(info.value.searched) == 5


SLOW_MERGE = """#!/bin/sh
# Stands in for a long llama-export-lora: a child in its process group, one progress line.
sleep 60 &
echo "$$ $!" > "$PIDS_FILE"
echo "merge_tensor : blk.0.attn_q.weight [64, 64, 1, 1]"
wait
"""


@pytest.mark.anyio
async def test_cancelling_kills_the_whole_process_group(
    tiny_model: Path, lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "llama-export-lora"
    fake.parent.mkdir()
    fake.write_text(SLOW_MERGE)
    fake.chmod(0o755)
    monkeypatch.setenv("PIDS_FILE", str(tmp_path / "pids"))
    out = tmp_path / "models"
    seen: list[MergeProgress] = []
    with anyio.CancelScope() as scope:

        def progress(p: MergeProgress) -> None:
            seen.append(p)
            scope.cancel()

        await merge_lora(tiny_model, lora, out / "x.gguf", binary=fake, on_progress=progress)
    assert scope.cancelled_caught
    assert seen == [MergeProgress(1, TINY_TENSORS, "blk.0.attn_q.weight", merged=True)]
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    assert gone(pids)  # the script and its child: reaped, not orphaned
    assert _names(out) == []  # no output, no temporary file
