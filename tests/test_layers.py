"""The package's layers, read from its imports (parsed with ``ast``, nothing is executed).

Every import counts, wherever it is: at module level, inside a function, under
``if TYPE_CHECKING:``. A lower layer that imports a higher one, even lazily, is what makes
the packages impossible to use, test or move apart.

From the bottom up: ``_errors``, ``_groups``, ``_version`` (shared by all); ``client`` (the
HTTP client: nothing of the process side); ``server``, ``gpu``; ``_placement``; ``models``,
``environment``, ``telemetry``; ``engine``; ``frontdoor`` (beside the engine, through its
public API) and ``bench``; ``_cli`` (reached only from ``__main__``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llamatelemetry_async

ROOT = Path(llamatelemetry_async.__file__).parent
NAME = "llamatelemetry_async"

# Modules every package may import, private names included.
SHARED = frozenset({"_errors", "_groups", "_version", "_placement"})

# Packages each package must not import at all.
FORBIDDEN: dict[str, frozenset[str]] = {
    "client": frozenset({"engine", "server", "telemetry", "gpu", "models", "bench", "_cli"}),
    "models": frozenset({"engine"}),
    "environment": frozenset({"engine"}),
    "bench": frozenset({"_cli"}),
    # The front door uses the engine's and the client's public faces only.
    "frontdoor": frozenset({"_cli", "bench", "server", "gpu", "models", "environment"}),
    "_placement": frozenset({"engine", "models", "environment", "bench", "_cli", "cluster"}),
    # Servers on Ray: built on the engine's backend seam; nothing below knows of it.
    "cluster": frozenset({"_cli", "bench", "frontdoor"}),
    "engine": frozenset({"cluster", "frontdoor", "_cli"}),
}

# Cross-package imports of private modules or names that work running alongside this test's
# removes (issue 14: the engine's rewrite onto the client's request path, the client's split):
# (importing package, imported module). Each entry must still be needed, so a fixed one is
# deleted here: the list only shrinks.
KNOWN: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str  # dotted, without the "llamatelemetry_async." prefix ("" for the root)
    target: str  # dotted, absolute; the prefix removed when it is this package's
    names: tuple[str, ...]  # the names taken from it (empty for `import x`)
    line: int

    @property
    def where(self) -> str:
        return f"{self.importer or '__init__'}:{self.line}"


def _module_name(path: Path) -> tuple[str, bool]:
    """The module's dotted name under the package, and whether it is a package's __init__."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    if is_init:
        parts.pop()
    return ".".join(parts), is_init


def _imports() -> Iterator[Import]:
    for path in sorted(ROOT.rglob("*.py")):
        module, is_init = _module_name(path)
        package = module.split(".") if is_init else module.split(".")[:-1]
        package = [p for p in package if p]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, _strip(alias.name), (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                    if base != NAME and not base.startswith(NAME + "."):
                        yield Import(module, base, tuple(a.name for a in node.names), node.lineno)
                        continue
                    base = _strip(base)
                else:
                    up = package[: len(package) - (node.level - 1)]
                    assert len(up) == len(package) - (node.level - 1), f"{path}: beyond the root"
                    base = ".".join([*up, *([node.module] if node.module else [])])
                names = tuple(a.name for a in node.names)
                if node.module is None:  # `from . import a, b`: a and b are modules
                    for name in names:
                        yield Import(module, f"{base}.{name}".lstrip("."), (), node.lineno)
                else:
                    yield Import(module, base, names, node.lineno)


def _strip(dotted: str) -> str:
    if dotted == NAME:
        return ""
    return dotted.removeprefix(NAME + ".")


def _is_internal(target: str) -> bool:
    top = target.split(".")[0]
    return (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


IMPORTS = list(_imports())
INTERNAL = [i for i in IMPORTS if i.target and _is_internal(i.target)]


def test_the_walk_sees_the_package() -> None:
    # A guard against a walk that silently finds nothing.
    assert len({i.importer for i in INTERNAL}) > 40
    assert any(i.importer == "engine._engine" and i.target == "_placement" for i in INTERNAL)
    assert any(i.importer == "bench._run" and i.target == "gpu" for i in INTERNAL)


def test_lower_layers_do_not_import_higher_ones() -> None:
    found = [
        f"{i.where} imports {i.target}"
        for i in INTERNAL
        if _top(i.target) in FORBIDDEN.get(_top(i.importer), frozenset())
    ]
    assert found == []


def test_only_main_reaches_the_command_line() -> None:
    found = [
        f"{i.where} imports {i.target}"
        for i in INTERNAL
        if _top(i.target) == "_cli" and _top(i.importer) not in {"_cli", "__main__"}
    ]
    assert found == []


def test_only_the_command_line_reaches_the_front_door() -> None:
    # Starlette and uvicorn load only for those who serve HTTP (the root's import is lazy).
    found = [
        f"{i.where} imports {i.target}"
        for i in INTERNAL
        if _top(i.target) == "frontdoor" and _top(i.importer) not in {"frontdoor", "_cli", ""}
    ]
    assert found == []
    outside = [
        i.where
        for i in IMPORTS
        if _top(i.target) in {"starlette", "uvicorn"}
        and _top(i.importer) not in {"frontdoor", "_cli"}
    ]
    assert outside == []


def test_only_gpu_talks_to_nvml() -> None:
    # Reading NVML (init, shutdown, errors, bytes-or-str names) is done once, in gpu/;
    # the fake in testing/ imitates pynvml without importing it.
    found = [
        i.where
        for i in IMPORTS
        if (i.target == "pynvml" or i.target.startswith("pynvml.")) and _top(i.importer) != "gpu"
    ]
    assert found == []


def _private_crossings() -> set[tuple[str, str, str]]:
    """(importer, target, where) of imports of another package's private modules or names."""
    crossings = set()
    for i in INTERNAL:
        mine, theirs = _top(i.importer), _top(i.target)
        if mine == theirs or theirs in SHARED:
            continue
        if mine == "__main__" and theirs == "_cli":
            continue  # the entry point
        private_module = any(part.startswith("_") for part in i.target.split("."))
        private_name = any(name.startswith("_") for name in i.names)
        if private_module or private_name:
            crossings.add((i.importer, i.target, i.where))
    return crossings


def test_no_package_imports_another_packages_private_names() -> None:
    # A package's surface is its __init__; what it shares with its neighbours is exported
    # there without an underscore (it need not be in the top-level __all__).
    found = sorted(
        f"{where} imports {target}"
        for importer, target, where in _private_crossings()
        if (_top(importer), target) not in KNOWN
    )
    assert found == []


def test_known_exceptions_are_still_needed() -> None:
    present = {(_top(importer), target) for importer, target, _ in _private_crossings()}
    assert sorted(KNOWN - present) == [], "fixed: delete these from KNOWN"


def test_the_core_and_the_cluster_package_import_without_ray() -> None:
    # `pip install llamatelemetry_async` has no Ray; the [ray] extra brings it for those who
    # place servers on a cluster, and only using the cluster package imports it.
    code = (
        "import sys, llamatelemetry_async, llamatelemetry_async.cluster, "
        "llamatelemetry_async.engine; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
