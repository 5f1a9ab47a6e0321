"""``batch --cluster`` on a real Ray cluster (issue 17, docs/cluster.md): a head and two worker nodes as separate
processes on 127.0.0.1 (Ray's own multi-node test cluster, started once for this file), the real ``brats-ensemble``
command line as a subprocess, tiny phantoms and the shipped nnU-Net v2 demo model.

Rows: results equal to local ``batch`` (label maps, uncertainty maps and statistics.csv byte for byte, each JSON
field but ``seconds``; a bad case reported once with the same error line; a case in NRRD); model folders downloaded
on the workers from a manifest's url; a worker killed (SIGKILL) inside a case; a driver killed (SIGKILL) between two
renames and the cohort resumed; Ctrl-C and SIGTERM to the driver. The three kinds of address are used: HOST:PORT,
ray://HOST:PORT (Ray Client) and auto (a Ray instance of the run's own). Light rows without a cluster: the worker
layout, errors before any work, Ray stays out of the plain install and of the Slicer install.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_runs import cli, cli_command, events
from BraTSEnsembleLib import process
from BraTSEnsembleLib.cluster import TEST_WORKER_STOP_ENV, ClusterError, worker_layout
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.downloads import CACHE_ENV
from BraTSEnsembleLib.results import TEST_STOP_AFTER_ENV

ROOT = Path(__file__).resolve().parents[1]
DEMO_NNUNET = ROOT / "BraTSEnsembleLib" / "demo" / "models" / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"
#: every run also writes the uncertainty maps, so that they are compared too
MODEL = ("-m", str(DEMO_NNUNET), "--no-mirroring", "--device", "cpu", "--save-uncertainty")
SHAPE = (40, 44, 40)  # tiny phantoms: a few seconds per case on one core
GOOD = ("Phantom-09131", "Phantom-09132", "Phantom-09133")  # seeds 9131-9133, never used for training
NRRD_CASE, BAD_CASE = "Phantom-09134", "Phantom-09135"
#: Ray on this machine: every address on 127.0.0.1 (Ray otherwise advertises the machine's network address, even
#: for 127.0.0.1), no usage statistics.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
#: Each cluster run: one worker per node's core; the local reference runs with one torch thread too, so that both
#: do the same arithmetic (another thread count may round a voxel at p = 0.5 otherwise, see docs/batch.md).
CLUSTER = ("--cpus-per-worker", "1")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def leftovers(out: Path) -> list[Path]:
    """Anything that is not a complete result: temporary files, locks, commit records, the state folder."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".partial" in p.name or p.suffix == ".lock"]


def same_results(expected: Path, actual: Path, case_ids: list[str], cohort: Path, reference_cohort: Path) -> None:
    """Label and uncertainty maps byte for byte; every JSON field equal except ``seconds`` and ``timing`` (the time
    the case and its stages took, which no two runs share; the same stages and members are named); where the cohort
    lies (``case_folder``, ``inputs``) compared relative to the cohort folder."""
    for case_id in case_ids:
        for name in (f"{case_id}.nii.gz", f"{case_id}_disagreement.nii.gz", f"{case_id}_entropy.nii.gz"):
            assert (actual / name).read_bytes() == (expected / name).read_bytes(), name
        ours = (actual / f"{case_id}.json").read_text().replace(str(cohort), "COHORT")
        theirs = (expected / f"{case_id}.json").read_text().replace(str(reference_cohort), "COHORT")
        ours_json, theirs_json = json.loads(ours), json.loads(theirs)
        assert isinstance(ours_json.pop("seconds"), float) and isinstance(theirs_json.pop("seconds"), float)
        ours_timing, theirs_timing = ours_json.pop("timing"), theirs_json.pop("timing")
        assert list(ours_timing["stages"]) == list(theirs_timing["stages"])
        assert [m["member"] for m in ours_timing["members"]] == [m["member"] for m in theirs_timing["members"]]
        assert ours_json == theirs_json, case_id
        assert list(ours_json) == list(theirs_json), "the same fields in the same order"


def worker_pid(marker: Path, timeout: float = 300) -> int:
    """The process id a worker wrote into the test hook's file when it stopped itself inside a case."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text())
        time.sleep(0.2)
    raise AssertionError("no worker reached a case")


def process_state(pid: int) -> str | None:
    """'T' stopped, 'Z' zombie …, None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return None


