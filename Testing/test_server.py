"""``brats-ensemble serve`` for real: one server per module, started as a subprocess on a free port of 127.0.0.1
with the shipped demo model set, and its clients — HTTP by hand, ``curl``, the library's client
(``BraTSEnsembleLib.remote``) and the Slicer module's logic on slicer-core's MRML.

The server runs with small limits (4 MiB per file, 12 MiB per case, 3 waiting cases, 100 requests a minute) and
five tokens, one per client: alice and bob (two at once), carol (the module), dave (the rate limit), erin
(cancel).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib import demo, remote, server as server_module

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("t1n", "t1c", "t2w", "t2f")
CASE_ID = "DemoPhantom-777"
MIB = 1024 * 1024
CLIENTS = ("alice", "bob", "carol", "dave", "erin")


def demo_files(folder: Path = demo.CASE_DIR, case_id: str = CASE_ID) -> dict[str, Path]:
    return {role: folder / f"{case_id}-{role}.nii.gz" for role in ROLES}


def brats_ensemble(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def cli_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and lines, done.stderr[-2000:]
    return lines[-1][len("error: "):]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    tokens: dict[str, str]
    work: Path  # the server's TMPDIR: its private job folders are made in there
    log: Path

    def client(self, name: str) -> remote.ServerClient:
        return remote.ServerClient(self.url, self.tokens[name])

    def job_folders(self) -> list[Path]:
        return [p for p in self.work.glob("brats-ensemble-serve-*/job-*")]


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "brats-ensemble"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "BraTSEnsembleLib.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("server")
    tokens = {name: secrets.token_urlsafe(24) for name in CLIENTS}
    token_file = folder / "tokens"
    token_file.write_text("# one token per client\n" + "\n".join(tokens.values()) + "\n")
    token_file.chmod(0o600)
    work = folder / "tmp"
    work.mkdir()
    port = free_port()
    log = folder / "serve.log"
    env = {**os.environ, "TMPDIR": str(work)}
    env.pop(server_module.TOKEN_ENV, None)
    with log.open("w") as handle:
        process = subprocess.Popen(
            [*console_script(), "serve", "--model-set", str(demo.MANIFEST), "--token-file", str(token_file),
             "--port", str(port), "--device", "cpu", "--max-file-mb", "4", "--max-request-mb", "12",
             "--max-queue", "3", "--rate-limit", "100"],
            cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", port, tokens, work, log)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"brats-ensemble serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if api(running, "alice", "GET", "/")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"brats-ensemble serve did not answer:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not list(work.glob("brats-ensemble-serve-*")), "the server left files behind"


def api(server: Server, client: str | None, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request by hand: (status, headers, JSON body or raw bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        all_headers = dict(headers or {})
        if client is not None:
            all_headers["Authorization"] = f"Bearer {server.tokens[client]}"
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    if answer_headers.get("content-type", "").startswith("application/json"):
        assert b"Traceback" not in data
        return response.status, answer_headers, json.loads(data)
    return response.status, answer_headers, data


def submit(server: Server, client: str, files: dict[str, Path], **fields: str) -> tuple[int, dict[str, Any]]:
    boundary = uuid.uuid4().hex
    chunks, length = remote.multipart_body(boundary, fields, files)
    body = b"".join(chunks)
    assert len(body) == length
    status, _headers, data = api(server, client, "POST", "/jobs", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, data


def wait_for(predicate, timeout: float = 1800, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def local_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``brats-ensemble predict`` on the demo case with the demo set (the reference for the remote results)."""
    out = tmp_path_factory.mktemp("local")
    done = brats_ensemble("predict", str(demo.CASE_DIR), "-o", str(out), "--model-set", str(demo.MANIFEST),
                          "--device", "cpu", "--save-uncertainty", "--progress", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "events": [json.loads(line)["event"] for line in done.stdout.splitlines()],
            "labels": sitk.ReadImage(str(out / f"{CASE_ID}.nii.gz")),
            "statistics": json.loads((out / f"{CASE_ID}.json").read_text())}


def assert_same_image(path: Path, reference: sitk.Image) -> None:
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert image.GetSize() == reference.GetSize() and image.GetPixelID() == reference.GetPixelID()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin()) and np.allclose(image.GetSpacing(),
                                                                                reference.GetSpacing())
    assert np.allclose(image.GetDirection(), reference.GetDirection())


