"""Least-outstanding-requests routing over ready servers, slot-aware, with a bounded wait.

A request takes a slot on the ready server with the fewest requests in flight, among those
with a free slot (``n_parallel`` from ``/props``). When every slot is busy it waits here, in
FIFO order, instead of piling into one server's queue; a released slot is handed straight
to the oldest waiter. A cancelled waiter gives up its place at once (and passes on a slot it
was handed but never used).

When no server can take requests for a while (each failed to restart repeatedly), the engine
says so with ``set_unavailable``: waiting requests fail with its error, and so do new ones,
until a server is ready again.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import anyio

from .._errors import EngineBusyError
from ..client import AsyncLlamaClient

__all__ = ["Member", "Router"]


class Member:
    """One server as the router sees it: its slots, and requests in flight."""

    __slots__ = (
        "client",
        "dead",
        "exited",
        "failed",
        "healthy",
        "name",
        "outstanding",
        "ready",
        "served",
        "slots",
    )

    def __init__(self, name: str, client: AsyncLlamaClient | None, slots: int) -> None:
        self.name = name
        self.client = client
        self.slots = slots
        self.outstanding = 0
        self.served = 0
        self.ready = False
        self.dead = False  # exited for good (restart=False)
        self.failed = False  # its restarts keep failing: not expected back soon
        self.healthy = True  # answers its health probe (a stopped process does not)
        self.exited: anyio.Event | None = None  # set when the current process exits


class _Waiter:
    __slots__ = ("cancelled", "error", "event", "member")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.member: Member | None = None
        self.error: Exception | None = None
        self.cancelled = False


class Router:
    """Hands out server slots; ``acquire`` waits (bounded) when all are busy."""

    def __init__(self, *, max_waiting: int) -> None:
        self.members: list[Member] = []
        self.max_waiting = max_waiting
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._waiting = 0
        self._closed: Exception | None = None
        self._unavailable: Callable[[], Exception] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return self._waiting

    def _pick(self) -> Member | None:
        best: Member | None = None
        for member in self.members:  # a handful of servers: a scan is cheapest
            free = member.ready and member.healthy and member.outstanding < member.slots
            if free and (best is None or member.outstanding < best.outstanding):
                best = member
        return best

    async def acquire(self) -> Member:
        if self._closed is not None:
            raise self._closed
        if self._unavailable is not None:
            raise self._unavailable()
        member = self._pick()
        if member is not None and not self._waiting:
            member.outstanding += 1
            try:
                await anyio.lowlevel.checkpoint()
            except BaseException:  # cancelled at the checkpoint: the slot was never used
                member.outstanding -= 1
                self._dispatch()
                raise
            return member
        if self._waiting >= self.max_waiting:
            raise EngineBusyError(
                f"all {sum(m.slots for m in self.members)} slots are busy and "
                f"{self._waiting} requests already wait (max_waiting={self.max_waiting}); "
                "lower the concurrency or raise max_waiting"
            )
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._waiting += 1
        self._dispatch()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.member is not None:
                # Handed a slot it will never use: pass it on.
                waiter.member.outstanding -= 1
                self._dispatch()
            else:
                waiter.cancelled = True
                self._waiting -= 1
            raise
        if waiter.member is None:  # woken by close() or set_unavailable()
            assert waiter.error is not None
            raise waiter.error
        return waiter.member

    def release(self, member: Member) -> None:
        """Give a slot back: to the oldest waiter if there is one."""
        member.outstanding -= 1
        member.served += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters, oldest first (also after a server becomes ready)."""
        while self._waiters:
            head = self._waiters[0]
            if head.cancelled:
                self._waiters.popleft()
                continue
            member = self._pick()
            if member is None:
                return
            self._waiters.popleft()
            self._waiting -= 1
            member.outstanding += 1
            head.member = member
            head.event.set()

    def close(self, error: Exception) -> None:
        """Refuse new requests with ``error`` and wake every waiter to raise it."""
        self._closed = error
        self._fail_waiters(lambda: error)

    def set_unavailable(self, error: Callable[[], Exception] | None) -> None:
        """Fail waiting and new requests with ``error()`` (``None``: take them again)."""
        self._unavailable = error
        if error is not None:
            self._fail_waiters(error)

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.cancelled:
                self._waiting -= 1
                waiter.error = error()  # one instance per waiter: each gets its own traceback
                waiter.event.set()

    def set_ready(self, member: Member, ready: bool) -> None:
        member.ready = ready
        if ready:
            self._dispatch()

    def set_healthy(self, member: Member, healthy: bool) -> None:
        """A ready server stopped (or started again) answering its health probe."""
        member.healthy = healthy
        if healthy:
            self._dispatch()

    def releaser(self, member: Member) -> Callable[[], None]:
        """A release callable that acts once, however many times it is called."""
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.release(member)

        return release