def wait_gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def ray_env() -> dict[str, str]:
    """The environment of the CLI runs: Ray on 127.0.0.1, its session files in a short temporary folder (Ray's
    socket paths must stay under 108 characters), the run's torch threads as a worker's."""
    temp = tempfile.mkdtemp(prefix="bre-ray-")
    yield {**os.environ, **RAY_ENV, "RAY_TMPDIR": temp, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_env: dict[str, str]) -> dict[str, str]:
    """A Ray head (no CPU: it only coordinates) and two worker nodes with one CPU each, each its own processes on
    127.0.0.1, with small object stores; its addresses: ``gcs`` (HOST:PORT, a driver joins the cluster) and
    ``client`` (ray://HOST:PORT, Ray Client: a driver outside the cluster), and ``cache``, the download cache of
    both worker nodes (as two nodes of one machine share theirs)."""
    cache = Path(ray_env["RAY_TMPDIR"]) / "worker-cache"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**RAY_ENV, "RAY_TMPDIR": ray_env["RAY_TMPDIR"], CACHE_ENV: str(cache)}.items():
            patch.setenv(key, value)
        cluster_utils = pytest.importorskip("ray.cluster_utils")
        from ray._private import ray_constants

        assert not ray_constants.ENABLE_RAY_CLUSTER, "Ray was imported before this file could keep it on 127.0.0.1"
        node = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024**2}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            client_port = probe.getsockname()[1]
        cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "ray_client_server_port": client_port, **node})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, **node)
            yield {"gcs": cluster.address, "client": f"ray://127.0.0.1:{client_port}", "cache": cache}
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantoms in BraTS 2023 naming, one in NRRD (read by the driver, sent as images) and one whose T2w is
    all zero (bad input, found by the worker that reads it)."""
    folder = tmp_path_factory.mktemp("cohort")
    for case_id in (*GOOD, NRRD_CASE, BAD_CASE):
        make_phantom(int(case_id[-5:]), shape=SHAPE).write(folder)
    for path in sorted((folder / NRRD_CASE).glob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path).replace(".nii.gz", ".nrrd"), useCompression=True)
        path.unlink()
    t2w = folder / BAD_CASE / f"{BAD_CASE}-t2w.nii.gz"
    image = sitk.ReadImage(str(t2w))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(t2w))
    return folder


@pytest.fixture(scope="module")
def local_batch(cohort: Path, ray_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference: local ``batch`` on the cohort (one torch thread)."""
    out = tmp_path_factory.mktemp("local") / "out"
    run = cli("batch", cohort, "-o", out, *MODEL, "--progress", "json", env=ray_env)
    assert run.returncode == 1, run.stderr[-3000:]  # the bad case
    return out, run


def good_cohort(cohort: Path, target: Path, case_ids: tuple[str, ...] = GOOD) -> Path:
    target.mkdir(parents=True)
    for case_id in case_ids:
        shutil.copytree(cohort / case_id, target / case_id)
    return target


# ================================================================================================================
# Results


def test_results_on_a_cluster_are_the_files_local_batch_writes(tmp_path, cohort, local_batch, ray_cluster, ray_env):
    local_out, local_run = local_batch
    out = tmp_path / "out"
    run = cli("batch", cohort, "-o", out, *MODEL, "--progress", "json", "--cluster", ray_cluster["gcs"], *CLUSTER,
              env=ray_env)
    assert run.returncode == local_run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    # the bad case: reported once, with local batch's error line (naming the driver's path of the file)
    assert error_lines(run.stderr) == error_lines(local_run.stderr)
    assert f"error: {cohort / BAD_CASE / (BAD_CASE + '-t2w.nii.gz')} (t2w): is all zero (empty)" in run.stderr
    kinds = collections.Counter((e["event"], e["case"]) for e in events(run.stdout))
    assert kinds[("error", BAD_CASE)] == 1
    assert all(kinds[("written", case_id)] == 1 for case_id in (*GOOD, NRRD_CASE))
    assert events(run.stdout)[-1]["message"] == events(local_run.stdout)[-1]["message"] == "4/5 case(s) done"
    assert "2 worker(s), 1 CPU core(s) each" in run.stderr  # one per node

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_out.iterdir())
    assert (out / "statistics.csv").read_bytes() == (local_out / "statistics.csv").read_bytes()
    same_results(local_out, out, [*GOOD, NRRD_CASE], cohort, cohort)
    assert not leftovers(out)


