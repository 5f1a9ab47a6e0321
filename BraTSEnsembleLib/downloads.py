"""Downloading model archives: verified by sha256, resumable, cached outside the extension, extracted atomically.

A model-set manifest member may name a ``url`` (a ``.zip`` or ``.tar.gz`` archive of the model folder) and the
``sha256`` of that archive. :func:`ensure_member_files` returns the member's model folder: its ``path`` when it
exists, otherwise the archive is downloaded into the cache (:func:`default_cache_dir`), checked against the
sha256, and extracted there. The cache layout is ``CACHE/<sha256>/<archive name>`` (kept, so that
``brats-ensemble models verify`` can recompute its checksum) and ``CACHE/<sha256>/extracted/`` (renamed into place
only once complete, so a half-extracted archive never looks usable).

``brats-ensemble models list|fetch|verify MANIFEST`` (:func:`register_models_command`,
:func:`run_models_command`) lists, downloads or checks the members of a manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, TextIO

from .errors import BraTSEnsembleError, ModelError

CACHE_ENV = "BRATS_ENSEMBLE_CACHE"
TIMEOUT_S: float = 60.0  # seconds without data before a connection counts as failed
CHUNK_BYTES = 1 << 20
EXTRACTED_DIR = "extracted"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_IGNORED_TOP_LEVEL = {"__MACOSX", ".DS_Store"}

STATUS_PRESENT = "present"
STATUS_VERIFIED = "verified"
STATUS_MISSING = "missing"
STATUS_MISMATCH = "checksum mismatch"


# ----------------------------------------------------------------------------------------------------------------
# Cache location and checksums


def default_cache_dir() -> Path:
    """Where downloaded models are kept: ``$BRATS_ENSEMBLE_CACHE``, else the user's cache folder.

    That is ``~/.cache/brats-ensemble`` on Linux (``$XDG_CACHE_HOME/brats-ensemble`` when set),
    ``~/Library/Caches/brats-ensemble`` on macOS and ``%LOCALAPPDATA%\\brats-ensemble\\cache`` on Windows — never
    the extension's own folder, which an extension update replaces.
    """
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "brats-ensemble" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "brats-ensemble"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "brats-ensemble"


def normalize_sha256(sha256: str, context: str) -> str:
    """The lower-case hex digest, or a ModelError naming ``context`` when it is not 64 hex digits."""
    value = str(sha256).strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if not _SHA256_RE.match(value):
        raise ModelError(f"{context}: sha256 {sha256!r} is not a SHA-256 hex digest (64 hex digits); compute it "
                         "with `sha256sum ARCHIVE` (or `certutil -hashfile ARCHIVE SHA256` on Windows)")
    return value


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# ----------------------------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` and verify its SHA-256; returns ``dest``.

    Data goes to ``dest.part`` first; a ``.part`` left by an interrupted run is resumed with an HTTP Range request
    (a server that ignores Range sends the whole file, which then replaces the partial one). The whole file is
    checked against ``sha256`` before it is renamed to ``dest``. A ``dest`` that exists with the right checksum is
    returned without any network request. Raises ModelError: on a checksum mismatch (the bad file is deleted) and on
    network errors (the ``.part`` is kept for the next attempt). ``file://`` URLs work as well.
    """
    dest = Path(dest)
    expected = normalize_sha256(sha256, url)
    if dest.is_file():
        if file_sha256(dest) == expected:
            return dest
        dest.unlink()  # a stale or damaged file of another version: fetch it again
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{dest.parent}: cannot be created ({exc.strerror or exc}); set {CACHE_ENV} to a folder "
                         "you can write to") from exc
    part = _part_path(dest)
    _fetch_to_part(url, part, progress)
    actual = file_sha256(part)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"{url}: checksum mismatch: expected sha256 {expected}, got {actual}; the download was deleted. Run "
            "the command again; if the mismatch persists the file on the server differs from the one the manifest "
            "names: ask its publisher for the right sha256 (change the manifest only if you trust the source)")
    os.replace(part, dest)
    return dest