# ================================================================================================ access


def test_every_request_needs_a_valid_token(server):
    refusals = [{}, {"Authorization": "Bearer " + "x" * 32}, {"Authorization": f"Basic {server.tokens['alice']}"},
                {"Authorization": f"Bearer {server.tokens['alice']}x"}, {"Authorization": "Bearer"}]
    for headers in refusals:
        for method, path in (("GET", "/"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("DELETE", "/jobs/" + "0" * 32), ("GET", "/no-such-page")):
            status, answer_headers, body = api(server, None, method, path, headers=headers)
            assert status == 401, (headers, method, path)
            assert answer_headers["www-authenticate"] == "Bearer" and "token" in body["error"]
    status, answer_headers, info = api(server, "alice", "GET", "/")
    assert status == 200 and answer_headers["cache-control"] == "no-store"
    assert info["service"] == "brats-ensemble" and info["client"] == "client-1"
    (served,) = info["model_sets"]
    assert served["name"] == "brats-ensemble-demo" and served["roles"] == list(ROLES)
    assert [(m["name"], m["framework"]) for m in served["members"]] == [
        ("nnunet", "nnunetv2"), ("umamba-bot", "umamba"), ("mednext-s", "mednext")]
    from BraTSEnsembleLib.modelset import load_model_set

    assert served["fingerprint"] == server_module.model_set_fingerprint(load_model_set(demo.MANIFEST))
    assert info["limits"]["max_file_bytes"] == 4 * MIB and info["limits"]["max_request_bytes"] == 12 * MIB
    assert "/" not in json.dumps(served).replace("sha256:", "")  # no server path
    assert api(server, "bob", "GET", "/")[2]["client"] == "client-2"
    assert api(server, "alice", "GET", "/docs")[0] == 404  # no API browser


def test_fingerprint_changes_with_a_member_file(tmp_path):
    from BraTSEnsembleLib.modelset import load_model_set

    copy = tmp_path / "models"
    shutil.copytree(demo.MODELS_DIR, copy)
    manifest = copy / demo.MANIFEST.name
    before = server_module.model_set_fingerprint(load_model_set(manifest))
    assert before == server_module.model_set_fingerprint(load_model_set(demo.MANIFEST))  # not path-dependent
    plans = next(copy.glob("nnUNetTrainerAdam*/plans.json"))
    plans.write_text(plans.read_text() + " ")
    assert server_module.model_set_fingerprint(load_model_set(manifest)) != before


def test_request_rate_is_bounded_per_client(server):
    statuses = []
    for _ in range(1000):
        status, headers, body = api(server, "dave", "GET", "/jobs")
        statuses.append(status)
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "too many requests" in body["error"]
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200} and len(statuses) > 90
    assert api(server, "alice", "GET", "/")[0] == 200  # another client is not slowed down


# ================================================================================================ refusals


def test_uploads_are_bounded_while_they_stream(server, tmp_path):
    big = tmp_path / "big.nii.gz"
    big.write_bytes(b"\x1f\x8b" + os.urandom(5 * MIB))  # over the 4 MiB per file, under the 12 MiB per case
    status, body = submit(server, "alice", {**demo_files(), "t1c": big}, case_id=CASE_ID)
    assert status == 413 and body["error"] == ("t1c: the file is larger than this server takes (4 MiB per file, "
                                               "--max-file-mb)")
    # A case declared larger than 12 MiB is refused from its headers, before its body is read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/jobs")
    for key, value in {"Authorization": f"Bearer {server.tokens['alice']}", "Content-Length": str(13 * MIB),
                       "Content-Type": "multipart/form-data; boundary=b"}.items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most 12 MiB per case" in json.loads(response.read())["error"]
    connection.close()
    # A small file whose header declares 16 GiB of voxels (it would be allocated when read).
    import gzip

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.int16)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024))
    status, body = submit(server, "alice", {**demo_files(), "t2w": bomb}, case_id=CASE_ID)
    assert status == 413 and body["error"].startswith(f"{CASE_ID}-t2w.nii.gz: its header declares 16384 MiB")
    assert server.job_folders() == [] and api(server, "alice", "GET", "/jobs")[2] == {"jobs": []}


