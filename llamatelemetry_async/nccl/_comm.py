"""``Communicator``: an NCCL communicator whose every call runs on a worker thread.

Init takes ~865 ms on an H100 and a collective plus its stream synchronisation blocks too,
so each call goes through ``anyio.to_thread.run_sync`` with the communicator's own
``CapacityLimiter(1)``: calls on one communicator stay in order and the loop keeps running.

NCCL keeps group depth and the last error per *thread*, and pooled worker threads are not
pinned, so anything that must share a thread (a call and its error text, a whole
``group()``) is done inside one worker call: ops issued inside ``group()`` are validated at
once, queued, and run as GroupStart, ops, GroupEnd in one call when the block exits.

Stream synchronisation needs the CUDA runtime (CuPy, or ``libcudart`` via ctypes). With
``synchronize=True`` (the default) a collective returns after its stream finished; without a
runtime that raises ``NCCLUsageError``: pass ``synchronize=False`` and synchronise yourself.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import dataclasses
import importlib.util
import math
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio

from .._errors import ClientClosedError, NCCLError, NCCLUsageError
from .._version import __version__
from ._lib import DataType, NCCLLibrary, RedOp, UniqueId, load

if TYPE_CHECKING:
    from opentelemetry import metrics, trace

_SCOPE = "llamatelemetry_async.nccl"

__all__ = ["Buffer", "Communicator", "group"]

T = TypeVar("T")

# __cuda_array_interface__ typestr (byte-order char dropped) -> NCCL data type.
_TYPESTRS = {
    "i1": DataType.INT8,
    "u1": DataType.UINT8,
    "i4": DataType.INT32,
    "u4": DataType.UINT32,
    "i8": DataType.INT64,
    "u8": DataType.UINT64,
    "f2": DataType.FLOAT16,
    "f4": DataType.FLOAT32,
    "f8": DataType.FLOAT64,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """A contiguous device buffer: address, element count, NCCL data type."""

    ptr: int
    count: int
    dtype: DataType

    @property
    def nbytes(self) -> int:
        """The buffer's size in bytes (``count`` times the data type's size)."""
        return self.count * self.dtype.itemsize

    @classmethod
    def of(cls, obj: object) -> Buffer:
        """From ``__cuda_array_interface__`` (CuPy, PyTorch) or ``(pointer, count, dtype)``.

        ``dtype`` in a tuple is a ``DataType``, its int, or a typestr such as ``"<f4"``.
        """
        if isinstance(obj, Buffer):
            return obj
        if isinstance(obj, tuple):
            if len(obj) != 3:
                raise NCCLUsageError("an explicit buffer is a (pointer, count, dtype) tuple")
            ptr, count, dtype = obj
            if isinstance(dtype, str):
                dtype = _dtype_of(dtype)
            try:
                dt = DataType(dtype)
            except ValueError:
                raise NCCLUsageError(f"unknown NCCL data type {dtype!r}") from None
            if not isinstance(ptr, int) or not isinstance(count, int) or count < 0:
                raise NCCLUsageError("pointer and count must be ints, count >= 0")
            return cls(ptr, count, dt)
        cai = getattr(obj, "__cuda_array_interface__", None)
        if not isinstance(cai, dict):
            raise NCCLUsageError(
                f"{type(obj).__name__} is not a device buffer: pass an object with "
                "__cuda_array_interface__ (CuPy, PyTorch) or a (pointer, count, dtype) tuple"
            )
        dt = _dtype_of(str(cai["typestr"]))
        shape = tuple(int(n) for n in cai["shape"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, dt.itemsize):
            raise NCCLUsageError("NCCL needs a C-contiguous buffer; copy it first")
        return cls(int(cai["data"][0]), math.prod(shape), dt)


def _dtype_of(typestr: str) -> DataType:
    try:
        return _TYPESTRS[typestr.lstrip("<>|=")]
    except KeyError:
        raise NCCLUsageError(
            f"typestr {typestr!r} has no NCCL data type; use one of "
            + ", ".join(sorted(_TYPESTRS))
            + " (bfloat16/fp8: pass (pointer, count, DataType) explicitly)"
        ) from None


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _stream_handle(stream: object) -> int:
    """An int ``cudaStream_t`` from an int, ``__cuda_stream__`` or ``.ptr`` (CuPy) object."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    proto = getattr(stream, "__cuda_stream__", None)
    if callable(proto):
        return int(proto()[1])  # (version, handle) per the CUDA stream protocol
    for attr in ("ptr", "cuda_stream", "handle"):
        value = getattr(stream, attr, None)
        if isinstance(value, int):
            return value
    raise NCCLUsageError(f"cannot get a CUDA stream handle from {type(stream).__name__}")