def _fetch_to_part(url: str, part: Path, progress: bool) -> None:
    """Bring ``part`` to the complete content of ``url``, resuming from its current size."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        _copy_file_url(url, part, progress)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, progress)
    else:
        raise ModelError(f"{url}: unsupported URL scheme {scheme or '(none)'!r}; use https://, http:// or file://")


def _network_error(url: str, part: Path, reason: str) -> ModelError:
    kept = (f" The partial download is kept in {part}; running the command again resumes it."
            if part.is_file() and part.stat().st_size else "")
    return ModelError(f"{url}: download failed ({reason}). Check the network connection, the URL and any proxy "
                      f"settings (HTTPS_PROXY).{kept}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _fetch_http(url: str, part: Path, progress: bool) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "brats-ensemble", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the partial file is no prefix of the file the server has: start again
            part.unlink()
            return _fetch_http(url, part, progress)
        raise _network_error(url, part, _reason(exc)) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(url, part, _reason(exc)) from exc
    with response:
        status = getattr(response, "status", 200)
        if status == 206 and _content_range_start(response.headers.get("Content-Range")) != offset:
            if not offset:
                raise _network_error(url, part, "the server sent part of the file to a request for all of it")
            response.close()  # a range we did not ask for: start again without a Range header
            part.unlink(missing_ok=True)
            return _fetch_http(url, part, progress)
        mode = "ab" if status == 206 else "wb"  # 200: no Range support, the whole file comes again
        offset = offset if status == 206 else 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = offset + remaining if remaining is not None else None
        received = _stream(response, part, mode, url, offset, total, progress)
    if remaining is not None and received < remaining:
        raise _network_error(url, part, f"connection closed after {offset + received} of {total} bytes")


def _content_range_start(value: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header."""
    match = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _stream(source: IO[bytes], part: Path, mode: str, url: str, offset: int, total: int | None,
            progress: bool) -> int:
    """Copy ``source`` into ``part`` (appending or truncating) with a progress bar; returns the bytes copied."""
    from tqdm import tqdm

    received = 0
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name or url
    try:
        handle = open(part, mode)
    except OSError as exc:
        raise ModelError(f"{part}: cannot be written ({exc.strerror or exc}); check free space and permissions, "
                         f"or set {CACHE_ENV} to another folder") from exc
    with handle, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      desc=name[:40], disable=not progress, leave=False) as bar:
        while True:
            try:
                block = source.read(CHUNK_BYTES)
            except (http.client.HTTPException, OSError) as exc:
                handle.flush()
                raise _network_error(url, part, _reason(exc)) from exc
            if not block:
                break
            try:
                handle.write(block)
            except OSError as exc:
                raise ModelError(f"{part}: cannot be written ({exc.strerror or exc}); check free space") from exc
            received += len(block)
            bar.update(len(block))
    return received


def _copy_file_url(url: str, part: Path, progress: bool) -> None:
    parsed = urllib.parse.urlsplit(url)
    source = Path(urllib.request.url2pathname(parsed.path))
    if parsed.netloc and parsed.netloc != "localhost":
        source = Path(urllib.request.url2pathname(f"//{parsed.netloc}{parsed.path}"))
    try:
        size = source.stat().st_size
        handle = open(source, "rb")
    except OSError as exc:
        raise ModelError(f"{url}: cannot be read ({exc.strerror or exc}); check the path in the manifest") from exc
    offset = part.stat().st_size if part.is_file() else 0
    if offset > size:
        offset = 0
    with handle:
        handle.seek(offset)
        _stream(handle, part, "ab" if offset else "wb", url, offset, size, progress)


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def _archive_kind(archive: Path) -> str:
    """``zip`` or ``tar`` (any compression tarfile reads), by content; ModelError otherwise."""
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except OSError:
        pass
    raise ModelError(f"{archive}: is neither a .zip nor a .tar.gz archive; a member's url must point to an archive "
                     "of the model folder")


