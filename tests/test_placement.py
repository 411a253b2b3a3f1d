"""Placement resolution, presets, argv/env per placement, and GPU discovery (no processes)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from llamatelemetry_async._errors import ConfigError
from llamatelemetry_async.engine import Placement, ServerPlan
from llamatelemetry_async.gpu import visible_gpus
from llamatelemetry_async.server._config import ServerConfig, server_command


def names(plans: list[ServerPlan]) -> list[str]:
    return [plan.name for plan in plans]


# -- resolution ----------------------------------------------------------------------------


def test_per_gpu_over_all_visible() -> None:
    plans = Placement.per_gpu().plans([0, 1, 2])
    assert plans == [ServerPlan("gpu0", (0,)), ServerPlan("gpu1", (1,)), ServerPlan("gpu2", (2,))]


def test_per_gpu_named() -> None:
    assert Placement.per_gpu([3, 1]).plans([0, 1, 2, 3]) == [
        ServerPlan("gpu3", (3,)),
        ServerPlan("gpu1", (1,)),
    ]


def test_per_gpu_gpu_not_visible() -> None:
    with pytest.raises(ConfigError, match="GPU 2 not visible") as info:
        Placement.per_gpu([0, 2]).plans([0, 1])
    assert info.value.field == "gpus"
    assert "[0, 1]" in str(info.value)


@pytest.mark.parametrize("placement", [Placement.per_gpu(), Placement.pairs()])
def test_gpu_placement_without_gpus_suggests_cpu(placement: Placement) -> None:
    with pytest.raises(ConfigError, match=r"Placement\.cpu"):
        placement.plans([])


def test_pairs_of_visible_gpus() -> None:
    plans = Placement.pairs().plans([0, 1, 2, 3])
    assert plans == [
        ServerPlan("gpu0+1", (0, 1), tensor_split=(0.5, 0.5), split_mode="layer"),
        ServerPlan("gpu2+3", (2, 3), tensor_split=(0.5, 0.5), split_mode="layer"),
    ]


def test_pairs_odd_gpu_is_left_out() -> None:
    assert names(Placement.pairs().plans([0, 1, 2])) == ["gpu0+1"]


def test_pairs_named_with_split() -> None:
    placement = Placement.pairs([(2, 3), (0, 1)], tensor_split=(0.6, 0.4), split_mode="tensor")
    plans = placement.plans([0, 1, 2, 3])
    assert names(plans) == ["gpu2+3", "gpu0+1"]
    assert all(plan.tensor_split == (0.6, 0.4) for plan in plans)
    assert all(plan.split_mode == "tensor" for plan in plans)


def test_pairs_gpu_not_visible() -> None:
    with pytest.raises(ConfigError, match="GPU 1 not visible") as info:
        Placement.pairs([(0, 1)]).plans([0])
    assert info.value.field == "pairs"


@pytest.mark.parametrize(
    ("build", "field", "fragment"),
    [
        (lambda: Placement.pairs([(0, 1), (1, 2)]), "pairs", "two pairs"),
        (lambda: Placement.pairs([(1, 1)]), "pairs", "two different GPUs"),
        (lambda: Placement.pairs([]), "pairs", "at least one"),
        (lambda: Placement.pairs([(0, 1, 2)]), "pairs", "two GPU ids"),  # type: ignore[list-item]
        (lambda: Placement.pairs(tensor_split=(0.5, 0.0)), "tensor_split", "positive"),
        (lambda: Placement.pairs(tensor_split=(1.0,)), "tensor_split", "two"),  # type: ignore[arg-type]
        (lambda: Placement.pairs(split_mode="none"), "split_mode", "layer, row, tensor"),  # type: ignore[arg-type]
        (lambda: Placement.per_gpu([]), "gpus", "at least one"),
        (lambda: Placement.per_gpu([0, 0]), "gpus", "twice"),
        (lambda: Placement.per_gpu([-1]), "gpus", ">= 0"),
        (lambda: Placement.single_gpu(-2), "gpus", ">= 0"),
        (lambda: Placement.cpu(0), "n", ">= 1"),
        (lambda: Placement.cpu(-3), "n", ">= 1"),
        (lambda: Placement.kaggle_t4x2_pair("80/20"), "split", "60/40"),  # type: ignore[arg-type]
        (lambda: Placement.coerce("gpu"), "placement", "auto"),
    ],
)
def test_invalid_placement_names_its_field(build: object, field: str, fragment: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)


def test_pairs_need_two_visible_gpus() -> None:
    with pytest.raises(ConfigError, match="2 visible GPUs") as info:
        Placement.pairs().plans([0])
    assert "Placement.per_gpu()" in str(info.value)


def test_cpu() -> None:
    assert Placement.cpu(3).plans([0, 1]) == [
        ServerPlan("cpu0", ()),
        ServerPlan("cpu1", ()),
        ServerPlan("cpu2", ()),
    ]
    assert names(Placement.cpu().plans([])) == ["cpu0"]


def test_auto() -> None:
    assert names(Placement.auto().plans([0, 1])) == ["gpu0", "gpu1"]
    assert Placement.auto().plans([]) == [ServerPlan("cpu0", ())]


def test_visible_list_is_deduplicated_and_checked() -> None:
    assert names(Placement.auto().plans([1, 1, 0])) == ["gpu1", "gpu0"]
    with pytest.raises(ConfigError, match="gpus"):
        Placement.auto().plans([-1])


def test_presets() -> None:
    assert Placement.kaggle_t4x2() == Placement.per_gpu([0, 1])
    assert names(Placement.kaggle_t4x2().plans([0, 1])) == ["gpu0", "gpu1"]
    assert Placement.single_gpu().plans([0, 1]) == [ServerPlan("gpu0", (0,))]
    assert Placement.single_gpu(1).plans([0, 1]) == [ServerPlan("gpu1", (1,))]
    for split, expected in [("50/50", (0.5, 0.5)), ("60/40", (0.6, 0.4)), ("70/30", (0.7, 0.3))]:
        plans = Placement.kaggle_t4x2_pair(split).plans([0, 1])  # type: ignore[arg-type]
        assert plans == [ServerPlan("gpu0+1", (0, 1), tensor_split=expected, split_mode="layer")]
    row = Placement.kaggle_t4x2_pair("70/30", split_mode="row").plans([0, 1])
    assert row[0].split_mode == "row"


def test_kaggle_preset_on_a_single_gpu_machine() -> None:
    with pytest.raises(ConfigError, match="GPU 1 not visible"):
        Placement.kaggle_t4x2().plans([0])


def test_coerce() -> None:
    placement = Placement.cpu(2)
    assert Placement.coerce(placement) is placement
    assert Placement.coerce("auto") == Placement.auto()


def test_placement_is_immutable_and_hashable() -> None:
    placement = Placement.pairs([(0, 1)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.n = 4  # type: ignore[misc]
    assert hash(placement) == hash(Placement.pairs([(0, 1)]))
    assert placement.gpu_pairs == ((0, 1),)
    assert isinstance(Placement.per_gpu([0, 1]).gpus, tuple)


# -- argv and env for each placement and preset --------------------------------------------

# (placement, visible GPUs, [(CUDA_VISIBLE_DEVICES, n-gpu-layers, split-mode, tensor-split)])
CASES: list[tuple[str, Placement, list[int], list[tuple[str, str, str | None, str | None]]]] = [
    ("auto-gpus", Placement.auto(), [0, 1], [("0", "all", None, None), ("1", "all", None, None)]),
    ("auto-cpu", Placement.auto(), [], [("", "0", None, None)]),
    ("per_gpu", Placement.per_gpu([1]), [0, 1], [("1", "all", None, None)]),
    ("cpu3", Placement.cpu(3), [0], [("", "0", None, None)] * 3),
    (
        "pairs",
        Placement.pairs(),
        [0, 1, 2, 3],
        [("0,1", "all", "layer", "0.5,0.5"), ("2,3", "all", "layer", "0.5,0.5")],
    ),
    (
        "pair-60/40-tensor",
        Placement.pairs([(0, 1)], tensor_split=(0.6, 0.4), split_mode="tensor"),
        [0, 1],
        [("0,1", "all", "tensor", "0.6,0.4")],
    ),
    (
        "kaggle_t4x2",
        Placement.kaggle_t4x2(),
        [0, 1],
        [("0", "all", None, None), ("1", "all", None, None)],
    ),
    ("kaggle_50/50", Placement.kaggle_t4x2_pair(), [0, 1], [("0,1", "all", "layer", "0.5,0.5")]),
    (
        "kaggle_60/40",
        Placement.kaggle_t4x2_pair("60/40"),
        [0, 1],
        [("0,1", "all", "layer", "0.6,0.4")],
    ),
    (
        "kaggle_70/30-row",
        Placement.kaggle_t4x2_pair("70/30", split_mode="row"),
        [0, 1],
        [("0,1", "all", "row", "0.7,0.3")],
    ),
    (
        "kaggle_60/40-tensor",
        Placement.kaggle_t4x2_pair("60/40", split_mode="tensor"),
        [0, 1],
        [("0,1", "all", "tensor", "0.6,0.4")],
    ),
    ("single_gpu", Placement.single_gpu(1), [0, 1], [("1", "all", None, None)]),
]


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.mark.parametrize(
    ("placement", "gpus", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_argv_and_env_per_placement(
    placement: Placement,
    gpus: list[int],
    expected: list[tuple[str, str, str | None, str | None]],
) -> None:
    config = ServerConfig(ctx_size=2048, n_parallel=4, api_key="key-1")
    got = []
    for plan in placement.plans(gpus):
        argv, env = server_command(
            config, binary="llama-server", model="m.gguf", plan=plan, base_env={"PATH": "/bin"}
        )
        assert argv[:7] == [
            "llama-server",
            "--model",
            "m.gguf",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        assert _value(argv, "--ctx-size") == "2048"
        assert _value(argv, "--parallel") == "4"
        assert "key-1" not in argv
        assert env["LLAMA_API_KEY"] == "key-1"
        assert ("--device" in argv) == (not plan.gpus)
        got.append(
            (
                env["CUDA_VISIBLE_DEVICES"],
                _value(argv, "--n-gpu-layers"),
                _value(argv, "--split-mode"),
                _value(argv, "--tensor-split"),
            )
        )
    assert got == expected


def test_tensor_pair_with_flash_attention_off_is_refused() -> None:
    plan = Placement.kaggle_t4x2_pair("60/40", split_mode="tensor").plans([0, 1])[0]
    with pytest.raises(ConfigError, match="split_mode"):
        server_command(ServerConfig(flash_attn="off"), binary="b", model="m", plan=plan)


# -- GPU discovery -------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakePynvml(types.ModuleType):
    """The slice of nvidia-ml-py that discovery uses, reporting ``count`` devices."""

    NVMLError = FakeNVMLError

    def __init__(self, count: int = 2, *, init_fails: bool = False) -> None:
        super().__init__("pynvml")
        self.count = count
        self.init_fails = init_fails
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{'ab'[handle]}{handle}aaaaaa-1111-2222-3333-444444444444"


@pytest.fixture
def no_cuda_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def _install(monkeypatch: pytest.MonkeyPatch, fake: FakePynvml) -> FakePynvml:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_real_nvml_absent_here_means_no_gpus(no_cuda_env: pytest.MonkeyPatch) -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the no-driver path is covered by the fakes")
    assert visible_gpus() == []


def test_real_nvml_absent_uses_cuda_visible_devices(no_cuda_env: pytest.MonkeyPatch) -> None:
    _install(no_cuda_env, FakePynvml(init_fails=True))
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == [2, 3]
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1,GPU-b1aaaaaa,0")  # no NVML: a UUID ends it
    assert visible_gpus() == [1]
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_pynvml_not_installed(no_cuda_env: pytest.MonkeyPatch) -> None:
    no_cuda_env.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert visible_gpus() == []
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert visible_gpus() == [0]


def test_fake_nvml_two_devices(no_cuda_env: pytest.MonkeyPatch) -> None:
    fake = _install(no_cuda_env, FakePynvml(2))
    assert visible_gpus() == [0, 1]
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", [1]),
        ("1,0", [1, 0]),
        (" 0 , 1 ", [0, 1]),
        ("0,5,1", [0]),  # as in CUDA: the list ends at the first invalid entry
        ("-1", []),
        ("", []),
        ("0,0", [0]),
        ("GPU-b1", [1]),  # a unique UUID prefix
        ("GPU-a0aaaaaa-1111-2222-3333-444444444444,1", [0, 1]),
        ("GPU-", []),  # ambiguous prefix
        ("MIG-0123", []),
    ],
)
def test_fake_nvml_narrowed_by_cuda_visible_devices(
    no_cuda_env: pytest.MonkeyPatch, value: str, expected: list[int]
) -> None:
    _install(no_cuda_env, FakePynvml(2))
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == expected


def test_fake_nvml_error_after_init_still_shuts_down(no_cuda_env: pytest.MonkeyPatch) -> None:
    class Broken(FakePynvml):
        def nvmlDeviceGetCount(self) -> int:
            raise FakeNVMLError("GPU is lost")

    fake = _install(no_cuda_env, Broken())
    assert visible_gpus() == []
    assert fake.calls == ["init", "shutdown"]


def test_discovery_feeds_auto(no_cuda_env: pytest.MonkeyPatch) -> None:
    _install(no_cuda_env, FakePynvml(2))
    assert names(Placement.auto().plans(visible_gpus())) == ["gpu0", "gpu1"]
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert names(Placement.auto().plans(visible_gpus())) == ["gpu1"]
