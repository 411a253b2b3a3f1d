"""NCCL bindings against the real library (nvidia-nccl-cu12 wheel), on a machine with no GPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import threading
import time
from typing import Any

import anyio
import pytest

from llamatelemetry_async._errors import (
    LlamaError,
    NCCLError,
    NCCLNotFoundError,
    NCCLSymbolError,
    NCCLUsageError,
    UsageError,
)
from llamatelemetry_async.nccl import (
    FUNCTIONS,
    Buffer,
    Communicator,
    DataType,
    NCCLLibrary,
    Result,
    decode_version,
    find_nccl,
    group,
    load,
)
from llamatelemetry_async.nccl._lib import RESULT_NAMES

pytestmark = pytest.mark.anyio

LISTED = [
    "GetVersion", "GetErrorString", "GetLastError", "GetUniqueId", "CommInitRank",
    "CommInitRankConfig", "CommInitAll", "CommFinalize", "CommDestroy", "CommAbort",
    "CommGetAsyncError", "CommCount", "CommCuDevice", "CommUserRank", "AllReduce", "Broadcast",
    "Reduce", "AllGather", "ReduceScatter", "Send", "Recv", "GroupStart", "GroupEnd",
]  # fmt: skip

try:
    LIB: NCCLLibrary | None = load()
except NCCLNotFoundError:
    LIB = None
needs_lib = pytest.mark.skipif(LIB is None, reason="pip install nvidia-nccl-cu12")


def lib() -> NCCLLibrary:
    assert LIB is not None
    return LIB


@needs_lib
def test_library_loads_and_version_matches_wheel() -> None:
    assert lib().path.name == "libnccl.so.2"
    version = lib().version()
    try:
        wheel = importlib.metadata.version("nvidia-nccl-cu12")
    except importlib.metadata.PackageNotFoundError:
        wheel = importlib.metadata.version("nvidia-nccl-cu13")
    assert version == wheel


def test_decode_version() -> None:
    assert decode_version(23203) == "2.32.3"
    assert decode_version(22809) == "2.28.9"
    assert decode_version(2708) == "2.7.8"  # the pre-2.9 X*1000 scheme


@needs_lib
def test_unique_ids_are_128_bytes_and_fresh() -> None:
    a, b = lib().unique_id(), lib().unique_id()
    assert ctypes.sizeof(a) == 128
    assert len(bytes(a)) == 128
    assert bytes(a) != bytes(b)
    assert bytes(type(a).from_bytes(bytes(a))) == bytes(a)


@needs_lib
def test_every_result_code_has_name_and_text() -> None:
    for code in Result:
        assert RESULT_NAMES[code].startswith("nccl")
        assert lib().error_string(code)
        if code:
            err = lib().error(code, "ncclTest")
            assert err.code == code
            assert err.name == RESULT_NAMES[code]
            assert err.error_string == lib().error_string(code)
    assert lib().error_string(1).startswith("unhandled cuda error")


def test_function_table_complete() -> None:
    for short in LISTED:
        _restype, argtypes = FUNCTIONS[f"nccl{short}"]
        assert isinstance(argtypes, tuple)
    assert FUNCTIONS["ncclCommInitRank"][1][2].__name__ == "UniqueId"  # by value
    assert len(FUNCTIONS["ncclAllReduce"][1]) == 7


@needs_lib
def test_every_listed_symbol_resolves() -> None:
    for short in LISTED:
        assert lib().fn(f"nccl{short}").argtypes is not None


@needs_lib
def test_missing_symbol_reported_on_use() -> None:
    table = dict(FUNCTIONS, ncclNoSuchThing=(ctypes.c_int, ()))
    fresh = NCCLLibrary(lib().path, functions=table)  # loading does not resolve anything
    assert fresh.version().startswith("2.")
    with pytest.raises(NCCLSymbolError, match="ncclNoSuchThing") as info:
        fresh.call("ncclNoSuchThing")
    assert info.value.symbol == "ncclNoSuchThing"


def test_not_found_lists_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import llamatelemetry_async.nccl._lib as mod

    monkeypatch.setenv(mod.ENV_VAR, str(tmp_path / "nope.so"))
    monkeypatch.setattr(mod, "_wheel_candidates", list)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(mod, "_SONAME", "libnccl-missing.so.9")
    with pytest.raises(NCCLNotFoundError, match="pip install nvidia-nccl-cu12") as info:
        find_nccl(tmp_path / "explicit.so")
    assert len(info.value.searched) >= 3
    assert isinstance(info.value, NCCLError)
    assert isinstance(info.value, LlamaError)


@needs_lib
async def test_init_rank_without_gpu_fails_typed_while_loop_ticks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llamatelemetry_async.nccl._lib import NCCLLibrary

    threads: set[int] = set()
    real_call = NCCLLibrary.call

    def recording_call(self: NCCLLibrary, name: str, *args: Any, comm: Any = None) -> int:
        if name == "ncclCommInitRank":
            threads.add(threading.get_ident())
        return real_call(self, name, *args, comm=comm)

    monkeypatch.setattr(NCCLLibrary, "call", recording_call)
    loop_thread = threading.get_ident()
    lags: list[float] = []
    errors: list[NCCLError] = []
    t_init: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    async def inits() -> None:
        for _ in range(20):
            t = time.perf_counter()
            try:
                await Communicator.init_rank(1, 0, lib().unique_id(), synchronize=False)
            except NCCLError as exc:
                errors.append(exc)
            t_init.append(time.perf_counter() - t)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.02)
        await inits()
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()

    assert len(errors) == 20
    err = errors[0]
    assert type(err) is NCCLError
    assert err.code == Result.UNHANDLED_CUDA_ERROR
    assert err.name == "ncclUnhandledCudaError"
    assert err.error_string is not None
    assert "unhandled cuda error" in err.error_string
    assert err.last_error is not None
    assert "CUDA driver" in err.last_error
    # The blocking init ran on a worker thread, never on the event loop's; the ticker's lag
    # is printed for the record (a ~0.3 ms failing init is too short to show up as lag).
    assert threads
    assert loop_thread not in threads
    lags.sort()
    p99 = lags[int(len(lags) * 0.99) - 1]
    print(
        f"init fail {min(t_init) * 1e3:.2f} ms min; {len(lags)} ticks, lag p99 {p99 * 1e3:.2f} ms"
    )


class FakeArray:
    def __init__(self, shape: tuple[int, ...], typestr: str, ptr: int = 0x1000) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3, "strides": None
        }  # fmt: skip


class RecordingLib:
    """Stands in for NCCLLibrary: records calls, so validation failures show none were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def call(self, name: str, *args: Any, comm: Any = None) -> int:
        self.calls.append((name, args))
        return 0


