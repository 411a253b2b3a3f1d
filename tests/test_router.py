"""The router's slot accounting under cancellation and close (no processes needed)."""

from __future__ import annotations

import anyio
import pytest

from llamatelemetry_async import EngineError
from llamatelemetry_async.engine._router import Member, Router

pytestmark = pytest.mark.anyio


def _router(slots: int = 1, waiting: int = 10) -> tuple[Router, Member]:
    router = Router(max_waiting=waiting)
    member = Member("m", None, slots=slots)
    router.members.append(member)
    router.set_ready(member, True)
    return router, member


async def test_cancelled_fast_path_keeps_no_slot() -> None:
    router, member = _router()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await router.acquire()
    assert member.outstanding == 0
    assert await router.acquire() is member


async def test_slots_go_to_waiters_in_order_and_a_cancelled_one_is_skipped() -> None:
    router, member = _router(slots=1)
    await router.acquire()
    order: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def wait(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            got = await router.acquire()
            order.append(name)
            router.release(got)

    async with anyio.create_task_group() as tg:
        for name in ("first", "second", "third"):
            tg.start_soon(wait, name)
            await anyio.wait_all_tasks_blocked()
        assert router.waiting == 3
        scopes["second"].cancel()
        await anyio.wait_all_tasks_blocked()
        assert router.waiting == 2
        router.release(member)
    assert order == ["first", "third"]
    assert member.outstanding == 0
    assert router.waiting == 0


async def test_close_wakes_waiters_with_the_error() -> None:
    router, _member = _router(slots=1)
    await router.acquire()
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            try:
                await router.acquire()
            except EngineError as exc:
                errors.append(exc)

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        router.close(EngineError("closed"))
    assert [str(e) for e in errors] == ["closed"]
    with pytest.raises(EngineError):
        await router.acquire()


async def test_unavailable_fails_waiters_and_new_requests_until_cleared() -> None:
    router, member = _router(slots=1)
    await router.acquire()
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            try:
                await router.acquire()
            except EngineError as exc:
                errors.append(exc)

        for _ in range(2):
            tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        router.set_unavailable(lambda: EngineError("nothing can serve"))
    assert [str(e) for e in errors] == ["nothing can serve"] * 2
    assert errors[0] is not errors[1]  # each waiter raises its own instance
    assert router.waiting == 0
    with pytest.raises(EngineError, match="nothing can serve"):
        await router.acquire()
    router.set_unavailable(None)
    router.release(member)
    assert await router.acquire() is member


async def test_an_unhealthy_member_gets_no_new_requests() -> None:
    router, member = _router(slots=4)
    other = Member("other", None, slots=4)
    router.members.append(other)
    router.set_ready(other, True)
    router.set_healthy(member, False)
    assert [(await router.acquire()).name for _ in range(3)] == ["other"] * 3
    router.set_healthy(other, False)
    got: list[Member] = []
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            got.append(await router.acquire())

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # nobody healthy: it waits
        router.set_healthy(member, True)  # answers again: the waiter gets it
    assert got == [member]
