"""A two-node Ray cluster for the tests, inside a network namespace of the test run's own.

Why the namespace: Ray advertises the machine's interface address and probes outside
addresses, and every test's traffic must stay on 127.0.0.1. ``unshare -n`` (as root) gives a
namespace with only a loopback interface; a holder process keeps it alive, and ``nsenter``
runs ``ray start`` and each test's driver in it. The two nodes are two ``ray start`` processes
on this machine, each with a custom resource (``node_a``, ``node_b``) standing in for a host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PORT = 6380


class Cluster:
    def __init__(self, holder: subprocess.Popen[bytes], ray: str) -> None:
        self.holder = holder
        self.ray = ray
        self.address = f"127.0.0.1:{PORT}"

    def _in_ns(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", *argv]

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._in_ns(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def driver(self, code: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run ``code`` (a script printing one JSON line last) as a driver in the namespace."""
        script = textwrap.dedent(code)
        result = self.run([sys.executable, "-c", script, self.address, *args], timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"driver failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    holder = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 3600"],
        stdin=subprocess.DEVNULL,
    )
    cluster = Cluster(holder, ray)
    try:
        head = cluster.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1",
                            "--port", str(PORT), "--num-cpus", "2", "--resources",
                            '{"node_a": 1}', "--disable-usage-stats",
                            "--include-dashboard", "false"])  # fmt: skip
        assert head.returncode == 0, head.stderr[-2000:]
        worker = cluster.run([ray, "start", "--address", cluster.address, "--node-ip-address",
                              "127.0.0.1", "--num-cpus", "2", "--resources", '{"node_b": 1}',
                              "--disable-usage-stats"])  # fmt: skip
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield cluster
    finally:
        cluster.run([ray, "stop", "--force"], timeout=60)
        holder.kill()
        holder.wait()


def model_path(tmp: Path) -> str:
    from llamatelemetry_async.testing import write_tiny_model

    return str(write_tiny_model(tmp / "tiny.gguf"))
