"""Task-group errors, raised as themselves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["single_error"]


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
