"""The GPU check's driver (``scripts/gpu_check.py``) and its shell entry point.

The verdicts, the report and the arguments are pure logic, tested on figures built here
(through the driver's own ``Request``/``Phase`` arithmetic where the figures come from it).
The measuring code runs for real as a CPU dry run: an engine over a real tiny-model
llama-server, the front door served by uvicorn, the project's fake NVML under the sampler.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llamatelemetry_async.server import find_llama_server
from llamatelemetry_async.testing._server import RunningServer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc: Any = _load()


def _request(server_s: float, caller_s: float, *, n: int = 101, energy: float | None = None) -> Any:
    """A request whose n - 1 tokens took llama-server ``server_s`` and the caller
    ``caller_s``."""
    return gc.Request(
        sent=0.0,
        first=0.5,
        last=0.5 + caller_s,
        chunks=n,
        predicted_n=n,
        predicted_per_second=(n - 1) / server_s,
        prompt_ms=10.0,
        predicted_ms=server_s * 1e3,
        energy_j=energy,
    )


def _phase(
    requests: list[Any],
    *,
    streams: int = 1,
    energy: float | None = None,
    lag: list[float] | None = None,
) -> dict[str, Any]:
    summary: dict[str, Any] = gc.Phase(
        streams, requests, 2.0, energy, [], lag if lag is not None else [0.1]
    ).summary()
    return summary


def _gpu_result(**changes: Any) -> dict[str, Any]:
    """A complete GPU run's figures, every target met; ``changes`` replace entries."""
    single = _phase([_request(1.0, 1.0, energy=50.0)], energy=50.0, lag=[0.5] * 100)
    many = _phase(
        [_request(1.0, 1.01, energy=10.0) for _ in range(4)],
        streams=4,
        energy=40.0,
        lag=[1.0] * 100,
    )
    result: dict[str, Any] = {
        "mode": "gpu",
        "visible_gpus": [0, 1],
        "streams": 4,
        "n_predict": 101,
        "single_requests": 1,
        "rounds": 1,
        "interval": 0.1,
        "server_config": "n_parallel=4, ctx_size=1024",
        "server": {"version": "version: 11434", "split_modes": ["none", "layer", "row"]},
        "ready_s": 2.5,
        "threads": [
            {
                "server": "gpu0",
                "pid": 42,
                "threads": 20,
                "argv_threads": "4",
                "argv_threads_batch": None,
                "cpus_allowed": "0-3",
            }
        ],
        "phases": [single, many],
        "door": _phase([_request(1.0, 1.0)], streams=4),
        "vram": {
            "n_gpu_layers": 17,
            "predicted": {
                "weights": 600 * gc.MIB,
                "kv": 100 * gc.MIB,
                "compute": 100 * gc.MIB,
                "overhead": 200 * gc.MIB,
                "total": 1000 * gc.MIB,
            },
            "nvml_used": 1550 * gc.MIB,
            "nvml_used_before": 500 * gc.MIB,
            "measured": 1050 * gc.MIB,
            "process_used": 1040 * gc.MIB,
        },
        "sampler": {"available": True, "reason": None},
        "pairs": {
            "pair": [0, 1],
            "modes": {mode: {"one": single, "many": many} for mode in ("layer", "row")},
        },
    }
    result.update(changes)
    return result


def _nccl_result(**changes: Any) -> dict[str, Any]:
    ops = {name: {"ms": 0.1, "exact": True} for name in ("all_reduce", "broadcast", "reduce")}
    result: dict[str, Any] = {
        "mode": "gpu",
        "version": "2.28.9",
        "devices": 2,
        "one_rank": {"elements": 1024, "init_rank_ms": 800.0, "ops": ops},
        "two_ranks": {
            "devices": [0, 1],
            "init_all_ms": 900.0,
            "all_reduce_exact": True,
            "bandwidth": {"bytes": 64 * gc.MIB, "ms": 1.0, "bus_gb_s": 67.1},
        },
    }
    result.update(changes)
    return result


def _status(rows: list[Any], start: str) -> str:
    found = [r for r in rows if r.figure.startswith(start)]
    assert len(found) == 1, [r.figure for r in rows]
    status: str = found[0].status
    return status


