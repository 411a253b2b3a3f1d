"""NCCL across nodes: the unique id made on rank 0 and shared through Ray.

```python
import ray
from llamatelemetry_async.cluster import ray_communicator


@ray.remote(num_gpus=1)
class Rank:
    async def setup(self, rank: int, nranks: int) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES: this actor's GPU is device 0.
        self.comm = await ray_communicator("train", nranks, rank)

    async def all_reduce(self, x):
        await self.comm.all_reduce(x)  # on a worker thread: the actor's loop keeps running


ranks = [Rank.remote() for _ in range(4)]
ray.get([r.setup.remote(i, len(ranks)) for i, r in enumerate(ranks)])
```

Rank 0 makes the ``ncclUniqueId`` (on a worker thread: loading NCCL blocks) and publishes
it to a small named Ray async actor (namespace ``"llamatelemetry"``, one per ``group``,
no CPU); the other ranks wait on that actor (an ``asyncio.Event``, no polling) for at most
``timeout`` seconds. When all ``nranks`` ranks have the id, the actor is killed, so the
same group name can meet again later. Rank 0's ``timeout`` also bounds how long the id
stays there for ranks that have not come yet; after it, late ranks start afresh and wait
for a new rank 0. Importing this module does not import Ray; using it does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import anyio

from .._errors import NCCLError, NCCLUsageError
from ..nccl import Communicator, NCCLLibrary, load
from ._backend import ensure_ray, ray_result

__all__ = ["ray_communicator", "ray_unique_id"]

NAMESPACE = "llamatelemetry"
_RETRY_DELAY = 0.05  # a finished rendezvous actor is being killed: try again shortly


def _actor_name(group: str) -> str:
    return f"llamatelemetry.nccl.rendezvous.{group}"


@dataclasses.dataclass(eq=False)
class _Round:
    """One use of a group: rank 0's id (once published) and the ranks it went to."""

    uid: bytes | None = None
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    waiting: set[int] = dataclasses.field(default_factory=set)
    served: set[int] = dataclasses.field(default_factory=set)
    expires: float = math.inf


class _Rendezvous:
    """The Ray async actor behind one group: holds rank 0's id until every rank has it.

    Rounds queue up, so a rank 0 that runs ahead to the group's next rendezvous before the
    others fetched this one's id does not mix them up. ``join`` answers
    ``(status, id, last)``; status ``"ok"``, ``"timeout"``, ``"finished"`` (this actor is
    done: kill it and make a new one), or a usage problem's text; ``last``: this rank
    completed the last open round, so the actor is done.
    """

    def __init__(self, group: str, nranks: int) -> None:
        self._group = group
        self._nranks = nranks
        self._rounds: list[_Round] = []
        self._done = False

    async def join(
        self, nranks: int, rank: int, uid: bytes | None, timeout: float
    ) -> tuple[str, bytes | None, bool]:
        if self._done:
            return ("finished", None, False)
        if nranks != self._nranks:
            return (
                f"rank {rank} says nranks={nranks}, but group {self._group!r} was started "
                f"with nranks={self._nranks}: every rank must pass the same nranks (or a "
                "rendezvous under this name from an earlier run is still open: use another "
                "group name, or wait for its rank 0's timeout)",
                None,
                False,
            )
        now = time.monotonic()
        # A round whose rank 0 timeout passed: its missing ranks never came.
        self._rounds = [r for r in self._rounds if r.uid is None or now <= r.expires]
        if uid is not None:  # rank 0: the first round still without an id
            # (or the one with this id: a call that Ray retried after a lost answer)
            rnd = next((r for r in self._rounds if r.uid == uid), None) or next(
                (r for r in self._rounds if r.uid is None), None
            )
            if rnd is None:
                rnd = _Round()
                self._rounds.append(rnd)
            rnd.uid, rnd.expires = uid, now + timeout
            rnd.event.set()
        else:  # the first round this rank has not been served in (or waits in: a retry)
            rnd = next((r for r in self._rounds if rank not in r.served), None)
            if rnd is None:
                rnd = _Round()
                self._rounds.append(rnd)
            if rnd.uid is None:
                rnd.waiting.add(rank)
                try:
                    await asyncio.wait_for(rnd.event.wait(), timeout)
                except TimeoutError:
                    return ("timeout", None, False)
                finally:  # served, timed out or cancelled (ray.cancel)
                    rnd.waiting.discard(rank)
                    if rnd.uid is None and not rnd.waiting and rnd in self._rounds:
                        self._rounds.remove(rnd)
        rnd.served.add(rank)
        last = False
        if len(rnd.served) == self._nranks:
            if rnd in self._rounds:
                self._rounds.remove(rnd)
            if not self._rounds:
                self._done = last = True
        return ("ok", rnd.uid, last)


