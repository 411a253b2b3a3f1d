"""Load benchmarks of llama-server: fixed concurrency or Poisson arrivals, exact metrics.

```python
from llamatelemetry_async.bench import BenchConfig, run_bench

result = await run_bench("http://127.0.0.1:8080", BenchConfig(concurrency=8, requests=200))
print(result.summary_text())       # TTFT, TPOT, ITL, E2E, throughput, goodput, formulas
await result.save("bench-out")     # result.json, ttft.png, itl.png, throughput.png, gpu.png
```

``run_sweep`` runs several load points in one call (a list of concurrencies or rates, or a
``Ramp`` until a latency or goodput bound breaks), each with its own warm-up:

```python
from llamatelemetry_async.bench import BenchConfig, SweepConfig, run_sweep

sweep = SweepConfig(BenchConfig(requests=64), concurrencies=(1, 4, 16, 64))
result = await run_sweep("http://127.0.0.1:8080", sweep)
print(result.summary_text())      # one line per point: throughput, TTFT/ITL, server side
await result.save("sweep-out")    # sweep.json, point-NN/result.json, sweep_*.png
```

Datasets: ``load_sharegpt`` (first turns as prompts) and ``load_sharegpt_conversations``
(``BenchConfig(conversations=...)`` replays them turn by turn with the growing prefix).

``run_bench`` drives a URL, an ``AsyncLlamaClient`` or an ``AsyncEngine`` (started here
if it is not running). Every request is recorded (send, response head, each chunk's
arrival, the server's own timings, any error); the metrics are pure functions of those
records (``compute_metrics``).

Constants and aliases:

- ``FORMULAS``: how each metric is computed, by name (``"ttft"``, ``"tpot"``, ...); the
  summary and the JSON state them.
- ``SCHEMA``: the ``schema`` value of a result's JSON (``"llamatelemetry_async.bench/2"``).
- ``SWEEP_SCHEMA``: the ``schema`` value of a sweep's ``sweep.json``.
- ``WORDS``: the word list synthetic prompts are drawn from.
- ``Endpoint``: ``"completion"`` or ``"chat"``, the streaming endpoint prompts go to.
"""

from ._config import (
    BenchConfig as BenchConfig,
    BenchPrompt as BenchPrompt,
    Conversation as Conversation,
    Endpoint as Endpoint,
    PromptFileError as PromptFileError,
    load_prompts_jsonl as load_prompts_jsonl,
    parse_prompts_jsonl as parse_prompts_jsonl,
)
from ._datasets import (
    load_sharegpt as load_sharegpt,
    load_sharegpt_conversations as load_sharegpt_conversations,
    parse_sharegpt as parse_sharegpt,
)
from ._metrics import (
    FORMULAS as FORMULAS,
    BenchMetrics as BenchMetrics,
    RequestRecord as RequestRecord,
    Stats as Stats,
    Timeline as Timeline,
    compute_metrics as compute_metrics,
    max_in_flight as max_in_flight,
    pooled_itl as pooled_itl,
    throughput_timeline as throughput_timeline,
)
from ._prompts import (
    WORDS as WORDS,
    PromptSource as PromptSource,
    inter_arrival_times as inter_arrival_times,
)
from ._result import SCHEMA as SCHEMA, BenchResult as BenchResult
from ._run import run_bench as run_bench
from ._sweep import (
    SWEEP_SCHEMA as SWEEP_SCHEMA,
    Ramp as Ramp,
    SweepConfig as SweepConfig,
    SweepResult as SweepResult,
    run_sweep as run_sweep,
)

__all__ = [
    "FORMULAS",
    "SCHEMA",
    "SWEEP_SCHEMA",
    "WORDS",
    "BenchConfig",
    "BenchMetrics",
    "BenchPrompt",
    "BenchResult",
    "Conversation",
    "Endpoint",
    "PromptFileError",
    "PromptSource",
    "Ramp",
    "RequestRecord",
    "Stats",
    "SweepConfig",
    "SweepResult",
    "Timeline",
    "compute_metrics",
    "inter_arrival_times",
    "load_prompts_jsonl",
    "load_sharegpt",
    "load_sharegpt_conversations",
    "max_in_flight",
    "parse_prompts_jsonl",
    "parse_sharegpt",
    "pooled_itl",
    "run_bench",
    "run_sweep",
    "throughput_timeline",
]
