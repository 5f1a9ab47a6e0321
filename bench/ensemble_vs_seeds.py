"""nnU-Net's own way of ensembling vs ``brats-ensemble predict``, interleaved in one run; writes bench/RESULTS.md.

The seeds' way: one ``nnUNetv2_predict_from_modelfolder --save_probabilities`` process per member (each writes its
probabilities as a compressed ``.npz``), then ``nnUNetv2_ensemble`` (nnU-Net's defaults for processes; N = 1 is a
single predict without probabilities, what a user runs for one model). The project's way: one
``brats-ensemble predict`` process with the same members, fold 0, ``--postprocess none`` (nnU-Net's ensemble does
not postprocess), mirroring on in both (nnU-Net's default), CPU. For every N the two ways run one after the other,
their order alternating from one N to the next (the machine is shared: read the ratios, not the seconds).

Measured per run: wall time; peak memory of the whole process tree (the child and its descendants, sampled from
/proc every 0.2 s: the sum of RSS, and the sum of PSS, which counts pages shared by forked workers once); and the
share of voxels where the two ways' labels agree. Also printed: the per-stage ``timing`` of the project's run with
the most members (from its JSON; see docs/command-line.md).

The members are genuine nnU-Net v2 results folders of two architectures (plain U-Net and Residual Encoder M),
planned by nnU-Net's planners on phantoms of ``--shape`` and initialised, not trained, by nnU-Net's trainer
(bench/nnunet_members.py): random weights suffice for timing and for agreement between two ways of running the same
members. Usage (a few minutes at this size; the issue's size is ``--shape 240,240,155 --members 1,3,7``)::

    .venv/bin/python bench/ensemble_vs_seeds.py --shape 64,72,64 --members 1,3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
CASE_SEED = 4242  # the case segmented: a phantom seed that the planner's dataset does not use


@dataclass
class Run:
    way: str
    members: int
    seconds: float
    peak_rss_gib: float
    peak_pss_gib: float
    labels: np.ndarray


# -- memory of a process tree ------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The children of ``pid``; none when it has gone (processes end while the tree is walked)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB from /proc/PID/smaps_rollup; (0, 0) when it has gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


class TreeMemory:
    """Samples the memory of a process and its descendants until stopped; keeps the peaks of the sums."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            sums = [sum(v) for v in zip(*(_memory_kib(p) for p in _tree(self.pid)))] or [0, 0]
            self.peak_rss, self.peak_pss = max(self.peak_rss, sums[0]), max(self.peak_pss, sums[1])
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(commands: Sequence[Sequence[str]], env: dict[str, str]) -> tuple[float, int, int]:
    """Run commands one after the other; (wall seconds, peak RSS KiB, peak PSS KiB) over all of them."""
    started = time.perf_counter()
    peak_rss = peak_pss = 0
    for command in commands:
        process = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        memory = TreeMemory(process.pid)
        out, err = process.communicate()
        memory.stop()
        if process.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({process.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        peak_rss, peak_pss = max(peak_rss, memory.peak_rss), max(peak_pss, memory.peak_pss)
    return time.perf_counter() - started, peak_rss, peak_pss


# -- the two ways ------------------------------------------------------------------------------------------------


def read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def seeds_way(members: list[Path], nn_in: Path, out: Path, case_id: str, env: dict[str, str]) -> Run:
    predict = [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(nn_in), "-f", "0", "-device", "cpu"]
    if len(members) == 1:
        commands = [[*predict, "-o", str(out / "m0"), "-m", str(members[0])]]
        result = out / "m0" / f"{case_id}.nii.gz"
    else:
        commands = [[*predict, "-o", str(out / f"m{k}"), "-m", str(m), "--save_probabilities"]
                    for k, m in enumerate(members)]
        commands.append([str(BIN / "nnUNetv2_ensemble"), "-i", *(str(out / f"m{k}") for k in range(len(members))),
                         "-o", str(out / "ensemble")])
        result = out / "ensemble" / f"{case_id}.nii.gz"
    seconds, rss, pss = run_measured(commands, env)
    return Run("nnU-Net (seeds' way)", len(members), seconds, rss / 2**20, pss / 2**20, read_labels(result))


def project_way(members: list[Path], case_dir: Path, out: Path, case_id: str, env: dict[str, str]) -> tuple[Run, dict]:
    command = [str(BIN / "brats-ensemble"), "predict", str(case_dir), "-o", str(out), "--folds", "0",
               "--device", "cpu", "--postprocess", "none", "--progress", "none"]
    for member in members:
        command += ["-m", str(member)]
    seconds, rss, pss = run_measured([command], env)
    summary = json.loads((out / f"{case_id}.json").read_text())
    return (Run("brats-ensemble predict", len(members), seconds, rss / 2**20, pss / 2**20,
                read_labels(out / f"{case_id}.nii.gz")), summary)


# -- setting up --------------------------------------------------------------------------------------------------


def build_members(work: Path, shape_zyx: tuple[int, ...], count: int, env: dict[str, str]) -> list[Path]:
    done = subprocess.run([sys.executable, str(HERE / "nnunet_members.py"), "--work", str(work / "nnunet"),
                           "--shape", ",".join(map(str, shape_zyx)), "--count", str(count)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the members failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return [Path(line) for line in done.stdout.strip().splitlines()[-count:]]


def write_case(work: Path, shape_zyx: tuple[int, ...]) -> tuple[Path, Path, str]:
    """The phantom case in BraTS naming (for brats-ensemble) and in nnU-Net naming (t1n, t1c, t2w, t2f as
    channels 0–3, the members' dataset.json order)."""
    from BraTSEnsembleLib.demo.phantom import ROLES, make_phantom

    phantom = make_phantom(CASE_SEED, shape=tuple(shape_zyx))  # type: ignore[arg-type]
    cases = work / "case"
    phantom.write(cases)
    case_dir = cases / phantom.case_id
    nn_in = work / "nnunet_input"
    nn_in.mkdir(parents=True, exist_ok=True)
    for channel, role in enumerate(ROLES):
        shutil.copy(case_dir / f"{phantom.case_id}-{role}.nii.gz", nn_in / f"{phantom.case_id}_{channel:04d}.nii.gz")
    return case_dir, nn_in, phantom.case_id


# -- report ------------------------------------------------------------------------------------------------------


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0.0)
    import torch

    return (f"{platform.node()}: {model}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def table(runs: list[tuple[Run, Run]]) -> list[str]:
    lines = ["| N | seeds' way s | project s | speed-up | seeds' peak RSS / PSS GiB | project peak RSS / PSS GiB "
             "| labels agree |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for seeds, ours in runs:
        agree = float(np.mean(seeds.labels == ours.labels)) if seeds.labels.shape == ours.labels.shape else 0.0
        lines.append(f"| {seeds.members} | {seeds.seconds:.1f} | {ours.seconds:.1f} | "
                     f"{seeds.seconds / ours.seconds:.2f}× | {seeds.peak_rss_gib:.2f} / {seeds.peak_pss_gib:.2f} | "
                     f"{ours.peak_rss_gib:.2f} / {ours.peak_pss_gib:.2f} | {agree:.4%} |")
    return lines


def profile(summary: dict) -> list[str]:
    timing = summary["timing"]
    stages = timing["stages"]
    lines = [f"`seconds` of the case: {summary['seconds']}", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {name} | {'—' if value is None else f'{value:.3f}'} |" for name, value in stages.items()]
    lines += ["", "| member | s | loading | preprocessing | network | export | other |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m in timing["members"]:
        lines.append(f"| {m['member']} | {m['seconds']:.3f} | " + " | ".join(
            f"{m.get(k, 0.0):.3f}" for k in ("loading", "preprocessing", "network", "export", "other")) + " |")
    return lines


FULL_SHAPE_ZYX = (155, 240, 240)
FULL_COMMAND = "python bench/ensemble_vs_seeds.py --shape 240,240,155 --members 1,3,7"


def targets_section(shape_zyx: tuple[int, ...], sizes: list[int]) -> list[str]:
    """The issue's targets, stated as measured by this run only when it ran at their size."""
    full = tuple(shape_zyx) == FULL_SHAPE_ZYX and {1, 3, 7} <= set(sizes)
    lines = ["## Targets (issue 15)", "",
             "- N = 3 at least 1.5× and N = 7 at least 1.8× faster than the seeds' way, labels identical",
             "- peak RSS at N = 7 at most 1.3× that at N = 1",
             "- postprocessing + statistics of one 240×240×155 case under 1 s", ""]
    if full:
        return lines + ["Read them off the table and the profile above.", ""]
    return lines + ["**Not yet measured**: this run was not at the issue's size, so it says nothing about the "
                    "targets. The full-size measurement is", "", f"    {FULL_COMMAND}", ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,3,7", help="ensemble sizes N, comma-separated")
    parser.add_argument("--shape", default="240,240,155", help="case size x,y,z in 1 mm voxels (BraTS: 240,240,155)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.members.split(",")]
    shape_zyx = tuple(reversed([int(v) for v in args.shape.split(",")]))
    command = "python bench/ensemble_vs_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env[var] = str(work / "nnunet" / sub)  # nnU-Net's commands want them set; nothing is read from them
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = load_average()
    try:
        print(f"building {max(sizes)} member(s) and the case in {work} …", flush=True)
        members = build_members(work, shape_zyx, max(sizes), env)
        case_dir, nn_in, case_id = write_case(work, shape_zyx)
        runs: list[tuple[Run, Run]] = []
        last_summary: dict = {}
        for index, n in enumerate(sizes):
            chosen = members[:n]
            seeds_out, ours_out = work / f"seeds-{n}", work / f"ours-{n}"
            order = ("seeds", "ours") if index % 2 == 0 else ("ours", "seeds")
            done: dict[str, Run] = {}
            for way in order:
                print(f"N = {n}: {way} …", flush=True)
                if way == "seeds":
                    done[way] = seeds_way(chosen, nn_in, seeds_out, case_id, env)
                else:
                    done[way], last_summary = project_way(chosen, case_dir, ours_out, case_id, env)
            runs.append((done["seeds"], done["ours"]))
            print("\n".join(table(runs)[-1:]), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()
    rows, stages = table(runs), profile(last_summary)
    print("\n".join(rows))
    print(f"\nper-stage profile of brats-ensemble predict, N = {sizes[-1]}:")
    print("\n".join(stages))
    report = [
        "# Ensemble: brats-ensemble predict vs nnU-Net's own commands", "",
        f"- command: `{command}`",
        f"- date: {started_at}",
        f"- machine: {machine()}",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- case: one phantom (BraTSEnsembleLib.demo.phantom, seed {CASE_SEED}) of "
        f"{'×'.join(map(str, reversed(shape_zyx)))} voxels (x×y×z), 1 mm",
        "- members: genuine nnU-Net v2 results folders (plain U-Net and Residual Encoder M alternating), planned by "
        "nnU-Net's planners and randomly initialised by its trainer (bench/nnunet_members.py): the timings and the "
        "agreement between the two ways are meaningful, the labels themselves are not", "",
        *rows, "",
        f"## Per-stage profile (brats-ensemble predict, N = {sizes[-1]}, from the JSON's `timing`)", "",
        *stages, "",
        *targets_section(shape_zyx, sizes),
    ]
    args.results.write_text("\n".join(report))
    print(f"\nwritten: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
