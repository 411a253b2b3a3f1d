"""A Ray cluster of several "nodes" on one machine, reachable on 127.0.0.1 only (Linux, root).

Why a network namespace: Ray advertises the machine's interface address and its processes
connect to it, so a cluster on this machine would put test traffic on the real network.
``unshare -n`` gives a namespace whose only interface is loopback; a holder process keeps it
alive (it exits when this process closes its stdin, or dies), and ``nsenter`` runs
``ray start`` and the drivers in it. Each node is one ``ray start`` on this machine, with a
custom resource (``node_a``, ``node_b``...) standing in for a host.

```python
with LoopbackRayCluster() as cluster:          # head: node_a; cluster.add_node() for more
    cluster.add_node({"node_b": 1})
    print(cluster.driver(SCRIPT, "arg"))       # SCRIPT prints one JSON line last
```
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

__all__ = ["LoopbackRayCluster", "kill_raylet"]

# Brings ``lo`` up inside the new namespace (no iproute2 needed), then holds the namespace
# until its stdin closes.
_HOLDER = """
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))
print("up", flush=True)
sys.stdin.read()
"""

# Node death is noticed within about a second instead of Ray's default ~15 s.
_FAST_HEALTH = {"RAY_health_check_period_ms": "300", "RAY_health_check_failure_threshold": "3"}


class LoopbackRayCluster:
    """A Ray head (and nodes added later) in a loopback-only network namespace."""

    def __init__(
        self,
        head_resources: Mapping[str, float] | None = None,
        *,
        port: int | None = None,
        num_cpus: int = 2,
        num_gpus: int = 0,
        python: str = sys.executable,
    ) -> None:
        self.port = port if port is not None else _free_gcs_port()
        self.address = f"127.0.0.1:{self.port}"
        self.python = python
        self._ray = shutil.which("ray", path=os.path.dirname(python)) or "ray"
        self._head = (dict(head_resources or {"node_a": 1}), num_cpus, num_gpus)
        self._holder: subprocess.Popen[str] | None = None

    def __enter__(self) -> LoopbackRayCluster:
        self._holder = subprocess.Popen(
            ["unshare", "-n", self.python, "-c", _HOLDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "up":
            self._holder.wait()
            self._holder.stdout.close()
            raise RuntimeError(
                "could not make a loopback-only network namespace (`unshare -n` needs root)"
            )
        try:
            resources, cpus, gpus = self._head
            self._start(["--head", "--port", str(self.port), "--include-dashboard", "false"],
                        resources, cpus, gpus)  # fmt: skip
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        holder = self._holder
        if holder is None:
            return
        try:
            self._kill_namespace(holder.pid)
        finally:
            self._holder = None
            assert holder.stdin is not None
            assert holder.stdout is not None
            holder.stdin.close()
            holder.wait()
            holder.stdout.close()

    @staticmethod
    def _kill_namespace(holder: int) -> None:
        """SIGKILL every process in the holder's namespace: this cluster's, and no other
        (``ray stop`` would stop every Ray cluster on the machine)."""
        import psutil

        netns = os.stat(f"/proc/{holder}/ns/net").st_ino
        procs = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != holder and os.stat(f"/proc/{proc.pid}/ns/net").st_ino == netns:
                    proc.kill()
                    procs.append(proc)
            except (OSError, psutil.Error):  # gone meanwhile
                continue
        psutil.wait_procs(procs, timeout=30)

    def add_node(self, resources: Mapping[str, float], *, num_cpus: int = 2,
                 num_gpus: int = 0) -> None:  # fmt: skip
        """Start one more node (a ``ray start --address``) with these custom resources."""
        self._start(["--address", self.address], dict(resources), num_cpus, num_gpus)

    def kill_node(self, resource: str) -> int:
        """SIGKILL the raylet of the node that has ``resource`` (the node is lost); its pid."""
        return kill_raylet(resource)

    def _start(self, args: list[str], resources: dict[str, float], cpus: int, gpus: int) -> None:
        argv = [self._ray, "start", *args, "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                "--resources", json.dumps(resources), "--disable-usage-stats"]  # fmt: skip
        result = subprocess.run(
            self._in_ns(argv),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, **_FAST_HEALTH},
        )
        if result.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{result.stderr[-3000:]}")

    def _in_ns(self, argv: Sequence[str]) -> list[str]:
        if self._holder is None:
            raise RuntimeError("the cluster is not running (use it as a context manager)")
        return ["nsenter", "-t", str(self._holder.pid), "-n", *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace."""
        return subprocess.run(
            self._in_ns(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def driver(self, code: str, *args: str, timeout: float = 120) -> Any:
        """Run ``code`` as a Python script in the namespace, with ``sys.argv[1]`` the cluster's
        address and ``args`` after it; the last JSON object it printed (alone on a line)."""
        script = textwrap.dedent(code)
        result = self.run([self.python, "-c", script, self.address, *args], timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"driver failed ({result.returncode}):\n{result.stderr[-4000:]}")
        # Ray may print its own lines too (a lost node's notice): the last JSON object line.
        for line in reversed(result.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        raise AssertionError(f"the driver printed no JSON line:\n{result.stdout[-4000:]}")


def _free_gcs_port() -> int:
    """A GCS port no other cluster on this machine uses: ``ray start`` refuses a port that a
    running GCS has on its command line, whatever namespace that GCS is in."""
    import psutil

    used = set()
    for proc in psutil.process_iter(["cmdline"]):
        for arg in proc.info["cmdline"] or ():
            if arg.startswith("--gcs_server_port="):
                used.add(int(arg.split("=", 1)[1]))
    return next(p for p in range(6380, 7380) if p not in used)


def kill_raylet(resource: str) -> int:
    """Lose the node that has the custom ``resource``: SIGKILL its raylet and every process
    under it (workers, actors, their llama-servers) at once, as a machine's loss would; the
    raylet's pid."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        args = proc.info["cmdline"] or ()
        static = next((a for a in args if a.startswith("--static_resource_list=")), "=")
        names = static.split("=", 1)[1].split(",")[0::2]  # name,amount,name,amount...
        if proc.info["name"] == "raylet" and resource in names:
            tree = [proc, *proc.children(recursive=True)]
            for member in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            psutil.wait_procs(tree, timeout=10)
            return proc.pid
    raise LookupError(f"no raylet has the resource {resource!r}")
