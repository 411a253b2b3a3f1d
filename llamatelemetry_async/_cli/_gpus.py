"""``gpus``: the GPUs NVML sees, which of them this process may use, and a live sample."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import anyio

from ..gpu import GPUSample, GPUSampler, visible_gpus
from ..models import human_bytes
from ..telemetry import gpu_resource_attributes
from ._common import EXIT_OK, run

__all__ = ["GPUInventory", "add_parser", "describe_sample", "inventory"]

_EPILOG = """\
examples:
  llamatelemetry-async gpus
  llamatelemetry-async gpus --json
  CUDA_VISIBLE_DEVICES=1 llamatelemetry-async gpus

Without a GPU, driver or NVML library it says why and exits 0: the engine then runs
llama-server on the CPU (placement auto).
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    gpus = sub.add_parser(
        "gpus",
        parents=[common],
        help="list the GPUs (NVML) with a live sample of each",
        description="List every GPU NVML reports, mark the ones this process may use "
        "(CUDA_VISIBLE_DEVICES), and take one live sample of each: utilization, memory, "
        "power, temperature, clocks and the processes using it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gpus.add_argument("--json", action="store_true", help="print JSON instead of a table")
    gpus.set_defaults(func=lambda args: run(_gpus, args))


@dataclasses.dataclass(frozen=True)
class GPUInventory:
    """What ``gpus`` reports: the samples, which GPUs are usable, and why none when none."""

    available: bool
    reason: str | None
    samples: list[GPUSample]
    visible: list[int]
    system: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "visible": self.visible,
            "system": self.system,
            "gpus": [
                {**dataclasses.asdict(s), "visible": s.index in self.visible} for s in self.samples
            ],
        }


async def inventory(nvml: Any = None) -> GPUInventory:
    """Sample every GPU once; ``nvml`` is the NVML binding (tests pass the fake one)."""
    async with GPUSampler(nvml=nvml) as sampler:
        if not sampler.available:
            reason = (sampler.reason or "").removeprefix("unavailable: ")
            return GPUInventory(False, reason, [], [], {})
        samples = list((await sampler.sample_now()).values())
    if nvml is None:
        visible = await anyio.to_thread.run_sync(visible_gpus)  # NVML init blocks
        system = await anyio.to_thread.run_sync(gpu_resource_attributes)
    else:  # a given binding: no real NVML to narrow with or to ask about the driver
        visible = [s.index for s in samples]
        system = {}
    return GPUInventory(True, None, samples, visible, system)


def describe_sample(s: GPUSample) -> str:
    """One line for one GPU: name, utilization, memory, power, temperature, clocks."""
    parts = [f"GPU {s.index} {s.name}"]
    if s.utilization_gpu is not None:
        parts.append(f"{s.utilization_gpu:.0f}% busy")
    if s.memory_used is not None and s.memory_total is not None:
        parts.append(f"{human_bytes(s.memory_used)} / {human_bytes(s.memory_total)} used")
    if s.power_w is not None:
        limit = f" / {s.power_limit_w:.0f}" if s.power_limit_w is not None else ""
        parts.append(f"{s.power_w:.0f}{limit} W")
    if s.temperature_c is not None:
        parts.append(f"{s.temperature_c:.0f} °C")
    if s.sm_clock_mhz is not None:
        parts.append(f"SM {s.sm_clock_mhz} MHz")
    if s.processes:
        n = len(s.processes)
        parts.append(f"{n} process{'es' if n != 1 else ''}")
    return ", ".join(parts)


async def _gpus(args: argparse.Namespace, nvml: Any = None) -> int:
    report = await inventory(nvml)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK
    if not report.available:
        print(f"no GPU available: {report.reason}")
        print("llama-server runs on the CPU here (placement auto); see `gpus --help`")
        return EXIT_OK
    system = report.system
    if system:
        driver = system.get("gpu.driver.version", "?")
        print(f"NVIDIA driver {driver}, CUDA {system.get('gpu.cuda.version', '?')}")
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        print(f"CUDA_VISIBLE_DEVICES={cuda}: this process may use GPUs {report.visible}")
    for sample in report.samples:
        mark = "" if sample.index in report.visible else "  (not visible to this process)"
        print(describe_sample(sample) + mark)
        for pid, used in sample.processes:
            print(f"    pid {pid}: {human_bytes(used)}")
    return EXIT_OK