def nan_case(folder: Path) -> Path:
    folder.mkdir()
    for role, path in demo_files().items():
        shutil.copy(path, folder / path.name)
    image = sitk.Cast(sitk.ReadImage(str(folder / f"{CASE_ID}-t1c.nii.gz")), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[10, 20:23, 30] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(folder / f"{CASE_ID}-t1c.nii.gz"), True)
    return folder


def wrong_size_case(folder: Path) -> Path:
    folder.mkdir()
    for role, path in demo_files().items():
        shutil.copy(path, folder / path.name)
    image = sitk.ReadImage(str(folder / f"{CASE_ID}-t2w.nii.gz"))
    sitk.WriteImage(image[:-8, :, :], str(folder / f"{CASE_ID}-t2w.nii.gz"), True)
    return folder


@pytest.mark.parametrize("make_case, expected", [(nan_case, "3 NaN/Inf voxel(s)"), (wrong_size_case, "differ in size")])
def test_bad_input_is_refused_with_the_clis_own_message(server, tmp_path, make_case, expected):
    case = make_case(tmp_path / "case")
    message = cli_error(brats_ensemble("predict", str(case), "-o", str(tmp_path / "out"), "--model-set",
                                       str(demo.MANIFEST), "--device", "cpu", timeout=600))
    assert expected in message and str(case) in message
    status, body = submit(server, "alice", demo_files(case), case_id=CASE_ID)
    assert status == 422 and body == {"error": message.replace(f"{case}/", "")}
    assert str(server.work) not in body["error"] and api(server, "alice", "GET", "/jobs")[2] == {"jobs": []}


