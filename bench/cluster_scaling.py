"""Cohort throughput of ``batch --cluster`` with 1 and 2 workers, and what the engine adds per case (bench/CLUSTER.md).

    .venv/bin/python bench/cluster_scaling.py [--cases 8] [--rounds 2] [--json results.json]

Starts a Ray cluster on 127.0.0.1 (a head without CPU and two worker nodes with one core each, separate processes,
as Testing/test_cluster.py does), then:

1. throughput: ``brats-ensemble batch --cluster ADDRESS --workers 1`` and ``--workers 2`` on the same cohort of
   tiny phantoms with the shipped nnU-Net v2 demo model, interleaved (1, 2, 2, 1, …) so that a change of the
   machine's load hits both alike; cases per minute from the first case sent to the last result written (the
   steady state), and end to end (the command's wall time, with Ray's connection and the workers' model loading);
2. the engine's cost per case, measured: an actor call without data (scheduling), the round trip of a real BraTS
   case's bytes to a worker on another node and a label map of its size back (serialisation and transfer), and
   what the driver does per case for a real BraTS case (read its files and check them against the fingerprint;
   write the result as local batch writes it);
3. a control without Ray: one local ``batch`` process on the cohort against two at once on its halves (one torch
   thread each), interleaved with the cluster runs: what this machine gives a second process at that moment;
4. the load of the machine (``os.getloadavg``) before and after, because this 2-core machine is shared.
"""
from __future__ import annotations

import argparse
import json
import threading
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from BraTSEnsembleLib.case import discover_case_files, read_case_folder  # noqa: E402
from BraTSEnsembleLib.cluster import CaseWorker, read_payload  # noqa: E402
from BraTSEnsembleLib.cohort import assign_case_ids, plan_cases  # noqa: E402
from BraTSEnsembleLib.demo.phantom import make_phantom  # noqa: E402
from BraTSEnsembleLib.pipeline import Result, write_result  # noqa: E402
from BraTSEnsembleLib.results import input_fingerprint  # noqa: E402

DEMO_NNUNET = ROOT / "BraTSEnsembleLib" / "demo" / "models" / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"
REAL_CASE = ROOT.parent / "shared" / "data" / "real" / "BraTS-GLI-00001-000"
if not REAL_CASE.is_dir():
    REAL_CASE = Path("/work/shared/data/real/BraTS-GLI-00001-000")
SHAPE = (64, 72, 64)  # the demo phantoms' size: a few seconds per case on one core
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_cluster(temp: str):
    os.environ.update({**RAY_ENV, "RAY_TMPDIR": temp})
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 200 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **node})
    for _ in range(2):
        cluster.add_node(num_cpus=1, **node)
    return cluster


def batch_command(cohort: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "BraTSEnsembleLib.cli", "batch", str(cohort), "-o", str(out), "-m",
            str(DEMO_NNUNET), "--no-mirroring", "--device", "cpu", "--progress", "json", *options]