# --------------------------------------------------------------------------- CUDA runtime
class _Cudart:
    """The two CUDA runtime calls needed: pick a device for init, synchronise a stream."""

    def __init__(self) -> None:
        self._cupy: Any = None
        self._lib: Any = None
        if importlib.util.find_spec("cupy") is not None:
            import cupy  # type: ignore[import-not-found]  # optional GPU dependency

            self._cupy = cupy
            return
        for name in _cudart_candidates():
            try:
                self._lib = ctypes.CDLL(name)
            except OSError:
                continue
            self._lib.cudaSetDevice.argtypes = (ctypes.c_int,)
            self._lib.cudaStreamSynchronize.argtypes = (ctypes.c_void_p,)
            return

    @property
    def available(self) -> bool:
        return self._cupy is not None or self._lib is not None

    def set_device(self, device: int) -> None:
        if self._cupy is not None:
            self._cupy.cuda.runtime.setDevice(device)
        elif self._lib is not None and (rc := self._lib.cudaSetDevice(device)):
            raise NCCLError(f"cudaSetDevice({device}) failed with cudaError {rc}")

    def synchronize(self, stream: int) -> None:
        if self._cupy is not None:
            self._cupy.cuda.runtime.streamSynchronize(stream)
        elif self._lib is not None and (rc := self._lib.cudaStreamSynchronize(stream)):
            raise NCCLError(f"cudaStreamSynchronize failed with cudaError {rc}")


def _cudart_candidates() -> list[str]:
    names: list[str] = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations is not None:
        for base in spec.submodule_search_locations:
            for major in ("13", "12"):
                lib = Path(base) / "cuda_runtime" / "lib" / f"libcudart.so.{major}"
                if lib.is_file():
                    names.append(str(lib))
    if found := ctypes.util.find_library("cudart"):
        names.append(found)
    return names


_cudart: _Cudart | None = None


def _runtime() -> _Cudart:
    global _cudart
    if _cudart is None:
        _cudart = _Cudart()
    return _cudart


# --------------------------------------------------------------------------- groups
@dataclasses.dataclass(slots=True)
class _Op:
    comm: Communicator
    name: str
    call: Callable[[], None]
    stream: int
    nbytes: int


_pending: contextvars.ContextVar[list[_Op] | None] = contextvars.ContextVar(
    "llamatelemetry_nccl_group", default=None
)


@contextlib.asynccontextmanager
async def group() -> AsyncIterator[None]:
    """Fuse the NCCL ops issued inside into one ``ncclGroupStart``/``ncclGroupEnd``.

    Needed when one process drives several communicators (``init_all``) or pairs
    ``send``/``recv``. Ops are checked at once and run together when the block exits;
    nesting joins the outer group.
    """
    if _pending.get() is not None:
        yield
        return
    ops: list[_Op] = []
    token = _pending.set(ops)
    try:
        yield
    finally:
        _pending.reset(token)
    if not ops:
        return
    comms = sorted({id(op.comm): op.comm for op in ops}.values(), key=id)
    lib = comms[0]._lib
    sync = comms[0]._synchronize

    def run() -> None:
        lib.call("ncclGroupStart")
        try:
            for op in ops:
                op.call()
        finally:
            lib.call("ncclGroupEnd")
        if sync:
            for stream in dict.fromkeys(op.stream for op in ops):
                _runtime().synchronize(stream)

    async with contextlib.AsyncExitStack() as stack:
        # Hold every member's limiter (in a fixed order, no deadlock) so the group stays
        # ordered with each communicator's other calls.
        for comm in comms:
            await stack.enter_async_context(comm._limiter)
        attrs: dict[str, int | list[str]] = {
            "nccl.ops": [op.name for op in ops],
            "nccl.bytes": sum(op.nbytes for op in ops),
            "nccl.communicators": len(comms),
        }
        with comms[0]._tracer.start_as_current_span("nccl group", attributes=attrs):
            await anyio.to_thread.run_sync(run)
    for op in ops:
        op.comm._count(op.name, op.nbytes)


