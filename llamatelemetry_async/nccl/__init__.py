"""NCCL through ctypes, with an async ``Communicator`` whose calls run on a worker thread."""

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
