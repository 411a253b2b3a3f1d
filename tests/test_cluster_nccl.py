"""NCCL across nodes: the unique id shared through Ray (``cluster._rendezvous``), on the real
two-node Ray cluster of ``ray_cluster`` (conftest), each scenario a driver script run inside
its loopback-only namespace. Without a GPU, ``ncclCommInitRank`` fails with NCCL's own CUDA
error on every rank, as in the single-machine tests (``test_nccl``)."""

from __future__ import annotations

import anyio
import pytest

from llamatelemetry_async import NCCLUsageError, UsageError
from llamatelemetry_async.cluster._rendezvous import ray_communicator, ray_unique_id
from llamatelemetry_async.nccl import Result
from llamatelemetry_async.testing._ray import LoopbackRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

_TWO_RANKS = """
import json, sys, time
import ray
from llamatelemetry_async import NCCLError
from llamatelemetry_async.cluster._rendezvous import NAMESPACE, _actor_name
from llamatelemetry_async.cluster._rendezvous import ray_communicator, ray_unique_id

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)


@ray.remote
class Rank:
    async def run(self, group, nranks, rank):
        # Two rendezvous in a row under one name (rank 0 may run ahead), then a communicator.
        ids = [(await ray_unique_id(group, nranks, rank, timeout=30)).hex() for _ in range(2)]
        try:
            await ray_communicator(group, nranks, rank, timeout=30, synchronize=False)
        except NCCLError as exc:
            error = {"type": type(exc).__name__, "code": exc.code, "text": str(exc)}
        else:
            error = None
        return {"ids": ids, "error": error, "node": ray.get_runtime_context().get_node_id()}


ranks = [Rank.options(resources={node: 0.01}, num_cpus=0).remote() for node in ("node_a", "node_b")]
out = ray.get([r.run.remote("pair", 2, i) for i, r in enumerate(ranks)], timeout=90)
gone = False
for _ in range(100):  # the last rank kills the rendezvous actor; that takes effect shortly
    try:
        ray.get_actor(_actor_name("pair"), namespace=NAMESPACE)
    except ValueError:
        gone = True
        break
    time.sleep(0.05)
for rank in out:
    print("rank ids", rank["ids"])
print(json.dumps({"ranks": out, "actor_gone": gone}))
"""

_LONELY = """
import json, sys, time
import anyio, ray
from llamatelemetry_async import NCCLError, NCCLUsageError
from llamatelemetry_async.cluster import NAMESPACE
from llamatelemetry_async.cluster._rendezvous import _actor_name, ray_unique_id

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)


async def lonely():  # rank 1 whose rank 0 never comes (trio: Ray's refs waited on a thread)
    t = time.monotonic()
    try:
        await ray_unique_id("lonely", 2, 1, timeout=1.0)
    except NCCLError as exc:
        return {"type": type(exc).__name__, "usage": isinstance(exc, NCCLUsageError),
                "text": str(exc), "elapsed": time.monotonic() - t}
    return None


def exists(group):
    try:
        ray.get_actor(_actor_name(group), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


async def mismatched():  # rank 1 waits with nranks=2; rank 2 comes saying nranks=3
    result = {}
    async with anyio.create_task_group() as tg:
        async def waiter():
            try:
                await ray_unique_id("mismatch", 2, 1, timeout=3.0)
            except NCCLError as exc:
                result["waiter"] = type(exc).__name__
        tg.start_soon(waiter)
        with anyio.fail_after(10):  # until the waiter's rendezvous (nranks=2) exists
            while not await anyio.to_thread.run_sync(exists, "mismatch"):
                await anyio.sleep(0.02)
        try:
            await ray_unique_id("mismatch", 3, 2, timeout=3.0)
        except NCCLError as exc:
            result["other"] = {"type": type(exc).__name__, "text": str(exc)}
    return result


print(json.dumps({"lonely": anyio.run(lonely, backend="trio"), "mismatch": anyio.run(mismatched)}))
"""


@pytest.fixture
def cluster(ray_cluster: LoopbackRayCluster) -> LoopbackRayCluster:
    return ray_cluster


def test_ranks_on_two_nodes_share_one_id_and_init_fails_with_nccls_cuda_error(
    cluster: LoopbackRayCluster,
) -> None:
    out = cluster.driver(_TWO_RANKS)
    rank0, rank1 = out["ranks"]
    assert rank0["node"] != rank1["node"]  # node_a and node_b
    assert rank0["ids"] == rank1["ids"]  # every rank got rank 0's id, each time
    first, second = (bytes.fromhex(h) for h in rank0["ids"])
    assert len(first) == len(second) == 128
    assert first != second  # the second rendezvous is a new one, not a stale id
    for rank in (rank0, rank1):
        assert rank["error"]["type"] == "NCCLError", rank["error"]
        assert rank["error"]["code"] == Result.UNHANDLED_CUDA_ERROR, rank["error"]
        assert "ncclCommInitRank" in rank["error"]["text"]
    assert out["actor_gone"]  # the name is free for the group's next rendezvous


def test_rank_without_rank_0_times_out_typed_and_mismatched_nranks_is_refused(
    cluster: LoopbackRayCluster,
) -> None:
    out = cluster.driver(_LONELY)
    lonely = out["lonely"]
    assert lonely is not None
    assert lonely["type"] == "NCCLError"
    assert not lonely["usage"]
    assert "rank 0" in lonely["text"]
    assert "timeout=" in lonely["text"]
    assert 0.9 < lonely["elapsed"] < 15
    mismatch = out["mismatch"]
    assert mismatch["other"]["type"] == "NCCLUsageError"
    assert "nranks=3" in mismatch["other"]["text"]
    assert "nranks=2" in mismatch["other"]["text"]
    assert mismatch["waiter"] == "NCCLError"  # its rank 0 never came either


@pytest.mark.parametrize(
    ("group", "nranks", "rank", "timeout", "words"),
    [
        ("", 2, 0, 1.0, "group"),
        ("g", 0, 0, 1.0, "nranks"),
        ("g", True, 0, 1.0, "nranks"),
        ("g", 2, 2, 1.0, "rank"),
        ("g", 2, -1, 1.0, "rank"),
        ("g", 2, 0, 0.0, "timeout"),
    ],
)
def test_bad_arguments_are_refused_before_ray(
    group: str, nranks: int, rank: int, timeout: float, words: str
) -> None:
    async def main() -> None:
        with pytest.raises(NCCLUsageError, match=words) as info:
            await ray_unique_id(group, nranks, rank, timeout=timeout)
        assert isinstance(info.value, UsageError)
        with pytest.raises(NCCLUsageError, match=words):
            await ray_communicator(group, nranks, rank, timeout=timeout)

    anyio.run(main)
