"""``LlamaServer``: one llama-server process, started, watched and always reaped.

* Own process group (``start_new_session``), so stopping reaches every child it forks.
* Parent-death signal: on Linux the child is started through a tiny exec shim that sets
  ``PR_SET_PDEATHSIG`` to SIGKILL, so a llama-server never outlives a Python process that was
  SIGKILLed or SIGTERMed (no ``finally`` runs then). The signal follows the spawning
  *thread*: asyncio spawns from the event loop's thread; under trio (whose worker threads
  retire when idle) the library forks from one daemon thread of its own that lives as long
  as the process, and waits for the child through a pidfd.
* A start that dies of SIGSEGV or SIGILL names the likely causes (a binary built for another
  CPU; llama.cpp's CPU weight-repack path) and the way out (``--no-repack``, a rebuild).
* Output is drained from the first byte into a bounded ring of recent lines, Python
  ``logging``, and optionally a file (aiofiles): a pipe nobody reads stalls the server.
* Before a start on GPUs, the binary's CUDA architectures are checked against the GPUs'
  compute capabilities (``check_cuda_compatibility``): a T4 given a binary built only for
  an H100 fails at once with ``CUDAArchitectureError``, not at llama-server's first kernel.
* Readiness: llama-server logs ``listening on http://HOST:PORT`` once the model is loaded
  (it binds before loading, but logs the address after). With ``--port 0`` that line is
  also the only way to learn the port, and there is no port race at all. ``/health`` is
  then checked once, quickly.
* Stop: SIGTERM to the group, a grace period, SIGKILL, reap; shielded from cancellation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import functools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

from .._errors import (
    ConfigError,
    HTTPStatusError,
    LlamaError,
    ServerStartError,
    TransportError,
)
from .._groups import single_error
from ..client import AsyncLlamaClient
from ._config import core_ranges
from ._cuda_arch import check_cuda_compatibility

__all__ = ["LlamaServer", "ServerState", "dies_with_this_process", "open_process"]

logger = logging.getLogger("llamatelemetry_async.server")

_LISTENING = re.compile(rb"listening on (https?)://(\S+?):(\d+)\s*$")

# Runs in the child before exec: pin to the given cores (every thread llama-server starts
# inherits it; its own --cpu-mask leaves the main thread free), die with the parent, then
# become llama-server. argv[1]: the parent's pid, or "-" for no parent-death signal;
# argv[2]: the cores, comma-separated, or "" for no pinning.
_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ppid,cores=sys.argv[1:3]\n"
    "cores and os.sched_setaffinity(0,[int(c) for c in cores.split(',')])\n"
    "if ppid!='-':\n"
    " ctypes.CDLL(None).prctl(1,signal.SIGKILL)\n"  # PR_SET_PDEATHSIG = 1
    " os.getppid()==int(ppid) or os._exit(70)\n"  # the parent died before prctl
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)


class ServerState(enum.Enum):
    """Where a ``LlamaServer`` is in its life."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


