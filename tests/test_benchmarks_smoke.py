"""The client benchmarks run end to end at tiny sizes, so they cannot rot unnoticed.

Each script runs in its own process (as a user runs it), against the replay server and the
real llama-server on the tiny model; the JSON it writes is checked for what the tables claim:
every arm and pass ran, every token arrived, tracing exported its spans and events, the GPU
sampler ran beside this library's arms.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llamatelemetry_async.server import find_llama_server

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LIBRARY_ARMS = {"lib", "chat", "traced", "events"}
HAS_OPENAI = importlib.util.find_spec("openai") is not None


def _run(script: str, out: Path, *args: str, timeout: float = 200) -> tuple[str, dict[str, Any]]:
    argv = [sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(out), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout, json.loads(out.read_text())


# llama-server closes its connection after each streamed response; a plain httpx pool may
# send the next request on it first (no retry: max_retries=0 for openai, whose error names
# httpx's as its cause). The benchmark reports that as an error of those arms; this library
# does not pool such connections.
_KEEPALIVE_RACE = "Server disconnected without sending a response"


def _check_runs(cell: dict[str, Any]) -> None:
    """Every run of the cell received every token, without an error."""
    errors = cell["errors"]
    if cell["server"] == "llama" and cell["arm"] in ("raw", "openai"):
        assert all(_KEEPALIVE_RACE in message for message in errors), cell
        lost = sum(errors.values()) * cell["tokens"]
    else:
        assert errors == {}, cell
        lost = 0
    received = sum(n for p in cell["passes"].values() for n in p["tokens"])
    expected = sum(n for p in cell["passes"].values() for n in p["expected_tokens"])
    assert expected > 0
    assert received == expected - lost, cell


@pytest.mark.timeout(300)
def test_compare_clients_quick(tmp_path: Path, tiny_model: Path) -> None:
    binary = find_llama_server()
    stdout, report = _run(
        "compare_clients.py",
        tmp_path / "out.json",
        "--model",
        str(tiny_model),
        "--llama-server",
        str(binary),
        timeout=280,
    )
    arms = {"raw", "lib", "chat", "traced", "events"} | ({"openai"} if HAS_OPENAI else set())
    cells = {(c["server"], c["concurrency"], c["arm"]): c for c in report["cells"]}
    assert set(cells) == {(s, n, a) for s in ("replay", "llama") for n in (1, 16) for a in arms}
    for (server, _, arm), cell in cells.items():
        _check_runs(cell)
        passes = cell["passes"]
        assert set(passes) == ({"cpu", "lag", "sampler"} if arm in LIBRARY_ARMS else {"cpu", "lag"})
        assert cell["cpu_us_per_token"] > 0
        if server == "replay":  # paced runs last 0.2 s: the 1 ms ticker ticked
            assert passes["lag"]["lag_ticks"] > 0
            assert passes["cpu"]["lag_ticks"] == 0  # the CPU pass runs without the ticker
            assert cell["ideal_s"] == pytest.approx(10 / 50)
        if arm in ("traced", "events"):
            for pass_ in passes.values():
                streams = cell["concurrency"] * cell["repeat"]
                for exported, tokens in zip(pass_["exported"], pass_["tokens"], strict=True):
                    assert exported["spans"] == streams + 1  # and the warm-up stream's
                    if arm == "events":
                        assert exported["span_events"] >= tokens
                    else:
                        assert exported["span_events"] < tokens
    # The real server at concurrency 1 got several streams per worker, so it ran long enough.
    assert cells["llama", 1, "lib"]["repeat"] == 4
    targets = {row["target"] for row in report["targets"]}
    assert any("this client / raw httpx CPU" in t for t in targets)
    assert "| arm | CPU µs/token |" in stdout
    assert "### real llama-server" in stdout


@pytest.mark.timeout(200)
def test_presets_quick(tmp_path: Path) -> None:
    """The two presets (thin wrappers over compare_clients.py) still run and say the same."""
    _, overhead = _run("client_overhead.py", tmp_path / "overhead.json")
    assert overhead["config"]["rate"] == 0.0
    assert {c["concurrency"] for c in overhead["cells"]} == {1}
    for cell in overhead["cells"]:
        _check_runs(cell)
        assert set(cell["passes"]) == {"cpu"}

    _, concurrency = _run("concurrency.py", tmp_path / "concurrency.json")
    assert {c["arm"] for c in concurrency["cells"]} == {"raw", "lib"}
    for cell in concurrency["cells"]:
        _check_runs(cell)
        assert cell["concurrency"] == 16  # --quick caps the preset's 1,000
        expected = {"lag", "sampler"} if cell["arm"] == "lib" else {"lag"}
        assert set(cell["passes"]) == expected


@pytest.mark.timeout(200)
def test_front_door_quick(tmp_path: Path) -> None:
    """The front-door benchmark: direct, bare and door arms (LiteLLM: a separate install)."""
    stdout, report = _run("front_door.py", tmp_path / "door.json", "--arms", "direct,bare,door")
    arms = {a["arm"]: a for a in report["arms"]}
    assert set(arms) == {"direct", "bare", "door"}
    for arm in arms.values():
        assert arm["errors"] == {}, arm
        assert arm["tokens"] == arm["expected_tokens"] == 16 * 10
        assert arm["ttft_ms"]["p50"] > 0
    door = arms["door"]
    # psutil's CPU times tick every 10 ms: a tiny run may read 0, never None.
    assert door["proxy_cpu_s"] is not None
    assert door["warm_proxy_cpu_us_per_request"] is not None
    assert door["lag"]["ticks"] > 0
    assert door["lag"]["waiting_peak"] == 0  # /props reported enough slots: nothing queued
    assert door["lag_run"]["tokens"] == door["lag_run"]["expected_tokens"]
    assert arms["direct"]["proxy_cpu_s"] is None
    assert {row["target"].split(" ")[0] for row in report["targets"]} == {"door"}
    assert "| arm | wall / ideal |" in stdout


@pytest.mark.timeout(180)
def test_cpu_share_quick(tiny_model: Path) -> None:
    argv = [sys.executable, str(BENCHMARKS / "cpu_share.py"), "--rounds", "1",
            "--concurrency", "4", "--tokens", "8", "--model", str(tiny_model)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    # Each arm ran, and the "after" arms ran as split: one server per share of the cores.
    for arm in ("before cpu(1)", "before cpu(2)", "after cpu(1)", "after cpu(2)"):
        assert f"| {arm} |" in out
    row = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "cpu0: default threads on any core" in row["before cpu(2)"]
    assert "cpu1:" in row["after cpu(2)"]
    assert "any core" not in row["after cpu(2)"]  # both servers pinned to their own cores
    assert "two servers / one, after:" in out
