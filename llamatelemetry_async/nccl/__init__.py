"""NCCL through ctypes, with an async ``Communicator`` whose calls run on a worker thread.

``find_nccl()`` locates ``libnccl.so.2`` (the ``nvidia-nccl-cu12`` wheel, or one you name),
``load()`` loads it once per process, and ``Communicator.init_rank``/``init_all`` create
communicators whose collectives run off the event loop.

``FUNCTIONS`` is the binding's table: each NCCL function's name mapped to its ctypes
``(restype, argtypes)``, copied from ``nccl.h``.
"""

from __future__ import annotations

from ._comm import Buffer, Communicator, group
from ._lib import (
    FUNCTIONS,
    DataType,
    NCCLLibrary,
    RedOp,
    Result,
    UniqueId,
    decode_version,
    find_nccl,
    load,
)

__all__ = [
    "FUNCTIONS",
    "Buffer",
    "Communicator",
    "DataType",
    "NCCLLibrary",
    "RedOp",
    "Result",
    "UniqueId",
    "decode_version",
    "find_nccl",
    "group",
    "load",
]
