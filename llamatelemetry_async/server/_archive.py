"""A cached build as one file: exported on one machine, verified and unpacked on another.

A fresh Kaggle (or Colab, or CI) machine would build llama-server from source every session;
an archive of the first session's build, attached as a dataset, makes the next start take
seconds. The format (a gzip-compressed tar, stdlib only)::

    llama-server-build/manifest.json    {"format": 1, "key": cache folder name,
                                         "files": {relative path: {"sha256", "size", "mode"}}}
    llama-server-build/build.json       the build record (version, flags, CUDA architectures)
    llama-server-build/bin/<tool>       llama-server, llama-quantize, llama-export-lora
    llama-server-build/lib/<library>    shared libraries, when the build has any

``FILE.sha256`` beside it (``sha256sum`` format) holds the archive's own SHA-256: when it is
there it is checked before anything is unpacked (only the manifest is read first, to tell
whether the build is already here), and every file is checked against the manifest whether
it is there or not. Unpacking never lets ``tarfile`` create a path: each member must be a
regular file with one of the names above; it is streamed into a staging folder beside the
cache entry (after a check that the disk has room for what the manifest lists), checked,
and renamed into place (the server last, then the marker that says the entry is whole), so
a first install is found whole or not at all, and an install cut off part-way is done again
by the next. Links, devices, absolute or ``..`` paths, unknown or duplicate names and files
the manifest does not list are refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .._errors import BuildArchiveError, UsageError
from ._build import BUILT_TOOLS, _locked, _usable_here, cache_root

__all__ = [
    "ARCHIVE_ENV_VAR",
    "BuildArchiveError",
    "export_build_archive",
    "install_build_archive",
]

ARCHIVE_ENV_VAR = "LLAMA_SERVER_ARCHIVE"
FORMAT = 1
_TOP = "llama-server-build"
_MANIFEST = "manifest.json"
_KEY = re.compile(r"^b\d+-[a-z0-9+]+-[0-9a-f]{10}$")
_SIMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MARKER = ".from-archive.json"  # in the cache entry: which manifest it was unpacked from
_CHUNK = 1 << 20
_MAX_MANIFEST = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_files(key_dir: Path) -> list[tuple[str, Path]]:
    """(name in the archive, path) of everything a cache entry holds that a build needs."""
    files = [("build.json", key_dir / "build.json")]
    for tool in BUILT_TOOLS:
        if (key_dir / "bin" / tool).is_file():
            files.append((f"bin/{tool}", key_dir / "bin" / tool))
    lib = key_dir / "lib"
    if lib.is_dir():
        for item in sorted(lib.iterdir()):
            if item.is_file() and not item.is_symlink() and _SIMPLE_NAME.match(item.name):
                files.append((f"lib/{item.name}", item))
    return files


def export_build_archive(
    file: str | os.PathLike[str], binary: str | os.PathLike[str] | None = None
) -> Path:
    """Write the cached build of ``binary`` (default: the newest cached build) to ``file``.

    ``file`` gets a gzip-compressed tar of the build's binaries, shared libraries and
    ``build.json`` with a manifest of their SHA-256 sums; ``file.sha256`` gets the
    archive's own. Both are written under temporary names and renamed into place. Returns
    ``file``. Blocking (compression takes seconds): async code uses a worker thread.
    Raises ``UsageError`` when ``binary`` is not in a build cache folder (it has no
    ``build.json``: build one with ``build_llama_server``).
    """
    from ._build import cached_builds

    if binary is None:
        builds = cached_builds()
        if not builds:
            raise UsageError(
                "there is no cached build to export; build one first: "
                "python -m llamatelemetry_async build-server [--cuda-arch 75]"
            )
        binary = builds[0]
    server = Path(binary).expanduser().resolve()
    key_dir = server.parent.parent
    if server.parent.name != "bin" or not (key_dir / "build.json").is_file():
        raise UsageError(
            f"{server} is not a build from the cache (no {key_dir / 'build.json'}); only "
            "builds made by build-server can be exported"
        )
    if not _KEY.match(key_dir.name):
        raise UsageError(f"{key_dir} is not a build cache folder (b<build>-<flavour>-<hash>)")
    target = Path(file).expanduser()
    if target.is_dir():
        raise UsageError(f"{target} is a directory; give the archive's file name")
    with contextlib.ExitStack() as stack:
        # The build's own lock: a build-server --force or an install of the same key
        # rewriting these files while they are hashed and packed would give an archive
        # whose manifest does not match its contents.
        with contextlib.suppress(OSError):  # a read-only folder: nothing can rewrite it
            stack.enter_context(_locked(key_dir / ".lock", lambda _message: None))
        return _export(key_dir, target)


def _export(key_dir: Path, target: Path) -> Path:
    files = _entry_files(key_dir)
    manifest: dict[str, Any] = {"format": FORMAT, "key": key_dir.name, "files": {}}
    for name, path in files:
        mode = 0o755 if name.startswith("bin/") else 0o644
        manifest["files"][name] = {
            "sha256": _sha256_file(path),
            "size": path.stat().st_size,
            "mode": mode,
        }
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        # Level 6: 1.8 s instead of 4.2 s (tarfile's default 9) for the CPU build, 1% larger.
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar,
        ):
            data = json.dumps(manifest, indent=2).encode() + b"\n"
            _add_bytes(tar, f"{_TOP}/{_MANIFEST}", data, 0o644)  # first: read before the rest
            for name, path in files:
                info = tarfile.TarInfo(f"{_TOP}/{name}")
                info.size = manifest["files"][name]["size"]
                info.mode = manifest["files"][name]["mode"]
                info.mtime = int(path.stat().st_mtime)
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
        tmp.chmod(0o644)
        digest = _sha256_file(tmp)
        side = target.with_name(target.name + ".sha256")
        side_tmp = side.with_name(f".{side.name}.part")
        side_tmp.write_text(f"{digest}  {target.name}\n")
        os.replace(tmp, target)
        os.replace(side_tmp, side)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _fail(archive: Path, problem: str, what_to_do: str | None = None) -> BuildArchiveError:
    todo = what_to_do or (
        "export it again on the machine that built it (python -m llamatelemetry_async "
        "build-server --export FILE) and replace both files, or unset "
        f"{ARCHIVE_ENV_VAR} to build here"
    )
    return BuildArchiveError(f"build archive {archive}: {problem}; {todo}", archive=str(archive))


def _check_sidecar(archive: Path) -> str | None:
    """The archive's SHA-256, checked against ``archive.sha256`` when that file is there."""
    side = archive.with_name(archive.name + ".sha256")
    if not side.is_file():
        return None
    try:
        expected = side.read_text().split()[0].lower()
    except (OSError, IndexError) as exc:
        raise _fail(archive, f"its checksum file {side} is unreadable ({exc})") from exc
    actual = _sha256_file(archive)
    if actual != expected:
        raise _fail(
            archive,
            f"SHA-256 {actual} does not match {expected} in {side.name} (a corrupt or "
            "incomplete copy, or the checksum of another archive)",
        )
    return actual