# ------------------------------------------------------------------------ the figures
def test_request_and_phase_arithmetic() -> None:
    fast, slow = _request(1.0, 1.0), _request(1.0, 2.0)
    assert fast.server_s == pytest.approx(1.0)
    assert slow.ratio == pytest.approx(0.5)
    summary = _phase([fast, slow])
    # Token-weighted: 2 s of server time over 3 s of caller time, not the mean of 1 and 0.5.
    assert summary["ratio"] == pytest.approx(2 / 3)
    assert summary["worst_request_ratio"] == pytest.approx(0.5)
    assert summary["tokens"] == 202
    assert summary["spans_energy_j"] is None  # no request carried joules


def test_spans_energy_is_a_sum_only_over_every_request() -> None:
    both = _phase([_request(1, 1, energy=2.0), _request(1, 1, energy=3.0)])
    assert both["spans_energy_j"] == pytest.approx(5.0)
    assert both["requests_with_energy"] == 2
    one = _phase([_request(1, 1, energy=2.0), _request(1, 1)])
    assert one["spans_energy_j"] is None
    assert one["requests_with_energy"] == 1


def test_percentiles() -> None:
    got = gc.percentiles([float(i) for i in range(1, 101)])
    assert (got["n"], got["p50"], got["p99"], got["max"]) == (100, 51.0, 100.0, 100.0)
    assert math.isnan(gc.percentiles([])["p99"])


def test_bus_bandwidth_follows_nccl_tests() -> None:
    assert gc.bus_bandwidth(10**9, 1.0, 2) == pytest.approx(1.0)  # 2 ranks: bus = algorithm
    assert gc.bus_bandwidth(10**9, 0.5, 4) == pytest.approx(3.0)  # 2 GB/s * 2 * 3 / 4


# ------------------------------------------------------------------------ the verdicts
@pytest.mark.parametrize(
    ("caller_s", "status"), [(1.0, "PASS"), (1.0 / 0.98, "PASS"), (1.0 / 0.979, "FAIL")]
)
def test_ratio_target(caller_s: float, status: str) -> None:
    row = gc._ratio_row("ratio", _phase([_request(1.0, caller_s)]))
    assert row.status == status
    assert row.target == ">= 0.98"


def test_ratio_not_measured_fails_with_the_reason() -> None:
    assert gc._ratio_row("r", None).status == "FAIL"
    row = gc._ratio_row("r", {"error": "RuntimeError: the door answered 503"})
    assert row.status == "FAIL"
    assert "503" in row.value


@pytest.mark.parametrize(
    ("planned", "status"), [(1100, "PASS"), (900, "PASS"), (1101, "FAIL"), (899, "FAIL")]
)
def test_vram_within_ten_percent(planned: int, status: str) -> None:
    vram = {"predicted": {"total": planned * gc.MIB}, "measured": 1000 * gc.MIB}
    assert gc._vram_row(vram, cpu=False).status == status


def test_vram_without_a_measurement_fails_on_a_gpu_and_is_na_on_the_cpu() -> None:
    vram = {"predicted": {"total": 1000 * gc.MIB}, "nvml_used": 5 * gc.MIB, "measured": 0}
    row = gc._vram_row(vram, cpu=False)
    assert row.status == "FAIL"
    assert "NVML used 5 MiB" in row.value
    assert gc._vram_row({**vram, "nominal": True}, cpu=True).status == gc.NO_GPU
    assert gc._vram_row({"error": "no plan"}, cpu=False).status == "FAIL"


@pytest.mark.parametrize(("spans", "status"), [(95.0, "PASS"), (105.0, "PASS"), (94.9, "FAIL")])
def test_energy_within_five_percent(spans: float, status: str) -> None:
    phase = {"spans_energy_j": spans, "energy_j": 100.0}
    assert gc._energy_row("energy", phase, cpu=False).status == status


def test_energy_missing_on_spans_or_counter_fails() -> None:
    phase = _phase([_request(1, 1, energy=1.0), _request(1, 1)], energy=2.0)
    row = gc._energy_row("energy", phase, cpu=False)
    assert (row.status, row.value) == ("FAIL", "joules on 1 of 2 requests' spans")
    no_counter = {"spans_energy_j": 3.0, "energy_j": None}
    assert gc._energy_row("energy", no_counter, cpu=False).status == "FAIL"
    assert gc._energy_row("energy", no_counter, cpu=True).status == gc.NO_GPU


