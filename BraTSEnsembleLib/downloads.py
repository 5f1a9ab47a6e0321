"""Downloading model archives: verified by sha256, resumable, cached outside the extension, extracted atomically.

A model-set manifest member may name a ``url`` (a ``.zip`` or ``.tar.gz`` archive of the model folder) and the
``sha256`` of that archive. :func:`ensure_member_files` returns the member's model folder: its ``path`` when it
exists, otherwise the archive is downloaded into the cache (:func:`default_cache_dir`), checked against the
sha256, and extracted there. The cache layout is ``CACHE/<sha256>/<archive name>`` (kept, so that
``brats-ensemble models verify`` can recompute its checksum) and ``CACHE/<sha256>/extracted/`` (renamed into place
only once complete, so a half-extracted archive never looks usable).

``brats-ensemble models list|fetch|verify MANIFEST`` (:func:`register_models_command`,
:func:`run_models_command`) lists, downloads or checks the members of a manifest.

**Bounded.** A download stops as soon as it exceeds the member's ``archive_size`` (bytes, optional manifest key), the
server's Content-Length, or :func:`max_download_bytes` (``$BRATS_ENSEMBLE_MAX_DOWNLOAD``, default 16 GiB); a
``file://`` source must be a regular file. An archive is refused before extraction when its entries declare more
than :func:`max_extracted_bytes` (``$BRATS_ENSEMBLE_MAX_EXTRACTED``, default 32 GiB) or more than
:data:`MAX_COMPRESSION_RATIO` times the archive's size (model checkpoints barely compress), or more than
:data:`MAX_ARCHIVE_ENTRIES` entries; extraction counts the bytes it writes and stops at the same bound. A refused
download or archive leaves nothing behind (no ``.part``, no half-extracted folder, no refused archive); only a
download interrupted by the network keeps its ``.part`` to resume.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import re
import shutil
import stat
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
MAX_DOWNLOAD_ENV = "BRATS_ENSEMBLE_MAX_DOWNLOAD"
MAX_EXTRACTED_ENV = "BRATS_ENSEMBLE_MAX_EXTRACTED"
#: Default caps, per archive: a 5-fold ResEnc-L or MedNeXt-L folder is 2-4 GB, so 16 GiB leaves room for the
#: largest published models while a runaway source stops long before a disk is full.
DEFAULT_MAX_DOWNLOAD_BYTES = 16 << 30
DEFAULT_MAX_EXTRACTED_BYTES = 32 << 30
#: Expanded size / archive size above which an archive is no model folder (checkpoints compress ~1.1x; JSON and
#: logs more, but they are small). Applies once the archive expands beyond RATIO_FLOOR_BYTES.
MAX_COMPRESSION_RATIO = 20
RATIO_FLOOR_BYTES = 16 << 20
MAX_ARCHIVE_ENTRIES = 100_000
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


class DownloadRefused(ModelError):
    """A download or archive that is refused as a whole (too large, not a regular file): nothing of it is kept."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


def parse_size(text: str, what: str) -> int:
    """Bytes from ``"123"``, ``"500M"``, ``"16G"``, ``"1.5TiB"`` (powers of 1024); ModelError naming ``what``."""
    match = _SIZE_RE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ModelError(f"{what}={text!r} is not a size; write bytes or a number with K, M, G or T, e.g. 64G")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def _cap(env: str, default: int) -> int:
    value = os.environ.get(env, "").strip()
    return parse_size(value, env) if value else default


def max_download_bytes() -> int:
    """Largest download accepted per archive: ``$BRATS_ENSEMBLE_MAX_DOWNLOAD`` (e.g. ``64G``), default 16 GiB."""
    return _cap(MAX_DOWNLOAD_ENV, DEFAULT_MAX_DOWNLOAD_BYTES)


def max_extracted_bytes() -> int:
    """Largest expanded size accepted per archive: ``$BRATS_ENSEMBLE_MAX_EXTRACTED``, default 32 GiB."""
    return _cap(MAX_EXTRACTED_ENV, DEFAULT_MAX_EXTRACTED_BYTES)


def _human(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} bytes"