def test_malformed_requests_are_refused_and_nothing_is_kept(server, tmp_path):
    text = tmp_path / "not-an-image.nii.gz"
    text.write_bytes(b"not an image at all")
    cases = [
        ({**demo_files(), "t1c": text}, {"case_id": CASE_ID}, 422, f"{CASE_ID}-t1c.nii: cannot be read"),
        ({r: p for r, p in demo_files().items() if r != "t2f"}, {"case_id": CASE_ID}, 422,
         "model nnunet needs t2f (T2-FLAIR), which case DemoPhantom-777 (the upload) does not provide"),
        (demo_files(), {"case_id": "../../etc/passwd"}, 400, "case_id '../../etc/passwd': use 1-80 letters"),
        (demo_files(), {"model_set": "other"}, 400,
         "unknown model set 'other'; this server serves brats-ensemble-demo"),
        (demo_files(), {"save_uncertainty": "maybe"}, 400, "the option save_uncertainty must be true or false"),
        (demo_files(), {"path": "/etc"}, 400, "unknown form field 'path'"),
        ({}, {"case_id": CASE_ID}, 400, "no image uploaded"),
    ]
    for files, fields, status, start in cases:
        got, body = submit(server, "alice", files, **fields)
        assert (got, body["error"][:len(start)]) == (status, start), body
    status, _headers, body = api(server, "alice", "POST", "/jobs", b'{"t1c": "/data/case.nii.gz"}',
                                 {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in body["error"]
    for path in ("/jobs/" + "0" * 32, "/jobs/../../etc/passwd", "/jobs/" + "0" * 32 + "/files/labels"):
        assert api(server, "alice", "GET", path)[0] == 404
    assert server.job_folders() == [] and api(server, "alice", "GET", "/jobs")[2] == {"jobs": []}


def test_client_side_refusals_say_why(server, tmp_path):
    unreachable = remote.ServerClient(f"http://127.0.0.1:{free_port()}", "t" * 20)
    with pytest.raises(remote.RemoteError, match=r"cannot reach the server at http://127\.0\.0\.1:\d+ \("):
        unreachable.info()
    with pytest.raises(remote.RemoteError, match="did not accept the token"):
        remote.ServerClient(server.url, "t" * 20).info()
    with pytest.raises(remote.RemoteError, match="no token"):
        remote.ServerClient(server.url, "", environ={})
    with pytest.raises(remote.RemoteError, match="give it as http"):
        remote.ServerClient("ftp://host/", "t" * 20)
    run = remote.RemoteRun(server.client("alice"), demo_files(), CASE_ID, tmp_path, model_set="nope")
    run.wait(timeout=120)
    assert not run.succeeded and "does not serve the model set 'nope'" in run.failure_message()


# ================================================================================================ running cases


def curl(*args: str) -> str:
    done = subprocess.run(["curl", "--silent", "--show-error", "--fail-with-body", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


@pytest.mark.slow
def test_two_clients_at_once_get_the_local_result_and_never_see_each_other(server, local_result, tmp_path):
    """alice through the library's client (as the module sends it), bob with curl (or by hand without curl); one
    runs while the other waits; both results equal ``predict``'s voxel for voxel; neither can reach the other's
    job."""
    alice_out = tmp_path / "alice"
    alice_out.mkdir()
    names: list[str] = []
    alice = remote.RemoteRun(server.client("alice"), demo_files(), CASE_ID, alice_out, save_uncertainty=True)
    alice_job = wait_for(lambda: alice.job_id or (not alice.running and pytest.fail(alice.failure_message())))
    bob_token = server.tokens["bob"]
    have_curl = shutil.which("curl") is not None
    if have_curl:
        form = [f"-F{role}=@{path}" for role, path in demo_files().items()]
        bob_job = json.loads(curl("-H", f"Authorization: Bearer {bob_token}", *form, "-F", f"case_id={CASE_ID}",
                                  f"{server.url}/jobs"))
    else:
        status, bob_job = submit(server, "bob", demo_files(), case_id=CASE_ID)
        assert status == 202
    assert bob_job["state"] == "queued" and bob_job["queue_position"] in (1, 2)  # one worker: alice's goes first
    bob_id = bob_job["id"]
    assert len(bob_id) == 32 and bob_id != alice_job
    # Neither sees the other's job: not in the list, and every request about it is answered as for no job.
    assert [j["id"] for j in api(server, "bob", "GET", "/jobs")[2]["jobs"]] == [bob_id]
    assert [j["id"] for j in server.client("alice").jobs()] == [alice_job]
    for path in ("", "/events", "/files/labels", "/files/statistics"):
        assert api(server, "bob", "GET", f"/jobs/{alice_job}{path}")[0] == 404
        assert api(server, "alice", "GET", f"/jobs/{bob_id}{path}")[0] == 404
    assert api(server, "bob", "DELETE", f"/jobs/{alice_job}")[0] == 404
    assert api(server, "bob", "GET", f"/jobs/{bob_id}/files/labels")[0] == 409  # not done yet

    alice.wait(timeout=3600, callback=lambda event: names.append(event.event))
    assert alice.succeeded, alice.failure_message()
    assert names == local_result["events"]  # the same events as `predict --progress json`
    assert_same_image(alice_out / f"{CASE_ID}.nii.gz", local_result["labels"])
    for kind in ("entropy", "disagreement"):
        remote_map = sitk.GetArrayFromImage(sitk.ReadImage(str(alice_out / f"{CASE_ID}_{kind}.nii.gz")))
        local_map = sitk.GetArrayFromImage(sitk.ReadImage(str(local_result["out"] / f"{CASE_ID}_{kind}.nii.gz")))
        assert np.allclose(remote_map, local_map, atol=1e-6)
    statistics = json.loads((alice_out / f"{CASE_ID}.json").read_text())
    assert statistics["regions"] == local_result["statistics"]["regions"]
    assert statistics["inputs"] == {role: f"{CASE_ID}-{role}.nii.gz" for role in ROLES}  # no server path
    assert api(server, "alice", "GET", f"/jobs/{alice_job}")[0] == 404  # the client deleted it after download

    bob_done = wait_for(lambda: (lambda job: job if job["state"] in ("done", "failed") else None)(
        api(server, "bob", "GET", f"/jobs/{bob_id}")[2]), timeout=3600, interval=2)
    assert bob_done["state"] == "done", bob_done
    assert bob_done["started"] >= bob_job["created"] and bob_done["files"] == ["labels", "statistics"]
    events = api(server, "bob", "GET", f"/jobs/{bob_id}/events?since=0")[2]
    assert [e["event"] for e in events["events"]] == local_result["events"]
    labels = tmp_path / "bob.nii.gz"
    if have_curl:
        curl("-H", f"Authorization: Bearer {bob_token}", "-o", str(labels),
             f"{server.url}/jobs/{bob_id}/files/labels")
    else:
        labels.write_bytes(api(server, "bob", "GET", f"/jobs/{bob_id}/files/labels")[2])
    assert_same_image(labels, local_result["labels"])
    assert api(server, "bob", "GET", f"/jobs/{bob_id}/files/entropy")[0] == 404  # not asked for
    assert api(server, "bob", "DELETE", f"/jobs/{bob_id}")[2] == {"id": bob_id, "state": "deleted"}
    assert api(server, "bob", "GET", f"/jobs/{bob_id}")[0] == 404 and server.job_folders() == []


@pytest.mark.slow
def test_cancel_a_waiting_and_a_running_job(server, tmp_path):
    first = remote.RemoteRun(server.client("erin"), demo_files(), CASE_ID, tmp_path)
    started = []
    wait_for(lambda: started.extend(e.event for e in first.poll()) or "member-start" in started
             or (not first.running and pytest.fail(first.failure_message())))
    status, second = submit(server, "erin", demo_files(), case_id=CASE_ID)
    assert status == 202 and second["state"] == "queued" and second["queue_position"] == 1
    assert api(server, "erin", "DELETE", f"/jobs/{second['id']}")[2] == {"id": second["id"], "state": "cancelled"}
    assert api(server, "erin", "GET", f"/jobs/{second['id']}")[0] == 404
    job_id = first.job_id
    assert api(server, "erin", "GET", f"/jobs/{job_id}")[2]["state"] == "running"
    first.cancel()  # what the module's Cancel does: the job is deleted on the server, which stops it
    assert not first.succeeded and first.failure_message() == "cancelled" and list(tmp_path.iterdir()) == []
    wait_for(lambda: api(server, "erin", "GET", f"/jobs/{job_id}")[0] == 404, timeout=1800, interval=2)
    info = api(server, "erin", "GET", "/")[2]
    assert info["queue"] == {"waiting": 0, "running": 0} and server.job_folders() == []
    assert "job %s: cancelled" % job_id[:8] in server.log.read_text()


# ================================================================================================ the module


@pytest.mark.slow
def test_module_logic_segments_the_demo_case_through_the_server(server, local_result, tmp_path):
    """The Slicer module's logic on slicer-core: the volumes exported as for a local run, sent to the server, the
    result imported exactly as a local one; refusals end as errors that say why; the scene is untouched by them."""
    pytest.importorskip("slicer")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slicer_application import CoreApplication, add_module_to_path
    from test_slicer_mrml import label_points_ras, mismatches, nodes_of_class, segment_points_ras

    add_module_to_path(ROOT)
    from BraTSEnsembleModule.logic import SegmentationLogic

    app = CoreApplication(tmp_path / "slicer")
    try:
        logic = SegmentationLogic(app.applicationLogic)
        volumes = {}
        for role, path in demo_files().items():
            volumes[role] = app.moduleLogics["Volumes"].AddArchetypeVolume(str(path), f"{CASE_ID}-{role}", 0)
        before = app.scene.GetNumberOfNodes()
        refusals = [({"server": f"http://127.0.0.1:{free_port()}", "token": "t" * 20}, "cannot reach the server"),
                    ({"server": server.url, "token": "t" * 20}, "did not accept the token")]
        for options, message in refusals:
            with pytest.raises(RuntimeError, match=message):
                logic.segment(volumes, None, timeout=300, **options)
        with pytest.raises(ValueError, match="postprocess, folds: not used with a server"):
            logic.segment(volumes, None, server=server.url, token=server.tokens["carol"], postprocess="none",
                          folds="0")
        assert app.scene.GetNumberOfNodes() == before and list(app.temporary.iterdir()) == []
        info = logic.serverInfo(server.url, server.tokens["carol"])
        assert [m["name"] for m in info["model_sets"]] == ["brats-ensemble-demo"]

        seg, table = logic.segment(volumes, "brats-ensemble-demo", server=server.url, token=server.tokens["carol"],
                                   timeout=3600, save_uncertainty=True)
        assert seg.GetName() == f"{CASE_ID} segmentation"
        labels = local_result["labels"]
        for region, value in (("ET", 3), ("NETC", 1), ("SNFH", 2)):
            assert mismatches(label_points_ras(labels, value), segment_points_ras(seg, region)) == 0, region
        rows = {table.GetCellText(r, 0): int(table.GetCellText(r, 3)) for r in range(table.GetNumberOfRows())}
        assert rows == {r: v["voxels"] for r, v in local_result["statistics"]["regions"].items()}
        assert seg.GetNodeReference("BraTSEnsemble.Uncertainty") is not None
        assert not [n for n in nodes_of_class(app.scene, "vtkMRMLStorageNode")
                    if "BraTSEnsemble-" in str(n.GetFileName() or "")]
        assert list(app.temporary.iterdir()) == [] and server.job_folders() == []
        assert server.client("carol").jobs() == []  # fetched and deleted on the server
    finally:
        app.close()


# ================================================================================================ pieces


def test_tokens_rate_limiter_and_exposure_warning():
    tokens = server_module.Tokens(["a" * 16, "b" * 16])
    assert tokens.identify("a" * 16) == "client-1" and tokens.identify("b" * 16) == "client-2"
    assert tokens.identify("a" * 15) is None and tokens.identify("") is None
    assert server_module.bearer_token("Bearer  abc ") == "abc" and server_module.bearer_token("bearer abc") == "abc"
    assert server_module.bearer_token("Basic abc") is None and server_module.bearer_token(None) is None
    now = [0.0]
    limiter = server_module.RateLimiter(3, clock=lambda: now[0])
    assert [limiter.take("x") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("x") == pytest.approx(20.0) and limiter.take("y") == 0.0
    now[0] = 20.0
    assert limiter.take("x") == 0.0 and limiter.take("x") > 0
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert server_module.exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "gpu.hospital.org"):
        warning = server_module.exposure_warning(host)
        assert "WITHOUT TLS" in warning and "TLS reverse proxy" in warning


def test_tokens_come_from_options_a_file_or_the_environment(tmp_path):
    parse = server_module.build_parser().parse_args
    tokens, generated = server_module.read_tokens(parse(["--model-set", "m.json"]), {})
    assert generated and len(tokens) == 1 and len(tokens[0]) >= 40
    assert server_module.read_tokens(parse(["--model-set", "m.json"]), {})[0] != tokens  # new at every start
    token_file = tmp_path / "tokens"
    token_file.write_text("# clients\n" + "f" * 20 + "\n\n" + "g" * 20 + "\n")
    args = parse(["--model-set", "m.json", "--token", "t" * 20, "--token-file", str(token_file)])
    assert server_module.read_tokens(args, {"BRATS_ENSEMBLE_TOKEN": "e" * 20}) == (
        ["t" * 20, "f" * 20, "g" * 20, "e" * 20], False)
    for bad, message in ((["--token", "short"], "at least 16"), (["--token", "t" * 20, "--token", "t" * 20], "twice")):
        with pytest.raises(server_module.UsageError, match=message):
            server_module.read_tokens(parse(["--model-set", "m.json", *bad]), {})
    done = brats_ensemble("serve", "--model-set", str(demo.MANIFEST), "--token", "short", timeout=300)
    assert done.returncode == 2 and "error: a token must be at least 16 characters" in done.stderr
    assert "Traceback" not in done.stderr


def test_multipart_body_streams_files_with_the_exact_length(tmp_path):
    from python_multipart import MultipartParser

    one, two = tmp_path / "a.nii.gz", tmp_path / "b.nii"
    one.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    two.write_bytes(b"plain")
    chunks, length = remote.multipart_body("xyz", {"case_id": "C-1"}, {"t1c": one, "t2w": two})
    body = b"".join(chunks)
    assert len(body) == length
    parts: dict[str, bytes] = {}
    current: list[bytes] = []
    parser = MultipartParser(b"xyz", {"on_part_begin": lambda: current.clear(),
                                      "on_part_data": lambda d, s, e: current.append(d[s:e]),
                                      "on_part_end": lambda: parts.setdefault(str(len(parts)), b"".join(current))})
    parser.write(body)
    assert list(parts.values()) == [b"C-1", one.read_bytes(), b"plain"]


def test_slicer_needs_no_new_package_for_the_remote_mode():
    """The client is the standard library; the module's installer (``[project] dependencies``) never brings the
    server's packages into Slicer; ``make setup`` installs them for the tests and the server."""
    import ast

    from BraTSEnsembleLib import process

    for path in (ROOT / "BraTSEnsembleLib" / "remote.py", ROOT / "BraTSEnsembleLib" / "process.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (path.name, imported)
    dependencies = process.project_dependencies((ROOT / "pyproject.toml").read_text())
    assert not [d for d in dependencies if any(n in d.lower() for n in ("fastapi", "uvicorn", "multipart"))]
    assert re.search(r'-e "\.\[test,(\w+,)*server(,\w+)*\]"', (ROOT / "Makefile").read_text())  # make setup
