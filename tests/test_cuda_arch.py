"""The compute capability check: a binary's CUDA architectures against its GPUs', before start.

No GPU here: the GPUs are testing's fake NVML (the nvidia-ml-py surface, with the compute
capability and driver calls that ``read_gpu_inventory`` makes), the binaries are build cache
folders with a build record, and ``cuobjdump`` (CUDA toolkit, absent here) is a script that
prints what the real one prints. The rules themselves are NVIDIA's (see ``_cuda_arch``).
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from llamatelemetry_async._errors import LlamaServerError, LlamaWarning
from llamatelemetry_async.gpu import read_gpu_inventory
from llamatelemetry_async.server import (
    CUDAArchitectureError,
    CUDATarget,
    LlamaServer,
    _build as building,
    _cuda_arch,
    binary_cuda_targets,
    check_cuda_compatibility,
    find_llama_server,
    parse_cuda_architectures,
)
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML, NVMLError_GpuIsLost

T4 = ("Tesla T4", (7, 5))
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
B200 = ("NVIDIA B200", (10, 0))


class NVML(FakeNVML):
    """The fake NVML with these GPUs, each with its compute capability."""

    def __init__(self, *gpus: tuple[str, tuple[int, int]], no_driver: bool = False) -> None:
        fakes = [FakeGPU(name=name, compute_capability=cc) for name, cc in gpus]
        super().__init__(fakes, no_driver=no_driver)


def _sm(*archs: int) -> set[str]:
    return {f"sm_{a}" for a in archs}


def _names(spec: str | list[str]) -> set[str] | None:
    targets = parse_cuda_architectures(spec)
    return None if targets is None else {str(t) for t in targets}


# -- CMAKE_CUDA_ARCHITECTURES, and what runs where ----------------------------------------------


def test_cmake_architectures_are_read_as_cmake_reads_them() -> None:
    assert _names("75") == {"sm_75", "compute_75"}  # plain: real and virtual
    assert _names("90-real") == {"sm_90"}
    assert _names("90-virtual") == {"compute_90"}
    assert _names("75;86-real,89-virtual") == {"sm_75", "compute_75", "sm_86", "compute_89"}
    assert _names("90a-real") == {"sm_90a"}
    assert _names("120") == {"sm_120a", "compute_120a"}  # llama.cpp builds 12X as 12Xa
    assert _names(["61", "70-virtual"]) == {"sm_61", "compute_61", "compute_70"}
    for unknown in ("native", "all", "all-major", "75;native", "sm_75", ""):
        assert parse_cuda_architectures(unknown) is None, unknown


@pytest.mark.parametrize(
    ("spec", "capability", "runs"),
    [
        ("90", (7, 5), False),  # the T4 with an H100 build
        ("90", (9, 0), True),
        ("90", (10, 0), True),  # compute_90 PTX: JIT-compiled for a newer GPU
        ("90", (12, 0), True),
        ("90-real", (10, 0), False),  # SASS only: no newer major
        ("90-real", (9, 0), True),
        ("80-real", (8, 6), True),  # SASS runs on a newer minor of its major
        ("80-real", (8, 9), True),
        ("86-real", (8, 0), False),  # ... not an older one
        ("80-real", (9, 0), False),
        ("75-virtual", (7, 5), True),
        ("75-virtual", (9, 0), True),
        ("75-virtual", (7, 0), False),  # PTX never runs on an older GPU
        ("90a", (9, 0), True),  # architecture-specific: that GPU only, PTX included
        ("90a", (10, 0), False),
        ("120", (12, 0), True),
        ("120", (12, 1), False),  # 120a, not 120
        ("100f-real", (10, 3), True),  # family: a newer minor of the major
        ("100f-real", (11, 0), False),
        ("75;90-real", (7, 5), True),
        ("75;90-real", (8, 6), True),  # through compute_75
        ("75-real;90-real", (8, 6), False),
    ],
)
def test_what_runs_where(spec: str, capability: tuple[int, int], runs: bool) -> None:
    targets = parse_cuda_architectures(spec)
    assert targets is not None
    assert _cuda_arch.runs_on(targets, capability) is runs


def test_targets_print_as_cuda_names() -> None:
    assert str(CUDATarget(75)) == "sm_75"
    assert str(CUDATarget(90, "a", ptx=True)) == "compute_90a"


# -- the check on cached builds ---------------------------------------------------------------


def _build(
    root: Path, record: dict[str, Any] | None, key: str = "b11434-cuda90-0123456789"
) -> Path:
    """A build cache folder: bin/llama-server (a script that leaves a mark if run) and
    build.json."""
    binary = root / key / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!/bin/sh\necho ran > {root / 'ran'}\nexit 3\n")  # builtins only
    binary.chmod(0o755)
    if record is not None:
        (root / key / "build.json").write_text(json.dumps(record))
    return binary


def _cuda(arch: str, used: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"backend": "cuda", "cuda_arch": arch}
    if used is not None:
        record["cuda_architectures"] = used
    return record


@pytest.fixture
def no_toolkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cuobjdump: an empty PATH and CUDA_HOME; the cache of earlier answers emptied."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(_cuda_arch, "_cache", {})
    return empty


def test_a_t4_with_a_binary_built_for_9_0_is_refused_naming_both(
    tmp_path: Path, no_toolkit: Path
) -> None:
    binary = _build(tmp_path, _cuda("90-real"))
    with pytest.raises(CUDAArchitectureError) as info:
        check_cuda_compatibility(binary, (0,), name="gpu0", nvml=NVML(T4))
    err = info.value
    message = str(err)
    for needle in ("gpu0", "GPU 0 (Tesla T4)", "compute capability 7.5", "sm_90", str(binary)):
        assert needle in message
    assert "build-server --cuda-arch 75" in message
    assert "--cuda-arch '75;90'" in message
    assert (err.gpus, err.compute_capabilities, err.architectures) == ((0,), ("7.5",), ("sm_90",))
    assert err.binary == str(binary)
    assert isinstance(err, LlamaServerError)
    back = pickle.loads(pickle.dumps(err))  # raised in a Ray actor, it arrives as itself
    assert type(back) is CUDAArchitectureError
    assert vars(back) == vars(err)
    assert str(back) == message


def test_only_the_gpus_the_server_gets_are_checked(tmp_path: Path, no_toolkit: Path) -> None:
    binary = _build(tmp_path, _cuda("90"))
    nvml = NVML(H100, T4)
    check_cuda_compatibility(binary, (0,), nvml=nvml)
    with pytest.raises(CUDAArchitectureError) as info:
        check_cuda_compatibility(binary, (0, 1), nvml=nvml)
    assert info.value.gpus == (1,)
    assert "GPU 1 (Tesla T4)" in str(info.value)
    assert "GPU 0" not in str(info.value)


def test_ptx_serves_a_newer_gpu_and_sass_alone_does_not(tmp_path: Path, no_toolkit: Path) -> None:
    ptx = _build(tmp_path / "a", _cuda("90-virtual"))
    check_cuda_compatibility(ptx, (0,), nvml=NVML(B200))
    sass = _build(tmp_path / "b", _cuda("90-real"))
    with pytest.raises(CUDAArchitectureError, match="--cuda-arch 100"):
        check_cuda_compatibility(sass, (0,), nvml=NVML(B200))


def test_the_architectures_cmake_used_win_over_the_ones_asked_for(
    tmp_path: Path, no_toolkit: Path
) -> None:
    # A native build: the record's cuda_arch says "native", CMake's configure line said 75.
    native = _build(tmp_path / "a", _cuda("native", used="75"))
    check_cuda_compatibility(native, (0,), nvml=NVML(T4))
    with pytest.raises(CUDAArchitectureError):
        check_cuda_compatibility(native, (0,), nvml=NVML(("Tesla V100", (7, 0))))
    # Unresolved: unknown, not checked (the check never refuses what it cannot read).
    unresolved = _build(tmp_path / "b", _cuda("native"))
    check_cuda_compatibility(unresolved, (0,), nvml=NVML(("Tesla V100", (7, 0))))


def test_nothing_is_checked_without_gpus_nvml_or_known_architectures(
    tmp_path: Path, no_toolkit: Path
) -> None:
    binary = _build(tmp_path / "a", _cuda("90-real"))
    check_cuda_compatibility(binary, (), nvml=NVML(T4))  # a CPU plan
    check_cuda_compatibility(binary, (0,), nvml=NVML(T4, no_driver=True))  # no driver
    check_cuda_compatibility(binary, (3,), nvml=NVML(T4))  # not a GPU NVML knows
    no_record = _build(tmp_path / "b", None)  # and no cuobjdump to ask
    assert binary_cuda_targets(no_record) == ("unknown", None)
    check_cuda_compatibility(no_record, (0,), nvml=NVML(T4))
    broken = _build(tmp_path / "c", None)
    (broken.parent.parent / "build.json").write_text("{not json")
    check_cuda_compatibility(broken, (0,), nvml=NVML(T4))


def test_a_gpu_that_reports_no_capability_is_not_guessed_at(
    tmp_path: Path, no_toolkit: Path
) -> None:
    binary = _build(tmp_path, _cuda("90-real"))
    nvml = NVML(H100, T4)
    nvml.gpus[0].unsupported.add("compute_capability")
    # GPU 1's capability can no longer be matched to its id: no check rather than a wrong one.
    check_cuda_compatibility(binary, (1,), nvml=nvml)


def test_a_cpu_build_given_gpus_warns_and_runs_on_the_cpu(tmp_path: Path, no_toolkit: Path) -> None:
    binary = _build(tmp_path, {"backend": "cpu", "cuda_arch": None}, key="b11434-cpu-0123456789")
    with pytest.warns(LlamaWarning, match=r"CPU build .* build-server --cuda-arch 75"):
        check_cuda_compatibility(binary, (0,), nvml=NVML(T4))
    # GPU ids from a scheduler on a machine without GPUs (Ray's count): nothing to say.
    check_cuda_compatibility(binary, (0,), nvml=NVML(no_driver=True))


CUOBJDUMP = """#!/bin/sh
# What the CUDA toolkit's cuobjdump prints for a binary built with 75-real and 90 (SASS + PTX).
case "$1" in
  --list-elf) echo "ELF file    1: llama-server.1.sm_75.cubin"
              echo "ELF file    2: llama-server.2.sm_90.cubin" ;;
  --list-ptx) echo "PTX file    1: llama-server.1.sm_90.ptx" ;;
