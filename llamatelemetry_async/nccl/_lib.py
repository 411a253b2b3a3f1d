"""ctypes bindings to ``libnccl.so.2``: discovery, one declarative function table, enums.

Signatures are copied from ``nccl.h`` (2.32). Functions are resolved lazily from
``FUNCTIONS``, so a library older than this table loads fine and only a call to a function
it lacks raises ``NCCLSymbolError``. Every non-zero ``ncclResult_t`` becomes an ``NCCLError``
carrying the code, its name, ``ncclGetErrorString`` and ``ncclGetLastError``.

Everything here blocks; ``Communicator`` runs it on a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

from .._errors import NCCLError, NCCLNotFoundError, NCCLSymbolError, NCCLUsageError

__all__ = [
    "ENV_VAR",
    "FUNCTIONS",
    "RESULT_NAMES",
    "UNIQUE_ID_BYTES",
    "DataType",
    "NCCLLibrary",
    "RedOp",
    "Result",
    "UniqueId",
    "decode_version",
    "find_nccl",
    "load",
]

ENV_VAR = "LLAMATELEMETRY_NCCL_LIBRARY"
UNIQUE_ID_BYTES = 128
_SONAME = "libnccl.so.2"


class Result(enum.IntEnum):
    """``ncclResult_t``."""

    SUCCESS = 0
    UNHANDLED_CUDA_ERROR = 1
    SYSTEM_ERROR = 2
    INTERNAL_ERROR = 3
    INVALID_ARGUMENT = 4
    INVALID_USAGE = 5
    REMOTE_ERROR = 6
    IN_PROGRESS = 7
    TIMEOUT = 8


RESULT_NAMES: dict[int, str] = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
    8: "ncclTimeout",
}


class DataType(enum.IntEnum):
    """``ncclDataType_t``."""

    INT8 = 0
    UINT8 = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    FLOAT32 = 7
    FLOAT64 = 8
    BFLOAT16 = 9
    FLOAT8E4M3 = 10
    FLOAT8E5M2 = 11

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _ITEMSIZE[self]


_ITEMSIZE = {
    DataType.INT8: 1,
    DataType.UINT8: 1,
    DataType.INT32: 4,
    DataType.UINT32: 4,
    DataType.INT64: 8,
    DataType.UINT64: 8,
    DataType.FLOAT16: 2,
    DataType.FLOAT32: 4,
    DataType.FLOAT64: 8,
    DataType.BFLOAT16: 2,
    DataType.FLOAT8E4M3: 1,
    DataType.FLOAT8E5M2: 1,
}


class RedOp(enum.IntEnum):
    """Built-in ``ncclRedOp_t`` values."""

    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    AVG = 4


class UniqueId(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes, passed by value to ``ncclCommInitRank``.

    Rank 0 makes one and sends ``bytes(uid)`` to the others (any channel); they rebuild it
    with ``UniqueId.from_bytes``.
    """

    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]

    def __bytes__(self) -> bytes:
        # Not ``self.internal``: a c_char array reads back as bytes cut at the first NUL.
        return ctypes.string_at(ctypes.addressof(self), UNIQUE_ID_BYTES)

    @classmethod
    def from_bytes(cls, data: bytes) -> UniqueId:
        """Rebuild an id from its 128 bytes."""
        if len(data) != UNIQUE_ID_BYTES:
            raise NCCLUsageError(f"an ncclUniqueId is {UNIQUE_ID_BYTES} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)


class Config(ctypes.Structure):
    """The leading, stable part of ``ncclConfig_t`` (NCCL 2.18 layout, ``version=21800``).

    NCCL reads only the fields that the ``version`` field says exist, so this prefix stays
    valid on newer libraries. Build it with ``Config.default()`` (``NCCL_CONFIG_INITIALIZER``).
    """

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]

    @classmethod
    def default(cls, *, blocking: bool = True) -> Config:
        """Every field undefined (NCCL's defaults) except ``blocking``."""
        undef = -(2**31)  # NCCL_CONFIG_UNDEF_INT
        return cls(
            ctypes.sizeof(cls), 0xCAFEBEEF, 21800, int(blocking), undef, undef, undef, None, undef
        )


# C types, named as in nccl.h so the table reads like the header.
_result_t = ctypes.c_int
_comm_t = ctypes.c_void_p
_stream_t = ctypes.c_void_p  # cudaStream_t
_dtype_t = ctypes.c_int
_redop_t = ctypes.c_int
_size_t = ctypes.c_size_t
_int = ctypes.c_int
_ptr = ctypes.c_void_p
_P = ctypes.POINTER

