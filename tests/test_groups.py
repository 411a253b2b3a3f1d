"""single_error: a task group's lone error comes out as itself, with its own chain."""

from __future__ import annotations

import anyio
import pytest

from llamatelemetry_async._groups import single_error

pytestmark = pytest.mark.anyio


async def test_lone_error_keeps_type_and_cause() -> None:
    cause = KeyError("why")

    async def fail() -> None:
        raise ValueError("boom") from cause

    with pytest.raises(ValueError, match="boom") as info, single_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail)
    assert info.value.__cause__ is cause


async def test_several_errors_stay_grouped() -> None:
    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(ExceptionGroup) as info, single_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail, ValueError("a"))
            tg.start_soon(fail, KeyError("b"))
    assert len(info.value.exceptions) == 2


async def test_nested_groups_of_one_unwrap_to_the_error() -> None:
    async def fail() -> None:
        raise KeyError("deep")

    async def inner() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail)

    with pytest.raises(KeyError, match="deep"), single_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(inner)
