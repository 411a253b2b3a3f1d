"""RAM planning for CPU servers: do a placement's servers fit in the machine's memory together?

``plan_ram(model_info, servers, ...)`` counts what llama-server holds in host memory when it
runs on the CPU, with the same arithmetic as the VRAM planner (``models.plan``):

- **Weights, once**: llama-server memory-maps the GGUF file, so every server of the same file
  shares one copy in the page cache. (llama.cpp's CPU weight repacking, on builds and models
  that use it, copies the repacked tensors into each process; ``--no-repack`` keeps them
  shared. The plan counts the mapped file once either way.)
- **Per server**: its KV cache (exact, ``kv_cells``; sliding-window layers hold less), its
  compute buffer (``compute_buffer_bytes``, the same estimate as on a GPU) and
  ``SERVER_OVERHEAD_BYTES`` for the process itself.

What is available is the kernel's ``MemAvailable``, lowered to the room under the cgroup's
memory limit when the process runs in a container that sets one (``read_available_ram``;
page cache that no process maps counts as room there, as it does in ``MemAvailable``).

```python
info = await inspect_model("model.gguf")
ram = plan_ram(info, Placement.cpu(2).plans([]), ctx_size=8192)
print(ram.explain())  # raises ModelDoesNotFitError, with suggestions, when it does not fit
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._errors import ModelDoesNotFitError
from ..server import ServerPlan
from ._gguf import KV_CELL_ALIGN, ModelInfo, human_bytes
from ._vram import (
    _QUANT_BPW,
    _cache_fits_heads,
    _model_name,
    _scaled,
    _Settings,
    _settings,
    _slots,
    compute_buffer_bytes,
)

__all__ = ["SERVER_OVERHEAD_BYTES", "RAMPlan", "ServerRAMPlan", "plan_ram", "read_available_ram"]

MiB: Final = 2**20

SERVER_OVERHEAD_BYTES: Final = 64 * MiB
"""Counted for every llama-server process: its code, HTTP threads and small buffers (an
estimate: the tiny model's server has a resident set of about 40 MiB beside its mapping)."""


@dataclass(frozen=True, slots=True)
class ServerRAMPlan:
    """What one CPU server adds to host memory, beside the shared weights."""

    server: ServerPlan
    ctx_size: int
    """Total context (``--ctx-size``) the plan counted: the config's, or the model's own."""
    n_parallel: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int = SERVER_OVERHEAD_BYTES

    @property
    def used_bytes(self) -> int:
        """KV cache + compute buffer + process overhead."""
        return self.kv_bytes + self.compute_bytes + self.overhead_bytes

    def summary(self) -> str:
        """One line: context, slots and bytes."""
        return (
            f"{self.server.name}: ctx {self.ctx_size} ({self.n_parallel} slots), KV "
            f"{human_bytes(self.kv_bytes)} + compute {human_bytes(self.compute_bytes)} + "
            f"process {human_bytes(self.overhead_bytes)}"
        )


@dataclass(frozen=True, kw_only=True)
class RAMPlan:
    """The CPU servers of a placement and the host memory they need together."""

    model: ModelInfo
    weights_bytes: int
    """The model's tensors, mapped once and shared by every server."""
    servers: tuple[ServerRAMPlan, ...]
    available_bytes: int | None
    """What the machine (or its cgroup) had available; ``None``: unknown, not checked."""

    @property
    def total_bytes(self) -> int:
        """Shared weights plus what every server adds."""
        return self.weights_bytes + sum(s.used_bytes for s in self.servers)

    @property
    def fits(self) -> bool:
        """True when the total is within what is available (or nothing is known)."""
        return self.available_bytes is None or self.total_bytes <= self.available_bytes

    def summary(self) -> str:
        """One line, fit for a log: total against available, per server."""
        available = "unknown" if self.available_bytes is None else human_bytes(self.available_bytes)
        return (
            f"{len(self.servers)} CPU server(s): weights {human_bytes(self.weights_bytes)} "
            f"(shared) + {' + '.join(human_bytes(s.used_bytes) for s in self.servers)} = "
            f"{human_bytes(self.total_bytes)} of {available} available"
        )

    def explain(self) -> str:
        """The summary, then each server's line."""
        return "\n".join([self.summary(), *(f"  {s.summary()}" for s in self.servers)])


def read_available_ram() -> int | None:
    """Bytes of memory this process can still use: ``MemAvailable``, lowered to the room
    left under its cgroup's limit; ``None`` where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    if room is not None:
        found.append(room)
    return min(found) if found else None


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")

# memory.stat keys, cgroup v2 then v1 (hierarchical): file pages on the LRU lists, and those
# mapped by some process.
_FILE_KEYS: Final = (
    (("active_file", "inactive_file"), "file_mapped"),
    (("total_active_file", "total_inactive_file"), "total_mapped_file"),
)


def _cgroup_room() -> int | None:
    # cgroup v2 (memory.max) or v1 (memory/memory.limit_in_bytes); "max" or a huge v1 value
    # means no limit. The charge (memory.current) includes the page cache: a GGUF file just
    # downloaded, or mapped by a model's servers that have exited, stays charged until the
    # kernel reclaims it under pressure. That part, file pages no process maps, is room (as
    # MemAvailable counts it); pages mapped now (running servers' weights) are not.
    # The process's own cgroup and each one above it limit it: the least room wins.
    root = _CGROUP_ROOT
    rooms: list[int] = []
    for v2, (lru_keys, mapped_key) in zip((True, False), _FILE_KEYS, strict=True):
        limit_name, usage_name = (
            ("memory.max", "memory.current")
            if v2
            else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        )
        for base in _own_cgroup_dirs(root if v2 else root / "memory", v2):
            try:
                limit_text = (base / limit_name).read_text().strip()
                if limit_text == "max" or int(limit_text) >= 2**60:
                    continue
                limit, used = int(limit_text), int((base / usage_name).read_text().strip())
            except (OSError, ValueError):
                continue
            stat = _memory_stat(base / "memory.stat")
            unmapped = sum(stat.get(key, 0) for key in lru_keys) - stat.get(mapped_key, 0)
            rooms.append(max(0, limit - (used - max(0, unmapped))))
        if rooms:
            return min(rooms)
    return None


def _own_cgroup_dirs(mount: Path, v2: bool) -> list[Path]:
    """This process's memory cgroup under ``mount`` and every one above it, up to ``mount``.

    Where the cgroup's path (``/proc/self/cgroup``) is not under the mount (a container
    that mounts its own cgroup as the root), the mount alone.
    """
    path = ""
    try:
        for line in _PROC_CGROUP.read_text().splitlines():
            _, controllers, cgroup_path = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and "memory" in controllers.split(",")):
                path = cgroup_path.strip("/")
                break
    except (OSError, ValueError):
        pass
    own = mount / path if path else mount
    if not own.is_dir():
        return [mount]
    dirs = [own]
    while dirs[-1] != mount:
        dirs.append(dirs[-1].parent)
    return dirs


def _memory_stat(path: Path) -> dict[str, int]:
    """``key value`` lines of a cgroup's memory.stat; empty where it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def plan_ram(
    model: ModelInfo,
    servers: Sequence[ServerPlan],
    *,
    available_bytes: int | None = None,
    ctx_size: int | None = None,
    n_parallel: int | None = None,
    cache_type_k: str | None = None,
    cache_type_v: str | None = None,
    ubatch_size: int | None = None,
    flash_attn: str | None = None,
    swa_full: bool = False,
) -> RAMPlan:
    """What the CPU servers among ``servers`` need in host memory together.

    ``available_bytes`` defaults to ``read_available_ram()``. ``ctx_size`` ``None`` or 0
    means the model's own context, as for llama-server; the other settings are those of
    ``ServerConfig``. GPU servers in ``servers`` are left to the VRAM planner.
    Raises ``ModelDoesNotFitError`` when the servers do not fit together; its
    ``suggestions`` say what would (a smaller context, fewer servers, a q8_0 KV cache, a
    smaller quantization).
    """
    if available_bytes is None:
        available_bytes = read_available_ram()
    s = _settings(
        cache_type_k or "f16",
        cache_type_v,
        ubatch_size,
        flash_attn,
        1,
        True,
        model,
        swa_full=swa_full,
    )
    cpu = [server for server in servers if not server.gpus]
    ctx = ctx_size or model.context_length or KV_CELL_ALIGN
    ram = _count(model, cpu, s, ctx, n_parallel, available_bytes)
    if not ram.fits:
        assert available_bytes is not None  # fits is True when nothing is known
        suggestions = _suggestions(model, cpu, s, ctx, n_parallel, available_bytes)
        text = "; ".join(suggestions) if suggestions else "nothing smaller fits either"
        raise ModelDoesNotFitError(
            f"{_model_name(model)} on {len(cpu)} CPU server(s) needs "
            f"{human_bytes(ram.total_bytes)} of memory (weights {human_bytes(ram.weights_bytes)}"
            f", shared; each server's KV cache and buffers "
            f"{human_bytes(ram.servers[0].used_bytes)} at ctx_size={ctx}), but "
            f"{human_bytes(available_bytes)} is available. What would fit: {text}",
            model=_model_name(model),
            suggestions=suggestions,
        )
    return ram


