"""1,000 concurrent paced streams, raw httpx beside this library: a preset of
``compare_clients.py``.

Run::

    .venv/bin/python benchmarks/concurrency.py [any compare_clients.py option]

The replay server paces every stream at 20 tokens/s, 50 tokens each (ideal wall 2.5 s). For
each arm: wall time over the ideal, errors and event-loop lag (a 1 ms ticker), this library
also beside a GPU sampler on the fake NVML backend. Add ``--arms raw,lib,floor`` for the bare
asyncio floor, ``--uvloop`` for uvloop. Targets: <= 1.15x the ideal, 0 errors, lag p99 <= 5 ms.
"""

from __future__ import annotations

import sys

from compare_clients import main

PRESET = {
    "servers": ["replay"],
    "concurrency": [1000],
    "arms": ["raw", "lib"],
    "rounds": 1,
    "passes": ["lag", "sampler"],
}

if __name__ == "__main__":
    sys.exit(main(defaults=PRESET))
