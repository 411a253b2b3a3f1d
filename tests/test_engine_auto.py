"""The engine plans what its config leaves unset on GPUs, resolves model specs, and sets LoRA
adapters on every server. A "GPU" here is CUDA_VISIBLE_DEVICES=0 with a fake NVML saying how
much memory it has; the CPU build of llama-server runs the server (it ignores the offload)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import gguf
import pytest

from llamatelemetry_async._errors import ConfigError, ModelDoesNotFitError, ModelNotFoundError
from llamatelemetry_async.engine import AsyncEngine, Placement
from llamatelemetry_async.models import CUDA_OVERHEAD_BYTES, read_model_info
from llamatelemetry_async.server import ServerConfig
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML
from llamatelemetry_async.testing._tiny_lora import write_tiny_lora

pytestmark = [
    pytest.mark.anyio,
    # These GPU servers are CPU builds standing in for CUDA ones (NVML is the fake): the
    # engine rightly warns that a CPU build was given GPUs.
    pytest.mark.filterwarnings("ignore:.*given to a CPU build:llamatelemetry_async.LlamaWarning"),
]

MiB = 2**20
USED = 512 * MiB  # taken by something else: the plan only uses what is free


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The engine's own clients take the default path: run each test on both loops."""
    return str(request.param)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, free: int) -> FakeNVML:
    """GPU 0 with ``free`` bytes free, seen through NVML by discovery and by the planner."""
    nvml = FakeNVML([FakeGPU(name="Tesla T4", memory_total=USED + free, memory_used=USED)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    return nvml


def free_for_tokens(tiny_model: Path, tokens: int) -> int:
    """Free memory that holds the whole tiny model plus ``tokens`` of f16 KV cache, by hand."""
    info = read_model_info(tiny_model)
    weights = 2 * info.layer_bytes[0] + info.output_bytes  # both blocks + output (F16)
    compute = 4 * 512 * (info.vocab_size + 3 * 64 + 2 * 128)  # n_embd 64, n_ff 128
    kv_per_token = 2 * (2 * 16 * 2) * 2  # 2 layers x (K + V) x 2 heads x 16 x 2 bytes
    return CUDA_OVERHEAD_BYTES + compute + weights + kv_per_token * tokens


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


async def test_unset_settings_are_planned_to_fit_the_gpu(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for 3200 tokens: the context is capped at 3072 (whole 256-cell steps), which
    # gives 3 slots (each keeps >= 1024 tokens) of 1024; all 2 layers + output go up.
    fake_gpu(monkeypatch, free_for_tokens(tiny_model, 3200))
    caplog.set_level(logging.INFO, "llamatelemetry_async.engine")
    async with AsyncEngine(str(tiny_model), gpu_sampler=False) as engine:  # "auto"
        assert engine.model == tiny_model  # the spec (a str) resolved to the file
        vram = engine.vram_plan
        assert vram is not None
        server = vram.server("gpu0")
        assert (server.n_gpu_layers, server.ctx_size, server.n_parallel) == (3, 3072, 3)
        assert server.devices[0].free_bytes == 256 * (3200 - 3072)  # KV room for 128 tokens
        argv = engine._process("gpu0").argv
        assert flag(argv, "--n-gpu-layers") == "3"
        assert flag(argv, "--ctx-size") == "3072"
        assert flag(argv, "--parallel") == "3"
        assert engine.servers[0].slots == 3  # what the running server reports (/props)
        reply = await engine.completion("Once upon a time", n_predict=4)
        assert reply.usage.completion_tokens == 4
    assert any("VRAM plan for tiny.gguf: gpu0: all 2 layers" in r.message for r in caplog.records)


async def test_settings_the_config_gives_are_kept(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpu(monkeypatch, free_for_tokens(tiny_model, 3200))
    config = ServerConfig(n_parallel=2, n_gpu_layers="all")
    async with AsyncEngine(tiny_model, server=config, gpu_sampler=False) as engine:
        argv = engine._process("gpu0").argv
        assert flag(argv, "--parallel") == "2"
        assert flag(argv, "--n-gpu-layers") == "all"
        assert flag(argv, "--ctx-size") == "3072"  # planned: a multiple of 2 x 256
        assert engine.servers[0].slots == 2


async def test_a_model_that_does_not_fit_fails_before_any_server_starts(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpu(monkeypatch, 100 * MiB)  # less than the CUDA overhead alone
    engine = AsyncEngine(tiny_model, gpu_sampler=False)
    with pytest.raises(ModelDoesNotFitError, match="does not fit server gpu0") as info:
        async with engine:
            pass
    assert engine.servers == []
    # The reason is the GPU's free memory, not the model: no model setting would help.
    assert "needs on it before any layer" in str(info.value)
    assert info.value.suggestions[-1] == "the CPU: Placement.cpu()"


async def test_nothing_is_planned_without_memory_figures_or_on_the_cpu(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA_VISIBLE_DEVICES names a GPU but NVML has no driver: llama-server's defaults stand.
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(no_driver=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    async with AsyncEngine(tiny_model, gpu_sampler=False) as engine:
        assert engine.vram_plan is None
        argv = engine._process("gpu0").argv
        assert (flag(argv, "--n-gpu-layers"), flag(argv, "--ctx-size")) == ("all", None)
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1)) as engine:
        assert engine.vram_plan is None
        assert flag(engine._process("cpu0").argv, "--ctx-size") is None


async def test_an_unknown_model_name_is_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        async with AsyncEngine("no-such-model-anywhere", placement=Placement.cpu(1)):
            pass
    assert info.value.tried


async def test_lora_adapters_on_every_server(tiny_model: Path, tmp_path: Path) -> None:
    lora = write_tiny_lora(tmp_path / "lora.gguf")
    config = ServerConfig(lora=(str(lora),))
    greedy: dict[str, Any] = {"n_predict": 12, "temperature": 0, "cache_prompt": False}
    async with AsyncEngine(tiny_model, placement=Placement.cpu(2), server=config) as engine:
        adapters = await engine.each_server(lambda client: client.lora_adapters())
        assert sorted(adapters) == ["cpu0", "cpu1"]
        for entries in adapters.values():
            assert [(a["id"], a["path"], a["scale"]) for a in entries] == [(0, str(lora), 1.0)]
        with_lora = {(await engine.completion("Once upon a time", **greedy)).content for _ in "ab"}
        assert len(with_lora) == 1  # both servers, same adapter, same greedy text

        await engine.set_lora_adapters([{"id": 0, "scale": 0.0}])
        adapters = await engine.each_server(lambda client: client.lora_adapters())
        assert [entries[0]["scale"] for entries in adapters.values()] == [0.0, 0.0]
        without = {(await engine.completion("Once upon a time", **greedy)).content for _ in "ab"}
        assert len(without) == 1
        assert without != with_lora  # the adapter changes what the model writes

        await engine.set_lora_adapters({0: 1.0})
        again = {(await engine.completion("Once upon a time", **greedy)).content for _ in "ab"}
        assert again == with_lora

        with pytest.raises(ConfigError, match="no LoRA adapter with id \\[3\\]"):
            await engine.set_lora_adapters([{"id": 3, "scale": 1.0}])
        with pytest.raises(ConfigError) as bad:
            await engine.set_lora_adapters([{"id": 0, "scale": "high"}])
        assert bad.value.field == "adapters"
        adapters = await engine.each_server(
            lambda client: client.lora_adapters()
        )  # the refused calls changed nothing
        assert [entries[0]["scale"] for entries in adapters.values()] == [1.0, 1.0]


async def test_model_facts_come_from_any_server_without_a_slot(tiny_model: Path) -> None:
    from llamatelemetry_async import EngineBusyError, UsageError

    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), max_waiting=0)
    with pytest.raises(UsageError, match="not running"):
        await engine.tokenize("hello")
    async with engine:
        slots = engine.servers[0].slots
        ids = await engine.tokenize("Once upon a time")
        assert ids
        assert all(isinstance(i, int) for i in ids)
        assert (await engine.detokenize(ids)).strip() == "Once upon a time"
        assert (await engine.props())["total_slots"] == slots
        # Every slot busy and no waiting room: a completion is refused, tokenize still works.
        streams = [engine.stream("x", n_predict=64) for _ in range(slots)]
        for stream in streams:
            await stream.__aenter__()
        try:
            with pytest.raises(EngineBusyError):
                await engine.completion("y", n_predict=1)
            assert await engine.tokenize("Once upon a time") == ids
        finally:
            for stream in streams:
                await stream.aclose()


async def test_auto_gpu_layers_become_the_planned_count(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpu(monkeypatch, free_for_tokens(tiny_model, 3200))
    config = ServerConfig(n_gpu_layers="auto")
    async with AsyncEngine(tiny_model, server=config, gpu_sampler=False) as engine:
        vram = engine.vram_plan
        assert vram is not None
        assert vram.server("gpu0").n_gpu_layers == 3
        # The server runs what the plan says, not llama.cpp's own "auto".
        assert flag(engine._process("gpu0").argv, "--n-gpu-layers") == "3"


async def test_lora_adapters_are_planned_with_their_layers(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = write_tiny_lora(tmp_path / "lora.gguf")
    adapter = gguf.GGUFReader(lora)
    adapter_bytes = sum(int(t.n_bytes) for t in adapter.tensors)
    assert all(str(t.name).startswith("blk.") for t in adapter.tensors)
    # Exactly the room for the model, its adapter and 3072 tokens of KV cache.
    fake_gpu(monkeypatch, free_for_tokens(tiny_model, 3072) + adapter_bytes)
    plain = read_model_info(tiny_model)
    async with AsyncEngine(
        tiny_model, server=ServerConfig(lora=(str(lora),)), gpu_sampler=False
    ) as engine:
        vram = engine.vram_plan
        assert vram is not None
        server = vram.server("gpu0")
        (gpu,) = server.devices
        assert gpu.weights_bytes == sum(plain.layer_bytes) + plain.output_bytes + adapter_bytes
        assert (server.ctx_size, gpu.free_bytes) == (3072, 0)


async def test_a_restarted_server_gets_the_adapter_scales_back(
    tiny_model: Path, tmp_path: Path
) -> None:
    lora = write_tiny_lora(tmp_path / "lora.gguf")
    config = ServerConfig(lora=(str(lora),))  # scale 1.0 on the command line
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1), server=config) as engine:
        await engine.set_lora_adapters({0: 0.25})
        first_pid = engine.servers[0].pid
        process = engine._process("cpu0")
        exited = process.exited  # this run's: set once the killed process is reaped
        process.send_signal(signal.SIGKILL)
        with anyio.fail_after(30):
            await exited.wait()
            # The request waits for the restarted server, which is ready only once it has
            # the engine's scales again.
            await engine.completion("again", n_predict=1)
        assert engine.servers[0].pid != first_pid
        adapters = await engine.each_server(lambda client: client.lora_adapters())
        assert [entry["scale"] for entry in adapters["cpu0"]] == [0.25]