def _member_name(member: tarfile.TarInfo, archive: Path) -> str:
    """The member's name under the top folder; refuses everything but plain, known names."""
    if not member.isfile():
        kind = (
            "a symbolic link"
            if member.issym()
            else "a hard link"
            if member.islnk()
            else ("a folder" if member.isdir() else "not a regular file")
        )
        raise _fail(archive, f"member {member.name!r} is {kind}; an archive holds plain files")
    parts = member.name.split("/")
    top_file = len(parts) == 2 and parts[1] in (_MANIFEST, "build.json")
    in_folder = len(parts) == 3 and parts[1] in ("bin", "lib")
    simple = all(_SIMPLE_NAME.match(p) for p in parts[1:])
    if not (parts[0] == _TOP and simple and (top_file or in_folder)):
        raise _fail(archive, f"member {member.name!r} is not a name a build archive has")
    return "/".join(parts[1:])


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, Any], bytes]:
    first = tar.next()
    if first is None or _member_name(first, archive) != _MANIFEST:
        raise _fail(archive, f"it does not start with {_TOP}/{_MANIFEST}: not a build archive")
    if first.size > _MAX_MANIFEST:
        raise _fail(archive, "its manifest is implausibly large")
    fh = tar.extractfile(first)
    assert fh is not None
    raw = fh.read()
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise _fail(archive, f"its manifest is not JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(
            archive,
            f"manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
            f" is not {FORMAT}",
            "export it again with this version of llamatelemetry_async",
        )
    key = manifest.get("key")
    if not isinstance(key, str) or not _KEY.match(key):
        raise _fail(archive, f"its manifest names no valid cache key ({key!r})")
    if not isinstance(files, dict) or "bin/llama-server" not in files or "build.json" not in files:
        raise _fail(archive, "its manifest lists no bin/llama-server and build.json")
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
        ):
            raise _fail(archive, f"its manifest entry for {name!r} is malformed")
    return manifest, raw


