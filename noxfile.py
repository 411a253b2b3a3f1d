"""Developer and CI sessions; versions and dependency groups come from pyproject.toml.

nox -s demo        stream tokens from a real llama-server on the tiny model
nox -s tests       the test suite (builds llama-server into the cache on first use)
nox -s lint        ruff
nox -s typecheck   mypy --strict over the package, tests, benchmarks and this file
nox -s bench       client comparisons: raw httpx, openai-python and this library, 1 to 1,000
                   streams (`nox -s bench -- --quick` for a short run)
nox -s package     build sdist and wheel, twine check, install the wheel in a clean venv
nox -s docs        the documentation site into site/ (mkdocs build --strict)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)

nox.options.sessions = ["lint", "typecheck", "docs", "tests"]
nox.options.reuse_venv = "yes"


def _install(session: nox.Session, *groups: str, extras: str = "") -> None:
    deps = [dep for group in groups for dep in nox.project.dependency_groups(PYPROJECT, group)]
    session.install("-e", f".[{extras}]" if extras else ".", *deps)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, on the interpreter running nox (Arize Phoenix included)."""
    _install(session, "test", "phoenix", extras="ray")
    session.run("python", "-m", "llamatelemetry_async", "build-server")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS, name="tests-matrix")
def tests_matrix(session: nox.Session) -> None:
    """The test suite on every Python version pyproject.toml declares."""
    tests(session)


@nox.session
def demo(session: nox.Session) -> None:
    """Start llama-server on the project's tiny model and stream tokens from it."""
    _install(session)
    session.run("python", "-m", "llamatelemetry_async", "build-server")
    session.run("python", "-m", "llamatelemetry_async", "demo", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict (configured in pyproject.toml)."""
    _install(session, "typecheck", extras="bench,ray")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site into site/, warnings as errors (``-- serve`` to preview it)."""
    _install(session, "docs")
    # Material prints a banner about MkDocs 2.0 on every build; the variable is its off switch.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict", *session.posargs[1:], env=env)
    else:
        session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Client CPU per token, wall time and loop lag at 1 to 1,000 streams, arms side by side."""
    _install(session, extras="bench")
    session.run("python", "-m", "llamatelemetry_async", "build-server")
    session.run("python", "benchmarks/compare_clients.py", *session.posargs)
    # Unpaced, one stream at a time: the CPU-per-token targets of the client (issue 2).
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "benchmarks/client_overhead.py", *quick)


# Run by the clean venv's interpreter with -I, so the source tree cannot shadow the wheel.
_CHECK_INSTALLED = """
import importlib.metadata, importlib.resources, sys
import llamatelemetry_async as package
assert package.__file__.startswith(sys.prefix), package.__file__
assert importlib.metadata.version("llamatelemetry_async") == package.__version__
assert importlib.resources.files(package).joinpath("py.typed").is_file()
for name in package.__all__:
    getattr(package, name)
print("llamatelemetry_async", package.__version__, "installed and imported from", sys.prefix)
"""


@nox.session
def package(session: nox.Session) -> None:
    """Build sdist and wheel, twine check, install the wheel (no extras) in a clean venv, use it."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "packaging"))
    tmp = Path(session.create_tmp())
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # The sdist first, then the wheel built from the sdist: a file the sdist lacks fails here.
    session.run("python", "-m", "build", "--outdir", str(dist))
    session.run("twine", "check", "--strict", *sorted(str(p) for p in dist.iterdir()))
    (wheel,) = dist.glob("*.whl")
    venv = tmp / "clean-venv"
    session.run("python", "-m", "venv", "--clear", str(venv))
    python = str(venv / "bin" / "python")
    session.run(python, "-m", "pip", "install", "--quiet", str(wheel), external=True)
    session.run(python, "-I", "-c", _CHECK_INSTALLED, external=True)
    session.run(str(venv / "bin" / "llamatelemetry-async"), "--help", external=True)
