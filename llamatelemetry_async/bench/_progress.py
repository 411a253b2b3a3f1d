"""A progress bar on stderr (tqdm) that never writes from the event loop.

A task reads the count every ``interval`` seconds and hands the update to a worker thread:
a terminal or pipe that is slow to take stderr stalls that thread, never the requests.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Any, Self

import anyio

__all__ = ["Progress"]


class Progress(anyio.AsyncContextManagerMixin):
    """Show ``count()`` against ``total`` requests while the block runs (or nothing).

    Without a total (a run by duration alone) it shows the count and the elapsed time.
    """

    def __init__(
        self,
        enabled: bool,
        total: int | None,
        duration: float | None,
        count: Callable[[], int],
        *,
        interval: float = 0.2,
        unit: str = "req",
        position: int | None = None,
    ) -> None:
        self.enabled = enabled
        self._total = total
        self._duration = duration
        self._count = count
        self._interval = interval
        self._unit = unit
        self._position = position
        self._bar: Any = None
        self._description = ""
        self._shown = 0
        self._shown_description = ""

    def describe(self, text: str) -> None:
        """Set the label in front of the bar (shown at the next refresh)."""
        self._description = text

    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if not self.enabled:
            yield self
            return
        self._bar = await anyio.to_thread.run_sync(self._open)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresh_forever)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._refresh()
                await anyio.to_thread.run_sync(self._bar.close)

    def _open(self) -> Any:
        from tqdm.std import tqdm  # the plain text bar, also in notebooks (no widgets needed)

        postfix = f"up to {self._duration:g} s" if self._duration is not None else None
        return tqdm(
            total=self._total,
            unit=self._unit,
            position=self._position,
            # An inner bar (a sweep's point) clears itself: the outer one stays.
            leave=not self._position,
            file=sys.stderr,
            mininterval=0,  # this class decides how often to draw
            dynamic_ncols=True,
            postfix=postfix,
        )

    async def _refresh_forever(self) -> None:
        while True:
            await anyio.sleep(self._interval)  # a refresh period, not synchronisation
            await self._refresh()

    async def _refresh(self) -> None:
        count, description = self._count(), self._description
        if count != self._shown or description != self._shown_description:
            delta, self._shown, self._shown_description = count - self._shown, count, description
            await anyio.to_thread.run_sync(self._apply, delta, description)

    def _apply(self, delta: int, description: str) -> None:
        self._bar.set_description_str(description, refresh=False)
        self._bar.update(delta)
        if not delta:
            self._bar.refresh()
