"""``chat``: an interactive streaming chat, against an engine on a model or a server URL."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import anyio

from .._errors import LlamaError, UsageError
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    LineReader,
    add_placement_options,
    api_key_from,
    placement_from,
    resolve,
    run,
    stderr,
    stop_on_signals,
)

if TYPE_CHECKING:
    from ..client import ChatChunk, TokenStream

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  llamatelemetry-async chat model.gguf
  llamatelemetry-async chat model.gguf --system "Answer in one sentence." --max-tokens 128
  llamatelemetry-async chat --url http://127.0.0.1:8080 --api-key-env LLAMA_API_KEY
  printf 'hello\\nand then?\\n' | llamatelemetry-async chat model.gguf

In the chat:
  /exit, /quit or Ctrl-D   quit
  /reset                   forget the conversation (the system prompt stays)
  /history                 show the conversation so far
  Ctrl-C                   during a reply: stop that reply (the part shown stays in
                           the history); at the prompt: discard the line
  SIGTERM                  quit (exit status 0), stopping the engine's servers

The reply goes to stdout; the banner and each reply's figures (tokens, prompt tokens, time
to first token, tokens/s) go to stderr.
"""

_COMMANDS: Final = "/exit, /quit, /reset, /history"

OpenStream = Callable[..., "TokenStream[ChatChunk]"]  # engine.stream_chat, client.stream_chat


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="chat in the terminal, streaming each reply (a model or --url)",
        description="Chat with a model: start an engine on MODEL, or talk to a running "
        "llama-server at --url. Lines are read from stdin; each reply streams as it is "
        "generated, and the conversation is kept and sent with every turn.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="a .gguf path, owner/repo:file.gguf or a registry name, served here",
    )
    chat.add_argument("--url", help="a running llama-server (instead of MODEL)")
    keys = chat.add_mutually_exclusive_group()
    keys.add_argument("--api-key-env", metavar="VAR", help="with --url: the API key is in $VAR")
    keys.add_argument("--api-key-file", metavar="PATH", help="with --url: the API key file")
    reply = chat.add_argument_group("replies")
    reply.add_argument("--system", metavar="TEXT", help="a system prompt")
    reply.add_argument("--max-tokens", type=int, default=512, metavar="N", help="per reply")
    reply.add_argument("--temperature", type=float, metavar="T", help="sampling temperature")
    reply.add_argument("--seed", type=int, metavar="N", help="sampling seed")
    add_placement_options(chat)
    chat.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.url is None):
        raise UsageError("chat needs either MODEL (a .gguf file) or --url URL, not both")
    key = api_key_from(args.api_key_env, args.api_key_file)
    if args.url is not None and key is None:
        key = os.environ.get("LLAMA_API_KEY")  # what llama-server itself reads
    return run(lambda a: _session(a, key), args)


class _Interrupts:
    """What Ctrl-C means right now: stop the reply, discard the line, or quit (SIGTERM:
    quit)."""

    def __init__(self, session: anyio.CancelScope, show_prompt: bool) -> None:
        self.session = session
        self.show_prompt = show_prompt
        self.reply: anyio.CancelScope | None = None
        self.in_repl = False
        self.quit = False

    def __call__(self, signum: signal.Signals) -> None:
        if signum == signal.SIGTERM:  # asked to end: leave like /exit, servers reaped
            self.session.cancel()
        elif self.reply is not None:
            self.reply.cancel()
        elif self.in_repl:
            # A terminal already dropped the half-typed line; say how to leave instead.
            print(f"\n(Ctrl-D or /exit quits){_PROMPT if self.show_prompt else ''}", end="")
            sys.stdout.flush()
        else:  # still starting: give up
            self.quit = True
            self.session.cancel()


_PROMPT: Final = "\n> "


