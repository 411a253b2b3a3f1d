"""The Python examples in the docs (``docs/**/*.md``) and the README cannot rot.

Every ```` ```python ```` block is compiled, and all of them are type-checked together by one
mypy run. A block that a CPU machine can run is marked in the Markdown source, right before
its fence, and runs here against the project's tiny model and a real llama-server:

    <!-- docs: run -->            executed (in a fresh namespace and a temporary folder)
    <!-- docs: compile-only -->   compiled and type-checked only (needs a GPU, the Hub,
                                  Phoenix, or a collector); also the default when unmarked

How a block runs:

- in a temporary working folder where ``model.gguf`` is a link to the tiny model;
- with ``http://127.0.0.1:8080`` replaced by the URL of the session's llama-server;
- top-level ``await``/``async with`` is allowed, as in a notebook: such a block runs as one
  coroutine under ``anyio.run`` (asyncio); a block that calls ``anyio.run`` itself is
  plain code;
- ``__name__`` is ``"__main__"``, so a block written as a script runs as one.

For the type check, top-level-await blocks are wrapped in an ``async def``; names a block
uses without defining (``cupy_array``, ``t0``) are allowed, everything else about our API is
checked (attribute names, argument names and types, return types).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import linecache
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER_URL = "http://127.0.0.1:8080"
PLACEHOLDER_MODEL = "model.gguf"
Mode = Literal["run", "compile-only"]
MODES: dict[str, Mode] = {"run": "run", "compile-only": "compile-only"}

_MARK = re.compile(r"^<!--\s*docs:\s*(?P<mode>[\w-]+)\s*-->$")
_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^`]*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced Python block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the first line of code (after the fence)
    mode: Mode
    source: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def module_name(self) -> str:
        """A file name for the type check that says where the block lives."""
        stem = re.sub(r"\W", "_", str(self.path.relative_to(ROOT)))
        return f"{stem}_L{self.line}"


def markdown_files() -> list[Path]:
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def parse_blocks(path: Path, text: str) -> Iterator[Block]:
    """The ```` ```python ```` blocks of one Markdown text, with their marks.

    Raises ``ValueError`` for a mark that names no known mode or that is not followed by a
    Python block, so a typo cannot silently turn a run block into a compile-only one.
    """
    lines = text.splitlines()
    pending: tuple[Mode, int] | None = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        mark = _MARK.match(stripped)
        if mark:
            mode = MODES.get(mark.group("mode"))
            if mode is None:
                raise ValueError(
                    f"{path}:{i + 1}: unknown docs mark {mark.group('mode')!r}; "
                    f"use one of {list(MODES)}"
                )
            pending = (mode, i + 1)
            i += 1
            continue
        fence = _FENCE_OPEN.match(lines[i])
        if fence is None:
            if stripped and pending is not None:
                raise ValueError(f"{path}:{pending[1]}: a docs mark must come right before a block")
            i += 1
            continue
        indent, lang = fence.group("indent"), fence.group("lang")
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if lang == "python":
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[i + 1 : end]
            ]
            mode_: Mode = pending[0] if pending is not None else "compile-only"
            yield Block(path, i + 2, mode_, "\n".join(body) + "\n")
        elif pending is not None:
            raise ValueError(
                f"{path}:{pending[1]}: a docs mark must come right before a python block"
            )
        pending = None
        i = end + 1


def all_blocks() -> list[Block]:
    return [block for path in markdown_files() for block in parse_blocks(path, path.read_text())]


BLOCKS = all_blocks()


def compiled(block: Block) -> types.CodeType:
    """The block's code object; top-level ``await`` is allowed, as in a notebook."""
    linecache.cache[block.where] = (
        len(block.source),
        None,
        block.source.splitlines(True),
        block.where,
    )
    code: types.CodeType = compile(
        block.source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    return code


def is_coroutine(code: Any) -> bool:
    return bool(code.co_flags & inspect.CO_COROUTINE)


# ----------------------------------------------------------------------------- the parser
def test_parser_reads_marks_fences_and_indentation(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        Intro.

        <!-- docs: run -->
        ```python
        x = 1
        ```

        ```bash
        echo not python
        ```

        - a list item with a block:

          ```python
          y = 2
          ```
        """
    )
    blocks = list(parse_blocks(tmp_path / "page.md", text))
    assert [(b.mode, b.source, b.line) for b in blocks] == [
        ("run", "x = 1\n", 5),
        ("compile-only", "y = 2\n", 15),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "<!-- docs: runn -->\n```python\nx = 1\n```\n",
        "<!-- docs: run -->\nSome prose.\n```python\nx = 1\n```\n",
        "<!-- docs: run -->\n```bash\necho\n```\n",
    ],
    ids=["typo", "not-right-before", "not-python"],
)
def test_parser_refuses_a_misplaced_or_mistyped_mark(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="docs mark"):
        list(parse_blocks(tmp_path / "page.md", text))


def test_the_docs_have_examples_and_some_run() -> None:
    pages = {block.path for block in BLOCKS}
    assert ROOT / "README.md" in pages
    assert len(pages) >= 6, sorted(str(p) for p in pages)
    assert sum(block.mode == "run" for block in BLOCKS) >= 10


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_block_compiles(block: Block) -> None:
    compiled(block)


# ----------------------------------------------------------------------------- type check
def type_check_source(block: Block) -> str:
    """The block as a module mypy accepts: top-level-await code becomes a coroutine's body."""
    if is_coroutine(compiled(block)):
        return "async def _docs_block() -> None:\n" + textwrap.indent(block.source, "    ")
    return block.source


def doc_location(module_name: str, line: int) -> str:
    """``path.md:LINE`` for a line of a block's type-check module."""
    for block in BLOCKS:
        if block.module_name == module_name:
            wrapped = type_check_source(block) != block.source
            return f"{block.path.relative_to(ROOT)}:{block.line + line - 1 - wrapped}"
    return f"{module_name}:{line}"


def test_blocks_type_check(tmp_path: Path) -> None:
    """One mypy run over every block (cold ~10 s; it caches under the temporary folder)."""
    folder = tmp_path / "blocks"
    folder.mkdir()
    for block in BLOCKS:
        (folder / f"{block.module_name}.py").write_text(type_check_source(block))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file=",  # not the project's strict settings: these are snippets
            "--python-version=3.11",
            "--ignore-missing-imports",  # cupy, torch... in GPU-only examples
            "--follow-imports=silent",  # the package itself is checked by the typecheck session
            "--disable-error-code=name-defined",  # a snippet may use a name it does not define
            "--check-untyped-defs",
            "--warn-unused-ignores",
            "--no-error-summary",
            "--hide-error-context",
            f"--cache-dir={tmp_path / 'cache'}",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        check=False,
    )
    report = re.sub(
        r"\S*?/blocks/(\w+)\.py:(\d+)",
        lambda m: doc_location(m.group(1), int(m.group(2))),
        result.stdout + result.stderr,
    )
    assert result.returncode == 0, f"the docs' Python examples do not type-check:\n{report}"


# ----------------------------------------------------------------------------- run
RUN_BLOCKS = [block for block in BLOCKS if block.mode == "run"]


@pytest.fixture
def docs_folder(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with ``model.gguf`` linked to the tiny model."""
    (tmp_path / PLACEHOLDER_MODEL).symlink_to(tiny_model)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prepared(block: Block, request: pytest.FixtureRequest) -> Block:
    """The block with its placeholders pointing at the test's llama-server."""
    source = block.source
    if PLACEHOLDER_URL in source:
        server = request.getfixturevalue("llama_server")
        source = source.replace(PLACEHOLDER_URL, server.url)
    return dataclasses.replace(block, source=source)


def run_block(block: Block) -> dict[str, Any]:
    code = compiled(block)
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": block.where}
    if is_coroutine(code):

        async def main() -> None:
            await eval(code, namespace)

        anyio.run(main, backend="asyncio")
    else:
        exec(code, namespace)
    return namespace


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.where)
def test_block_runs(
    block: Block,
    docs_folder: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_block(prepared(block, request))
    # Examples show their results: each runnable one prints something.
    assert capsys.readouterr().out.strip(), f"{block.where} printed nothing"


def test_a_failing_block_fails(docs_folder: Path) -> None:
    """The runner does not swallow errors, in plain or in top-level-await blocks."""
    plain = Block(ROOT / "README.md", 1, "run", "raise LookupError('plain')\n")
    awaiting = Block(
        ROOT / "README.md",
        1,
        "run",
        "import anyio\nawait anyio.sleep(0)\nraise LookupError('awaited')\n",
    )
    with pytest.raises(LookupError, match="plain"):
        run_block(plain)
    with pytest.raises(LookupError, match="awaited"):
        run_block(awaiting)
    assert os.path.islink(docs_folder / PLACEHOLDER_MODEL)


# ----------------------------------------------------------------------------- troubleshooting
def test_every_public_error_has_a_troubleshooting_entry() -> None:
    """Each class of the exception tree has its own heading (cause and fix) on the page."""
    from llamatelemetry_async import _errors

    page = (ROOT / "docs" / "guides" / "troubleshooting.md").read_text()
    headings = set(re.findall(r"^#{2,4} `(\w+)`\s*$", page, flags=re.MULTILINE))
    missing = sorted(set(_errors.__all__) - headings)
    assert not missing, (
        f"errors without a ### `Name` entry in docs/guides/troubleshooting.md: {missing}"
    )
    unknown = sorted(headings - set(_errors.__all__))
    assert not unknown, f"troubleshooting entries for errors that do not exist: {unknown}"
