"""One request path: whatever a client can ask a server, an engine can ask its servers."""

from __future__ import annotations

import inspect

from llamatelemetry_async import AsyncEngine, AsyncLlamaClient

# The client's own lifecycle, not requests.
_LIFECYCLE = {"aclose", "dispatcher", "is_closed", "pool_stats", "strict", "instrumentation"}


def _request_methods() -> list[str]:
    names = []
    for name, member in inspect.getmembers(AsyncLlamaClient):
        if name.startswith("_") or name in _LIFECYCLE or not inspect.isfunction(member):
            continue
        names.append(name)
    return sorted(names)


def test_the_client_has_the_request_methods_users_expect() -> None:
    names = _request_methods()
    for expected in ("stream", "stream_chat", "completion", "chat", "embeddings", "tokenize"):
        assert expected in names
    assert len(names) >= 25, names


def test_the_engine_offers_every_client_request_method_with_the_same_signature() -> None:
    for name in _request_methods():
        engine_method = getattr(AsyncEngine, name, None)
        assert engine_method is not None, f"AsyncEngine has no {name}()"
        client_sig = inspect.signature(getattr(AsyncLlamaClient, name))
        engine_sig = inspect.signature(engine_method)
        assert engine_sig == client_sig, f"{name}: engine {engine_sig} != client {client_sig}"
        assert inspect.iscoroutinefunction(engine_method) == inspect.iscoroutinefunction(
            getattr(AsyncLlamaClient, name)
        ), name


def test_the_old_engine_names_are_gone() -> None:
    for old in ("complete", "chat_stream", "embed", "stream_completion"):
        assert not hasattr(AsyncEngine, old), old
        assert not hasattr(AsyncLlamaClient, old), old
