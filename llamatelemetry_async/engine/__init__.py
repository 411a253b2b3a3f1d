"""The engine: where servers run (``Placement``) and ``AsyncEngine``, which runs them.

``Placement`` says how many llama-servers to start and on which GPUs, and which servers
that run elsewhere to attach (``Placement.remote``); ``plans(gpus)`` resolves the local part
against the visible GPUs into ``ServerPlan`` values for ``server_command``. ``AsyncEngine``
starts them, supervises them and routes requests across them: its servers are backends
(``Backend``: a local process, or a remote server it only watches), and a third kind (a
server placed on another machine by a cluster scheduler) subclasses ``Backend``. With
``models={name: EngineModel(...)}`` one engine serves several models, each loaded on demand.
"""

from __future__ import annotations

from .._placement import Placement as Placement, RemoteServer as RemoteServer
from ..server import ServerPlan as ServerPlan
from ._backends import (
    Backend as Backend,
    BackendContext as BackendContext,
    LocalBackend as LocalBackend,
    RemoteBackend as RemoteBackend,
)
from ._energy_book import EnergyBook as EnergyBook
from ._engine import AsyncEngine as AsyncEngine, ServerInfo as ServerInfo
from ._models import EngineModel as EngineModel, ModelState as ModelState

__all__ = [
    "AsyncEngine",
    "Backend",
    "BackendContext",
    "EnergyBook",
    "EngineModel",
    "LocalBackend",
    "ModelState",
    "Placement",
    "RemoteBackend",
    "RemoteServer",
    "ServerInfo",
    "ServerPlan",
]
