"""The command line: ``python -m llamatelemetry_async COMMAND`` (or ``llamatelemetry-async``).

Commands: ``demo``, ``serve``, ``chat``, ``bench``, ``gpus``, ``inspect``, ``build-server``,
``find-server``; ``--help`` on each shows examples. The implementation is in ``_cli``.
"""

from __future__ import annotations

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