esac
echo "$2" >> "${0%/*}/asked"
"""


def test_without_a_build_record_cuobjdump_tells(tmp_path: Path, no_toolkit: Path) -> None:
    tool = no_toolkit / "cuobjdump"
    tool.write_text(CUOBJDUMP)
    tool.chmod(0o755)
    binary = _build(tmp_path, None)
    backend, targets = binary_cuda_targets(binary)
    assert backend == "cuda"
    assert targets is not None
    assert {str(t) for t in targets} == {"sm_75", "sm_90", "compute_90"}
    check_cuda_compatibility(binary, (0, 1), nvml=NVML(T4, B200))  # 7.5: SASS; 10.0: PTX
    with pytest.raises(CUDAArchitectureError, match=r"GPU 0 \(NVIDIA A100\)"):
        check_cuda_compatibility(binary, (0,), nvml=NVML(("NVIDIA A100", (8, 0))))
    asked = (no_toolkit / "asked").read_text().splitlines()
    assert asked == [str(binary), str(binary)]  # asked once per flag, then remembered


# -- every start on GPUs passes the check --------------------------------------------------------


@pytest.mark.anyio
async def test_a_llama_server_on_gpus_is_refused_before_it_is_spawned(
    tmp_path: Path, no_toolkit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = _build(tmp_path, _cuda("90-real"))
    # read_gpu_inventory imports pynvml: the fake stands in for the module, as installed.
    monkeypatch.setitem(sys.modules, "pynvml", NVML(T4, T4))
    server = LlamaServer([str(binary), "--port", "0"], name="gpu0+1", gpus=(0, 1))
    with pytest.raises(CUDAArchitectureError) as info:
        await server.run()
    assert info.value.gpus == (0, 1)
    assert "gpu0+1" in str(info.value)
    assert not (tmp_path / "ran").exists()  # nothing was started
    assert server.pid is None


@pytest.mark.anyio
async def test_a_real_cpu_server_given_a_gpu_warns_and_serves(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = find_llama_server()
    if binary_cuda_targets(binary)[0] != "cpu":
        pytest.skip(f"{binary} has no build record saying it is a CPU build")
    monkeypatch.setitem(sys.modules, "pynvml", NVML(T4))
    argv = [str(binary), "-m", str(tiny_model), "--host", "127.0.0.1", "--port", "0", "-c", "256"]
    server = LlamaServer(argv, name="gpu0", gpus=(0,))
    async with anyio.create_task_group() as tg:
        with pytest.warns(LlamaWarning, match="CPU build"):
            await tg.start(server.run)
        assert server.url is not None
        tg.cancel_scope.cancel()
    assert server.exited.is_set()


# -- the build records what CMake built ---------------------------------------------------------


def test_a_native_cuda_build_records_the_architectures_cmake_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_toolkit: Path
) -> None:
    """``--cuda-arch native`` is resolved by CMake; the build record keeps its answer, which
    the check then reads (no GPU or nvcc here: the build steps are faked, their output not)."""

    def fake_run(
        cmd: list[str], *, on_line: Callable[[str], None] | None = None, **_: object
    ) -> None:
        if "-S" in cmd and on_line is not None:  # ggml-cuda's configure line, verbatim
            on_line(
                "-- Using CMAKE_CUDA_ARCHITECTURES=75;90-real CMAKE_CUDA_ARCHITECTURES_NATIVE=75"
            )
        if "--build" in cmd:
            for tool in cmd[cmd.index("--target") + 1 : cmd.index("-j")]:
                exe = Path(cmd[cmd.index("--build") + 1]) / "bin" / tool
                exe.parent.mkdir(parents=True, exist_ok=True)
                exe.write_text("#!/bin/sh\n")
                exe.chmod(0o755)

    def fake_source(_version: str, _root: Path, tmp: Path, *_rest: object) -> Path:
        (tmp / "src").mkdir()
        return tmp / "src"

    monkeypatch.setattr(building, "_run_logged", fake_run)
    monkeypatch.setattr(building, "_prepare_source", fake_source)
    monkeypatch.setattr(building, "_check_toolchain", lambda *_: {})
    server = building.build_llama_server(cuda_arch="native", cache_dir=tmp_path, progress=None)
    record = json.loads((server.parent.parent / "build.json").read_text())
    assert (record["cuda_arch"], record["cuda_architectures"]) == ("native", "75;90-real")
    assert record["tools"] == list(building.BUILT_TOOLS)
    backend, targets = binary_cuda_targets(server)
    assert backend == "cuda"
    assert {str(t) for t in targets or ()} == {"sm_75", "compute_75", "sm_90"}
    check_cuda_compatibility(server, (0, 1), nvml=NVML(T4, B200))  # 10.0 through compute_75


def test_llama_export_lora_is_built_only_with_the_cpu_backend_linked_in() -> None:
    # llama.cpp defines the target only then (tools/CMakeLists.txt); asking for it otherwise
    # would fail the whole build.
    assert building.built_tools(building.cmake_args()) == building.BUILT_TOOLS
    for extra in (["-DGGML_BACKEND_DL=ON"], ["-DGGML_CPU=OFF"], ["-DGGML_BACKEND_DL:BOOL=1"]):
        tools = building.built_tools(building.cmake_args(extra_cmake_args=extra))
        assert tools == ("llama-server", "llama-quantize"), extra
    on_then_off = ["-DGGML_BACKEND_DL=ON", "-DGGML_BACKEND_DL=OFF"]  # the last one wins
    assert building.built_tools(on_then_off) == building.BUILT_TOOLS


def test_a_gpu_nvml_cannot_name_is_left_out_of_the_inventory() -> None:
    # "NVML half works": one GPU lost (or forbidden) must not take the others with it.
    class HalfLost(NVML):
        def nvmlDeviceGetName(self, h: FakeGPU) -> str:
            if h.lost:
                raise NVMLError_GpuIsLost("GPU is lost")
            return h.name

    nvml = HalfLost(T4, H100)
    nvml.gpus[0].lost = True
    inventory = read_gpu_inventory(nvml=nvml)
    assert inventory is not None
    assert inventory.names == ("NVIDIA H100 80GB HBM3",)
    assert inventory.compute_capabilities == ("9.0",)