def _count(
    model: ModelInfo,
    servers: Sequence[ServerPlan],
    s: _Settings,
    ctx: int,
    n_parallel: int | None,
    available: int | None,
) -> RAMPlan:
    slots = _slots(ctx, n_parallel)
    kv = model.kv_row_bytes(s.cache_type_k, s.cache_type_v) * sum(
        model.kv_cells_by_layer(ctx, slots, ubatch_size=s.ubatch, swa_full=s.swa_full)
    )
    compute = compute_buffer_bytes(
        model,
        ubatch_size=s.ubatch,
        ctx_per_slot=max(ctx // slots, 1),
        flash_attn=s.flash_attn,
        cache_type_k=s.cache_type_k,
        cache_type_v=s.cache_type_v,
    )
    return RAMPlan(
        model=model,
        weights_bytes=model.weight_bytes,
        servers=tuple(
            ServerRAMPlan(
                server=server, ctx_size=ctx, n_parallel=slots, kv_bytes=kv, compute_bytes=compute
            )
            for server in servers
        ),
        available_bytes=available,
    )


def _suggestions(
    model: ModelInfo,
    servers: Sequence[ServerPlan],
    s: _Settings,
    ctx: int,
    n_parallel: int | None,
    available: int,
) -> list[str]:
    """What would fit instead, most useful first."""

    def fits(m: ModelInfo, n: int, c: int, settings: _Settings = s) -> bool:
        return _count(m, servers[:n], settings, c, n_parallel, available).fits

    n = len(servers)
    out: list[str] = []
    lo, hi = 0, ctx // KV_CELL_ALIGN  # the largest context, in units of 256 tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(model, n, mid * KV_CELL_ALIGN):
            lo = mid
        else:
            hi = mid - 1
    if lo:
        out.append(f"ctx_size={lo * KV_CELL_ALIGN} (the largest context that fits {n} server(s))")
    fewer = next((k for k in range(n - 1, 0, -1) if fits(model, k, ctx)), 0)
    if fewer:
        out.append(f"fewer servers: Placement.cpu({fewer}) fits with ctx_size={ctx}")
    if (
        s.cache_type_k == "f16"
        and s.cache_type_v == "f16"
        and _cache_fits_heads("q8_0", model.head_dim_k)
        and _cache_fits_heads("q8_0", model.head_dim_v)
        and fits(model, n, ctx, dataclasses.replace(s, cache_type_k="q8_0", cache_type_v="q8_0"))
    ):
        out.append(
            f'cache_type_k="q8_0", cache_type_v="q8_0" with flash_attn="on" '
            f"(half the KV cache; ctx_size={ctx} fits)"
        )
    current = model.bits_per_weight
    for quant, bpw in _QUANT_BPW:
        if current and bpw < current * 0.97 and fits(_scaled(model, bpw / current), n, ctx):
            out.append(f"a smaller quantization: {quant} (~{bpw:.2f} bits per weight)")
            break
    return out
