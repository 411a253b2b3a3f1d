"""Environment detection (Kaggle, Colab, local; notebooks; GPUs) and notebook secrets.

GPUs come from the fake NVML (nvidia-ml-py's surface) put where ``import pynvml`` finds it, so
the real discovery and sampler code runs against it; the real NVML (no driver here) is used
once. Kaggle and Colab secrets come from fake modules with the real ones' surface.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable

import pytest

from llamatelemetry_async._errors import ModelDoesNotFitError
from llamatelemetry_async.engine import Placement
from llamatelemetry_async.environment import (
    Environment,
    GPUInfo,
    _secrets,
    detect_environment,
    load_secrets,
)
from llamatelemetry_async.models import GPUSpec, VRAMPlan, model_shape
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

GIB = 2**30
MARKERS = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG", "COLAB_GPU")
SECRET = "hf_TopSecretValue_0123456789"


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No platform markers, no notebook, no CUDA_VISIBLE_DEVICES, no secret clients."""
    for name in (*MARKERS, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for module in ("IPython", "google.colab", "kaggle_secrets", "google.colab.userdata"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of it raises ImportError
    return monkeypatch


def _nvml(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML) -> FakeNVML:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def t4() -> FakeGPU:
    return FakeGPU(name="Tesla T4", memory_total=15 * GIB, memory_used=GIB // 4)


# -- platform and notebook ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_platform_kind(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML())
    assert (await detect_environment()).kind == "local"
    plain.setenv("COLAB_RELEASE_TAG", "release-colab_20250101-060000_RC00")
    assert (await detect_environment()).kind == "colab"
    plain.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert (await detect_environment()).kind == "kaggle"
    plain.delenv("COLAB_RELEASE_TAG")
    plain.delenv("KAGGLE_KERNEL_RUN_TYPE")
    plain.setenv("KAGGLE_URL_BASE", "https://www.kaggle.com")
    assert (await detect_environment()).kind == "kaggle"


def _ipython(shell: object) -> types.ModuleType:
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell  # type: ignore[attr-defined]
    return module


@pytest.mark.anyio
async def test_in_notebook(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML())
    assert not (await detect_environment()).in_notebook  # IPython not loaded
    plain.setitem(sys.modules, "IPython", _ipython(None))
    assert not (await detect_environment()).in_notebook  # loaded, no shell running
    plain.setitem(sys.modules, "IPython", _ipython(types.SimpleNamespace(kernel=None)))
    assert not (await detect_environment()).in_notebook  # terminal IPython
    kernel_shell = types.SimpleNamespace(kernel=object())
    plain.setitem(sys.modules, "IPython", _ipython(kernel_shell))
    assert (await detect_environment()).in_notebook


# -- GPUs and the recommended placement ---------------------------------------------------------


@pytest.mark.anyio
async def test_kaggle_t4x2(plain: pytest.MonkeyPatch) -> None:
    fake = _nvml(plain, FakeNVML([t4(), t4()]))
    plain.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    env = await detect_environment()
    assert env.gpus == (
        GPUInfo(0, "Tesla T4", 15 * GIB, GIB // 4),
        GPUInfo(1, "Tesla T4", 15 * GIB, GIB // 4),
    )
    assert env.gpus[0].memory_free == 15 * GIB - GIB // 4
    assert env.is_kaggle_t4x2
    assert env.placement == Placement.kaggle_t4x2()
    assert env.gpu_note is None
    presets = env.presets()
    assert list(presets) == ["per_gpu", "pair 50/50", "pair 60/40", "pair 70/30", "cpu"]
    assert presets["pair 60/40"] == Placement.kaggle_t4x2_pair("60/40")
    (plan,) = presets["pair 70/30"].plans([0, 1])
    assert plan.tensor_split == (0.7, 0.3)
    assert [p.gpus for p in presets["per_gpu"].plans([0, 1])] == [(0,), (1,)]
    # Every NVML call ran in a worker thread, never on the event loop's.
    assert fake.threads
    assert threading.current_thread().name not in fake.threads
    text = env.describe()
    assert "Kaggle" in text
    assert "GPU 1: Tesla T4, 15.0 GiB" in text


@pytest.mark.anyio
async def test_one_gpu_and_cuda_visible_devices(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML([FakeGPU(), FakeGPU(name="NVIDIA A100-SXM4-40GB")]))
    plain.setenv("CUDA_VISIBLE_DEVICES", "1")
    env = await detect_environment()
    assert [(g.index, g.name) for g in env.gpus] == [(1, "NVIDIA A100-SXM4-40GB")]
    assert env.placement == Placement.single_gpu(1)
    assert list(env.presets()) == ["single_gpu", "cpu"]
    plain.delenv("CUDA_VISIBLE_DEVICES")
    env = await detect_environment()
    # Two GPUs that are not T4s: one server each, and the pair splits on those ids.
    assert env.placement == Placement.per_gpu([0, 1])
    assert not env.is_kaggle_t4x2
    assert env.presets()["pair 50/50"] == Placement.pairs([(0, 1)], tensor_split=(0.5, 0.5))


@pytest.mark.anyio
async def test_many_gpus(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML([FakeGPU() for _ in range(4)]))
    env = await detect_environment()
    assert env.placement == Placement.per_gpu([0, 1, 2, 3])
    assert list(env.presets()) == ["per_gpu", "pairs", "cpu"]


@pytest.mark.anyio
async def test_no_driver(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML([t4()], no_driver=True))
    env = await detect_environment()
    assert env.gpus == ()
    assert env.placement == Placement.cpu()
    assert env.presets() == {"cpu": Placement.cpu()}
    assert env.gpu_note is not None
    assert "no GPU" in env.describe()
    # No NVML, but CUDA_VISIBLE_DEVICES names GPUs: they are used, their details unknown.
    plain.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = await detect_environment()
    assert [g.index for g in env.gpus] == [0, 1]
    assert env.gpus[0].memory_total is None
    assert env.gpus[0].memory_free is None
    assert env.placement == Placement.per_gpu([0, 1])
    assert env.gpu_note is not None
    assert "NVML" in env.gpu_note


@pytest.mark.anyio
async def test_real_nvml_on_this_machine(plain: pytest.MonkeyPatch) -> None:
    """The real nvidia-ml-py: here, with no driver, no GPU and a CPU placement."""
    plain.delitem(sys.modules, "pynvml", raising=False)
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here; the fake NVML tests cover placement on GPUs")
    env = await detect_environment()
    assert isinstance(env, Environment)
    assert (env.kind, env.gpus, env.placement) == ("local", (), Placement.cpu())


def test_import_has_no_side_effects() -> None:
    code = (
        "import json, os, sys; before = dict(os.environ); "
        "import llamatelemetry_async.environment; "
        "names = ('pynvml', 'kaggle_secrets', 'google.colab', 'IPython'); "
        "print(json.dumps([dict(os.environ) == before, [m for m in names if m in sys.modules]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == [True, []]


# -- secrets ------------------------------------------------------------------------------------


class BackendError(Exception):
    """kaggle_web_client.BackendError: what Kaggle raises for a secret not attached."""


def _kaggle(
    monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str], *, broken: bool = False
) -> list[str]:
    """A ``kaggle_secrets`` module with the real one's surface; returns the labels asked."""
    asked: list[str] = []

    class UserSecretsClient:
        def __init__(self) -> None:
            if broken:
                raise RuntimeError("CredentialError: no kernel token")

        def get_secret(self, label: str) -> str:
            asked.append(label)
            if label not in secrets:
                raise BackendError(f"Unexpected response from the service: no secret {label}")
            return secrets[label]

    module = types.ModuleType("kaggle_secrets")
    module.UserSecretsClient = UserSecretsClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle_secrets", module)
    return asked


def _colab(monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str]) -> None:
    """``google.colab.userdata`` with the real one's ``get(name)``."""

    class SecretNotFoundError(Exception):
        pass

    def get(key: str) -> str:
        if key not in secrets:
            raise SecretNotFoundError(key)
        return secrets[key]

    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = get  # type: ignore[attr-defined]
    colab.userdata = userdata  # type: ignore[attr-defined]
    google.colab = colab  # type: ignore[attr-defined]
    google.__path__ = []
    colab.__path__ = []
    for name, module in (("google", google), ("google.colab", colab)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


@pytest.fixture
def no_token(plain: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # Set, then delete: either way monkeypatch puts back what was there before the test.
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        plain.setenv(name, "placeholder")
        plain.delenv(name)
    return plain


def test_kaggle_secrets_into_the_environment(
    no_token: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    asked = _kaggle(no_token, {"HF_TOKEN": SECRET})
    assert load_secrets() == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == SECRET
    assert asked == ["HF_TOKEN"]
    # Already set: kept and not asked for again, unless overwrite.
    assert load_secrets() == []
    assert asked == ["HF_TOKEN"]
    os.environ["HF_TOKEN"] = "older"
    assert load_secrets("HF_TOKEN", overwrite=True) == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == SECRET
    # A secret that is not attached is skipped, by name only.
    assert load_secrets(["HF_TOKEN", "WANDB_API_KEY"]) == []
    assert "WANDB_API_KEY" not in os.environ
    assert "WANDB_API_KEY: not available from Kaggle secrets (BackendError)" in caplog.text
    assert "loaded HF_TOKEN from Kaggle secrets" in caplog.text
    assert SECRET not in caplog.text


def test_colab_secrets(no_token: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _colab(no_token, {"HF_TOKEN": SECRET})
    assert load_secrets(("HF_TOKEN", "WANDB_API_KEY")) == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == SECRET
    assert "WANDB_API_KEY" not in os.environ
    assert SECRET not in caplog.text


def test_no_platform_no_secrets(no_token: pytest.MonkeyPatch) -> None:
    assert load_secrets() == []
    assert "HF_TOKEN" not in os.environ
    assert _secrets.kaggle_secret("HF_TOKEN") is None


def test_a_broken_kaggle_client_loads_nothing(no_token: pytest.MonkeyPatch) -> None:
    asked = _kaggle(no_token, {"HF_TOKEN": SECRET}, broken=True)
    assert load_secrets() == []
    assert asked == []
    assert _secrets.kaggle_secret("HF_TOKEN") is None


@pytest.mark.parametrize("value", ["", None])
def test_empty_secret_is_not_loaded(no_token: pytest.MonkeyPatch, value: str | None) -> None:
    module = types.ModuleType("kaggle_secrets")
    get: Callable[[object, str], str | None] = lambda self, label: value  # noqa: E731
    module.UserSecretsClient = type("UserSecretsClient", (), {"get_secret": get})  # type: ignore[attr-defined]
    no_token.setitem(sys.modules, "kaggle_secrets", module)
    assert load_secrets() == []
    assert "HF_TOKEN" not in os.environ


# -- the presets, planned -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_preset_planned_for_a_model(plain: pytest.MonkeyPatch) -> None:
    _nvml(plain, FakeNVML([t4(), t4()]))
    env = await detect_environment()
    assert env.gpus[0].spec() == GPUSpec(0, "Tesla T4", 15 * GIB, free_bytes=15 * GIB - GIB // 4)
    # Llama-2-13B in f16 (26 GB): one T4 cannot hold it, the pair can.
    f16_13b = model_shape(
        n_layer=40, n_embd=5120, n_head=40, n_ff=13824, n_vocab=32000, n_ctx_train=4096,
        weight_type="F16",
    )  # fmt: skip
    plans = env.plan_presets(f16_13b, allow_partial=False, ctx_size=4096)
    assert list(plans) == list(env.presets())
    per_gpu = plans["per_gpu"]
    assert isinstance(per_gpu, ModelDoesNotFitError)
    assert any("Placement.pairs([(0, 1)])" in s for s in per_gpu.suggestions)
    pair = plans["pair 50/50"]
    assert isinstance(pair, VRAMPlan)
    (server,) = pair.servers
    assert server.full_offload
    assert server.server.tensor_split == (0.5, 0.5)
    assert [d.capacity_bytes for d in server.devices] == [15 * GIB - GIB // 4] * 2  # free memory
    # 60% of 26 GB does not fit one 15 GiB T4: those presets say so, and what would.
    for name in ("pair 60/40", "pair 70/30"):
        uneven = plans[name]
        assert isinstance(uneven, ModelDoesNotFitError), name
        assert any("tensor_split=(0.5, 0.5)" in s for s in uneven.suggestions), name
    cpu = plans["cpu"]
    assert isinstance(cpu, VRAMPlan)
    assert cpu.servers[0].devices == ()
    # GPUs NVML gave no memory for are left out, with their presets.
    no_memory = Environment(
        kind="local", in_notebook=False, gpus=(GPUInfo(0, "unknown GPU"),),
        placement=Placement.single_gpu(0),
    )  # fmt: skip
    assert no_memory.gpus[0].spec() is None
    assert list(no_memory.plan_presets(f16_13b)) == ["cpu"]
