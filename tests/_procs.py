"""Process checks shared by the engine tests."""

from __future__ import annotations

import psutil


def gone(pids: list[int], timeout: float = 2.0) -> bool:
    """True when none of ``pids`` is alive (zombies of other parents count as gone)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive if p.is_running())
