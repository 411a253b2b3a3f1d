"""Task-group errors raised as themselves, and a block run in a task of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import sniffio

from ._errors import UsageError

__all__ = ["Background", "single_error"]


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a task group's lone exception as itself.

    anyio wraps whatever escapes a task group in an ExceptionGroup; a caller of ours who
    writes ``except ServerStartError`` (or raised a ValueError inside ``async with``) should
    get exactly that, also through nested task groups (a group of one group of one error).
    Several distinct failures stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        # Re-raising inside this handler rewrites the chain; keep the error's own.
        cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
        try:
            raise exc
        finally:
            exc.__cause__, exc.__context__ = cause, context
            exc.__suppress_context__ = suppress


class Background:
    """An async context manager's block, run in a task of its own until ``stop()``.

    For ``start()``/``aclose()`` without ``async with`` (a notebook runs each cell in its own
    task, and a task group must be entered and left in one task). asyncio only.
    """

    def __init__(self, manager: contextlib.AbstractAsyncContextManager[object]) -> None:
        self._manager = manager
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self, what: str) -> None:
        """Enter the manager in its task; raise why it could not be entered."""
        if sniffio.current_async_library() != "asyncio":
            raise UsageError(f"start() needs asyncio; under trio use `async with {what}`")
        if self._runner is not None:
            raise UsageError(f"this {what} was already started")
        started = asyncio.Event()

        async def run() -> None:
            async with self._manager:
                started.set()
                await self._stop.wait()

        self._runner = runner = asyncio.get_running_loop().create_task(run())
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if runner.done():
            runner.result()  # raises why it could not start

    async def stop(self) -> None:
        """Leave the block and wait until it is left; again: nothing."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stop.set()
        await runner
