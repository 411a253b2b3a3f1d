"""Shared fixtures: a tiny real model, real llama-servers, the SSE replay server.

Every async test runs three ways: asyncio with the Protocol fast path, asyncio with the
portable anyio path, and trio (which always takes the portable path).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.testing import write_tiny_model
from llamatelemetry_async.testing._ray import LoopbackRayCluster
from llamatelemetry_async.testing._replay import replay_server
from llamatelemetry_async.testing._server import RunningServer, run_llama_server

_WAYS = ["asyncio", "asyncio-portable", "trio"]


@pytest.fixture(params=_WAYS)
def _way(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(_way: str) -> str:
    return "trio" if _way == "trio" else "asyncio"


@pytest.fixture
def client_backend(_way: str) -> Backend:
    """The ``backend`` argument for AsyncLlamaClient in this way of running."""
    return "anyio" if _way == "asyncio-portable" else "auto"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A generation server with every optional endpoint of this kind switched on."""
    slots_dir = tmp_path_factory.mktemp("slots")
    args = ["-np", "4", "-c", "4096", "--metrics", "--props", "--slot-save-path", str(slots_dir)]
    with run_llama_server(tiny_model, args=args) as server:
        yield server


@pytest.fixture(scope="session")
def embedding_server(tiny_model: Path) -> Iterator[RunningServer]:
    with run_llama_server(
        tiny_model, args=["-np", "2", "--embeddings", "--pooling", "mean"]
    ) as server:
        yield server


@pytest.fixture(scope="session")
def rerank_server(tiny_model: Path) -> Iterator[RunningServer]:
    with run_llama_server(tiny_model, args=["-np", "2", "--reranking"]) as server:
        yield server


@pytest.fixture(scope="session")
def replay_url() -> Iterator[str]:
    """The loopback SSE replay server (llama-server's wire format), unpaced."""
    with replay_server(tokens=20) as url:
        yield url


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LoopbackRayCluster]:
    """Two Ray nodes (``node_a``, ``node_b``), each with one GPU as Ray counts them (Ray only
    counts: the servers run on the CPU), in a loopback-only namespace (see ``_ray``)."""
    with LoopbackRayCluster({"node_a": 1}, num_gpus=1) as cluster:
        cluster.add_node({"node_b": 1}, num_gpus=1)
        yield cluster