@pytest.mark.parametrize(("p99", "status"), [(5.0, "PASS"), (5.01, "FAIL")])
def test_lag_target(p99: float, status: str) -> None:
    phase = _phase([_request(1, 1)], streams=32, lag=[p99] * 10)
    row = gc._lag_row(phase, {"available": True}, cpu=False)
    assert row.status == status
    assert "32 streams" in row.figure


def test_lag_needs_the_sampler_on_and_is_na_on_the_cpu() -> None:
    phase = _phase([_request(1, 1)], lag=[1.0])
    off = gc._lag_row(phase, {"available": False, "reason": "unavailable: no NVML"}, cpu=False)
    assert off.status == "FAIL"
    assert "no NVML" in off.value
    on_cpu = gc._lag_row(phase, {"available": True}, cpu=True)
    assert on_cpu.status == gc.NO_GPU
    assert "1.00 ms" in on_cpu.value  # measured all the same


def test_nccl_rows() -> None:
    assert [r.status for r in gc._nccl_rows(_nccl_result(), False, 2)] == ["PASS", "PASS"]
    assert "67.1 GB/s" in gc._nccl_rows(_nccl_result(), False, 2)[1].value
    wrong = _nccl_result()
    wrong["one_rank"]["ops"]["broadcast"]["exact"] = False
    one = gc._nccl_rows(wrong, False, 2)[0]
    assert one.status == "FAIL"
    assert "wrong: broadcast" in one.value
    single = _nccl_result(devices=1)
    del single["two_ranks"]
    assert [r.status for r in gc._nccl_rows(single, False, 1)] == ["PASS", "n/a (one GPU)"]
    broken = {"mode": "gpu", "error": "NCCLNotFoundError: NCCL library not found"}
    rows = gc._nccl_rows(broken, False, 2)
    assert [r.status for r in rows] == ["FAIL", "FAIL"]
    assert "not found" in rows[0].value
    cpu = gc._nccl_rows({"mode": "cpu", "version": "2.32.3"}, True, None)
    assert [r.status for r in cpu] == [gc.NO_GPU, gc.NO_GPU]


def test_pair_rows() -> None:
    rows = gc._pair_rows(_gpu_result()["pairs"], cpu=False)
    assert [r.status for r in rows] == ["PASS", "PASS"]
    assert "split row" in rows[1].figure
    failed = {"pair": [0, 1], "modes": {"row": {"error": "ServerStartError: exited"}}}
    assert gc._pair_rows(failed, cpu=False)[0].status == "FAIL"
    one_gpu = {"skipped": "1 GPU visible", "modes": {}}
    assert gc._pair_rows(one_gpu, cpu=False)[0].status == "n/a (one GPU)"


def test_a_complete_gpu_run_passes_and_one_miss_fails_it() -> None:
    rows = gc.verdicts(_gpu_result(), _nccl_result(), cpu=False)
    assert {r.status for r in rows} == {"PASS"}
    assert gc.exit_code(rows) == 0
    assert len(rows) == 11  # 3 ratios, VRAM, 2 energies, lag, 2 NCCL, 2 pair modes
    slow_door = _gpu_result(door=_phase([_request(1.0, 1.1)], streams=4))
    rows = gc.verdicts(slow_door, _nccl_result(), cpu=False)
    assert _status(rows, "tokens/s ratio, 4 streams through the front door") == "FAIL"
    assert gc.exit_code(rows) == gc.TARGET_MISSED


def test_nothing_measured_fails_on_a_gpu() -> None:
    rows = gc.verdicts(None, None, cpu=False)
    assert all(r.status == "FAIL" for r in rows)
    assert gc.exit_code(rows) == gc.TARGET_MISSED


def test_a_run_stopped_midway_fails_what_it_did_not_measure() -> None:
    stopped = _gpu_result(error="the measuring step ran past its 175 s deadline")
    del stopped["door"], stopped["pairs"]
    rows = gc.verdicts(stopped, _nccl_result(), cpu=False)
    door = next(r for r in rows if "front door" in r.figure)
    assert (door.status, door.value) == (
        "FAIL",
        "not measured: the measuring step ran past its 175 s deadline",
    )
    assert _status(rows, "tokens/s ratio, 1 stream") == "PASS"  # measured before it stopped
    assert _status(rows, "GPU pair") == "FAIL"
    block = gc.report_block(stopped, _nccl_result(), rows, card="H100", cpu=False)
    assert "The measuring step stopped: the measuring step ran past" in block