def _check_entry_name(name: str, target: Path, archive: Path) -> None:
    """Refuse an archive entry that would land outside ``target`` (zip-slip): absolute names, drive letters, ``..``."""
    cleaned = name.replace("\\", "/")
    escapes = (cleaned.startswith("/") or re.match(r"^[A-Za-z]:", cleaned) is not None
               or ".." in PurePosixPath(cleaned).parts)
    resolved = (target / cleaned).resolve()
    root = target.resolve()
    if escapes or (resolved != root and root not in resolved.parents):
        raise ModelError(f"{archive}: entry {name!r} would be written outside the extraction folder; the archive is "
                         "refused (zip-slip). Ask its publisher for a clean archive of the model folder")


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            _check_entry_name(info.filename, target, archive)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # a symbolic link
                raise ModelError(f"{archive}: entry {info.filename!r} is a symbolic link; model archives must hold "
                                 "plain files and folders only")
        bundle.extractall(target)


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        for info in members:
            _check_entry_name(info.name, target, archive)
            if not (info.isfile() or info.isdir()):
                raise ModelError(f"{archive}: entry {info.name!r} is not a plain file or folder (link or device); "
                                 "model archives must hold plain files and folders only")
        if hasattr(tarfile, "data_filter"):
            bundle.extractall(target, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; the entries were checked above
            bundle.extractall(target, members=members)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a ``.zip`` or ``.tar(.gz)`` archive into ``dest`` atomically; returns ``dest``.

    Entries are checked first (none may escape the folder, nor be a link); the archive is extracted into a
    temporary folder beside ``dest`` that is renamed to ``dest`` once complete. An existing ``dest`` is kept.
    """
    if dest.is_dir():
        return dest
    kind = _archive_kind(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is as readable as the cache
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            raise ModelError(f"{archive}: cannot be extracted ({exc}); delete it and download it again") from exc
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent extraction that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_folder(extracted: Path) -> Path:
    """The model folder inside an extracted archive: its single top-level folder, or the extraction folder itself."""
    entries = [p for p in extracted.iterdir() if p.name not in _IGNORED_TOP_LEVEL]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


# ----------------------------------------------------------------------------------------------------------------
# Manifest members


def _member_name(member: dict[str, Any]) -> str:
    return str(member.get("name") or member.get("path") or member.get("url") or "(unnamed member)")


def _local_path(member: dict[str, Any], manifest_dir: Path) -> Path | None:
    if not member.get("path"):
        return None
    path = Path(str(member["path"])).expanduser()
    return path if path.is_absolute() else Path(manifest_dir) / path


def _archive_name(url: str) -> str:
    """A safe file name for the archive in the cache, from the URL's last path segment."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "archive"


def _member_sha256(member: dict[str, Any]) -> str:
    name = _member_name(member)
    if not member.get("sha256"):
        raise ModelError(f"model {name}: has a url ({member['url']}) but no sha256; a download must be verifiable. "
                         "Add the archive's checksum to the member in the manifest: \"sha256\": \"<output of "
                         "sha256sum ARCHIVE>\"")
    return normalize_sha256(member["sha256"], f"model {name}")


def member_cache_paths(member: dict[str, Any], cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(archive, extraction folder) of a member with ``url`` and ``sha256`` in the cache."""
    digest = _member_sha256(member)
    entry = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute() / digest
    return entry / _archive_name(str(member["url"])), entry / EXTRACTED_DIR


def ensure_member_files(member: dict[str, Any], manifest_dir: Path, cache_dir: Path | None = None,
                        progress: bool = True) -> Path:
    """The model folder of a manifest member, downloading and extracting its archive into the cache when needed.

    ``member["path"]`` (relative to ``manifest_dir``) is returned when it exists. Otherwise the member needs a
    ``url`` and the archive's ``sha256``: the archive is downloaded into ``cache_dir`` (default
    :func:`default_cache_dir`), verified, extracted, and the extracted model folder is returned (the archive's
    single top-level folder, or the extraction folder). A member already extracted in the cache needs no network.
    """
    local = _local_path(member, manifest_dir)
    if local is not None and local.exists():
        return local
    name = _member_name(member)
    if not member.get("url"):
        where = f"{local} does not exist" if local is not None else "it names no path"
        raise ModelError(f"model {name}: {where} and it has no url to download it from; fix the path in the "
                         "manifest or add a url and sha256")
    archive, extracted = member_cache_paths(member, cache_dir)
    if not extracted.is_dir():
        download(str(member["url"]), archive, str(member["sha256"]), progress=progress)
        extract_archive(archive, extracted)
    return model_folder(extracted)


def member_available(member: dict[str, Any], manifest_dir: Path, cache_dir: Path | None = None) -> bool:
    """Whether the member's model folder is usable without a download (local path, or extracted in the cache)."""
    local = _local_path(member, manifest_dir)
    if local is not None and local.exists():
        return True
    if not member.get("url") or not member.get("sha256"):
        return False
    try:
        return member_cache_paths(member, cache_dir)[1].is_dir()
    except ModelError:
        return False


def verify_member(member: dict[str, Any], manifest_dir: Path, cache_dir: Path | None = None) -> str:
    """Status of a member: ``verified`` (cached archive matches its sha256), ``checksum mismatch``, ``present``
    (the local path exists, or the extracted folder exists without its archive: nothing to check) or ``missing``."""
    local = _local_path(member, manifest_dir)
    if local is not None and local.exists():
        return STATUS_PRESENT
    if not member.get("url"):
        return STATUS_MISSING
    archive, extracted = member_cache_paths(member, cache_dir)
    if archive.is_file():
        return STATUS_VERIFIED if file_sha256(archive) == _member_sha256(member) else STATUS_MISMATCH
    return STATUS_PRESENT if extracted.is_dir() else STATUS_MISSING


def read_manifest_members(manifest: Path) -> list[dict[str, Any]]:
    """The ``members`` of a model-set manifest (JSON), each a dict; ModelError naming the file otherwise."""
    try:
        data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{manifest}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ModelError(f"{manifest}: is not valid JSON ({exc})") from exc
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise ModelError(f"{manifest}: needs a non-empty \"members\" list of objects, e.g. "
                         "{\"members\": [{\"name\": …, \"framework\": \"nnunetv2\", \"path\": …}]}")
    return members


# ----------------------------------------------------------------------------------------------------------------
# Command line: brats-ensemble models list|fetch|verify MANIFEST


def register_models_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models`` with the actions ``list``, ``fetch`` and ``verify`` to an argparse sub-parser collection."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("manifest", type=Path, metavar="MANIFEST", help="model-set manifest (.json)")
    common.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help=f"download cache (default: ${CACHE_ENV} or {default_cache_dir()})")
    models = subparsers.add_parser("models", help="list, download or verify the models of a model-set manifest")
    actions = models.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="members, framework, present or missing")
    fetch = actions.add_parser("fetch", parents=[common], help="download, verify and extract every member")
    fetch.add_argument("--no-progress", action="store_true", help="no download progress bar on stderr")
    actions.add_parser("verify", parents=[common], help="recompute the checksums of the cached archives")
    models.set_defaults(models_handler=run_models_command)
    return models


