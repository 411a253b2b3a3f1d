"""Developer and CI sessions; versions and dependency groups come from pyproject.toml.

nox -s demo        stream tokens from a real llama-server on the tiny model
nox -s tests       the test suite (builds llama-server into the cache on first use)
nox -s lint        ruff
nox -s typecheck   mypy --strict over the package, tests, benchmarks and this file
nox -s bench       client overhead and 1,000-stream concurrency benchmarks
"""

from __future__ import annotations

import nox

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"


def _install(session: nox.Session, *groups: str, extras: str = "") -> None:
    deps = [dep for group in groups for dep in nox.project.dependency_groups(PYPROJECT, group)]
    session.install("-e", f".[{extras}]" if extras else ".", *deps)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, on the interpreter running nox (Arize Phoenix included)."""
    _install(session, "test", "phoenix")
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
    _install(session, "typecheck", extras="bench")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Client CPU per token and 1,000 concurrent streams, arms side by side in one run."""
    _install(session, extras="bench")
    session.run("python", "-m", "llamatelemetry_async", "build-server")
    session.run("python", "benchmarks/client_overhead.py", *session.posargs)
    session.run("python", "benchmarks/concurrency.py")
