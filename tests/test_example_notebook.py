"""examples/notebook.ipynb, executed headless in a real IPython kernel (nbclient)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"


def _text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.timeout(300)
def test_the_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # jupyter_core warns (an error here) unless told to use the platformdirs locations.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code")
    client = NotebookClient(
        notebook,
        timeout=120,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()

    code = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    assert not any(o.get("name") == "stderr" for c in code for o in c.outputs)

    by_source = {c.source.splitlines()[0]: c for c in code}
    servers = _text(by_source["engine = await AsyncEngine(model, placement=\"auto\", "
                              "server=ServerConfig(n_parallel=4)).start()"])  # fmt: skip
    assert re.search(r"^cpu0 http://127\.0\.0\.1:\d+ pid \d+ 4 slots$", servers, re.M), servers

    stream_cell = by_source['async with engine.stream("Once upon a time", n_predict=48, '
                            'seed=42) as stream:']  # fmt: skip
    streamed = _text(stream_cell)
    words, _, tail = streamed.partition("\n\nfinish_reason=")
    assert len(words.split()) >= 40  # 48 tokens
    assert tail.startswith("length")
    # Streamed into the output: each flushed token reached the notebook as its own message.
    assert sum(o.output_type == "stream" for o in stream_cell.outputs) > 40
    chat = _text(by_source['messages = [{"role": "user", "content": "Tell me a story about a '
                           'cat."}]'])  # fmt: skip
    assert "finish_reason=length" in chat

    summary = _text(by_source["config = BenchConfig(concurrency=4, requests=24, "
                              "input_tokens=32, output_tokens=32)"])  # fmt: skip
    assert "TTFT" in summary

    plot = by_source["done = [r for r in result.records if r.ok and not r.warmup]"]
    pngs = [o for o in plot.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1
    assert len(pngs[0].data["image/png"]) > 1000  # base64 of a real figure

    saved = _text(by_source['paths = await result.save(workdir / "bench-out")']).split()
    assert "result.json" in saved
    assert "ttft.png" in saved

    stopped = _text(by_source["await engine.aclose()"])
    assert stopped.strip() == "['stopped']"