def test_a_cpu_run_never_passes_a_gpu_figure() -> None:
    cpu = _gpu_result(mode="cpu", pairs={"skipped": gc.NO_GPU, "modes": {}})
    rows = gc.verdicts(cpu, {"mode": "cpu", "version": "2.32.3"}, cpu=True)
    gpu_only = [r for r in rows if not r.figure.startswith("tokens/s")]
    assert gpu_only
    assert {r.status for r in gpu_only} == {gc.NO_GPU}
    assert {r.status for r in rows if r.figure.startswith("tokens/s")} == {"PASS"}
    assert gc.exit_code(rows) == 0


def test_table_and_block() -> None:
    rows = [
        gc.Verdict("a | b", "1", ">= 1", "PASS"),
        gc.Verdict("c", "-", "x", gc.NO_GPU),
    ]
    table = gc.verdict_table(rows).splitlines()
    assert table[0] == "| figure | value | target | verdict |"
    assert table[2] == "| a \\| b | 1 | >= 1 | **PASS** |"
    assert table[3] == "| c | - | x | n/a (no GPU) |"
    full = gc.verdicts(_gpu_result(), _nccl_result(), cpu=False)
    block = gc.report_block(_gpu_result(), _nccl_result(), full, card="H100", cpu=False)
    assert block.startswith("### ")
    assert ": H100\n" in block
    assert "every target met" in block
    assert "no GPU" not in block
    assert "- gpu0 (pid 42): 20 threads; --threads 4, --threads-batch not given" in block
    assert "bus bandwidth **67.1 GB/s**" in block
    assert "= **1000 MiB**; NVML used after warm-up less before start: **1050 MiB**" in block
    cpu_block = gc.report_block(None, None, rows, card="no GPU", cpu=True)
    assert "(a CPU dry run: no GPU figures)" in cpu_block.splitlines()[0]


# ------------------------------------------------------------------------ arguments
def test_run_arguments() -> None:
    base = ["run", "--model", "m.gguf", "--binary", "llama-server", "--json", "e.json"]
    args = gc.parser().parse_args(base)
    assert (args.streams, args.n_predict, args.rounds, args.cpu, args.door) == (
        32,
        224,
        4,
        False,
        True,
    )
    assert args.pair_modes == ["layer", "row"]
    args = gc.parser().parse_args([*base, "--cpu", "--no-door", "--pair-modes", "tensor,row"])
    assert (args.cpu, args.door, args.pair_modes) == (True, False, ["tensor", "row"])


def test_bad_arguments_say_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--model", "m", "--binary", "b", "--json", "j"]
    with pytest.raises(SystemExit) as exc:
        gc.parser().parse_args([*base, "--pair-modes", "layer,diagonal"])
    assert exc.value.code == 2
    assert "unknown split mode(s) ['diagonal']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.parser().parse_args(["verdict"])
    assert "--out-dir" in capsys.readouterr().err


def test_verdict_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "engine.json").write_text(json.dumps(_gpu_result()))
    (tmp_path / "nccl.json").write_text(json.dumps(_nccl_result()))
    report = tmp_path / "report.md"
    report.write_text("# Report\n")
    argv = ["verdict", "--out-dir", str(tmp_path), "--card", "H100", "--append-report"]
    assert gc.main([*argv, str(report)]) == 0
    assert "| figure | value | target | verdict |" in (tmp_path / "verdict.md").read_text()
    block = (tmp_path / "report-block.md").read_text()
    assert report.read_text() == "# Report\n\n" + block
    assert "verdict: PASS" in capsys.readouterr().out
    (tmp_path / "nccl.json").unlink()  # the NCCL step never finished
    assert gc.main(["verdict", "--out-dir", str(tmp_path)]) == gc.TARGET_MISSED


