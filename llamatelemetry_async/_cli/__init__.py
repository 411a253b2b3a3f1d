"""The command line, ``llamatelemetry-async`` (also ``python -m llamatelemetry_async``).

Each command lives in its own module and registers its subparser; ``_app`` builds the
parser and turns failures into exit codes (0 ok, 1 runtime failure, 2 usage error, 130
Ctrl-C) and one-line ``error:`` messages with a hint.
"""

from __future__ import annotations

from ._app import main as main

__all__ = ["main"]