def _copy_checked(src: IO[bytes], dst: Path, expected: dict[str, Any]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    # O_EXCL: a name that already exists in the fresh staging folder is a duplicate member.
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            if size > expected["size"]:
                break  # longer than the manifest says: no need to read the rest
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


@contextlib.contextmanager
def _open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        # Streaming mode ("|gz"): members are read in order, no seeking, one pass.
        with tarfile.open(archive, mode="r|gz") as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _fail(
            archive, f"it is not a readable gzip tar ({type(exc).__name__}: {exc})"
        ) from exc


def install_build_archive(file: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """Verify the build archive ``file`` and unpack it into the build cache; return its
    llama-server.

    Already unpacked from the same manifest, or built here with the same version and flags
    (the same cache key): returned at once, nothing is hashed. Else the archive's SHA-256 is
    checked against ``file.sha256`` when that file exists, every member against the
    manifest's sums, and the build record against this machine (a native build for another
    CPU, or another machine architecture, is refused). Blocking.
    Raises ``BuildArchiveError`` saying what is wrong and what to do.
    """
    archive = Path(file).expanduser()
    if not archive.is_file():
        raise _fail(
            archive,
            "there is no such file",
            "check the path (on Kaggle: /kaggle/input/<dataset>/<file>), "
            f"or unset {ARCHIVE_ENV_VAR}",
        )
    base = cache_root(cache_dir) / "llama-server"
    with _open_tar(archive) as tar:
        manifest, raw = _read_manifest(tar, archive)
    key_dir = base / str(manifest["key"])
    manifest_sha = hashlib.sha256(raw).hexdigest()
    if _already_installed(key_dir, manifest_sha) or _built_here(key_dir):
        return key_dir / "bin" / "llama-server"
    sidecar = _check_sidecar(archive)
    key_dir.mkdir(parents=True, exist_ok=True)
    with _locked(key_dir / ".lock", lambda _message: None):
        if _already_installed(key_dir, manifest_sha) or _built_here(key_dir):
            return key_dir / "bin" / "llama-server"
        for stale in key_dir.glob(".unpack-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed unpack, under the lock
        _check_space(archive, manifest, key_dir)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=key_dir))
        try:
            _unpack(archive, manifest, staging)
            _check_build_record(archive, staging / "build.json")
            marker = {"manifest_sha256": manifest_sha, "archive": str(archive)}
            if sidecar is not None:
                marker["archive_sha256"] = sidecar
            (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _publish(staging, key_dir, manifest)
        except OSError as exc:  # the disk filled up, or the cache is not writable
            raise _fail(
                archive,
                f"unpacking it into {key_dir} failed ({exc})",
                "free space there, or point LLAMATELEMETRY_CACHE at a disk with room",
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return key_dir / "bin" / "llama-server"


def _check_space(archive: Path, manifest: dict[str, Any], key_dir: Path) -> None:
    # Before anything is written: a manifest that promises more than the disk holds (a
    # build for every CUDA architecture, or a hostile archive) fails here, not at ENOSPC.
    need = sum(entry["size"] for entry in manifest["files"].values())
    free = shutil.disk_usage(key_dir).free
    if need > free:
        raise _fail(
            archive,
            f"it unpacks to {need / 1e6:,.1f} MB and {key_dir.parent} has {free / 1e6:,.1f} MB "
            "free",
            "free space there, or point LLAMATELEMETRY_CACHE at a disk with room",
        )


def _built_here(key_dir: Path) -> bool:
    # build-server made this key here (same version and flags): as good as the archive's.
    server = key_dir / "bin" / "llama-server"
    return not (key_dir / _MARKER).exists() and server.is_file() and os.access(server, os.X_OK)


def _already_installed(key_dir: Path, manifest_sha: str) -> bool:
    try:
        marker = json.loads((key_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    server = key_dir / "bin" / "llama-server"
    return (
        isinstance(marker, dict)
        and marker.get("manifest_sha256") == manifest_sha
        and server.is_file()
        and os.access(server, os.X_OK)
    )


def _unpack(archive: Path, manifest: dict[str, Any], staging: Path) -> None:
    files: dict[str, dict[str, Any]] = manifest["files"]
    (staging / "bin").mkdir()
    (staging / "lib").mkdir()
    seen: set[str] = set()
    with _open_tar(archive) as tar:
        _read_manifest(tar, archive)
        # tar.next(), not iteration: iterating a stream starts again at the manifest.
        while (member := tar.next()) is not None:
            name = _member_name(member, archive)
            if name not in files:
                raise _fail(archive, f"member {member.name!r} is not in its manifest")
            if name in seen:
                raise _fail(archive, f"member {member.name!r} appears twice")
            seen.add(name)
            src = tar.extractfile(member)
            assert src is not None
            digest, size = _copy_checked(src, staging / name, files[name])
            if size != files[name]["size"] or digest != files[name]["sha256"]:
                raise _fail(
                    archive,
                    f"{name} does not match its manifest (size {size}, SHA-256 {digest}; "
                    f"expected {files[name]['size']}, {files[name]['sha256']}): the archive "
                    "is corrupt or was changed",
                )
            os.chmod(staging / name, 0o755 if name.startswith("bin/") else 0o644)
    missing = sorted(set(files) - seen)
    if missing:
        raise _fail(archive, f"it lacks {', '.join(missing)} that its manifest lists (truncated?)")


def _check_build_record(archive: Path, record: Path) -> None:
    try:
        info = json.loads(record.read_text())
    except ValueError as exc:
        raise _fail(archive, f"its build.json is not JSON ({exc})") from exc
    machine = info.get("machine") if isinstance(info, dict) else None
    if machine and machine != platform.machine():
        raise _fail(
            archive,
            f"it was built for {machine}, and this machine is {platform.machine()}",
            "build here instead: python -m llamatelemetry_async build-server",
        )
    if not _usable_here(record.parent):
        raise _fail(
            archive,
            "it is a native build (-march=native) made on another kind of CPU, which may die "
            "of SIGILL here",
            "export a portable build (the build-server default) instead",
        )


def _publish(staging: Path, key_dir: Path, manifest: dict[str, Any]) -> None:
    """Rename the checked files into the cache entry: record first, the server last."""
    # First, a marker that vouches for nothing: a crash part-way through replacing an entry
    # unpacked from another archive must not leave that archive's marker over a mix of
    # both builds (it would be taken as installed), nor no marker (taken as built here).
    publishing = staging / ".publishing.json"
    publishing.write_text('{"manifest_sha256": null, "publishing": true}\n')
    os.replace(publishing, key_dir / _MARKER)
    (key_dir / "bin").mkdir(exist_ok=True)
    names = sorted(manifest["files"], key=lambda n: (n == "bin/llama-server", n))
    if any(n.startswith("lib/") for n in names):
        (key_dir / "lib").mkdir(exist_ok=True)
    for name in [*names, _MARKER]:  # the marker last: it says the rest is in place
        dst = key_dir / name
        # rename() replaces a file or a symlink in the way without following it; not a folder.
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(staging / name, dst)