def _too_large(url: str, what: str, limit: int, size: int | None) -> DownloadRefused:
    if size is not None:
        fix = ("the manifest's \"archive_size\" of this member says how large the archive is; if the publisher "
               "changed the archive, ask for the new archive_size and sha256")
    else:
        fix = (f"if the model really is that large, raise the cap: set {MAX_DOWNLOAD_ENV} (e.g. "
               f"{MAX_DOWNLOAD_ENV}=64G) and run the command again")
    return DownloadRefused(f"{url}: {what}, more than the {_human(limit)} allowed; the download was stopped and "
                           f"deleted. {fix[0].upper()}{fix[1:]}.")


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty (a cache entry whose download was refused)."""
    try:
        folder.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: Path, sha256: str, progress: bool = True, size: int | None = None) -> Path:
    """Download ``url`` to ``dest`` and verify its SHA-256; returns ``dest``.

    Data goes to ``dest.part`` first; a ``.part`` left by an interrupted run is resumed with an HTTP Range request
    (a server that ignores Range sends the whole file, which then replaces the partial one). The whole file is
    checked against ``sha256`` before it is renamed to ``dest``. A ``dest`` that exists with the right checksum is
    returned without any network request. The transfer stops beyond ``size`` (the manifest's ``archive_size``), the
    server's Content-Length or :func:`max_download_bytes`. Raises ModelError: on a checksum mismatch or a refused
    download (the file is deleted, with its cache folder when that is left empty) and on network errors (the
    ``.part`` is kept for the next attempt). ``file://`` URLs work as well; they must name a regular file.
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
    limit = size if size is not None else max_download_bytes()
    try:
        _fetch_to_part(url, part, progress, limit, size)
        received = part.stat().st_size
        if size is not None and received != size:
            raise DownloadRefused(f"{url}: {received} bytes arrived, but the manifest's \"archive_size\" says {size}; "
                                  "the download was deleted. Ask the publisher for the right archive_size and sha256.")
    except DownloadRefused:
        part.unlink(missing_ok=True)
        _remove_empty(dest.parent)
        raise
    except BaseException:
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()  # nothing to resume
            _remove_empty(dest.parent)
        raise
    actual = file_sha256(part)
    if actual != expected:
        part.unlink(missing_ok=True)
        _remove_empty(dest.parent)
        raise ModelError(
            f"{url}: checksum mismatch: expected sha256 {expected}, got {actual}; the download was deleted. Run "
            "the command again; if the mismatch persists the file on the server differs from the one the manifest "
            "names: ask its publisher for the right sha256 (change the manifest only if you trust the source)")
    os.replace(part, dest)
    return dest


def _fetch_to_part(url: str, part: Path, progress: bool, limit: int, size: int | None) -> None:
    """Bring ``part`` to the complete content of ``url``, resuming from its current size, never beyond ``limit``
    bytes (``size``: the manifest's, which ``limit`` then is)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        _copy_file_url(url, part, progress, limit, size)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, progress, limit, size)
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


def _fetch_http(url: str, part: Path, progress: bool, limit: int, size: int | None) -> None:
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
            return _fetch_http(url, part, progress, limit, size)
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
            return _fetch_http(url, part, progress, limit, size)
        mode = "ab" if status == 206 else "wb"  # 200: no Range support, the whole file comes again
        offset = offset if status == 206 else 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = offset + remaining if remaining is not None else None
        if total is not None and total > limit:
            response.close()
            raise _too_large(url, f"the server announces {total} bytes (Content-Length)", limit, size)
        received = _stream(response, part, mode, url, offset, total, progress,
                           min(limit, total) if total is not None else limit, size)
    if remaining is not None and received < remaining:
        raise _network_error(url, part, f"connection closed after {offset + received} of {total} bytes")


def _content_range_start(value: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header."""
    match = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _stream(source: IO[bytes], part: Path, mode: str, url: str, offset: int, total: int | None,
            progress: bool, limit: int, size: int | None) -> int:
    """Copy ``source`` into ``part`` (appending or truncating) with a progress bar; returns the bytes copied.
    Stops with DownloadRefused as soon as ``part`` would exceed ``limit`` bytes."""
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
            if offset + received + len(block) > limit:
                if total is not None and limit == total:
                    raise DownloadRefused(f"{url}: the server sends more than the {total} bytes it announced "
                                          "(Content-Length); the download was stopped and deleted. Try again later "
                                          "or ask the publisher to fix the server.")
                raise _too_large(url, f"the transfer went past {limit} bytes", limit, size)
            try:
                handle.write(block)
            except OSError as exc:
                raise DownloadRefused(f"{part}: cannot be written ({exc.strerror or exc}); check free space; the "
                                      "partial download was deleted") from exc
            received += len(block)
            bar.update(len(block))
    return received


def _copy_file_url(url: str, part: Path, progress: bool, limit: int, size: int | None) -> None:
    parsed = urllib.parse.urlsplit(url)
    source = Path(urllib.request.url2pathname(parsed.path))
    if parsed.netloc and parsed.netloc != "localhost":
        source = Path(urllib.request.url2pathname(f"//{parsed.netloc}{parsed.path}"))
    try:  # non-blocking: opening a FIFO for reading would otherwise wait for a writer
        descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ModelError(f"{url}: cannot be read ({exc.strerror or exc}); check the path in the manifest") from exc
    info = os.fstat(descriptor)  # of the file opened, not of what the name points to later
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise DownloadRefused(f"{url}: not a regular file (a device, pipe or folder); a file:// url must name the "
                              "model archive itself.")
    with os.fdopen(descriptor, "rb") as handle:
        length = info.st_size
        if length > limit:
            raise _too_large(url, f"the file has {length} bytes", limit, size)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > length:
            offset = 0
        handle.seek(offset)
        _stream(handle, part, "ab" if offset else "wb", url, offset, length, progress, min(limit, length), size)


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


class _Budget:
    """How many bytes an archive may expand to (the cap, or the plausible compression ratio), and what it wrote."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        cap = max_extracted_bytes()
        archive_size = archive.stat().st_size
        by_ratio = max(RATIO_FLOOR_BYTES, MAX_COMPRESSION_RATIO * archive_size)
        self.limit = min(cap, by_ratio)
        if by_ratio < cap:
            self.reason = (f"{MAX_COMPRESSION_RATIO} times the archive's {_human(archive_size)}, which is implausible "
                           "for model files (checkpoints barely compress): an archive bomb? Ask its publisher for a "
                           "plain archive of the model folder")
        else:
            self.reason = (f"the {_human(cap)} allowed; if the model really is that large, raise the cap: set "
                           f"{MAX_EXTRACTED_ENV} (e.g. {MAX_EXTRACTED_ENV}=64G) and run the command again")
        self.written = 0

    def refuse(self, what: str) -> DownloadRefused:
        return DownloadRefused(f"{self.archive}: {what}, more than {self.reason}. Nothing was kept.")

    def declared(self, total: int) -> None:
        if total > self.limit:
            raise self.refuse(f"its entries declare {total} bytes ({_human(total)}) when extracted")

    def spend(self, count: int) -> None:
        self.written += count
        if self.written > self.limit:
            raise self.refuse(f"it expands beyond {self.limit} bytes while being extracted")


def _too_many_entries(archive: Path, count: int | str) -> DownloadRefused:
    return DownloadRefused(f"{archive}: holds {count} entries, more than the {MAX_ARCHIVE_ENTRIES} a model folder "
                           "could need; refused before extraction. Ask its publisher for an archive of the model "
                           "folder only.")


def _copy_counted(source: IO[bytes], dest: Path, budget: _Budget) -> None:
    """Copy ``source`` to the new file ``dest``, counting every byte against ``budget`` before it is written."""
    with open(dest, "wb") as out:
        while True:
            block = source.read(CHUNK_BYTES)
            if not block:
                break
            budget.spend(len(block))
            out.write(block)


def _entry_path(target: Path, name: str) -> Path:
    return target / name.replace("\\", "/")


def _zip_entry_count(archive: Path) -> int | None:
    """Entries the zip's end-of-central-directory record declares (read before the directory itself is)."""
    try:
        with open(archive, "rb") as handle:
            record = zipfile._EndRecData(handle)  # type: ignore[attr-defined]  # stdlib since Python 2
        return int(record[4]) if record else None  # _ECD_ENTRIES_TOTAL
    except (AttributeError, OSError, IndexError, TypeError, ValueError):  # pragma: no cover - private API moved
        return None


def _extract_zip(archive: Path, target: Path, budget: _Budget) -> None:
    count = _zip_entry_count(archive)
    if count is not None and count > MAX_ARCHIVE_ENTRIES:
        raise _too_many_entries(archive, count)
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        if len(infos) > MAX_ARCHIVE_ENTRIES:
            raise _too_many_entries(archive, len(infos))
        for info in infos:
            _check_entry_name(info.filename, target, archive)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # a symbolic link
                raise ModelError(f"{archive}: entry {info.filename!r} is a symbolic link; model archives must hold "
                                 "plain files and folders only")
        budget.declared(sum(info.file_size for info in infos))
        for info in infos:  # plain files and folders, written here (no modes, links or owners from the archive)
            path = _entry_path(target, info.filename)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with bundle.open(info) as source:
                _copy_counted(source, path, budget)


class _BoundedReader:
    """A decompressed tar stream that refuses any read or seek beyond ``limit`` bytes, so that listing a tar bomb's
    entries never decompresses more than an acceptable archive could hold."""

    def __init__(self, raw: IO[bytes], limit: int, budget: _Budget) -> None:
        self.raw, self.limit, self.budget = raw, limit, budget

    def _check(self, position: int) -> None:
        if position > self.limit:
            raise self.budget.refuse(f"its entries reach beyond {self.limit} bytes")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit + 1 - self.raw.tell()
        data = self.raw.read(size)
        self._check(self.raw.tell())
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.raw.tell()
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek from the end of a compressed stream")
        self._check(offset)
        return self.raw.seek(offset)

    def tell(self) -> int:
        return self.raw.tell()


def _open_decompressed(archive: Path) -> IO[bytes]:
    """The archive's bytes decompressed (gzip, bzip2, xz) or as they are."""
    with open(archive, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x1f\x8b"):
        import gzip

        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        import bz2

        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        import lzma

        return lzma.open(archive, "rb")
    return open(archive, "rb")


def _extract_tar(archive: Path, target: Path, budget: _Budget) -> None:
    # headers and padding: at most two 512-byte blocks per entry beyond the data, plus the end-of-archive records
    stream_limit = budget.limit + 1024 * MAX_ARCHIVE_ENTRIES + (1 << 20)
    with _open_decompressed(archive) as raw, \
            tarfile.open(fileobj=_BoundedReader(raw, stream_limit, budget), mode="r:") as bundle:  # type: ignore
        members = []
        declared = 0
        for info in bundle:
            if len(members) >= MAX_ARCHIVE_ENTRIES:
                raise _too_many_entries(archive, f"more than {MAX_ARCHIVE_ENTRIES}")
            _check_entry_name(info.name, target, archive)
            if not (info.isfile() or info.isdir()):
                raise ModelError(f"{archive}: entry {info.name!r} is not a plain file or folder (link or device); "
                                 "model archives must hold plain files and folders only")
            declared += info.size if info.isfile() else 0
            budget.declared(declared)
            members.append(info)
        for info in members:  # plain files and folders, written here (no modes, links or owners from the archive)
            path = _entry_path(target, info.name)
            if info.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            source = bundle.extractfile(info)
            if source is None:  # pragma: no cover - isfile() entries always have data
                raise ModelError(f"{archive}: entry {info.name!r} has no data")
            with source:
                _copy_counted(source, path, budget)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a ``.zip`` or ``.tar(.gz)`` archive into ``dest`` atomically; returns ``dest``.

    Entries are checked first (none may escape the folder, nor be a link; their count and declared size must fit
    the caps: see the module docstring); the archive is extracted into a temporary folder beside ``dest``, counting
    every byte written, and that folder is renamed to ``dest`` once complete. Any refusal removes the temporary
    folder (DownloadRefused for a size refusal). An existing ``dest`` is kept.
    """
    if dest.is_dir():
        return dest
    kind = _archive_kind(archive)
    budget = _Budget(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp, budget)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is as readable as the cache
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError, ValueError) as exc:
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
    ``url`` and the archive's ``sha256`` (and may give its ``archive_size`` in bytes): the archive is downloaded into
    ``cache_dir`` (default :func:`default_cache_dir`), verified, extracted, and the extracted model folder is
    returned (the archive's single top-level folder, or the extraction folder). A member already extracted in the
    cache needs no network. A refused download or archive leaves nothing in the cache.
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
        download(str(member["url"]), archive, str(member["sha256"]), progress=progress, size=_member_size(member))
        try:
            extract_archive(archive, extracted)
        except ModelError:
            archive.unlink(missing_ok=True)  # a refused or broken archive is of no use: nothing stays in the cache
            _remove_empty(archive.parent)
            raise
    return model_folder(extracted)


def _member_size(member: dict[str, Any]) -> int | None:
    """The manifest's ``archive_size`` of the member (bytes), or None; ModelError when it is no byte count."""
    size = member.get("archive_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ModelError(f"model {_member_name(member)}: archive_size {size!r} is not the archive's size in bytes; "
                         "write the output of `stat -c %s ARCHIVE` or remove the key")
    return size


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
    """The ``members`` of a model-set manifest (JSON), each a dict; ModelError naming the file otherwise (the file
    is read bounded and exact: see :mod:`BraTSEnsembleLib.jsonfiles`)."""
    from .jsonfiles import MANIFEST_MAX_BYTES, read_json_file

    data, _ = read_json_file(Path(manifest), "model-set manifest", MANIFEST_MAX_BYTES)
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
