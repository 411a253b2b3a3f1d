"""The sdist and wheel: complete metadata, every module shipped, one source for the version.

The distributions are built here with hatchling's own PEP 517 hooks (~2 s, no network). The
rest of the release check, ``python -m build`` in an isolated environment, ``twine check``
and installing the wheel into a clean venv, needs the network and runs in ``nox -s package``.
"""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import llamatelemetry_async

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llamatelemetry_async"
VERSION = llamatelemetry_async.__version__
DIST_NAME = f"llamatelemetry_async-{VERSION}"

BUILD = """
import sys
from hatchling.build import build_sdist, build_wheel
print(build_sdist(sys.argv[1]))
print(build_wheel(sys.argv[1]))
"""


def _build(source: Path, out: Path) -> tuple[Path, Path]:
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sdist, wheel = result.stdout.split()
    return out / sdist, out / wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) built from the working tree."""
    return _build(ROOT, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def metadata(built: tuple[Path, Path]) -> Message:
    with zipfile.ZipFile(built[1]) as wheel:
        text = wheel.read(f"{DIST_NAME}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_wheel_metadata_is_complete(metadata: Message) -> None:
    assert metadata["Name"] == "llamatelemetry_async"
    assert metadata["Version"] == VERSION
    assert metadata["Summary"]
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    readme = metadata.get_payload()
    assert isinstance(readme, str)
    assert readme.strip() == (ROOT / "README.md").read_text().strip()
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL", []))
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
    assert all(url.startswith("https://") for url in urls.values())
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    classifiers = metadata.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    # Declared versions start at requires-python's minimum (nox's tests-matrix reads them).
    versions = sorted(
        tuple(int(part) for part in c.rsplit(" :: ", 1)[1].split("."))
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions[0] == (3, 11)
    assert {"bench", "nccl"} <= set(metadata.get_all("Provides-Extra", []))
    assert metadata.get_all("Requires-Dist")


def test_wheel_ships_every_module_the_types_and_the_license(built: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(built[1]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(f"{DIST_NAME}.dist-info/entry_points.txt").decode()
    source = {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert source - names == set()
    assert "llamatelemetry_async/py.typed" in names
    assert f"{DIST_NAME}.dist-info/licenses/LICENSE" in names
    # Only the package and its metadata: no tests, benchmarks or docs in site-packages.
    assert {name.split("/")[0] for name in names} == {
        "llamatelemetry_async",
        f"{DIST_NAME}.dist-info",
    }
    assert "llamatelemetry-async = llamatelemetry_async.__main__:main" in entry_points


def test_sdist_is_complete_and_builds_the_wheel(built: tuple[Path, Path], tmp_path: Path) -> None:
    with tarfile.open(built[0]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        sdist.extractall(tmp_path, filter="data")
    for required in (
        "PKG-INFO",
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "LICENSE",
        "llamatelemetry_async/py.typed",
        "llamatelemetry_async/_version.py",
        "tests/conftest.py",
        "tests/test_import.py",
        "noxfile.py",
    ):
        assert required in names, required
    # A wheel built from the unpacked sdist alone (what pip does from PyPI) has every module.
    _, wheel = _build(tmp_path / DIST_NAME, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as built_wheel:
        from_sdist = {n for n in built_wheel.namelist() if n.endswith(".py")}
    with zipfile.ZipFile(built[1]) as built_wheel:
        from_tree = {n for n in built_wheel.namelist() if n.endswith(".py")}
    assert from_sdist == from_tree


def test_the_version_has_one_source() -> None:
    pyproject = _pyproject()
    project = pyproject["project"]
    assert isinstance(project, dict)
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    tool = pyproject["tool"]
    assert isinstance(tool, dict)
    assert tool["hatch"]["version"]["path"] == "llamatelemetry_async/_version.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", VERSION)
    literal = f'"{VERSION}"'
    holders = [
        path.relative_to(ROOT).as_posix()
        for path in [*PACKAGE.rglob("*.py"), ROOT / "pyproject.toml", ROOT / "noxfile.py"]
        if literal in path.read_text()
    ]
    assert holders == ["llamatelemetry_async/_version.py"]


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Changelog"
    assert "https://keepachangelog.com/" in text
    releases = [line for line in lines if line.startswith("## ")]
    assert releases[0] == "## [Unreleased]"
    for heading in releases[1:]:
        assert re.fullmatch(r"## \[\d+\.\d+\.\d+\S*\] - \d{4}-\d{2}-\d{2}", heading), heading
    kinds = {line[4:] for line in lines if line.startswith("### ")}
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    # Every release heading links to its changes.
    for heading in releases:
        label = heading[3:].split("]")[0] + "]"
        assert re.search(rf"^{re.escape(label)}: https://\S+$", text, re.MULTILINE), label