def test_the_shell_script_checks_its_arguments() -> None:
    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        script = str(ROOT / "scripts" / "gpu_check.sh")
        return subprocess.run(
            ["bash", script, *args], capture_output=True, text=True, timeout=30, check=False
        )

    helped = sh("--help")
    assert helped.returncode == 0
    assert "--budget" in helped.stdout
    assert "$OUT" not in helped.stdout
    wrong = sh("--frobnicate")
    assert wrong.returncode == 2
    assert "unknown argument '--frobnicate'" in wrong.stderr
    budget = sh("--budget", "ten")
    assert budget.returncode == 2
    assert "whole seconds" in budget.stderr


# ------------------------------------------------------------------------ real processes
def test_split_modes_from_the_real_binary() -> None:
    helped = subprocess.run(
        [str(find_llama_server()), "--help"], capture_output=True, text=True, timeout=60
    )
    modes = gc.split_modes(helped.stdout + helped.stderr)
    assert {"layer", "row"} <= set(modes)
    assert gc.split_modes("usage: llama-server [options]") == []


def test_flag_value() -> None:
    argv = ["llama-server", "-m", "x", "--threads", "4", "-tb", "2"]
    assert gc.flag_value(argv, "--threads", "-t") == "4"
    assert gc.flag_value(argv, "--threads-batch", "-tb") == "2"
    assert gc.flag_value(["s", "--threads=6"], "--threads", "-t") == "6"
    assert gc.flag_value(["s", "-t", "1", "--threads", "3"], "--threads", "-t") == "3"
    assert gc.flag_value(["s", "--threads"], "--threads") is None


def test_thread_count_of_a_real_llama_server(llama_server: RunningServer) -> None:
    got = gc.process_threads(llama_server.pid)
    assert got["pid"] == llama_server.pid
    assert got["threads"] > 1  # llama-server runs an HTTP pool and compute threads
    assert got["argv_threads"] is None  # the fixture gives no --threads
    assert got["cpus_allowed"]


@pytest.fixture
def anyio_backend() -> str:
    """The front door is served by uvicorn, which runs on asyncio only."""
    return "asyncio"


def test_run_writes_the_figures_it_has_when_time_runs_out(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = ["run", "--model", str(tiny_model), "--binary", str(find_llama_server())]
    with pytest.raises(TimeoutError):
        gc.main([*argv, "--json", str(out), "--cpu", "--deadline", "0.001"])
    written = json.loads(out.read_text())
    assert written["error"] == "the measuring step ran past its 0.001 s deadline"
    assert "phases" not in written


@pytest.mark.anyio
async def test_cpu_dry_run_of_the_measuring_code(tiny_model: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(
        model=str(tiny_model),
        model_info=None,
        binary=str(find_llama_server()),
        cpu=True,
        gpu=0,
        streams=2,
        slot_ctx=256,
        n_predict=16,
        single_requests=2,
        rounds=1,
        interval=0.05,
        door=True,
        pair_modes=["layer", "row"],
        ready_timeout=60.0,
        deadline=100.0,  # the front door needs a minute of budget left
        log_dir=str(tmp_path / "logs"),
    )
    result = await gc.measure(args)
    json.dumps(result, default=str)  # what `run` writes
    single, many = result["phases"]
    assert (single["requests"], many["requests"], many["streams"]) == (2, 2, 2)
    for phase in (single, many, result["door"]):
        assert phase["tokens"] == phase["requests"] * 16
        assert 0 < phase["ratio"] < math.inf
    assert result["door"]["requests"] == 2
    assert result["sampler"] == {"available": True, "reason": None, "fake_nvml": True}
    assert many["lag_ms"]["n"] > 0
    (threads,) = result["threads"]
    assert threads["server"] == "cpu0"
    assert threads["threads"] > 1
    assert result["vram"]["nominal"]
    assert result["vram"]["predicted"]["total"] > result["vram"]["predicted"]["weights"] > 0
    assert {"layer", "row"} <= set(result["server"]["split_modes"])
    assert result["pairs"]["skipped"] == gc.NO_GPU
    assert (tmp_path / "logs" / "cpu0.log").is_file()
    rows = gc.verdicts(result, {"mode": "cpu", "version": "x"}, cpu=True)
    assert {r.status for r in rows if not r.figure.startswith("tokens/s")} == {gc.NO_GPU}
    assert {r.status for r in rows if r.figure.startswith("tokens/s")} <= {"PASS", "FAIL"}
