"""``inspect MODEL``: what a GGUF file holds, and a VRAM plan for the GPUs."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import anyio

from ..models import GPUSpec, human_bytes, inspect_model, plan, read_gpu_specs
from ._common import EXIT_OK, add_placement_options, gpu_memory, placement_from, resolve, run

if TYPE_CHECKING:
    from ..models import ModelInfo, VRAMPlan

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  llamatelemetry-async inspect model.gguf                  plan for this machine's GPUs
  llamatelemetry-async inspect model.gguf --gpu-mem 15GiB x2          two 15 GiB GPUs
  llamatelemetry-async inspect model.gguf --gpu-mem 15GiB x2 --preset kaggle-t4x2-pair:60/40
  llamatelemetry-async inspect model.gguf --gpu-mem 80GiB --ctx-size 32768 --parallel 8
  llamatelemetry-async inspect qwen2.5-0.5b-instruct --json

MODEL is a path, a Hub file (owner/repo:file.gguf) or a registry name. The plan chooses,
per server, the GPU layers, context and slots that fit (settings you give are kept), and
shows the bytes on each GPU. Exit status 1 when the model does not fit; the error lists
settings that would.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        help="show a GGUF model's shape and a VRAM plan for the GPUs",
        description="Read a GGUF file's header and tensor table (not its weights) and plan "
        "how it fits the visible GPUs, or the GPUs --gpu-mem describes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument(
        "model", metavar="MODEL", help="a .gguf path, owner/repo:file.gguf, a name"
    )
    inspect.add_argument(
        "--gpu-mem",
        nargs="+",
        metavar="SIZE",
        help="plan for GPUs of these sizes instead of the visible ones: 15GiB x2, 16GB,24GB",
    )
    inspect.add_argument(
        "--cache-type", default="f16", metavar="TYPE", help="KV cache type (f16, q8_0, q4_0...)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_placement_options(inspect)
    inspect.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    sizes = gpu_memory(args.gpu_mem) if args.gpu_mem is not None else None  # usage first
    return run(lambda a: _inspect(a, sizes), args)


async def _inspect(args: argparse.Namespace, sizes: list[int] | None) -> int:
    info = await inspect_model(await resolve(args.model))
    if sizes is not None:
        specs = [GPUSpec(i, "--gpu-mem", size) for i, size in enumerate(sizes)]
        source = "--gpu-mem"
    else:
        from ..gpu import visible_gpus

        def visible_specs() -> list[GPUSpec]:  # NVML: blocking
            return read_gpu_specs(visible_gpus())

        specs = await anyio.to_thread.run_sync(visible_specs)
        source = "NVML, free memory"
    if args.json:
        vram = _plan(info, specs, args) if specs else None
        print(json.dumps(_json(info, vram, specs), indent=2, default=str))
        return EXIT_OK
    print(_describe(info))
    print()
    if not specs:
        print("VRAM plan: no GPU visible here (NVML found none); plan for GPUs you do not")
        print("have here with --gpu-mem, e.g. --gpu-mem 15GiB x2 for Kaggle's two T4s")
        return EXIT_OK
    vram = _plan(info, specs, args)  # ModelDoesNotFitError: exit 1, with what would fit
    gpus = ", ".join(f"GPU {s.index} {human_bytes(s.available_bytes)}" for s in specs)
    print(f"VRAM plan ({source}: {gpus}):")
    for server in vram.servers:
        print(server.explain())
    return EXIT_OK


def _plan(info: ModelInfo, specs: list[GPUSpec], args: argparse.Namespace) -> VRAMPlan:
    return plan(
        info,
        specs,
        ctx_size=args.ctx_size,
        n_parallel=args.parallel,
        n_gpu_layers=args.n_gpu_layers,
        cache_type=args.cache_type,
        placement=placement_from(args),
    )


def _describe(info: ModelInfo) -> str:
    rows = [
        ("file", f"{info.path} ({human_bytes(info.file_size)})"),
        ("architecture", info.architecture),
        ("quantization", f"{info.file_type or '?'} ({info.bits_per_weight:.2f} bits per weight)"),
        ("parameters", f"{info.parameter_count:,} in {info.tensor_count} tensors"),
        ("weights", human_bytes(info.weight_bytes)),
        (
            "layers",
            f"{info.block_count}; {info.head_count} heads, {info.head_count_kv} KV heads "
            f"of {info.head_dim_k}",
        ),
        ("embedding", f"{info.embedding_length}, feed-forward {info.feed_forward_length or '?'}"),
        ("context", f"{info.context_length} tokens (training)"),
        ("vocabulary", f"{info.vocab_size} tokens{_special_tokens(info)}"),
        ("chat template", "yes" if info.chat_template else "none"),
        (
            "KV cache",
            ", ".join(
                f"{human_bytes(info.kv_bytes_per_token(t))}/token {t}" for t in ("f16", "q8_0")
            ),
        ),
        (
            "tensor types",
            ", ".join(
                f"{name} x{stats.count} ({human_bytes(stats.nbytes)})"
                for name, stats in sorted(info.tensor_types.items())
            ),
        ),
    ]
    if info.rope_freq_base is not None:
        rows.append(("rope", f"freq base {info.rope_freq_base:g}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [info.name or info.architecture] + [f"  {name:<{width}}  {value}" for name, value in rows]
    )


def _special_tokens(info: ModelInfo) -> str:
    parts = [
        f"{label} {text!r} ({token})"
        for label, text, token in (
            ("BOS", info.bos_token, info.bos_token_id),
            ("EOS", info.eos_token, info.eos_token_id),
        )
        if token is not None
    ]
    return "; " + ", ".join(parts) if parts else ""


def _json(info: ModelInfo, vram: VRAMPlan | None, specs: list[GPUSpec]) -> dict[str, Any]:
    import dataclasses

    model = {
        f.name: getattr(info, f.name)
        for f in dataclasses.fields(info)
        if f.name not in ("metadata", "chat_template", "tensor_types", "layer_bytes")
    }
    model["tensor_types"] = {k: dataclasses.asdict(v) for k, v in info.tensor_types.items()}
    model["has_chat_template"] = info.chat_template is not None
    model["weight_bytes"] = info.weight_bytes
    servers = []
    for server in vram.servers if vram is not None else ():
        entry = dataclasses.asdict(server)
        entry["server"] = server.server.name
        entry["gpus"] = list(server.server.gpus)
        servers.append(entry)
    return {
        "model": model,
        "gpus": [dataclasses.asdict(s) for s in specs],
        "plan": servers if vram is not None else None,
    }