class LlamaServer:
    """One supervised llama-server process.

    ``argv`` and ``env`` are complete (see ``server_command``); ``name`` and ``gpus``
    describe it in logs, errors and ``AsyncEngine.servers``; ``cores`` pins the process and
    every thread it starts to those CPU cores (``server_affinity`` says which). ``run()``
    starts it and returns its exit code when it exits by itself; cancelling ``run()`` stops
    and reaps it. One ``LlamaServer`` can be run again after it exited (restarts).
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        name: str = "llama-server",
        gpus: tuple[int, ...] = (),
        cores: Sequence[int] = (),
        log_lines: int = 500,
        log_file: str | os.PathLike[str] | None = None,
        stop_grace: float = 5.0,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.name = name
        self.gpus = gpus
        self.cores = tuple(cores)
        self.stop_grace = stop_grace
        self.log_file = Path(log_file) if log_file is not None else None
        self.state = ServerState.NEW
        self.url: str | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.starts = 0
        self._lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._listening = anyio.Event()
        self.exited = anyio.Event()
        """Set when the current process has exited (reset on each run)."""

    def recent_logs(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines the server printed (all kept lines by default)."""
        lines = list(self._lines)
        return lines if n is None else lines[-n:]

    def __repr__(self) -> str:
        return f"<LlamaServer {self.name} {self.state.value} pid={self.pid} url={self.url}>"

    async def run(
        self,
        *,
        ready_timeout: float = 120.0,
        on_ready: Callable[[], Awaitable[None]] | None = None,
        on_exit: Callable[[], None] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> int:
        """Start the process, report ready through ``task_status``, return its exit code.

        Raises ``ServerStartError`` (with the exit code and the last log lines) if it exits
        or does not become ready within ``ready_timeout`` seconds. ``on_ready`` runs once the
        server answers, before ``task_status.started()``; ``on_exit`` runs as soon as the
        process is gone, before ``exited`` is set. With ``gpus``, raises
        ``CUDAArchitectureError`` before spawning anything when the binary has no code
        those GPUs can run.
        """
        if self.gpus:
            # Every way a server starts (engine, Ray actor) passes here. Blocking: NVML, and
            # maybe cuobjdump the first time a binary without a build record is seen.
            check = functools.partial(
                check_cuda_compatibility, self.argv[0], self.gpus, name=self.name
            )
            await anyio.to_thread.run_sync(check)
        self.state = ServerState.STARTING
        self.url = self.host = self.port = self.exit_code = None
        self._listening = anyio.Event()
        self.exited = anyio.Event()
        self.starts += 1
        process = await open_process(self.argv, self.env, cores=self.cores)
        self.pid = process.pid
        logger.info("%s: started pid %d: %s", self.name, process.pid, " ".join(self.argv))
        try:
            with single_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, process)
                    await self._wait_ready(process, ready_timeout)
                    self.state = ServerState.READY
                    logger.info("%s: ready at %s", self.name, self.url)
                    if on_ready is not None:
                        try:
                            await on_ready()
                        except LlamaError as exc:
                            raise self._start_error(f"answered but is not usable: {exc}") from exc
                    task_status.started()
                    code = await process.wait()
            self.exit_code = code
            self.state = ServerState.CRASHED
            logger.warning("%s: pid %d exited with code %d", self.name, process.pid, code)
            return code
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    self.state = ServerState.STOPPING
                    await self._terminate(process)
                    self.state = ServerState.STOPPED
                self.exit_code = process.returncode
                if on_exit is not None:
                    on_exit()  # before anyone waiting on `exited` runs
                self.exited.set()
                await process.aclose()

    async def _wait_ready(self, process: anyio.abc.Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with anyio.move_on_after(timeout):
            await self._listening.wait()
        if self.url is not None:
            # The address is logged after the model loaded; /health confirms it answers.
            # Our own client: a default httpx client loads a TLS context on the loop (~20 ms).
            async with AsyncLlamaClient(self.url, timeout=5.0) as client:
                with anyio.move_on_after(deadline - time.monotonic()):
                    while process.returncode is None:
                        with contextlib.suppress(TransportError, HTTPStatusError):
                            await client.health()
                            return
                        await anyio.sleep(0.01)  # poll interval; 503 "Loading model" waits
        # It is exiting (the pump saw end of output, or /health broke) or time ran out.
        with anyio.move_on_after(self.stop_grace):
            await process.wait()
        code = process.returncode
        if code is None:
            why = f"did not become ready within {timeout:g} s"
        elif (crash := _crash_signal(code)) is not None:
            why = f"was killed by {crash.name} (exit code {code}) while loading. {_CRASH_HINT}"
        else:
            why = f"exited with code {code} while starting"
        raise self._start_error(why, code)

    def _start_error(self, why: str, exit_code: int | None = None) -> ServerStartError:
        return ServerStartError(
            f"{self.name}: llama-server {why}",
            server=self.name,
            exit_code=exit_code,
            log_tail="\n".join(self.recent_logs(40)),
        )

    async def _pump(self, process: anyio.abc.Process) -> None:
        """Drain stdout+stderr from the first byte to EOF (never leave the pipe full)."""
        assert process.stdout is not None
        log_file = await _LogFile.open(self.log_file) if self.log_file is not None else None
        pending = b""
        try:
            async for data in process.stdout:
                if log_file is not None:
                    await log_file.write(data)
                *lines, pending = (pending + data).split(b"\n")
                for raw in lines:
                    self._line(raw)
            if pending:
                self._line(pending)
        finally:
            self._listening.set()  # EOF: the waiter sees no URL and reports why
            if log_file is not None:
                with anyio.CancelScope(shield=True):
                    await log_file.aclose()

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._lines.append(line)
        logger.debug("%s: %s", self.name, line)
        if self.url is None:
            match = _LISTENING.search(raw.rstrip())
            if match:
                scheme, host, port = (g.decode() for g in match.groups())
                self.host, self.port = host, int(port)
                self.url = f"{scheme}://{host}:{port}"
                self._listening.set()

    async def _terminate(self, process: anyio.abc.Process) -> None:
        """SIGTERM the group, wait ``stop_grace``, SIGKILL the group, reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with anyio.move_on_after(self.stop_grace):
            await process.wait()
            return
        logger.warning("%s: pid %d ignored SIGTERM; killing it", self.name, process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    def send_signal(self, sig: int) -> None:
        """Signal the running process group (tests use SIGKILL and SIGSTOP)."""
        if self.pid is None or self.exited.is_set():
            raise ProcessLookupError(f"{self.name} is not running")
        os.killpg(self.pid, sig)


class _LogFile:
    """An append-only log file written off the event loop.

    aiofiles on asyncio; anyio's worker-thread file under trio, where aiofiles cannot run.
    """

    def __init__(self, file: Any, close: Callable[[], Awaitable[None]]) -> None:
        self.write: Callable[[bytes], Awaitable[Any]] = file.write
        self.aclose = close

    @classmethod
    async def open(cls, path: Path) -> _LogFile:
        if sniffio.current_async_library() == "asyncio":
            import aiofiles

            file: Any = await aiofiles.open(path, "ab")
            return cls(file, file.close)
        file = await anyio.open_file(path, "ab")
        return cls(file, file.aclose)


_CRASH_HINT = (
    "Likely causes: a llama-server built for another CPU (-march=native elsewhere; SIGILL), "
    "or llama.cpp's CPU weight-repack path, which crashes loading some quantized models "
    '(Q8_0, Q4_1, Q4_K) on AVX-512/AMX hosts. Try ServerConfig(extra_args=["--no-repack"]), '
    "or rebuild a portable binary with `python -m llamatelemetry_async build-server --force`."
)


def _crash_signal(code: int) -> signal.Signals | None:
    """SIGSEGV or SIGILL if ``code`` says the process died of one (-N, or 128+N from a shell)."""
    for sig in (signal.SIGSEGV, signal.SIGILL):
        if code in (-sig, 128 + sig):
            return sig
    return None


def _shim_argv(argv: list[str], *, pdeath: bool, cores: Sequence[int] = ()) -> list[str]:
    """``argv`` behind the shim that pins it to ``cores`` and sets the parent-death signal."""
    # -I -S: no site, no user paths: the shim starts in a few milliseconds.
    ppid = str(os.getpid()) if pdeath else "-"
    cores_arg = ",".join(map(str, cores))
    return [sys.executable, "-I", "-S", "-c", _SHIM, ppid, cores_arg, *argv]


def dies_with_this_process(argv: Sequence[str]) -> list[str]:
    """``argv`` that a synchronous caller spawns (``subprocess.Popen``) so that the child is
    SIGKILLed when this process dies, however it dies (Linux; unchanged elsewhere).

    The parent-death signal follows the spawning *thread*: spawn from one that lives as long
    as the process (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    return _shim_argv(list(argv), pdeath=True)


async def open_process(
    argv: list[str], env: Mapping[str, str] | None = None, *, cores: Sequence[int] = ()
) -> anyio.abc.Process:
    """Start ``argv`` in its own process group (so stopping reaches every child it forks),
    output merged into one pipe, tied to this process by the parent-death signal on Linux.
    ``env`` None: this process's environment. ``cores``: CPU cores to pin it to (Linux;
    ``ConfigError`` if this process may not use them)."""
    if sys.platform.startswith("linux"):
        cores = _allowed_cores(cores)
        if sniffio.current_async_library() == "asyncio":
            # asyncio (and uvloop) fork from the event loop's thread, which outlives every server.
            argv = _shim_argv(argv, pdeath=True, cores=cores)
        elif _pidfd_works():
            return await _SpawnedProcess.start(_shim_argv(argv, pdeath=True, cores=cores), env)
        elif cores:
            # Else (a kernel before 5.3, or a sandbox that forbids pidfd_open): trio spawns as
            # usual, and no parent-death signal is set; a clean exit still reaps every server.
            argv = _shim_argv(argv, pdeath=False, cores=cores)
    elif cores:
        logger.info("CPU pinning is Linux-only; %s runs on any core", argv[0])
    return await anyio.open_process(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _allowed_cores(cores: Sequence[int]) -> tuple[int, ...]:
    if not cores:
        return ()
    allowed = os.sched_getaffinity(0)
    if missing := sorted(set(cores) - allowed):
        raise ConfigError(
            f"cpu_affinity: core(s) {', '.join(map(str, missing))} are not available to this "
            f"process (it may use {core_ranges(allowed)}); pin to those, or leave "
            "cpu_affinity unset",
            field="cpu_affinity",
        )
    return tuple(cores)


@functools.cache
def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


class _SpawnThread:
    """One daemon thread that forks every server started outside asyncio.

    ``PR_SET_PDEATHSIG`` fires when the thread that forked the child exits, not the process.
    trio forks from worker threads that it retires after a few idle seconds, which would kill
    healthy servers; this thread lives until the process ends, so the signal means what it says.
    """

    _guard = threading.Lock()
    _current: _SpawnThread | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="llamatelemetry-spawn", daemon=True).start()

    @classmethod
    def get(cls) -> _SpawnThread:
        with cls._guard:
            # A forked child has no copy of the thread: start its own.
            if cls._current is None or cls._current.pid != os.getpid():
                cls._current = cls()
            return cls._current

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the caller, who raises it
                    future.set_exception(exc)

    def call(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the spawn thread; blocks (call it from a worker thread)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()


class _PipeStream(anyio.abc.ByteReceiveStream):
    """The read end of a child's output pipe (non-blocking), read on any anyio backend."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            # Yield to other tasks, but never drop data that was read.
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            anyio.notify_closing(fd)
            os.close(fd)
        await anyio.lowlevel.checkpoint()


class _SpawnedProcess(anyio.abc.Process):
    """A child forked by ``_SpawnThread``: waited for through a pidfd, read through a pipe."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout_fd: int, pidfd: int) -> None:
        self._popen = popen
        self._stdout = _PipeStream(stdout_fd)
        self._pidfd = pidfd
        self._wait_lock = anyio.Lock()

    @classmethod
    async def start(cls, argv: list[str], env: Mapping[str, str] | None) -> _SpawnedProcess:
        def spawn() -> tuple[subprocess.Popen[bytes], int, int]:
            read_fd, write_fd = os.pipe()
            try:
                popen = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=write_fd,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)  # the child has its copy; EOF comes when it exits
            try:
                # Opened before anyone reaps the child, so the pid cannot be reused meanwhile.
                pidfd = os.pidfd_open(popen.pid)
            except OSError:
                os.close(read_fd)
                popen.kill()
                popen.wait()
                raise
            return popen, read_fd, pidfd

        spawner = _SpawnThread.get()
        # Shielded: a cancellation here must not lose a process that was already started.
        with anyio.CancelScope(shield=True):
            popen, read_fd, pidfd = await anyio.to_thread.run_sync(spawner.call, spawn)
        return cls(popen, read_fd, pidfd)

    async def wait(self) -> int:
        async with self._wait_lock:  # one waiter per fd at a time (trio insists)
            if self._popen.poll() is None:
                await anyio.wait_readable(self._pidfd)
            code = self._popen.wait()  # it has exited: this only reaps it
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            return code

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stdout.aclose()
        try:
            await self.wait()
        except BaseException:
            self.kill()
            with anyio.CancelScope(shield=True):
                await self.wait()
            raise

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    def send_signal(self, signal: signal.Signals) -> None:
        self._popen.send_signal(signal)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()  # reaps an exited child, as trio's own Process does

    @property
    def stdin(self) -> anyio.abc.ByteSendStream | None:
        return None

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream | None:
        return None
