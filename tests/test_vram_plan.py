"""VRAM plans for a Kaggle 2 x T4 machine (15360 MiB each), checked against arithmetic done
here by hand, for 7B/8B/13B/70B-like shapes (``model_shape``: no big files needed)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from llamatelemetry_async._errors import ConfigError, ModelDoesNotFitError
from llamatelemetry_async.engine import Placement
from llamatelemetry_async.models import (
    CUDA_OVERHEAD_BYTES,
    GPUSpec,
    ModelInfo,
    compute_buffer_bytes,
    kv_cells,
    model_shape,
    plan,
    probe_gpu_specs,
    read_gpu_specs,
    read_model_info,
)
from llamatelemetry_async.server import ServerConfig, ServerPlan
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

MiB = 2**20
T4 = 15360 * MiB  # what NVML reports for a Kaggle Tesla T4
OVERHEAD = 400 * MiB
T4X2 = [GPUSpec(0, "Tesla T4", T4), GPUSpec(1, "Tesla T4", T4)]


def q4_0(elements: int) -> int:
    return elements // 32 * 18  # 32 weights in 18 bytes


def q4_k(elements: int) -> int:
    return elements // 256 * 144  # 256 weights in 144 bytes


def q6_k(elements: int) -> int:
    return elements // 256 * 210


def f16(elements: int) -> int:
    return elements * 2


def llama2_7b(weight_type: str = "Q4_0") -> ModelInfo:
    return model_shape(
        n_layer=32, n_embd=4096, n_head=32, n_ff=11008, n_vocab=32000, n_ctx_train=4096,
        weight_type=weight_type,
    )  # fmt: skip


def llama3_8b(n_ctx_train: int = 8192) -> ModelInfo:
    return model_shape(
        n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
        n_ctx_train=n_ctx_train, weight_type="Q4_K", output_type="Q6_K",
    )  # fmt: skip


def llama2_13b(weight_type: str = "Q4_K") -> ModelInfo:
    return model_shape(
        n_layer=40, n_embd=5120, n_head=40, n_ff=13824, n_vocab=32000, n_ctx_train=4096,
        weight_type=weight_type,
    )  # fmt: skip


def llama2_70b() -> ModelInfo:
    return model_shape(
        n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=32000,
        n_ctx_train=4096, weight_type="Q4_K",
    )  # fmt: skip


# Per-layer and output bytes, by hand.
# Llama-2-7B: q, k, v, o are 4096 x 4096; gate, up, down 4096 x 11008; two norms of 4096 (F32).
L7_MATRIX = 4 * 4096 * 4096 + 3 * 4096 * 11008
L7 = q4_0(L7_MATRIX) + 2 * 4096 * 4  # 113,868,800
OUT7 = q4_0(32000 * 4096) + 4096 * 4  # output.weight + output_norm
EMBD7 = q4_0(32000 * 4096)  # token_embd: stays on the CPU
KV7 = 32 * 2 * 4096 * 2  # per token: 32 layers x (K + V) x 4096 elements x 2 bytes (f16)
COMPUTE7 = 4 * 512 * (32000 + 3 * 4096 + 2 * 11008)  # ubatch 512, float32


def test_parameter_counts_and_kv_bytes_by_hand() -> None:
    m = llama2_7b()
    # Llama-2-7B's published count: 6,738,415,616.
    assert m.parameter_count == 32 * (L7_MATRIX + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert m.parameter_count == 6_738_415_616
    assert m.layer_bytes == (L7,) * 32
    assert (m.output_bytes, m.input_bytes) == (OUT7, EMBD7)
    assert m.kv_bytes_per_token("f16") == KV7 == 524_288
    # Llama-3-8B: 8 KV heads of 128 -> a 1024-element K row and V row per layer.
    m8 = llama3_8b()
    assert m8.parameter_count == 8_030_261_248
    assert m8.kv_bytes_per_token("f16") == 32 * 2 * 1024 * 2  # 131,072
    assert m8.kv_bytes_per_token("q8_0") == 32 * 2 * (1024 // 32 * 34)  # 69,632
    assert m8.kv_bytes_per_token("q4_0") == 32 * 2 * (1024 // 32 * 18)  # 36,864
    assert m8.kv_bytes_per_token("q8_0", "q4_0") == 32 * (1088 + 576)
    # Tied embeddings: the output layer is the token embeddings again (on the GPU).
    tied = model_shape(
        n_layer=2, n_embd=256, n_head=4, n_ff=512, n_vocab=1000, n_ctx_train=512,
        weight_type="F16", tied_embeddings=True,
    )  # fmt: skip
    assert tied.output_bytes == 256 * 4
    assert tied.output_device_bytes == 256 * 4 + f16(1000 * 256)


def test_kv_cells_follow_llama_cpp_padding() -> None:
    assert kv_cells(4096, 4) == 4096
    assert kv_cells(3000, 3) == 3072  # pad(3000) = 3072, 1024 per slot
    assert kv_cells(2500, 3) == 3072  # pad(2500) = 2560, 853 per slot -> 1024
    assert kv_cells(100, 1) == 256
    assert kv_cells(5000, 4) == 5120  # pad(5000) = 5120, 1280 per slot


def test_compute_buffer_formula() -> None:
    assert CUDA_OVERHEAD_BYTES == OVERHEAD
    m8 = llama3_8b()
    expected = 4 * 512 * (128256 + 3 * 4096 + 2 * 14336)
    assert compute_buffer_bytes(m8) == expected == 346_554_368  # 330.5 MiB
    no_fa = compute_buffer_bytes(m8, ctx_per_slot=2048, flash_attn="off")
    assert no_fa == expected + 4 * 512 * 32 * 2048  # attention scores, float32
    q8 = compute_buffer_bytes(m8, ctx_per_slot=2048, cache_type_k="q8_0")
    assert q8 == expected + 2 * 2048 * (1024 + 1024)  # an f16 copy of one layer's K and V


def test_7b_per_gpu_fits_whole_with_its_training_context() -> None:
    vram = plan(llama2_7b(), T4X2)  # "auto": one server per GPU
    assert [s.server.name for s in vram.servers] == ["gpu0", "gpu1"]
    for server in vram.servers:
        assert (server.n_gpu_layers, server.ctx_size, server.n_parallel) == (33, 4096, 4)
        assert server.full_offload
        (gpu,) = server.devices
        assert gpu.weights_bytes == 32 * L7 + OUT7
        assert gpu.kv_bytes == KV7 * 4096  # 2 GiB
        assert gpu.compute_bytes == COMPUTE7
        assert gpu.overhead_bytes == OVERHEAD
        assert gpu.free_bytes == T4 - (32 * L7 + OUT7 + KV7 * 4096 + COMPUTE7 + OVERHEAD)
        assert (gpu.layers, gpu.output_layer) == (32, True)
        assert server.host_weights_bytes == EMBD7
        assert server.host_kv_bytes == 0
        assert server.ctx_per_slot == 1024
    assert vram.servers[1].devices[0].gpu == 1


def test_a_128k_model_gets_the_context_that_fits() -> None:
    m = llama3_8b(n_ctx_train=131072)
    layer = q4_k(2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336) + 2 * 4096 * 4
    output = q6_k(128256 * 4096) + 4096 * 4
    compute = 4 * 512 * (128256 + 3 * 4096 + 2 * 14336)
    room = T4 - OVERHEAD - compute - (32 * layer + output)
    tokens = room // 131072 // 256 * 256  # whole 256-cell steps
    ctx = tokens // (4 * 256) * (4 * 256)  # 4 slots of a multiple of 256 each
    assert ctx == 82944
    server = plan(m, T4X2, placement=Placement.single_gpu(1)).servers[0]
    assert (server.n_gpu_layers, server.ctx_size, server.n_parallel) == (33, ctx, 4)
    assert server.devices[0].free_bytes == room - 131072 * ctx
    assert any("capped at 82944" in note for note in server.notes)
    # The pair (60/40) takes the whole 131072: 20 layers on GPU 0, 12 + output on GPU 1.
    pair = plan(m, T4X2, placement=Placement.kaggle_t4x2_pair("60/40")).servers[0]
    assert (pair.ctx_size, pair.n_parallel, pair.n_gpu_layers) == (131072, 4, 33)
    gpu0, gpu1 = pair.devices
    assert (gpu0.layers, gpu0.output_layer, gpu1.layers, gpu1.output_layer) == (20, False, 12, True)
    assert gpu0.weights_bytes == 20 * layer
    assert gpu1.weights_bytes == 12 * layer + output
    kv_layer = 2 * 1024 * 2 * 131072
    assert (gpu0.kv_bytes, gpu1.kv_bytes) == (20 * kv_layer, 12 * kv_layer)


def test_13b_fits_one_t4_and_a_pair_splits_it() -> None:
    layer = q4_k(4 * 5120 * 5120 + 3 * 5120 * 13824) + 2 * 5120 * 4
    output = q4_k(32000 * 5120) + 5120 * 4
    kv_token = 40 * 2 * 5120 * 2  # 819,200
    compute = 4 * 512 * (32000 + 3 * 5120 + 2 * 13824)
    server = plan(llama2_13b(), T4X2).servers[0]
    assert (server.n_gpu_layers, server.ctx_size, server.n_parallel) == (41, 4096, 4)
    used = 40 * layer + output + kv_token * 4096 + compute + OVERHEAD
    assert server.devices[0].used_bytes == used  # about 10.4 GiB of 15
    # 50/50 over 41 offloaded layers: i/41 < 0.5 for i <= 20, so 21 layers on GPU 0.
    pair = plan(llama2_13b(), T4X2, placement=Placement.kaggle_t4x2_pair("50/50")).servers[0]
    gpu0, gpu1 = pair.devices
    assert (gpu0.layers, gpu1.layers, gpu1.output_layer) == (21, 19, True)
    assert gpu0.weights_bytes + gpu1.weights_bytes == 40 * layer + output


def test_70b_partially_offloads_and_says_what_would_fit() -> None:
    m = llama2_70b()
    layer = q4_k(2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672) + 2 * 8192 * 4
    output = q4_k(32000 * 8192) + 8192 * 4
    compute = 4 * 512 * (32000 + 3 * 8192 + 2 * 28672)
    kv_layer = 2 * 1024 * 2 * 2048  # the 2048-token floor, f16
    budget = T4 - OVERHEAD - compute
    # -ngl k puts the output layer and the last k - 1 blocks on the GPU (llama.cpp counts
    # the output layer as the last of n_layer + 1).
    k = 1 + (budget - output) // (layer + kv_layer)
    assert k == 32
    server = plan(m, T4X2).servers[0]
    assert (server.n_gpu_layers, server.ctx_size, server.n_parallel) == (k, 2048, 2)
    assert not server.full_offload
    assert server.devices[0].layers == k - 1
    assert server.host_weights_bytes == (80 - (k - 1)) * layer + q4_k(32000 * 8192)
    assert server.host_kv_bytes == (80 - (k - 1)) * kv_layer
    assert any("partial offload" in note for note in server.notes)
    assert "partial offload" in server.explain()

    # Refusing partial offload: the error lists what would fit instead.
    with pytest.raises(ModelDoesNotFitError) as single:
        plan(m, T4X2, placement=Placement.single_gpu(0), allow_partial=False)
    assert single.value.suggestions == [
        f"n_gpu_layers={k} (partial offload: the other layers run on the CPU, slower)"
    ]  # 36 GiB: not even a pair or Q2_K fits one T4
    with pytest.raises(ModelDoesNotFitError) as pair:
        plan(m, T4X2, placement=Placement.kaggle_t4x2_pair(), allow_partial=False)
    # Q2_K (~3.17 bits instead of 4.5) is ~25.5 GiB: it fits across the pair.
    assert any(s.startswith("a smaller quantization: Q2_K") for s in pair.value.suggestions)
    assert "What would fit" in str(pair.value)


def test_too_much_context_suggests_the_largest_that_fits_and_it_does() -> None:
    m = llama2_7b()
    room = T4 - OVERHEAD - COMPUTE7 - (32 * L7 + OUT7)
    largest = room // KV7 // 256 * 256 // 1024 * 1024  # 4 slots
    assert largest == 22528
    one_gpu = Placement.single_gpu(0)
    with pytest.raises(ModelDoesNotFitError) as info:
        plan(m, T4X2, placement=one_gpu, ctx_size=32768, allow_partial=False)
    suggestions = info.value.suggestions
    assert suggestions[0].startswith(f"ctx_size={largest} ")
    assert any("Placement.pairs([(0, 1)])" in s for s in suggestions)
    assert any('cache_type_k="q8_0"' in s for s in suggestions)
    # Each suggestion is true.
    assert plan(m, T4X2, placement=one_gpu, ctx_size=largest).servers[0].full_offload
    with pytest.raises(ModelDoesNotFitError):
        plan(m, T4X2, placement=one_gpu, ctx_size=largest + 1024, allow_partial=False)
    pair = plan(m, T4X2, placement=Placement.pairs([(0, 1)]), ctx_size=32768)
    assert pair.servers[0].full_offload
    q8 = plan(m, T4X2, placement=one_gpu, ctx_size=32768, cache_type="q8_0", allow_partial=False)
    assert q8.servers[0].devices[0].kv_bytes == 32 * 2 * (4096 // 32 * 34) * 32768
    # With partial offload allowed the requested context stands and fewer layers go up.
    partial = plan(m, T4X2, placement=one_gpu, ctx_size=32768).servers[0]
    assert partial.ctx_size == 32768
    assert 0 < partial.n_gpu_layers < 33


def test_an_f16_13b_is_told_about_the_pair_and_quantization() -> None:
    with pytest.raises(ModelDoesNotFitError) as info:
        plan(llama2_13b("F16"), T4X2, placement=Placement.single_gpu(0), allow_partial=False)
    text = " | ".join(info.value.suggestions)
    assert "a GPU pair: Placement.pairs([(0, 1)])" in text
    assert "a smaller quantization: Q8_0" in text
    assert (
        plan(llama2_13b("F16"), T4X2, placement=Placement.pairs([(0, 1)])).servers[0].full_offload
    )


def test_settings_given_are_kept_and_overrides_fill_only_the_rest() -> None:
    m = llama2_7b()
    one = Placement.single_gpu(0)
    assert plan(m, T4X2, placement=one, n_parallel=1).servers[0].n_parallel == 1
    fixed = plan(m, T4X2, placement=one, n_gpu_layers=10).servers[0]
    assert (fixed.n_gpu_layers, fixed.ctx_size) == (10, 4096)
    assert fixed.devices[0].layers == 9  # the output layer plus the last 9 blocks
    server = plan(m, T4X2, placement=one, ctx_size=8192).servers[0]
    config = ServerConfig(ctx_size=8192, flash_attn="on")
    assert server.config_overrides(config) == {"n_gpu_layers": 33, "n_parallel": 4}
    applied = server.apply(config)
    assert (applied.n_gpu_layers, applied.ctx_size, applied.n_parallel) == (33, 8192, 4)
    assert applied.flash_attn == "on"
    assert server.config_overrides() == {"n_gpu_layers": 33, "ctx_size": 8192, "n_parallel": 4}
    # Plain byte counts stand for GPUs 0, 1 ...; a CPU placement plans nothing.
    assert plan(m, [T4, T4]).servers[1].devices[0].capacity_bytes == T4
    cpu = plan(m, [T4], placement=Placement.cpu(1)).servers[0]
    assert (cpu.devices, cpu.config_overrides()) == ((), {})
    # ServerPlans work as a placement too (what the engine passes).
    servers = plan(m, T4X2, placement=[ServerPlan("gpu1", (1,))]).servers
    assert servers[0].devices[0].gpu == 1


def test_explain_names_every_byte() -> None:
    vram = plan(llama2_7b(), T4X2, placement=Placement.kaggle_t4x2_pair("60/40"))
    text = vram.explain()
    assert "gpu0+1: all 32 layers + output, ctx 4096 (4 slots of 1024)" in text
    assert "GPU 0 (Tesla T4): 20 layers: weights" in text
    assert "GPU 1 (Tesla T4): 12 layers + output: weights" in text
    assert "\n" not in vram.summary()


def test_bad_inputs_are_config_errors(tiny_model: Path) -> None:
    m = llama2_7b()
    with pytest.raises(ConfigError) as bad_gpu:
        plan(m, [0])
    assert bad_gpu.value.field == "gpus"
    with pytest.raises(ConfigError, match="GPU\\(s\\) \\[3\\]"):
        plan(m, T4X2, placement=[ServerPlan("gpu3", (3,))])
    with pytest.raises(ConfigError) as bad_cache:
        plan(m, T4X2, cache_type="q9_9")
    assert bad_cache.value.field == "cache_type"
    # The tiny model's heads are 16 wide: llama.cpp refuses a q8_0 cache (blocks of 32).
    with pytest.raises(ConfigError, match="multiple of 32") as narrow:
        plan(read_model_info(tiny_model), T4X2, cache_type="q8_0")
    assert narrow.value.field == "cache_type"
    with pytest.raises(ConfigError):
        plan(m, T4X2, ctx_size=-1)


def test_gpu_specs_from_nvml() -> None:
    nvml = FakeNVML(
        [
            FakeGPU(name="Tesla T4", memory_total=T4, memory_used=300 * MiB),
            FakeGPU(name="Tesla T4", memory_total=T4, memory_used=0),
        ]
    )
    specs = read_gpu_specs(nvml=nvml)
    assert specs == [
        GPUSpec(0, "Tesla T4", T4, free_bytes=T4 - 300 * MiB),
        GPUSpec(1, "Tesla T4", T4, free_bytes=T4),
    ]
    assert read_gpu_specs([1], nvml=nvml) == specs[1:]
    assert not nvml.initialised  # shut down again
    assert read_gpu_specs(nvml=FakeNVML(no_driver=True)) == []
    # Free memory is what a plan uses.
    server = plan(llama2_7b(), specs).servers[0]
    assert server.devices[0].capacity_bytes == T4 - 300 * MiB


def test_a_row_split_keeps_each_layers_kv_cache_on_the_layers_gpu() -> None:
    # llama.cpp b11434 assigns each layer a GPU by the split in every split mode; in a row split
    # the matrices' rows spread over both GPUs, but the layer's KV cache stays on its GPU.
    m = llama2_7b()
    row = Placement.kaggle_t4x2_pair("60/40", split_mode="row")
    server = plan(m, T4X2, placement=row, ctx_size=4096, n_parallel=4).servers[0]
    gpu0, gpu1 = server.devices
    kv_layer = KV7 // 32 * 4096
    assert (gpu0.kv_bytes, gpu1.kv_bytes) == (20 * kv_layer, 12 * kv_layer)
    assert gpu0.weights_bytes == 32 * math.ceil(L7 * 0.6) + math.ceil(OUT7 * 0.6)
    assert gpu1.weights_bytes == 32 * math.ceil(L7 * 0.4) + math.ceil(OUT7 * 0.4)
    assert (gpu0.layers, gpu1.layers, gpu0.output_layer, gpu1.output_layer) == (32, 32, True, True)
    # A tensor split shares the KV cache by the proportions instead.
    tensor = Placement.kaggle_t4x2_pair("60/40", split_mode="tensor")
    gpu0, gpu1 = plan(m, T4X2, placement=tensor, ctx_size=4096, n_parallel=4).servers[0].devices
    assert (gpu0.kv_bytes, gpu1.kv_bytes) == (
        32 * math.ceil(kv_layer * 0.6),
        32 * math.ceil(kv_layer * 0.4),
    )


def test_auto_gpu_layers_are_planned_and_written_into_the_config() -> None:
    m = llama2_13b()
    one = Placement.single_gpu(0)
    server = plan(m, T4X2, placement=one, n_gpu_layers="auto").servers[0]
    assert server.n_gpu_layers == 41
    # "auto" is replaced, so the server runs what the plan describes.
    assert server.config_overrides(ServerConfig(n_gpu_layers="auto"))["n_gpu_layers"] == 41
    assert "n_gpu_layers" not in server.config_overrides(ServerConfig(n_gpu_layers=7))


def test_cache_type_k_is_serverconfigs_name_and_cache_type_another() -> None:
    m = llama3_8b()
    one = Placement.single_gpu(0)
    by_k = plan(m, T4X2, placement=one, ctx_size=8192, cache_type_k="q8_0").servers[0]
    by_alias = plan(m, T4X2, placement=one, ctx_size=8192, cache_type="q8_0").servers[0]
    assert by_k == by_alias
    assert (by_k.cache_type_k, by_k.cache_type_v) == ("q8_0", "q8_0")
    assert by_k.devices[0].kv_bytes == 32 * 2 * (1024 // 32 * 34) * 8192
    with pytest.raises(ConfigError) as both:
        plan(m, T4X2, cache_type_k="q8_0", cache_type="q4_0")
    assert both.value.field == "cache_type"
    with pytest.raises(ConfigError) as bad:
        plan(m, T4X2, cache_type_k="q9_9")
    assert bad.value.field == "cache_type_k"


def test_moe_compute_buffer_counts_the_chosen_experts() -> None:
    # Mixtral-8x7B-like: 8 experts of 14336, 2 per token (no expert_feed_forward_length key:
    # llama.cpp's MoE FFN length is feed_forward_length then).
    dense = model_shape(
        n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=32000,
        n_ctx_train=32768,
    )  # fmt: skip
    moe = dataclasses.replace(dense, expert_count=8, expert_used_count=2)
    assert compute_buffer_bytes(dense) == 4 * 512 * (32000 + 3 * 4096 + 2 * 14336)
    assert compute_buffer_bytes(moe) == 4 * 512 * (
        32000 + 3 * 4096 + 2 * (2 * 14336) + (8 + 2 * 4096)
    )
    # Qwen3-30B-A3B-like: 128 experts of 768, 8 per token: 8 x 768 = 6144 wide.
    qwen = dataclasses.replace(
        dense, feed_forward_length=6144, expert_count=128, expert_used_count=8,
        expert_feed_forward_length=768,
    )  # fmt: skip
    assert compute_buffer_bytes(qwen) == 4 * 512 * (32000 + 3 * 4096 + 2 * 6144 + 128 + 8 * 4096)


def test_sliding_window_layers_are_planned_at_their_size() -> None:
    # Gemma-2-9B-like: 42 layers, every other one sliding-window (4096), f16, 8192 trained.
    full = model_shape(
        n_layer=42, n_embd=3584, n_head=16, n_head_kv=8, head_dim=256, n_ff=14336,
        n_vocab=256000, n_ctx_train=8192, weight_type="Q4_K", tied_embeddings=True,
    )  # fmt: skip
    swa = dataclasses.replace(
        full, architecture="gemma2", sliding_window=4096, swa_layers=(True, False) * 21
    )
    row = 2 * (8 * 256 * 2)  # K + V rows, f16
    one = Placement.single_gpu(0)
    a = plan(full, T4X2, placement=one, ctx_size=8192, n_parallel=1).servers[0]
    b = plan(swa, T4X2, placement=one, ctx_size=8192, n_parallel=1).servers[0]
    assert a.devices[0].kv_bytes == 42 * row * 8192
    # SWA layers: pad(min(8192, 4096 + 512), 256) = 4608 cells.
    assert b.devices[0].kv_bytes == 21 * row * 8192 + 21 * row * 4608
    c = plan(swa, T4X2, placement=one, ctx_size=8192, n_parallel=1, swa_full=True).servers[0]
    assert c.devices[0].kv_bytes == a.devices[0].kv_bytes
    # Partial offload: the host keeps the KV cache of its layers, at their own sizes.
    d = plan(swa, T4X2, placement=one, ctx_size=8192, n_parallel=1, n_gpu_layers=40).servers[0]
    assert d.host_kv_bytes == row * (4608 + 8192 + 4608)  # layers 0, 1, 2: SWA, full, SWA
    assert d.devices[0].kv_bytes == b.devices[0].kv_bytes - d.host_kv_bytes


def test_why_nvml_gave_no_memory_figures() -> None:
    specs, why = probe_gpu_specs(None, nvml=FakeNVML(no_driver=True))
    assert specs == []
    assert why is not None
    assert why.startswith("NVML did not start (")
    specs, why = probe_gpu_specs(None, nvml=FakeNVML([FakeGPU(name="Tesla T4")]))
    assert [s.name for s in specs] == ["Tesla T4"]
    assert why is None
