"""Client CPU per streamed token, one stream at a time: a preset of ``compare_clients.py``.

Run::

    .venv/bin/python benchmarks/client_overhead.py [any compare_clients.py option]

The replay server replays as fast as it can (``--rate 0``); each round, every arm streams 10
requests of 200 tokens one after another; 7 rounds, arms taking turns; the table reports the
median round's CPU time of this process per token. Add ``--servers replay,llama`` for the
real llama-server too, ``--count-reads`` for socket reads per token, ``--rate 1000`` for one
read per token (where the cost of waking up, large in a VM, dominates every client). Targets
(issue 2): this client <= 0.5x the raw httpx loop, <= 0.65x with an event per token, and
openai-python >= 10x this client's chat stream.
"""

from __future__ import annotations

import sys

from compare_clients import main

PRESET = {
    "servers": ["replay"],
    "rate": 0.0,
    "concurrency": [1],
    "tokens": 200,
    "repeat": 10,
    "rounds": 7,
    "passes": ["cpu"],
}

if __name__ == "__main__":
    sys.exit(main(defaults=PRESET))