# name -> (restype, argtypes), exactly nccl.h's prototypes.
FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "ncclGetVersion": (_result_t, (_P(_int),)),
    "ncclGetErrorString": (ctypes.c_char_p, (_result_t,)),
    "ncclGetLastError": (ctypes.c_char_p, (_comm_t,)),
    "ncclGetUniqueId": (_result_t, (_P(UniqueId),)),
    "ncclCommInitRank": (_result_t, (_P(_comm_t), _int, UniqueId, _int)),
    "ncclCommInitRankConfig": (_result_t, (_P(_comm_t), _int, UniqueId, _int, _P(Config))),
    "ncclCommInitAll": (_result_t, (_P(_comm_t), _int, _P(_int))),
    "ncclCommFinalize": (_result_t, (_comm_t,)),
    "ncclCommDestroy": (_result_t, (_comm_t,)),
    "ncclCommAbort": (_result_t, (_comm_t,)),
    "ncclCommGetAsyncError": (_result_t, (_comm_t, _P(_result_t))),
    "ncclCommCount": (_result_t, (_comm_t, _P(_int))),
    "ncclCommCuDevice": (_result_t, (_comm_t, _P(_int))),
    "ncclCommUserRank": (_result_t, (_comm_t, _P(_int))),
    "ncclAllReduce": (
        _result_t,
        (_ptr, _ptr, _size_t, _dtype_t, _redop_t, _comm_t, _stream_t),
    ),
    "ncclBroadcast": (_result_t, (_ptr, _ptr, _size_t, _dtype_t, _int, _comm_t, _stream_t)),
    "ncclReduce": (
        _result_t,
        (_ptr, _ptr, _size_t, _dtype_t, _redop_t, _int, _comm_t, _stream_t),
    ),
    "ncclAllGather": (_result_t, (_ptr, _ptr, _size_t, _dtype_t, _comm_t, _stream_t)),
    "ncclReduceScatter": (
        _result_t,
        (_ptr, _ptr, _size_t, _dtype_t, _redop_t, _comm_t, _stream_t),
    ),
    "ncclSend": (_result_t, (_ptr, _size_t, _dtype_t, _int, _comm_t, _stream_t)),
    "ncclRecv": (_result_t, (_ptr, _size_t, _dtype_t, _int, _comm_t, _stream_t)),
    "ncclGroupStart": (_result_t, ()),
    "ncclGroupEnd": (_result_t, ()),
}

# Functions that return something other than ncclResult_t: never checked.
_UNCHECKED = frozenset({"ncclGetErrorString", "ncclGetLastError"})