def run_models_command(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``models list|fetch|verify``; 0 when every member is fine, 1 otherwise (``error: …`` on stderr)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        members = read_manifest_members(args.manifest)
        manifest_dir = Path(args.manifest).expanduser().resolve().parent
        action: Callable[..., list[str]] = {"list": _list, "fetch": _fetch, "verify": _verify}[args.models_action]
        failures = action(members, manifest_dir, args, out)
    except BraTSEnsembleError as exc:
        print(f"error: {exc}", file=err)
        return 1
    if failures:
        print(f"error: {len(failures)} of {len(members)} model(s) failed:\n  " + "\n  ".join(failures), file=err)
        return 1
    return 0


def _rows(members: Iterable[dict[str, Any]]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    for member in members:
        yield _member_name(member), str(member.get("framework", "?")), member


def _list(members: list[dict[str, Any]], manifest_dir: Path, args: argparse.Namespace, out: TextIO) -> list[str]:
    for name, framework, member in _rows(members):
        status = STATUS_PRESENT if member_available(member, manifest_dir, args.cache_dir) else STATUS_MISSING
        source = member.get("url") or _local_path(member, manifest_dir) or ""
        print(f"{name}\t{framework}\t{status}\t{source}", file=out)
    return []


def _fetch(members: list[dict[str, Any]], manifest_dir: Path, args: argparse.Namespace, out: TextIO) -> list[str]:
    failures = []
    for name, _, member in _rows(members):
        try:
            folder = ensure_member_files(member, manifest_dir, args.cache_dir,
                                         progress=not getattr(args, "no_progress", False))
        except BraTSEnsembleError as exc:
            failures.append(str(exc))
            continue
        print(f"{name}\t{folder}", file=out)
    return failures


def _verify(members: list[dict[str, Any]], manifest_dir: Path, args: argparse.Namespace, out: TextIO) -> list[str]:
    failures = []
    for name, _, member in _rows(members):
        try:
            status = verify_member(member, manifest_dir, args.cache_dir)
        except BraTSEnsembleError as exc:
            failures.append(str(exc))
            continue
        print(f"{name}\t{status}", file=out)
        if status == STATUS_MISSING:
            failures.append(f"model {name}: missing; download it with `brats-ensemble models fetch {args.manifest}`")
        elif status == STATUS_MISMATCH:
            archive, _ = member_cache_paths(member, args.cache_dir)
            failures.append(f"model {name}: {archive} does not match sha256 {_member_sha256(member)}; delete "
                            f"{archive.parent} and run `brats-ensemble models fetch {args.manifest}`")
    return failures