# --------------------------------------------------------------------------- communicator
class Communicator:
    """One rank of an NCCL communicator, driven from async code.

    ```python
    uid = nccl.load().unique_id()                      # rank 0; share bytes(uid)
    async with await Communicator.init_rank(1, 0, uid, device=0) as comm:
        await comm.all_reduce(x, y)                    # CuPy/PyTorch arrays or (ptr, n, dtype)
    ```

    ``bytes_moved`` counts, per op name, the bytes of the buffer each op sent (its input).
    """

    def __init__(
        self,
        handle: int | None,
        *,
        lib: NCCLLibrary,
        nranks: int,
        rank: int,
        device: int,
        synchronize: bool = True,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        """Wrap an existing ``ncclComm_t``; use ``init_rank`` / ``init_all`` instead.

        Each collective becomes a span (``nccl ncclAllReduce``...) and its bytes are counted
        (``llamatelemetry.nccl.bytes``) on the given providers, or the global ones (no cost
        when none is configured).
        """
        self._handle = ctypes.c_void_p(handle)
        self._lib = lib
        self.nranks = nranks
        self.rank = rank
        self.device = device
        self._synchronize = synchronize
        self._limiter = anyio.CapacityLimiter(1)  # this communicator's calls, in order
        self._closed = False
        self.bytes_moved: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        from opentelemetry import metrics, trace  # here: loading NCCL needs no OpenTelemetry

        self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self._bytes_counter = meter.create_counter(
            "llamatelemetry.nccl.bytes", unit="By", description="Bytes sent by NCCL operations."
        )
        self._op_counter = meter.create_counter(
            "llamatelemetry.nccl.operations", unit="{operation}", description="NCCL operations."
        )

    # ----------------------------------------------------------------- creation
    @classmethod
    async def init_rank(
        cls,
        nranks: int,
        rank: int,
        unique_id: UniqueId | bytes,
        *,
        device: int = 0,
        lib: NCCLLibrary | None = None,
        synchronize: bool = True,
    ) -> Self:
        """``ncclCommInitRank`` on ``device``; blocks (on a thread) until all ranks joined."""
        if not 0 <= rank < nranks:
            raise NCCLUsageError(f"rank {rank} is outside 0..{nranks - 1}")
        uid = unique_id if isinstance(unique_id, UniqueId) else UniqueId.from_bytes(unique_id)
        _check_sync(synchronize)
        library = lib if lib is not None else await anyio.to_thread.run_sync(load)

        def init() -> int:
            # NCCL binds the communicator to the thread's current device.
            if device != 0 or _runtime().available:
                if not _runtime().available:
                    raise NCCLUsageError(
                        f"device={device} needs the CUDA runtime (CuPy or libcudart) to select it"
                    )
                try:
                    _runtime().set_device(device)
                except Exception:
                    # Device 0 is the default anyway: let NCCL fail with its own text
                    # (e.g. no driver) rather than the runtime's bare error number.
                    if device != 0:
                        raise
            comm = ctypes.c_void_p()
            library.call("ncclCommInitRank", ctypes.byref(comm), nranks, uid, rank)
            return int(comm.value or 0)

        limiter = anyio.CapacityLimiter(1)
        handle = await anyio.to_thread.run_sync(init, limiter=limiter)
        self = cls(
            handle, lib=library, nranks=nranks, rank=rank, device=device, synchronize=synchronize
        )
        self._limiter = limiter
        return self

    @classmethod
    async def init_all(
        cls,
        devices: Sequence[int],
        *,
        lib: NCCLLibrary | None = None,
        synchronize: bool = True,
    ) -> list[Self]:
        """``ncclCommInitAll``: one communicator per device, all driven by this process.

        Issue their collectives inside ``group()``.
        """
        devs = list(devices)
        if not devs:
            raise NCCLUsageError("init_all needs at least one device")
        _check_sync(synchronize)
        library = lib if lib is not None else await anyio.to_thread.run_sync(load)

        def init() -> list[int]:
            comms = (ctypes.c_void_p * len(devs))()
            devlist = (ctypes.c_int * len(devs))(*devs)
            library.call("ncclCommInitAll", comms, len(devs), devlist)
            return [int(c or 0) for c in comms]

        handles = await anyio.to_thread.run_sync(init)
        n = len(devs)
        return [
            cls(h, lib=library, nranks=n, rank=r, device=d, synchronize=synchronize)
            for r, (h, d) in enumerate(zip(handles, devs, strict=True))
        ]

    # ----------------------------------------------------------------- plumbing
    async def _run(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    def _live(self) -> None:
        if self._closed:
            raise ClientClosedError("this NCCL communicator was closed or aborted")

    def _count(self, name: str, nbytes: int) -> None:
        self.bytes_moved[name] = self.bytes_moved.get(name, 0) + nbytes
        self.calls[name] = self.calls.get(name, 0) + 1
        attrs: dict[str, str | int] = {"nccl.op": name, "nccl.rank": self.rank}
        self._bytes_counter.add(nbytes, attrs)
        self._op_counter.add(1, attrs)

    def _span_attributes(self, name: str, nbytes: int) -> dict[str, Any]:
        return {
            "nccl.op": name,
            "nccl.bytes": nbytes,
            "nccl.rank": self.rank,
            "nccl.nranks": self.nranks,
            "nccl.device": self.device,
        }

    async def _issue(self, name: str, args: tuple[Any, ...], stream: int, nbytes: int) -> None:
        self._live()
        lib, handle = self._lib, self._handle

        def call() -> None:
            lib.call(name, *args[:-1], handle, args[-1], comm=handle)

        ops = _pending.get()
        if ops is not None:
            ops.append(_Op(self, name, call, stream, nbytes))
            return
        sync = self._synchronize

        def run() -> None:
            call()
            if sync:
                _runtime().synchronize(stream)

        attrs = self._span_attributes(name, nbytes)
        with self._tracer.start_as_current_span(f"nccl {name}", attributes=attrs):
            await self._run(run)
        self._count(name, nbytes)

    # ----------------------------------------------------------------- collectives
    async def all_reduce(
        self, send: object, recv: object = None, *, op: RedOp = RedOp.SUM, stream: object = 0
    ) -> None:
        """``recv = op(send over ranks)``; ``recv=None`` reduces in place."""
        s, r = _pair(send, recv)
        _same(s, r, "all_reduce")
        h = _stream_handle(stream)
        await self._issue("ncclAllReduce", (s.ptr, r.ptr, s.count, s.dtype, op, h), h, s.nbytes)

    async def broadcast(
        self, send: object, recv: object = None, *, root: int = 0, stream: object = 0
    ) -> None:
        """Copy ``root``'s ``send`` into every rank's ``recv`` (``None``: in place)."""
        s, r = _pair(send, recv)
        _same(s, r, "broadcast")
        self._check_rank(root, "root")
        h = _stream_handle(stream)
        args = (s.ptr, r.ptr, s.count, s.dtype, root, h)
        await self._issue("ncclBroadcast", args, h, s.nbytes)

    async def reduce(
        self,
        send: object,
        recv: object = None,
        *,
        op: RedOp = RedOp.SUM,
        root: int = 0,
        stream: object = 0,
    ) -> None:
        """Reduce ``send`` over ranks into ``root``'s ``recv``."""
        s, r = _pair(send, recv)
        _same(s, r, "reduce")
        self._check_rank(root, "root")
        h = _stream_handle(stream)
        args = (s.ptr, r.ptr, s.count, s.dtype, op, root, h)
        await self._issue("ncclReduce", args, h, s.nbytes)

    async def all_gather(self, send: object, recv: object, *, stream: object = 0) -> None:
        """Every rank's ``send`` concatenated into ``recv`` (``nranks`` times as long)."""
        s, r = Buffer.of(send), Buffer.of(recv)
        _dtypes(s, r, "all_gather")
        if r.count != s.count * self.nranks:
            raise NCCLUsageError(
                f"all_gather: recv has {r.count} elements, needs send's {s.count} x "
                f"nranks {self.nranks} = {s.count * self.nranks}"
            )
        h = _stream_handle(stream)
        await self._issue("ncclAllGather", (s.ptr, r.ptr, s.count, s.dtype, h), h, s.nbytes)

    async def reduce_scatter(
        self, send: object, recv: object, *, op: RedOp = RedOp.SUM, stream: object = 0
    ) -> None:
        """Reduce ``send`` over ranks; rank i keeps block i in ``recv`` (send = nranks x recv)."""
        s, r = Buffer.of(send), Buffer.of(recv)
        _dtypes(s, r, "reduce_scatter")
        if s.count != r.count * self.nranks:
            raise NCCLUsageError(
                f"reduce_scatter: send has {s.count} elements, needs recv's {r.count} x "
                f"nranks {self.nranks} = {r.count * self.nranks}"
            )
        h = _stream_handle(stream)
        args = (s.ptr, r.ptr, r.count, s.dtype, op, h)
        await self._issue("ncclReduceScatter", args, h, s.nbytes)

    async def send(self, buffer: object, peer: int, *, stream: object = 0) -> None:
        """Send ``buffer`` to rank ``peer`` (pair it with ``recv`` inside ``group()``)."""
        b = Buffer.of(buffer)
        self._check_rank(peer, "peer")
        h = _stream_handle(stream)
        await self._issue("ncclSend", (b.ptr, b.count, b.dtype, peer, h), h, b.nbytes)

    async def recv(self, buffer: object, peer: int, *, stream: object = 0) -> None:
        """Receive into ``buffer`` from rank ``peer``."""
        b = Buffer.of(buffer)
        self._check_rank(peer, "peer")
        h = _stream_handle(stream)
        await self._issue("ncclRecv", (b.ptr, b.count, b.dtype, peer, h), h, b.nbytes)

    def _check_rank(self, value: int, what: str) -> None:
        if not 0 <= value < self.nranks:
            raise NCCLUsageError(f"{what} {value} is outside 0..{self.nranks - 1}")

    def group(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Same as the module's ``group()``."""
        return group()

    # ----------------------------------------------------------------- queries / lifecycle
    async def async_error(self) -> NCCLError | None:
        """``ncclCommGetAsyncError``: the communicator's pending failure, if any."""
        self._live()
        lib, handle = self._lib, self._handle

        def query() -> NCCLError | None:
            out = ctypes.c_int()
            lib.call("ncclCommGetAsyncError", handle, ctypes.byref(out), comm=handle)
            return lib.error(out.value, "async", comm=handle) if out.value else None

        return await self._run(query)

    async def abort(self) -> None:
        """``ncclCommAbort``: stop pending work and free the communicator.

        Runs outside the limiter on purpose: it is how a hung collective is cut short.
        """
        if self._closed:
            return
        self._closed = True
        lib, handle = self._lib, self._handle
        await anyio.to_thread.run_sync(lambda: lib.call("ncclCommAbort", handle, comm=handle))

    async def aclose(self) -> None:
        """``ncclCommFinalize`` then ``ncclCommDestroy``; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        lib, handle = self._lib, self._handle

        def close() -> None:
            try:
                lib.call("ncclCommFinalize", handle, comm=handle)
            finally:
                lib.call("ncclCommDestroy", handle, comm=handle)

        with anyio.CancelScope(shield=True):  # a cancelled close must still free the comm
            await self._run(close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _check_sync(synchronize: bool) -> None:
    if synchronize and not _runtime().available:
        raise NCCLUsageError(
            "synchronize=True needs the CUDA runtime (CuPy or libcudart) to wait for streams; "
            "install one or pass synchronize=False and synchronise the stream yourself"
        )


def _pair(send: object, recv: object) -> tuple[Buffer, Buffer]:
    s = Buffer.of(send)
    return s, (s if recv is None else Buffer.of(recv))


def _dtypes(s: Buffer, r: Buffer, op: str) -> None:
    if s.dtype != r.dtype:
        raise NCCLUsageError(f"{op}: send is {s.dtype.name}, recv is {r.dtype.name}")


def _same(s: Buffer, r: Buffer, op: str) -> None:
    _dtypes(s, r, op)
    if s.count != r.count:
        raise NCCLUsageError(f"{op}: send has {s.count} elements, recv has {r.count}")