def timed_runs(commands: list[list[str]]) -> tuple[float, list[float], list[float]]:
    """Run the commands at once; (wall time, times of case-start events, times of written events)."""
    started = time.monotonic()
    runs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ}) for c in commands]
    sent, written = [], []

    def follow(run: subprocess.Popen) -> None:
        for line in run.stdout:
            if line.startswith("{"):
                event = json.loads(line)["event"]
                if event in ("case-start", "written"):
                    (sent if event == "case-start" else written).append(time.monotonic())


    threads = [threading.Thread(target=follow, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread, run in zip(threads, runs):
        thread.join()
        if run.wait() != 0:
            raise SystemExit(f"{' '.join(run.args)} failed (exit {run.returncode})")
    return time.monotonic() - started, sorted(sent), sorted(written)


def run_local(cohorts: list[Path], outs: list[Path]) -> dict:
    """Control without Ray: one local batch process per cohort, all at once (one torch thread each)."""
    wall, sent, written = timed_runs([batch_command(c, o) for c, o in zip(cohorts, outs)])
    seconds = [json.loads(p.read_text())["seconds"] for o in outs for p in o.glob("*.json")]
    steady = written[-1] - sent[0]
    return {"local_processes": len(cohorts), "cases": len(written), "wall_s": round(wall, 2),
            "cases_per_min_steady": round(len(written) / steady * 60, 2),
            "segment_s_mean": round(statistics.mean(seconds), 2)}


def run_batch(cohort: Path, out: Path, address: str, workers: int) -> dict:
    """One cluster run; the times of its progress events as they arrive."""
    wall, sent, written = timed_runs([batch_command(cohort, out, "--cluster", address, "--cpus-per-worker", "1",
                                                    "--workers", str(workers))])
    seconds = [json.loads(p.read_text())["seconds"] for p in out.glob("*.json")]
    steady = written[-1] - sent[0]
    return {"workers": workers, "cases": len(written), "wall_s": round(wall, 2),
            "steady_s": round(steady, 2), "cases_per_min_steady": round(len(written) / steady * 60, 2),
            "cases_per_min_wall": round(len(written) / wall * 60, 2),
            "segment_s_mean": round(statistics.mean(seconds), 2),
            # what a case costs a worker beyond segment_case: the round trip, reading, and waiting for the driver
            "per_case_beyond_segment_s": round(steady * workers / len(written) - statistics.mean(seconds), 2)}


class Echo:
    """A worker that does nothing: its calls measure what Ray adds (scheduling, serialisation, transfer)."""

    def nothing(self) -> None:
        return None

    def round_trip(self, payload, shape):
        assert payload.size > 0
        return {"labels": np.zeros(shape, np.uint8), "geometry": ((1, 1, 1),) * 4, "statistics": {},
                "provenance": {}}


def engine_overhead(address: str, repeats: int = 15) -> dict:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        echo = ray.remote(num_cpus=1)(Echo).remote()
        ray.get(echo.nothing.remote())  # started
        case = plan_cases(assign_case_ids([(REAL_CASE, *discover_case_files(REAL_CASE))]), {"members": []},
                          Path(tempfile.mkdtemp()))[0][0]
        payload = read_payload(case)
        shape = tuple(reversed(sitk.ReadImage(str(next(iter(case.spec.files.values())))).GetSize()))
        empty, full = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            ray.get(echo.nothing.remote())
            empty.append(time.perf_counter() - start)
            start = time.perf_counter()
            ray.get(echo.round_trip.remote(payload, shape))
            full.append(time.perf_counter() - start)
        return {"call_without_data_ms": round(statistics.median(empty) * 1000, 1),
                "case_round_trip_ms": round(statistics.median(full) * 1000, 1),
                "case_bytes_mb": round(payload.size / 1e6, 1),
                "labels_bytes_mb": round(int(np.prod(shape)) / 1e6, 1)}
    finally:
        ray.shutdown()


def driver_per_case(repeats: int = 5) -> dict:
    """What the driver does for each case of a real BraTS case's size: read and check its files; write its result
    (label map gzip-compressed and read back, the JSON, the commit record's hashes); and, for comparison, what a
    worker adds to local batch's own reading (writing the bytes into a temporary folder first)."""
    files = discover_case_files(REAL_CASE)[1]
    inputs = input_fingerprint(files)
    case = plan_cases(assign_case_ids([(REAL_CASE, *discover_case_files(REAL_CASE))]), {"members": []},
                      Path(tempfile.mkdtemp()))[0][0]
    assert case.fingerprint["inputs"] == inputs
    image = read_case_folder(REAL_CASE)
    t2f = sitk.GetArrayFromImage(image.images["t2f"])
    labels = np.zeros(t2f.shape, np.uint8)  # tumour-like blobs: the brightest voxels of the FLAIR in three classes
    threshold = np.percentile(t2f[t2f > 0], [97, 98.5, 99.5])
    for label, low in enumerate(threshold, start=1):
        labels[t2f > low] = (2, 1, 3)[label - 1]
    read, write, worker_read, local_read = [], [], [], []
    worker = CaseWorker.__new__(CaseWorker)
    for _ in range(repeats):
        start = time.perf_counter()
        payload = read_payload(case)
        read.append(time.perf_counter() - start)
        out = Path(tempfile.mkdtemp())
        result = Result(case.case_id, labels, image.reference, {"WT": {"voxels": 1, "volume_ml": 1.0, "lesions": 1}},
                        {"fingerprint": case.fingerprint}, dict.fromkeys(("disagreement", "entropy")))
        start = time.perf_counter()
        write_result(result, out)
        write.append(time.perf_counter() - start)
        shutil.rmtree(out)
        start = time.perf_counter()
        worker._read(payload)
        worker_read.append(time.perf_counter() - start)
        start = time.perf_counter()
        read_case_folder(REAL_CASE)
        local_read.append(time.perf_counter() - start)
    return {"driver_read_and_check_s": round(statistics.median(read), 3),
            "driver_write_result_s": round(statistics.median(write), 3),
            "worker_read_from_bytes_s": round(statistics.median(worker_read), 3),
            "local_read_case_folder_s": round(statistics.median(local_read), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs; the order alternates (1 2, 2 1, …)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    report: dict = {"load_before": load(), "cpus": os.cpu_count()}
    temp = tempfile.mkdtemp(prefix="bre-bench-")
    cluster = start_cluster(temp)
    try:
        cohort = Path(temp) / "cohort"
        halves = [Path(temp) / "half-1", Path(temp) / "half-2"]
        for index in range(args.cases):
            make_phantom(9300 + index, shape=SHAPE).write(cohort)
            shutil.copytree(cohort / f"Phantom-{9300 + index:05d}", halves[index % 2] / f"Phantom-{9300 + index:05d}")
        runs, controls = [], []
        for round_ in range(args.rounds):
            for workers in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                out = Path(temp) / f"out-{round_}-{workers}"
                runs.append(run_batch(cohort, out, cluster.address, workers))
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(out)
                outs = [Path(temp) / f"local-{round_}-{workers}-{i}" for i in range(workers)]
                controls.append(run_local([cohort] if workers == 1 else halves, outs))
                print(json.dumps(controls[-1]), flush=True)
                for out in outs:
                    shutil.rmtree(out)
        report["runs"], report["controls_without_ray"] = runs, controls
        one = [r["cases_per_min_steady"] for r in runs if r["workers"] == 1]
        two = [r["cases_per_min_steady"] for r in runs if r["workers"] == 2]
        report["cases_per_min_steady"] = {"1": round(statistics.mean(one), 2), "2": round(statistics.mean(two), 2)}
        report["ratio_2_to_1_steady"] = round(statistics.mean(two) / statistics.mean(one), 2)
        report["control_ratio_2_to_1_steady"] = round(
            statistics.mean(r["cases_per_min_steady"] for r in controls if r["local_processes"] == 2)
            / statistics.mean(r["cases_per_min_steady"] for r in controls if r["local_processes"] == 1), 2)
        report["ratio_2_to_1_wall"] = round(
            statistics.mean(r["cases_per_min_wall"] for r in runs if r["workers"] == 2)
            / statistics.mean(r["cases_per_min_wall"] for r in runs if r["workers"] == 1), 2)
        if REAL_CASE.is_dir():
            report["engine"] = engine_overhead(cluster.address)
            report["driver"] = driver_per_case()
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    report["load_after"] = load()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
