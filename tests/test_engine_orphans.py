"""No llama-server outlives the Python process that started it, however that process ends,
on asyncio and on trio."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _procs import gone, with_default_sigint

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, anyio
    from llamatelemetry_async import AsyncEngine, Placement

    async def main() -> None:
        async with AsyncEngine(sys.argv[1], placement=Placement.cpu(2)) as engine:
            print(" ".join(str(s.pid) for s in engine.servers), flush=True)
            if sys.argv[2] == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            await anyio.sleep_forever()

    anyio.run(main, backend=sys.argv[3])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("how", ["sigint", "sigkill", "sigterm"])
def test_no_server_outlives_its_python_process(tiny_model: Path, how: str, backend: str) -> None:
    # SIGKILL and SIGTERM (docker stop, systemd) end Python with no finally: only the
    # parent-death signal can reap the servers. SIGINT is a clean KeyboardInterrupt.
    with subprocess.Popen(
        with_default_sigint([sys.executable, "-c", _CHILD, str(tiny_model), how, backend]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as child:
        try:
            assert child.stdout is not None
            pids = [int(p) for p in child.stdout.readline().split()]
            assert len(pids) == 2, child.stderr.read() if child.stderr else ""
            if how == "sigkill":
                child.kill()
            elif how == "sigterm":
                child.terminate()
            child.wait(30)
            assert gone(pids, timeout=10.0), f"orphaned llama-servers: {pids}"
            if how == "sigint":
                assert child.returncode != 0  # KeyboardInterrupt, after a clean shutdown
        finally:
            child.kill()