class SlowServer(ThreadingHTTPServer):
    """Serves one archive as /demo.zip, its body a few seconds after the headers (so that two workers that
    downloaded it at once would overlap), and records the requests."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), SlowHandler)
        self.data, self.requests = data, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/demo.zip"


class SlowHandler(BaseHTTPRequestHandler):
    server: SlowServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.end_headers()
        time.sleep(3)
        self.wfile.write(self.server.data)


def test_models_are_downloaded_on_the_workers_from_the_manifests_url(tmp_path, cohort, local_batch, ray_cluster,
                                                                      ray_env):
    """A manifest member whose folder no machine has, with url and sha256: the driver downloads it into its cache,
    the worker nodes into theirs (their workers one after the other: one download for the two nodes that share a
    cache here). The labels are local batch's; the JSON names the model folder as the driver has it."""
    archive = Path(shutil.make_archive(str(tmp_path / "demo"), "zip", root_dir=DEMO_NNUNET.parent,
                                       base_dir=DEMO_NNUNET.name))
    server = SlowServer(archive.read_bytes())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        manifest = tmp_path / "demo-download.json"
        manifest.write_text(json.dumps({"name": "demo-download", "members": [{
            "framework": "nnunetv2", "path": "nowhere/model", "url": server.url,
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "mirroring": False}]}))
        cases = good_cohort(cohort, tmp_path / "cohort", GOOD[:2])
        out, driver_cache = tmp_path / "out", tmp_path / "driver-cache"
        run = cli("batch", cases, "-o", out, "--model-set", manifest, "--device", "cpu", "--progress", "json",
                  "--cluster", ray_cluster["gcs"], *CLUSTER, env={**ray_env, CACHE_ENV: str(driver_cache)})
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    assert server.requests == ["/demo.zip", "/demo.zip"], "the driver, then one worker of the two nodes"
    assert list(ray_cluster["cache"].rglob("checkpoint_final.pth")) and list(driver_cache.rglob("checkpoint_final.pth"))
    for case_id in GOOD[:2]:
        assert (out / f"{case_id}.nii.gz").read_bytes() == (local_batch[0] / f"{case_id}.nii.gz").read_bytes()
        member = json.loads((out / f"{case_id}.json").read_text())["members"][0]
        assert member["path"].startswith(str(driver_cache)) and member["url"] == server.url


# ================================================================================================================
# Faults


def test_a_worker_killed_inside_a_case_costs_that_case_a_retry_on_another_worker(tmp_path, cohort, local_batch,
                                                                                  ray_cluster, ray_env):
    """Through Ray Client (ray://): the driver outside the cluster, as on a laptop in front of a GPU cluster."""
    cases = good_cohort(cohort, tmp_path / "cohort")
    out = tmp_path / "out"
    marker = tmp_path / "stopped-worker"
    run = subprocess.Popen(cli_command("batch", cases, "-o", out, *MODEL, "--progress", "json", "--cluster",
                                       ray_cluster["client"], *CLUSTER), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**ray_env, TEST_WORKER_STOP_ENV: str(marker)})
    try:
        pid = worker_pid(marker)
        deadline = time.monotonic() + 30
        while process_state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_state(pid) == "T", "the worker stops itself inside the case"
        assert "CaseWorker" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, stderr[-3000:]
    found = events(stdout)
    retried = [e["case"] for e in found if e["event"] == "case-retry"]
    assert len(retried) == 1, stderr[-3000:]
    starts = [e["message"] for e in found if e["event"] == "case-start" and e["case"] == retried[0]]
    assert len(starts) == 2 and starts[1].endswith("attempt 2")
    assert starts[0].split(" on ")[0] != starts[1].split(" on ")[0], "the retry went to the other worker"
    assert f"was lost during case {retried[0]}" in stderr
    assert sorted(e["case"] for e in found if e["event"] == "written") == sorted(GOOD)
    same_results(local_batch[0], out, list(GOOD), cases, cohort)
    assert not leftovers(out)


