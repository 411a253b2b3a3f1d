"""Notebook secrets (Kaggle's "Add-ons > Secrets", Colab's key panel) into the environment.

Values are never printed, logged or returned: ``load_secrets`` returns the names it set.
The platform clients are imported when called, never at import time; on a machine that is
neither Kaggle nor Colab nothing is loaded and nothing is asked.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["kaggle_secret", "load_secrets"]

logger = logging.getLogger("llamatelemetry_async.environment")


def _kaggle_client() -> Any | None:
    """A ``kaggle_secrets.UserSecretsClient``, or ``None`` outside a Kaggle notebook."""
    try:
        module = importlib.import_module("kaggle_secrets")
    except ImportError:
        return None
    try:
        return module.UserSecretsClient()
    # Kaggle's client raises its own errors (CredentialError when the kernel has no token).
    except Exception as exc:
        logger.info("Kaggle secrets are unavailable (%s)", type(exc).__name__)
        return None


def _colab_userdata() -> Any | None:
    """Colab's ``google.colab.userdata`` module, or ``None`` outside Colab."""
    try:
        return importlib.import_module("google.colab.userdata")
    except ImportError:
        return None


def _get(source: str, getter: Any, name: str) -> str | None:
    """One secret's value, or ``None`` when the platform does not give it to this notebook."""
    try:
        value = getter(name)
    # A secret that is not attached (Kaggle: BackendError; Colab: SecretNotFoundError,
    # NotebookAccessError) is an expected answer, not a failure. Only the type is logged:
    # the platform's message is not ours to vet for secret material.
    except Exception as exc:
        logger.info("%s: not available from %s secrets (%s)", name, source, type(exc).__name__)
        return None
    if not isinstance(value, str) or not value:
        return None
    return value


def kaggle_secret(name: str) -> str | None:
    """The Kaggle secret ``name``, or ``None`` (not on Kaggle, or not attached).

    Blocking: it asks Kaggle's secret service over HTTP; async code runs it in a thread.
    """
    client = _kaggle_client()
    if client is None:
        return None
    return _get("Kaggle", client.get_secret, name)


def load_secrets(
    names: Iterable[str] | str = ("HF_TOKEN",), *, overwrite: bool = False
) -> list[str]:
    """Copy notebook secrets into ``os.environ``; return the names set (never the values).

    On Kaggle the secrets attached to the notebook are read with
    ``kaggle_secrets.UserSecretsClient``; on Colab with ``google.colab.userdata`` (Colab may
    ask you, in the notebook, to grant access). A name already in the environment is kept
    unless ``overwrite``. A secret that is not attached is skipped (logged by name). Outside
    Kaggle and Colab it returns ``[]``. Blocking (one request per secret): from async code
    use ``await anyio.to_thread.run_sync(load_secrets)``.

    ```python
    load_secrets()                          # ['HF_TOKEN'] on a Kaggle notebook with it attached
    load_secrets(["HF_TOKEN", "WANDB_API_KEY"], overwrite=True)
    ```
    """
    wanted = [names] if isinstance(names, str) else list(names)
    todo = [n for n in wanted if overwrite or not os.environ.get(n)]
    if not todo:
        return []
    source: str
    getter: Any
    if (client := _kaggle_client()) is not None:
        source, getter = "Kaggle", client.get_secret
    elif (userdata := _colab_userdata()) is not None:
        source, getter = "Colab", userdata.get
    else:
        logger.debug("load_secrets: neither Kaggle nor Colab secrets are available here")
        return []
    loaded = []
    for name in todo:
        value = _get(source, getter, name)
        if value is not None:
            os.environ[name] = value
            loaded.append(name)
    if loaded:
        logger.info("loaded %s from %s secrets", ", ".join(loaded), source)
    return loaded