def _check(group: str, nranks: int, rank: int, timeout: float) -> None:
    if not isinstance(group, str) or not group:
        raise NCCLUsageError(
            f"group must be a non-empty string naming the rendezvous, got {group!r}"
        )
    if isinstance(nranks, bool) or not isinstance(nranks, int) or nranks < 1:
        raise NCCLUsageError(f"nranks must be an int >= 1, got {nranks!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < nranks:
        raise NCCLUsageError(f"rank must be an int in 0..{nranks - 1}, got {rank!r}")
    if not isinstance(timeout, int | float) or not timeout > 0:
        raise NCCLUsageError(f"timeout must be a number of seconds > 0, got {timeout!r}")


_actor_class: Any = None
# Ray collects a non-detached actor, named or not, once no handle to it is left: each
# process keeps its group's handle until the rendezvous is over (the last rank kills it).
_handles: dict[str, Any] = {}


def _get_actor(group: str, nranks: int) -> Any:
    """The group's rendezvous actor, made if none exists (blocking: a GCS call)."""
    import ray

    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(_Rendezvous)
    return _actor_class.options(
        name=_actor_name(group),
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_restarts=0,
        max_concurrency=1000,
    ).remote(group, nranks)


def _kill(group: str, actor: Any) -> None:
    import ray

    if _handles.get(group) is actor:
        del _handles[group]
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


async def ray_unique_id(
    group: str,
    nranks: int,
    rank: int,
    *,
    timeout: float = 60.0,
    lib: NCCLLibrary | None = None,
    address: str | None = None,
) -> bytes:
    """The 128 bytes of ``group``'s ``ncclUniqueId``, the same on every rank.

    Rank 0 makes it (with ``lib``, or the process-wide library) and publishes it through
    Ray; the others wait for it at most ``timeout`` seconds (then ``NCCLError``). Connects
    to Ray at ``address`` first if this process is not connected yet (inside a Ray actor it
    is). Bad arguments raise ``NCCLUsageError`` before Ray is touched.
    """
    _check(group, nranks, rank, timeout)
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(deadline - time.monotonic(), 0.0)

    uid: bytes | None = None
    if rank == 0:

        def make() -> bytes:
            return bytes((lib if lib is not None else load()).unique_id())

        uid = await anyio.to_thread.run_sync(make)
    try:
        await anyio.to_thread.run_sync(ensure_ray, address)
    except Exception as exc:
        raise NCCLError(f"rendezvous {group!r}: cannot connect to Ray: {exc}") from exc
    from ray.exceptions import RayActorError

    while True:
        actor = _handles[group] = await anyio.to_thread.run_sync(_get_actor, group, nranks)
        ref = actor.join.remote(nranks, rank, uid, remaining())
        try:
            status, got, last = await ray_result(ref)
        except RayActorError:
            # Dead (a finished rendezvous being killed: its name frees soon) or briefly
            # unreachable: ask again (join is safe to repeat), and never kill it here: a
            # live one may hold rank 0's id.
            if remaining() <= 0:
                status = "timeout"
            else:
                await anyio.sleep(_RETRY_DELAY)
                continue
        except BaseException as exc:
            import ray

            try:
                ray.cancel(ref)
            except Exception:  # already done
                pass
            if isinstance(exc, Exception):
                raise NCCLError(f"rendezvous {group!r} through Ray failed: {exc}") from exc
            raise
        if status == "ok":
            assert isinstance(got, bytes)
            if last:  # every rank has the id: the name is free for the next rendezvous
                await anyio.to_thread.run_sync(_kill, group, actor)
            return got
        if status == "finished":
            await anyio.to_thread.run_sync(_kill, group, actor)
            if remaining() <= 0:
                status = "timeout"
            else:
                await anyio.sleep(_RETRY_DELAY)
                continue
        if status == "timeout":
            raise NCCLError(
                f"rank {rank} of group {group!r} waited {timeout:g} s for rank 0's NCCL unique "
                "id and none came: start rank 0 (ray_unique_id / ray_communicator with rank=0 "
                "and the same group name and nranks) too, or pass a larger timeout= (two "
                f"processes with rank={rank} also end here)"
            )
        raise NCCLUsageError(status)


async def ray_communicator(
    group: str,
    nranks: int,
    rank: int,
    *,
    device: int = 0,
    timeout: float = 60.0,
    lib: NCCLLibrary | None = None,
    synchronize: bool = True,
    address: str | None = None,
) -> Communicator:
    """This process's rank of an NCCL communicator over Ray: ``ray_unique_id`` then
    ``Communicator.init_rank`` on ``device`` (which blocks, on a thread, until all ranks
    joined). Every rank of the communicator calls it with the same ``group`` and ``nranks``.
    """
    uid = await ray_unique_id(group, nranks, rank, timeout=timeout, lib=lib, address=address)
    return await Communicator.init_rank(
        nranks, rank, uid, device=device, lib=lib, synchronize=synchronize
    )