def test_a_driver_killed_between_two_renames_is_resumed(tmp_path, cohort, local_batch, ray_cluster, ray_env):
    """SIGKILL of the driver right after the second case's label map got its name (one worker: cases in order);
    the rerun (on a Ray instance of its own, --cluster auto) skips the done case, completes the others."""
    cases = good_cohort(cohort, tmp_path / "cohort")
    out = tmp_path / "out"
    first = subprocess.Popen(cli_command("batch", cases, "-o", out, *MODEL, "--progress", "none", "--cluster",
                                         ray_cluster["gcs"], *CLUSTER, "--workers", "1"), cwd=ROOT,
                             env={**ray_env, TEST_STOP_AFTER_ENV: f"{GOOD[1]}.nii.gz"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # the driver stops itself at the rename
        assert os.WIFSTOPPED(status), "the run ended before it reached the rename"
    finally:
        first.kill()
        first.wait()
    assert (out / f"{GOOD[0]}.json").is_file()
    assert (out / f"{GOOD[1]}.nii.gz").is_file() and not (out / f"{GOOD[1]}.json").exists()
    assert (out / ".brats-ensemble" / f"{GOOD[1]}.lock").is_file(), "the dead driver's lock is left"
    assert not (out / f"{GOOD[2]}.nii.gz").exists()

    resumed = cli("batch", cases, "-o", out, *MODEL, "--progress", "json", "--cluster", "auto", *CLUSTER,
                  env=ray_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "running on a Ray instance on this machine" in resumed.stderr
    found = events(resumed.stdout)
    assert [e["case"] for e in found if e["event"] == "case-skipped"] == [GOOD[0]]
    assert sorted(e["case"] for e in found if e["event"] == "written") == [GOOD[1], GOOD[2]]
    same_results(local_batch[0], out, list(GOOD), cases, cohort)
    assert not leftovers(out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_clusters_work_and_leaves_no_partial_files(tmp_path, cohort, ray_cluster, ray_env,
                                                                    signum):
    cases = good_cohort(cohort, tmp_path / "cohort")
    out = tmp_path / "out"
    marker = tmp_path / "stopped-worker"
    run = subprocess.Popen(cli_command("batch", cases, "-o", out, *MODEL, "--progress", "json", "--cluster",
                                       ray_cluster["gcs"], *CLUSTER, "--workers", "1"), cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**ray_env, TEST_WORKER_STOP_ENV: str(marker)})
    try:
        pid = worker_pid(marker)  # the only worker is inside the first case
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr[-3000:]
    assert "error: cancelled" in stderr and "Traceback" not in stderr
    assert wait_gone(pid), "the worker inside the case was stopped with the run"
    assert not [e for e in events(stdout) if e["event"] == "written"]
    assert not out.exists() or not list(out.iterdir()), "no result, no lock, no temporary file"


# ================================================================================================================
# Without a cluster


def test_worker_layout_one_per_gpu_or_per_cpu_cores():
    def node(cpus: int, gpus: int = 0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    gpu_cluster = [node(0), node(16, 4), node(8, 2), node(32, 8, alive=False)]
    assert worker_layout(gpu_cluster, "auto").count == 6 and worker_layout(gpu_cluster, "cuda").num_gpus == 1
    cpu = worker_layout(gpu_cluster, "cpu", cpus_per_worker=5)
    assert (cpu.count, cpu.num_cpus, cpu.num_gpus, cpu.threads) == (3 + 1, 5, 0, 5)
    assert worker_layout([node(0), node(2), node(2)], "auto").count == 2  # default: at most the largest node's cores
    assert worker_layout([node(16)], "auto").count == 4  # default 4 cores each
    assert worker_layout([node(16)], "auto", max_workers=3).count == 3
    with pytest.raises(ClusterError, match="--cpus-per-worker 2 or less"):
        worker_layout([node(2)], "cpu", cpus_per_worker=3)
    with pytest.raises(ClusterError, match="has no GPU"):
        worker_layout([node(8)], "cuda")
    with pytest.raises(ClusterError, match="no CPU for a worker"):
        worker_layout([node(0)], "auto")
    with pytest.raises(ClusterError, match="use auto, cpu or cuda"):
        worker_layout([node(8, 2)], "cuda:1")


def test_cluster_errors_come_before_any_work(tmp_path, cohort, ray_env):
    out = tmp_path / "out"
    alone = cli("batch", cohort, "-o", out, *MODEL, "--workers", "2", env=ray_env)
    assert alone.returncode == 1 and error_lines(alone.stderr) == [
        "error: --workers only apply to a run on a cluster: add --cluster auto (a Ray instance on this machine) or "
        "--cluster ADDRESS, or leave them out."]
    nobody = cli("batch", cohort, "-o", out, *MODEL, "--cluster", "127.0.0.1:9", env=ray_env)  # port 9: discard
    assert nobody.returncode == 1 and "Traceback" not in nobody.stderr
    assert len(error_lines(nobody.stderr)) == 1
    assert error_lines(nobody.stderr)[0].startswith("error: --cluster 127.0.0.1:9: no Ray cluster answers there")
    assert not out.exists()


def test_ray_stays_out_of_the_plain_and_the_slicer_install():
    """Ray is the [cluster] extra: the library and the CLI import without it, the Slicer module's installer (the
    [project] dependencies) does not install it."""
    code = "import sys, BraTSEnsembleLib.cli, BraTSEnsembleLib.cluster; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip() == "False"
    pyproject = (ROOT / "pyproject.toml").read_text()
    names = [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower()
             for r in process.requirements_to_install("\n".join(process.project_dependencies(pyproject)))]
    assert "ray" not in names and "ray" not in process.REQUIRED_IMPORTS
    assert re.search(r'^cluster = \["ray\[client\]==2\.\d+\.\d+"\]', pyproject, re.M)
    assert re.search(r'-e "\.\[test,(\w+,)*cluster(,\w+)*\]"', (ROOT / "Makefile").read_text())
