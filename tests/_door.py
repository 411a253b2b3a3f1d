"""A ``FrontDoor`` served by a real uvicorn on a free loopback port, inside a test.

uvicorn runs on asyncio only, so the tests that use this run on asyncio (their module
overrides ``anyio_backend``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn

from llamatelemetry_async._groups import single_error
from llamatelemetry_async.frontdoor import FrontDoor


class _Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # the test runner's signals stay the runner's
        yield


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` (lifespan off) on 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = _Quiet(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    with sock, single_error():  # the app's own error, not a group of one
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True


@contextlib.asynccontextmanager
async def running_door(door: FrontDoor, *, ready: bool = True) -> AsyncIterator[str]:
    """Serve ``door`` and enter it (its engine starts); yields the door's base URL.

    With ``ready`` the block starts once the engine takes requests.
    """
    async with serve_asgi(door) as url, door:
        if ready:
            await door.wait_ready()
        yield url