def fake_comm(nranks: int = 2) -> tuple[Communicator, RecordingLib]:
    rec = RecordingLib()
    comm = Communicator(0x1, lib=rec, nranks=nranks, rank=0, device=0, synchronize=False)  # type: ignore[arg-type]
    return comm, rec


async def test_validation_before_any_call() -> None:
    comm, rec = fake_comm()
    f4, f8 = FakeArray((4, 8), "<f4"), FakeArray((32,), "<f8")
    with pytest.raises(NCCLUsageError, match="FLOAT32"):
        await comm.all_reduce(f4, f8)
    with pytest.raises(NCCLUsageError, match="32 elements"):
        await comm.all_reduce(f4, FakeArray((31,), "<f4"))
    with pytest.raises(NCCLUsageError, match="needs send's 32"):
        await comm.all_gather(f4, FakeArray((32,), "<f4"))
    with pytest.raises(NCCLUsageError, match="reduce_scatter"):
        await comm.reduce_scatter(f4, FakeArray((32,), "<f4"))
    with pytest.raises(NCCLUsageError, match="typestr"):
        await comm.all_reduce(FakeArray((4,), "<c8"))
    with pytest.raises(NCCLUsageError, match="root 2"):
        await comm.broadcast(f4, root=2)
    with pytest.raises(NCCLUsageError, match="not a device buffer"):
        await comm.send(object(), 1)
    assert rec.calls == []
    assert isinstance(NCCLUsageError("x"), UsageError)


async def test_calls_and_bytes_counted() -> None:
    comm, rec = fake_comm()
    f4 = FakeArray((4, 8), "<f4", ptr=0xA0)
    await comm.all_reduce(f4, stream=7)
    await comm.all_gather((0xB0, 16, DataType.INT8), (0xC0, 32, "|i1"))
    assert rec.calls[0] == ("ncclAllReduce", (0xA0, 0xA0, 32, DataType.FLOAT32, 0, comm._handle, 7))
    assert rec.calls[1][0] == "ncclAllGather"
    assert comm.bytes_moved == {"ncclAllReduce": 128, "ncclAllGather": 16}
    async with group():
        await comm.send(f4, 1)
        await comm.recv(f4, 1)
        assert len(rec.calls) == 2  # queued until the group exits
    assert [c[0] for c in rec.calls[2:]] == [
        "ncclGroupStart",
        "ncclSend",
        "ncclRecv",
        "ncclGroupEnd",
    ]
    await comm.aclose()
    await comm.aclose()
    assert [c[0] for c in rec.calls[-2:]] == ["ncclCommFinalize", "ncclCommDestroy"]
    with pytest.raises(UsageError):
        await comm.all_reduce(f4)


def test_buffer_rejects_strided() -> None:
    arr = FakeArray((4, 8), "<f4")
    arr.__cuda_array_interface__["strides"] = (64, 8)
    with pytest.raises(NCCLUsageError, match="contiguous"):
        Buffer.of(arr)


async def test_collectives_are_spans_and_counted_bytes() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    rec = RecordingLib()
    comm = Communicator(
        0x1,
        lib=rec,  # type: ignore[arg-type]
        nranks=2,
        rank=0,
        device=0,
        synchronize=False,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    f4 = FakeArray((4, 8), "<f4")
    await comm.all_reduce(f4)
    async with group():
        await comm.send(f4, 1)
        await comm.recv(f4, 1)
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["nccl ncclAllReduce", "nccl group"]
    first = dict(spans.get_finished_spans()[0].attributes or {})
    assert first["nccl.bytes"] == 128
    assert first["nccl.nranks"] == 2
    data = reader.get_metrics_data()
    assert data is not None
    sums = {
        (m.name, dict(p.attributes or {})["nccl.op"]): getattr(p, "value", None)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }
    assert sums[("llamatelemetry.nccl.bytes", "ncclAllReduce")] == 128
    assert sums[("llamatelemetry.nccl.bytes", "ncclSend")] == 128
    assert sums[("llamatelemetry.nccl.operations", "ncclRecv")] == 1