def decode_version(code: int) -> str:
    """``ncclGetVersion``'s integer as ``"major.minor.patch"`` (23203 -> ``"2.32.3"``).

    nccl.h's ``NCCL_VERSION`` packs ``X*1000+Y*100+Z`` up to 2.8 and ``X*10000+Y*100+Z``
    after, so codes below 10000 are the old scheme.
    """
    major, rest = divmod(code, 10000 if code >= 10000 else 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def _wheel_candidates() -> list[Path]:
    """``nvidia/nccl/lib/libnccl.so.2`` under every ``nvidia`` namespace path (cu12, cu13)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) / "nccl" / "lib" / _SONAME for p in spec.submodule_search_locations]


def find_nccl(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``libnccl.so.2``.

    Order: ``explicit``, ``$LLAMATELEMETRY_NCCL_LIBRARY``, the ``nvidia-nccl-cu12``/``-cu13``
    wheels, the system loader's ``libnccl.so.2``. Raises ``NCCLNotFoundError`` listing them.
    """
    searched: list[str] = []
    if explicit is not None:
        path = Path(explicit)
        if path.is_file():
            return path
        searched.append(f"explicit path {path}")
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if path.is_file():
            return path
        searched.append(f"${ENV_VAR}={path}")
    for candidate in _wheel_candidates():
        if candidate.is_file():
            return candidate
        searched.append(str(candidate))
    if not any("nvidia" in s for s in searched):
        searched.append("nvidia-nccl-cu12 / nvidia-nccl-cu13 wheels (not installed)")
    name = ctypes.util.find_library("nccl")
    if name is None:
        # find_library needs ldconfig/gcc; dlopen's own search (LD_LIBRARY_PATH, rpath) may
        # still know it.
        try:
            ctypes.CDLL(_SONAME)
        except OSError:
            pass
        else:
            name = _SONAME
    if name is not None:
        return Path(name)
    searched.append(f"system loader ({_SONAME}, ctypes.util.find_library('nccl'))")
    raise NCCLNotFoundError(
        "NCCL library not found; searched: "
        + "; ".join(searched)
        + ". Install it with `pip install nvidia-nccl-cu12` (CUDA 12) or `nvidia-nccl-cu13`,"
        + f" or set ${ENV_VAR} to a libnccl.so.2.",
        searched=searched,
    )


class NCCLLibrary:
    """A loaded ``libnccl.so.2`` with checked, lazily resolved functions.

    ``lib.call("ncclCommCount", comm, ctypes.byref(n))`` raises ``NCCLError`` on a non-zero
    result; ``lib.fn(name)`` is the raw ctypes function. ``functions`` defaults to
    ``FUNCTIONS`` (tests pass a variant).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        functions: dict[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> None:
        self.path = find_nccl(path)
        try:
            self._cdll = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise NCCLNotFoundError(
                f"could not load NCCL from {self.path}: {exc}", searched=[str(self.path)]
            ) from exc
        self._table = dict(FUNCTIONS if functions is None else functions)
        self._resolved: dict[str, Any] = {}

    def fn(self, name: str) -> Any:
        """The ctypes function ``name`` with its table signature; resolved on first use."""
        try:
            return self._resolved[name]
        except KeyError:
            pass
        try:
            restype, argtypes = self._table[name]
        except KeyError:
            raise NCCLSymbolError(
                f"{name} is not in the NCCL function table", symbol=name
            ) from None
        try:
            func = getattr(self._cdll, name)
        except AttributeError:
            raise NCCLSymbolError(
                f"{name} is missing from {self.path} (NCCL {self.version()}); a newer NCCL has it",
                symbol=name,
            ) from None
        func.restype = restype
        func.argtypes = argtypes
        self._resolved[name] = func
        return func

    def call(self, name: str, *args: Any, comm: Any = None) -> int:
        """Call ``name`` and raise ``NCCLError`` unless it returns ``ncclSuccess``.

        ``comm`` (a communicator handle) lets ``ncclGetLastError`` report that communicator.
        Must run on the thread that made the call: NCCL keeps the last error per thread.
        """
        result = int(self.fn(name)(*args))
        if result != Result.SUCCESS and name not in _UNCHECKED:
            raise self.error(result, name, comm=comm)
        return result

    def error(self, code: int, function: str, *, comm: Any = None) -> NCCLError:
        """The ``NCCLError`` for ``code`` returned by ``function``."""
        name = RESULT_NAMES.get(code, f"ncclResult({code})")
        error_string = self.error_string(code)
        last_error = self.last_error(comm)
        message = f"{function} failed: {name} ({code}): {error_string}"
        if last_error:
            message += f"; NCCL says: {last_error}"
        return NCCLError(
            message, code=code, name=name, error_string=error_string, last_error=last_error
        )

    def error_string(self, code: int) -> str:
        """``ncclGetErrorString(code)``."""
        raw: bytes | None = self.fn("ncclGetErrorString")(code)
        return raw.decode(errors="replace") if raw else ""

    def last_error(self, comm: Any = None) -> str | None:
        """``ncclGetLastError(comm)``; ``None`` when empty or the library lacks it."""
        try:
            func = self.fn("ncclGetLastError")
        except NCCLSymbolError:
            return None
        raw: bytes | None = func(comm)
        text = raw.decode(errors="replace").strip() if raw else ""
        return text or None

    def version_code(self) -> int:
        """``ncclGetVersion``'s integer (23203 for 2.32.3)."""
        out = ctypes.c_int()
        self.call("ncclGetVersion", ctypes.byref(out))
        return out.value

    def version(self) -> str:
        """The library's version as ``"major.minor.patch"``."""
        return decode_version(self.version_code())

    def unique_id(self) -> UniqueId:
        """A fresh ``ncclUniqueId`` (rank 0 makes it; ~1 ms, it opens a bootstrap socket)."""
        uid = UniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return uid


_default: NCCLLibrary | None = None
_default_lock = threading.Lock()


def load(path: str | os.PathLike[str] | None = None) -> NCCLLibrary:
    """The process-wide library (found once); ``path`` loads that one instead, uncached."""
    global _default
    if path is not None:
        return NCCLLibrary(path)
    with _default_lock:  # load() is called from worker threads too
        if _default is None:
            _default = NCCLLibrary()
        return _default
