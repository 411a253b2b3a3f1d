"""The NVML sampler on a fake NVML with pynvml's surface, the real no-driver path, and
energy attribution on a scripted trace."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import AsyncEngine, Placement, setup_telemetry
from llamatelemetry_async.gpu import GPUSample, GPUSampler, RequestWindow, attribute_energy
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

pytestmark = pytest.mark.anyio


async def _lag_while(sampler_ticks: int, sampler: GPUSampler) -> list[float]:
    """Event-loop lag of a 1 ms ticker until the sampler has ticked ``sampler_ticks`` times."""
    lags: list[float] = []
    start_ticks = sampler.ticks
    with anyio.fail_after(20):
        while sampler.ticks < start_ticks + sampler_ticks:
            before = time.perf_counter()
            await anyio.sleep(0.001)  # the ticker whose lateness is the measurement
            lags.append(time.perf_counter() - before - 0.001)
    return lags


async def test_sampler_survives_every_nvml_failure_without_stalling_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "llamatelemetry_async.gpu")
    gpus = [
        FakeGPU(unsupported={"temperature_c", "ecc_errors"}, processes=[(4242, 2**30)]),
        FakeGPU(name="NVIDIA H100 (flaky)", fail_next={"power_w": 2}, block={"energy_j": 0.05}),
        FakeGPU(name="NVIDIA H100 (lost)"),
    ]
    nvml = FakeNVML(gpus)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with GPUSampler(interval=0.01, nvml=nvml, meter_provider=provider) as sampler:
        assert sampler.available
        assert sampler.reason is None
        assert sampler.gpus == [0, 1, 2]
        lags = await _lag_while(5, sampler)
        gpus[2].lost = True  # the GPU disappears mid-run
        lags += await _lag_while(5, sampler)
        latest = sampler.latest()
        ring0 = sampler.samples(0)
    # NVML was only ever called off the event loop's thread.
    assert threading.main_thread().name not in nvml.threads
    # Each tick blocked for 50 ms in a worker thread; the loop kept its beat. Had a call run
    # on the loop, every tick would lag >= 50 ms; half of that separates the two cases on a
    # busy machine too (the <= 5 ms goal itself is measured by benchmarks/compare_clients.py).
    lags.sort()
    assert lags[int(len(lags) * 0.99) - 1] < 0.025, lags[-5:]
    # Unsupported metrics are absent (logged once), the rest present.
    assert latest[0].temperature_c is None
    assert latest[0].ecc_errors is None
    assert latest[0].power_w == 300.0
    assert latest[0].memory_total == 80 * 2**30
    assert latest[0].processes == ((4242, 2**30),)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("does not support temperature_c" in m for m in messages) == 1
    # Transient errors skipped one reading each, then power came back.
    assert latest[1].power_w == 300.0
    assert sum(s.power_w is None for s in sampler.samples(1)) == 2
    # The lost GPU stopped being sampled, with one warning.
    assert sum("is lost" in m for m in messages) == 1
    assert latest[2].t < latest[0].t
    # The energy counter grows with time, and the ring is ordered.
    assert [s.t for s in ring0] == sorted(s.t for s in ring0)
    assert ring0[-1].energy_j is not None
    assert ring0[0].energy_j is not None
    assert ring0[-1].energy_j > ring0[0].energy_j
    # Exported with the hardware semantic-convention names.
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"hw.gpu.utilization", "hw.power", "hw.energy", "hw.gpu.memory.usage"} <= names


async def test_window_and_sample_now() -> None:
    async with GPUSampler(interval=3600, nvml=FakeNVML([FakeGPU()])) as sampler:
        t0 = time.monotonic()
        first = (await sampler.sample_now())[0]
        second = (await sampler.sample_now())[0]
        t1 = time.monotonic()
        window = sampler.window(t0, t1)[0]
    assert first in window
    assert second in window
    assert sampler.window(t1 + 1, t1 + 2) == {0: []}


async def test_no_driver_is_unavailable_not_an_error() -> None:
    async with GPUSampler(nvml=FakeNVML(no_driver=True)) as fake:
        assert not fake.available
        assert fake.reason is not None
        assert "Library Not Found" in fake.reason
    # The real nvidia-ml-py on this machine: no driver, no crash.
    async with GPUSampler(interval=0.01) as real:
        assert not real.available
        assert real.reason is not None
        assert real.reason.startswith("unavailable")
        assert real.latest() == {}


def _sample(t: float, energy: float | None, power: float | None = 100.0) -> GPUSample:
    return GPUSample(index=0, t=t, name="gpu", energy_j=energy, power_w=power, utilization_gpu=50)


def test_energy_of_overlapping_requests_adds_up_to_the_gpu_total() -> None:
    # 100 J/s for 10 s on the counter; three requests overlap in time.
    samples = [_sample(t, 100.0 * t) for t in range(11)]
    requests = [
        RequestWindow("a", 0.0, 6.0, tokens=60),  # 10 tok/s
        RequestWindow("b", 2.0, 10.0, tokens=240),  # 30 tok/s
        RequestWindow("c", 4.5, 5.5, tokens=10),  # 10 tok/s, shorter than... anything
    ]
    shares = attribute_energy(samples, requests)
    assert sum(s.joules for s in shares.values()) == pytest.approx(1000.0)
    # 0-2 s: a alone (200 J); 2-4.5: a 1/4 (62.5); 4.5-5.5: a 1/5 (20); 5.5-6: a 1/4 (12.5).
    assert shares["a"].joules == pytest.approx(200 + 62.5 + 20 + 12.5)
    assert shares["c"].joules == pytest.approx(20.0)
    assert {s.method for s in shares.values()} == {"counter"}
    assert shares["a"].mean_power_w == 100.0


def test_a_stalled_counter_falls_back_to_power_times_time() -> None:
    # The counter updates once, mid-way: before it, the GPU drew 200 W with no counter change.
    samples = [_sample(0.0, 500.0, 200.0), _sample(1.0, 500.0, 200.0), _sample(2.0, 800.0, 200.0)]
    [share] = attribute_energy(samples, [RequestWindow("r", 0.0, 2.0, tokens=5)]).values()
    assert share.joules == pytest.approx(200.0 + 300.0)
    assert share.method == "mixed"
    idle = attribute_energy(samples, [RequestWindow("r", 0.2, 0.4, tokens=1)])
    assert idle["r"].method == "power"
    assert idle["r"].joules == pytest.approx(40.0)  # 200 W x 0.2 s


async def test_engine_puts_each_requests_energy_on_its_span(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One "GPU" server (CUDA_VISIBLE_DEVICES=0; the CPU build of llama-server runs it on the
    # CPU) and a fake NVML reporting 300 W: the engine's own energy path runs for real.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry("t", span_exporters=[spans], metric_readers=[])
    sampler = GPUSampler(interval=0.02, nvml=FakeNVML([FakeGPU(power_w=300.0)]))
    engine = AsyncEngine(
        tiny_model, placement=Placement.per_gpu(), telemetry=telemetry, gpu_sampler=sampler
    )
    try:
        async with engine:
            assert engine.servers[0].gpus == (0,)
            assert engine.gpu_sampler is sampler
            assert sampler.available
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(_stream_some, engine, f"prompt {i}")
            await engine.completion("x", n_predict=4)
        telemetry.tracer_provider.force_flush()
        finished = spans.get_finished_spans()
    finally:
        telemetry.shutdown()
    assert len(finished) == 3
    for span in finished:
        attrs: dict[str, Any] = dict(span.attributes or {})
        assert attrs["llamatelemetry.gpu.energy_j"] > 0
        assert attrs["llamatelemetry.gpu.energy_method"] in ("counter", "power", "mixed")
        assert attrs["llamatelemetry.gpu.mean_power_w"] == 300.0
        assert attrs["llamatelemetry.gpu.energy_j_per_token"] == pytest.approx(
            attrs["llamatelemetry.gpu.energy_j"] / attrs["gen_ai.usage.output_tokens"]
        )


async def _stream_some(engine: AsyncEngine, prompt: str) -> None:
    async with engine.stream(prompt, n_predict=64, ignore_eos=True) as stream:
        async for _ in stream:
            pass


async def test_engine_on_a_cpu_machine_runs_on_without_nvml(tiny_model: Path) -> None:
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1), gpu_sampler=True) as engine:
        assert engine.gpu_sampler is not None
        assert not engine.gpu_sampler.available
        assert (await engine.completion("x", n_predict=2)).usage.completion_tokens == 2
