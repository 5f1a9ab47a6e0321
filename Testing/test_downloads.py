"""Model downloads against a local HTTP server (127.0.0.1, started here): verification, resume, extraction, CLI."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import socket
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from BraTSEnsembleLib import downloads
from BraTSEnsembleLib.downloads import (default_cache_dir, download, ensure_member_files, extract_archive,
                                        register_models_command, run_models_command, verify_member)
from BraTSEnsembleLib.errors import ModelError

PAYLOAD = bytes(range(256)) * 600  # 153,600 bytes: several reads, small enough to be instant


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Local server


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.range_support = True
        self.cut_after: int | None = None  # cut the next response after this many body bytes
        self.requests: list[dict[str, Any]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer
    timeout = 5  # a stalled client cannot hold a handler thread longer

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and self.server.range_support else 0
        if start >= len(data) and match and self.server.range_support:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        if match and self.server.range_support:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if self.server.range_support else "none")
        self.end_headers()
        if self.server.cut_after is not None:
            body, self.server.cut_after = body[: self.server.cut_after], None
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    monkeypatch.setattr(downloads, "TIMEOUT_S", 5.0)
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    backstop = threading.Timer(60.0, httpd.shutdown)  # stops by itself even if the test hangs
    backstop.daemon = True
    backstop.start()
    try:
        yield httpd
    finally:
        backstop.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# download()


def test_full_download_verifies(server: FileServer, tmp_path: Path) -> None:
    server.files["model.zip"] = PAYLOAD
    dest = tmp_path / "cache" / "model.zip"
    assert download(server.url("model.zip"), dest, sha(PAYLOAD), progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "cache" / "model.zip.part").exists()
    assert [r["range"] for r in server.requests] == [None]
    # a verified file that is there already needs no request
    download(server.url("model.zip"), dest, sha(PAYLOAD).upper(), progress=False)
    assert len(server.requests) == 1


def test_resume_after_interrupted_transfer(server: FileServer, tmp_path: Path) -> None:
    server.files["model.zip"] = PAYLOAD
    server.cut_after = 50_000
    dest, url = tmp_path / "model.zip", server.url("model.zip")
    with pytest.raises(ModelError, match=re.escape(url)) as info:
        download(url, dest, sha(PAYLOAD), progress=False)
    assert "resumes" in str(info.value)
    part = tmp_path / "model.zip.part"
    assert part.stat().st_size == 50_000 and not dest.exists()
    download(url, dest, sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert [r["range"] for r in server.requests] == [None, "bytes=50000-"]


def test_server_without_range_support_downloads_again(server: FileServer, tmp_path: Path) -> None:
    server.files["model.zip"] = PAYLOAD
    server.range_support = False
    dest = tmp_path / "model.zip"
    (tmp_path / "model.zip.part").write_bytes(b"x" * 1000)  # not even a prefix: must be replaced, not appended to
    download(server.url("model.zip"), dest, sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]


def test_partial_file_longer_than_remote_starts_again(server: FileServer, tmp_path: Path) -> None:
    server.files["model.zip"] = PAYLOAD
    (tmp_path / "model.zip.part").write_bytes(b"x" * (len(PAYLOAD) + 10))  # server answers 416
    download(server.url("model.zip"), tmp_path / "model.zip", sha(PAYLOAD), progress=False)
    assert (tmp_path / "model.zip").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]


# (A checksum mismatch: the row "manifest member with a wrong sha256" of test_bad_input_matrix.py, through the
# command line against this file's server.)


def test_invalid_sha256_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="64 hex digits"):
        download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", "abc", progress=False)


def test_unreachable_url_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads, "TIMEOUT_S", 5.0)
    url = f"http://127.0.0.1:{closed_port()}/model.zip"
    with pytest.raises(ModelError, match=re.escape(url) + ".*download failed"):
        download(url, tmp_path / "model.zip", sha(PAYLOAD), progress=False)
    assert not (tmp_path / "model.zip").exists()


def test_http_error_names_url_and_status(server: FileServer, tmp_path: Path) -> None:
    url = server.url("absent.zip")
    with pytest.raises(ModelError, match=re.escape(url) + r".*HTTP 404"):
        download(url, tmp_path / "absent.zip", sha(PAYLOAD), progress=False)


def test_file_url(tmp_path: Path) -> None:
    source = tmp_path / "src" / "model archive.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "model.zip"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.zip.part").write_bytes(PAYLOAD[:777])  # resumed by seeking
    download(source.as_uri(), dest, sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------------------------------------------
# Archives and members


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MODEL_FILES = {"resenc-m/dataset.json": b'{"channel_names": {}}', "resenc-m/plans.json": b"{}",
               "resenc-m/fold_0/checkpoint_final.pth": b"weights"}


@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_archive_escaping_its_folder_is_refused(tmp_path: Path, make: Any) -> None:
    archive = tmp_path / "evil.archive"
    archive.write_bytes(make({"model/ok.txt": b"ok", "../evil.txt": b"pwned"}))
    with pytest.raises(ModelError, match="zip-slip"):
        extract_archive(archive, tmp_path / "cache" / "extracted")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()
    assert not (tmp_path / "cache" / "extracted").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-extracted temporary folder left


def test_absolute_entry_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "abs.tar.gz"
    archive.write_bytes(tar_gz_bytes({"/tmp/evil.txt": b"x"}))
    with pytest.raises(ModelError, match="zip-slip"):
        extract_archive(archive, tmp_path / "extracted")


def test_ensure_member_files_downloads_once(server: FileServer, tmp_path: Path) -> None:
    data = zip_bytes(MODEL_FILES)
    server.files["resenc-m.zip"] = data
    member = {"name": "resenc-m", "framework": "nnunetv2", "path": "models/resenc-m",
              "url": server.url("resenc-m.zip"), "sha256": sha(data)}
    cache = tmp_path / "cache"
    folder = ensure_member_files(member, tmp_path, cache, progress=False)
    assert folder == cache / sha(data) / "extracted" / "resenc-m"
    assert (folder / "fold_0" / "checkpoint_final.pth").read_bytes() == b"weights"
    assert (cache / sha(data) / "resenc-m.zip").read_bytes() == data
    assert len(server.requests) == 1
    assert ensure_member_files(member, tmp_path, cache, progress=False) == folder
    assert len(server.requests) == 1  # second call: no network
    assert verify_member(member, tmp_path, cache) == "verified"


def test_ensure_member_files_tar_gz_without_top_folder(server: FileServer, tmp_path: Path) -> None:
    data = tar_gz_bytes({"dataset.json": b"{}", "fold_all/checkpoint_final.pth": b"w"})
    server.files["flat.tar.gz"] = data
    member = {"name": "flat", "url": server.url("flat.tar.gz"), "sha256": sha(data)}
    folder = ensure_member_files(member, tmp_path, tmp_path / "cache", progress=False)
    assert folder == tmp_path / "cache" / sha(data) / "extracted"
    assert (folder / "fold_all" / "checkpoint_final.pth").read_bytes() == b"w"


def test_existing_local_path_needs_no_download(tmp_path: Path) -> None:
    (tmp_path / "models" / "local").mkdir(parents=True)
    member = {"name": "local", "path": "models/local", "url": "http://127.0.0.1:9/never.zip", "sha256": "0" * 64}
    assert ensure_member_files(member, tmp_path, tmp_path / "cache") == tmp_path / "models" / "local"
    assert verify_member(member, tmp_path, tmp_path / "cache") == "present"


def test_url_without_sha256_is_refused(tmp_path: Path) -> None:
    member = {"name": "unsafe", "path": "models/unsafe", "url": "http://127.0.0.1:9/unsafe.zip"}
    with pytest.raises(ModelError, match="no sha256; a download must be verifiable"):
        ensure_member_files(member, tmp_path, tmp_path / "cache")


def test_missing_path_without_url(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no url"):
        ensure_member_files({"name": "gone", "path": "models/gone"}, tmp_path, tmp_path / "cache")
    assert verify_member({"name": "gone", "path": "models/gone"}, tmp_path, tmp_path / "cache") == "missing"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRATS_ENSEMBLE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("BRATS_ENSEMBLE_CACHE")
    if sys.platform in ("win32", "darwin"):
        return  # platform cache folders (LOCALAPPDATA, ~/Library/Caches)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "brats-ensemble"


# ----------------------------------------------------------------------------------------------------------------
# brats-ensemble models list|fetch|verify


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="brats-ensemble")
    register_models_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = run_models_command(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_models_commands(server: FileServer, tmp_path: Path) -> None:
    data = zip_bytes(MODEL_FILES)
    server.files["resenc-m.zip"] = data
    (tmp_path / "set" / "models" / "local-a").mkdir(parents=True)
    manifest = tmp_path / "set" / "ensemble.json"
    manifest.write_text(json.dumps({"members": [
        {"name": "local-a", "framework": "nnunetv2", "path": "models/local-a"},
        {"name": "resenc-m", "framework": "mednext", "path": "models/resenc-m", "url": server.url("resenc-m.zip"),
         "sha256": sha(data)},
    ]}))
    cache = ["--cache-dir", str(tmp_path / "cache")]

    code, out, err = run_cli(["models", "list", str(manifest), *cache])
    assert code == 0 and err == ""
    assert re.search(r"^local-a\tnnunetv2\tpresent\t", out, re.M)
    assert re.search(r"^resenc-m\tmednext\tmissing\t", out, re.M)
    code, out, err = run_cli(["models", "verify", str(manifest), *cache])
    assert code == 1 and "resenc-m\tmissing" in out and err.startswith("error: ") and "models fetch" in err

    code, out, err = run_cli(["models", "fetch", str(manifest), *cache, "--no-progress"])
    assert code == 0, err
    assert f"resenc-m\t{tmp_path / 'cache' / sha(data) / 'extracted' / 'resenc-m'}" in out
    code, out, _ = run_cli(["models", "list", str(manifest), *cache])
    assert re.search(r"^resenc-m\tmednext\tpresent\t", out, re.M)
    code, out, err = run_cli(["models", "verify", str(manifest), *cache])
    assert code == 0 and "local-a\tpresent" in out and "resenc-m\tverified" in out and err == ""
    assert len(server.requests) == 1

    (tmp_path / "cache" / sha(data) / "resenc-m.zip").write_bytes(b"corrupted")
    code, out, err = run_cli(["models", "verify", str(manifest), *cache])
    assert code == 1 and "resenc-m\tchecksum mismatch" in out and "error: " in err and "models fetch" in err


def test_models_fetch_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads, "TIMEOUT_S", 5.0)
    url = f"http://127.0.0.1:{closed_port()}/m.zip"
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps({"members": [{"name": "m", "framework": "nnunetv2", "url": url,
                                                 "sha256": "a" * 64},
                                                {"name": "nosum", "framework": "nnunetv2", "url": url}]}))
    code, out, err = run_cli(["models", "fetch", str(manifest), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert code == 1 and out == ""
    assert err.startswith("error: 2 of 2 model(s) failed") and url in err and "no sha256" in err


def test_models_bad_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "set.json"
    manifest.write_text("{not json")
    code, _, err = run_cli(["models", "list", str(manifest)])
    assert code == 1 and err.startswith(f"error: {manifest}: is not valid JSON")
    manifest.write_text(json.dumps({"members": []}))
    code, _, err = run_cli(["models", "list", str(manifest)])
    assert code == 1 and "members" in err
