"""The engine: where servers run (``Placement``) and ``AsyncEngine``, which runs them.

``Placement`` says how many llama-servers to start and on which GPUs; ``plans(gpus)``
resolves it against the visible GPUs into ``ServerPlan`` values for ``server_command``.
``AsyncEngine`` starts them, supervises them and routes requests across them.
"""

from __future__ import annotations

from .._placement import Placement as Placement
from ..server import ServerPlan as ServerPlan
from ._engine import AsyncEngine as AsyncEngine, ServerInfo as ServerInfo

__all__ = ["AsyncEngine", "Placement", "ServerInfo", "ServerPlan"]