async def _session(args: argparse.Namespace, key: str | None) -> int:
    interactive = os.isatty(0)
    with anyio.CancelScope() as scope:
        interrupts = _Interrupts(scope, interactive)
        async with (
            stop_on_signals(interrupts, signal.SIGINT, signal.SIGTERM),
            contextlib.AsyncExitStack() as stack,
        ):
            open_stream, where = await _connect(args, key, stack)
            stderr(f"chatting with {where}; /exit or Ctrl-D quits, Ctrl-C stops a reply")
            interrupts.in_repl = True
            await _repl(open_stream, args, interrupts, interactive)
    return EXIT_INTERRUPTED if interrupts.quit else EXIT_OK


async def _connect(
    args: argparse.Namespace, key: str | None, stack: contextlib.AsyncExitStack
) -> tuple[OpenStream, str]:
    if args.model is None:
        from ..client import AsyncLlamaClient

        client = await stack.enter_async_context(AsyncLlamaClient(args.url, api_key=key))
        await client.health()  # a wrong URL fails here, with a hint, not at the first line
        return client.stream_chat, args.url

    from ..engine import AsyncEngine
    from ..server import ServerConfig

    model = await resolve(args.model)
    config = ServerConfig(
        ctx_size=args.ctx_size, n_parallel=args.parallel, n_gpu_layers=args.n_gpu_layers
    )
    engine = AsyncEngine(
        model,
        placement=placement_from(args),
        server=config,
        binary=args.llama_server,
        log_dir=args.log_dir,
    )
    await stack.enter_async_context(engine)
    servers = ", ".join(f"{s.name} at {s.url}" for s in engine.servers)
    return engine.stream_chat, f"{model.name} ({servers})"


async def _repl(
    open_stream: OpenStream, args: argparse.Namespace, interrupts: _Interrupts, interactive: bool
) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    params: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    reader = LineReader(0)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = await reader.readline()
        if line is None:
            if interactive:
                print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(system)
            stderr("(the conversation is forgotten)")
            continue
        if text == "/history":
            _print_history(history)
            continue
        if text.startswith("/"):
            stderr(f"unknown command {text.split()[0]}; the commands are {_COMMANDS}")
            continue
        history.append({"role": "user", "content": text})
        reply = await _reply(open_stream, history, params, interrupts)
        if reply:
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()  # nothing came back: the turn did not happen


async def _reply(
    open_stream: OpenStream,
    history: list[dict[str, str]],
    params: dict[str, Any],
    interrupts: _Interrupts,
) -> str:
    """Stream one reply to stdout; returns its text (the part shown, if stopped)."""
    stream = open_stream(list(history), **params)
    start = time.perf_counter()
    first: float | None = None
    with anyio.CancelScope() as scope:
        interrupts.reply = scope
        try:
            async with stream:
                async for chunk in stream:
                    if first is None:
                        first = time.perf_counter() - start
                    print(chunk.text, end="", flush=True)
        except LlamaError as exc:
            print(flush=True)
            stderr(f"error: {str(exc).splitlines()[0]}")
            return ""
        finally:
            interrupts.reply = None
    print(flush=True)
    if scope.cancelled_caught:
        stderr("[reply stopped]")
        return stream.text
    stderr(_figures(stream, first))
    return stream.text


def _figures(stream: TokenStream[ChatChunk], first: float | None) -> str:
    parts = []
    usage = stream.usage
    if usage is not None:
        parts.append(f"{usage.completion_tokens} tokens, prompt {usage.prompt_tokens} tokens")
    if first is not None:
        parts.append(f"first token after {first * 1e3:.1f} ms")
    timings = stream.timings
    if timings is not None and timings.predicted_per_second:
        parts.append(f"{timings.predicted_per_second:.0f} tok/s")
    return f"[{', '.join(parts) or 'no figures'}]"


def _print_history(history: Iterable[dict[str, str]]) -> None:
    shown = False
    for message in history:
        shown = True
        print(f"{message['role']}: {message['content']}")
    if not shown:
        print("(no messages yet)")
