"""Cohorts and results on disk (issue 19, docs/batch.md): every row through the real ``brats-ensemble`` command
line as a subprocess, on real files, with the shipped nnU-Net v2 demo model (trained here, fast on tiny phantoms).

Rows: two patients exported with the same nnU-Net file names; copies of one case and a clash of ids; a resume
after a changed option or a changed image; a run killed (SIGKILL) between the label-map rename and the JSON rename;
a user's label map under a case's name; two ``batch`` processes on one output folder; the output folder inside the
cohort folder; unrelated and broken JSON files in the output folder.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_runs import cli, cli_command, events
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.results import TEST_STOP_AFTER_ENV

ROOT = Path(__file__).resolve().parents[1]
DEMO_NNUNET = ROOT / "BraTSEnsembleLib" / "demo" / "models" / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"
MODEL = ("-m", str(DEMO_NNUNET), "--no-mirroring", "--device", "cpu")
SHAPE = (40, 44, 40)  # tiny phantoms: a few seconds per case
SEEDS = (9111, 9112, 9113, 9114)  # never used for training


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def csv_cases(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return [row["case_id"] for row in csv.DictReader(handle)]


def no_traceback(run: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny phantom cases in BraTS 2023 naming, one folder each (``Phantom-09111`` …)."""
    folder = tmp_path_factory.mktemp("phantoms")
    for seed in SEEDS:
        make_phantom(seed, shape=SHAPE).write(folder)
    return folder


def cohort_of(phantoms: Path, target: Path, *names: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(phantoms / name, target / name)
    return target


# ================================================================================================================
# Case identity


def test_two_patients_with_nnunet_file_names_get_their_folder_names_and_resume_inside_the_cohort(tmp_path):
    """Lost patient: two patients exported as img_0000.nii.gz … in two folders; before, one result for both.
    The output folder lies inside the cohort folder (before: every resume failed on it)."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for folder, seed in (("patient-1", 9121), ("patient-2", 9122)):
        make_phantom(seed, shape=SHAPE, case_id="img").write(tmp_path / "export" / folder, naming="nnunet")
        shutil.move(tmp_path / "export" / folder / "img", cohort / folder)
    out = cohort / "results"
    options = ("--channel-names", "t1n,t1c,t2w,t2f", "--progress", "json")
    first = cli("batch", cohort, "-o", out, *MODEL, *options)
    assert first.returncode == 0, first.stderr[-3000:]
    assert events(first.stdout)[-1]["message"] == "2/2 case(s) done"
    assert not (out / "img.json").exists()
    for folder in ("patient-1", "patient-2"):
        result = json.loads((out / f"{folder}.json").read_text())
        assert result["case_id"] == folder and result["case_id_from"] == "folder name"
        assert result["case_folder"] == str((cohort / folder).resolve())
        assert result["fingerprint"]["inputs"]["t1c"] == sha256(cohort / folder / "img_0001.nii.gz")
    assert not np.array_equal(labels_of(out / "patient-1.nii.gz"), labels_of(out / "patient-2.nii.gz"))
    assert sorted(csv_cases(out / "statistics.csv")) == ["patient-1", "patient-2"]

    again = cli("batch", cohort, "-o", out, *MODEL, *options)
    assert again.returncode == 0, again.stderr[-3000:]
    kinds = collections.Counter(e["event"] for e in events(again.stdout))
    assert kinds["case-skipped"] == 2 and kinds["written"] == 0 and kinds["error"] == 0


def test_copies_of_one_case_are_both_segmented_and_a_clash_of_names_is_refused(tmp_path, phantoms):
    cohort = tmp_path / "cohort"
    for copy in ("copy-a", "copy-b"):
        shutil.copytree(phantoms / "Phantom-09111", cohort / copy)
    out = tmp_path / "out"
    done = cli("batch", cohort, "-o", out, *MODEL, "--progress", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(labels_of(out / "copy-a.nii.gz"), labels_of(out / "copy-b.nii.gz"))
    assert not (out / "Phantom-09111.json").exists()
    assert sorted(csv_cases(out / "statistics.csv")) == ["copy-a", "copy-b"]

    # A third folder whose files are named copy-a-t1n.nii.gz …: it and the folder copy-a would write copy-a.*
    clash = cohort / "zz-other"
    clash.mkdir()
    for path in (phantoms / "Phantom-09112").iterdir():
        shutil.copy(path, clash / path.name.replace("Phantom-09112", "copy-a"))
    out2 = tmp_path / "out2"
    refused = cli("batch", cohort, "-o", out2, *MODEL, "--progress", "none")
    assert refused.returncode == 1
    no_traceback(refused)
    assert f"error: {cohort / 'copy-a'} and {clash}: both would be written as copy-a.nii.gz" in refused.stderr
    assert not out2.exists()


def test_an_output_folder_inside_a_case_folder_is_refused(tmp_path, phantoms):
    """Excluded from the cases, that case would silently not be segmented."""
    cohort = cohort_of(phantoms, tmp_path / "cohort", "Phantom-09111", "Phantom-09112")
    out = cohort / "Phantom-09112" / "results"
    refused = cli("batch", cohort, "-o", out, *MODEL, "--progress", "none")
    assert refused.returncode == 1
    no_traceback(refused)
    assert f"error: {out}: the output folder is inside the case folder {cohort / 'Phantom-09112'}" in refused.stderr
    assert not out.exists()


# ================================================================================================================
# Resume by fingerprint


def test_a_resume_with_another_option_is_refused_until_overwrite(tmp_path, phantoms):
    """Stale resume: before, a rerun with other options said 'done' and kept the old labels."""
    cohort = cohort_of(phantoms, tmp_path / "cohort", "Phantom-09113")
    out = tmp_path / "out"
    first = cli("batch", cohort, "-o", out, *MODEL, "--progress", "none")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: sha256(p) for p in out.iterdir() if p.is_file()}

    stale = cli("batch", cohort, "-o", out, *MODEL, "--tile-step", "0.75", "--progress", "none")
    assert stale.returncode == 1
    no_traceback(stale)
    error = next(line for line in stale.stderr.splitlines() if line.startswith("error: "))
    assert f"{out / 'Phantom-09113.json'}: case Phantom-09113" in error
    assert "member 1 tile_step_size: 0.5 → 0.75" in error and "--overwrite" in error
    assert {p.name: sha256(p) for p in out.iterdir() if p.is_file()} == before

    redone = cli("batch", cohort, "-o", out, *MODEL, "--tile-step", "0.75", "--overwrite", "--progress", "none")
    assert redone.returncode == 0, redone.stderr[-3000:]
    result = json.loads((out / "Phantom-09113.json").read_text())
    assert result["fingerprint"]["models"]["members"][0]["tile_step_size"] == 0.75
    assert result["members"][0]["tile_step_size"] == 0.75


def test_predict_skips_the_same_case_and_refuses_another_patient_under_its_name(tmp_path, phantoms):
    case_dir = phantoms / "Phantom-09114"
    out = tmp_path / "out"
    first = cli("predict", case_dir, "-o", out, *MODEL, "--progress", "none")
    assert first.returncode == 0, first.stderr[-3000:]
    labels = sha256(out / "Phantom-09114.nii.gz")

    same = cli("predict", case_dir, "-o", out, *MODEL, "--progress", "json")
    assert same.returncode == 0, same.stderr[-3000:]
    assert [e["event"] for e in events(same.stdout)] == ["case-skipped", "finished"]

    other = make_phantom(9123, shape=SHAPE, case_id="Phantom-09114").write(tmp_path / "other")
    refused = cli("predict", other, "-o", out, *MODEL, "--progress", "none")
    assert refused.returncode == 1
    no_traceback(refused)
    assert "input image(s) t1c, t1n, t2f, t2w: other content (another patient" in refused.stderr
    assert "--overwrite" in refused.stderr and str(other) in refused.stderr
    assert sha256(out / "Phantom-09114.nii.gz") == labels


# ================================================================================================================
# Crash-safe completion


def test_a_run_killed_between_the_label_map_and_the_json_is_completed_by_the_next(tmp_path, phantoms):
    """Crash at the wrong moment: SIGKILL right after the label map got its name, before the JSON got its own.
    Before: every later run said 'exists already'; the hidden partial JSON was counted in statistics.csv."""
    cohort = cohort_of(phantoms, tmp_path / "cohort", "Phantom-09111", "Phantom-09112")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes\n")
    env = {**os.environ, TEST_STOP_AFTER_ENV: "Phantom-09111.nii.gz"}
    process = subprocess.Popen(cli_command("batch", cohort, "-o", out, *MODEL, "--progress", "none"), cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)  # the process stops itself at the rename
        assert os.WIFSTOPPED(status), "the run ended before it reached the rename"
    finally:
        process.kill()
        process.wait()
    assert (out / "Phantom-09111.nii.gz").is_file() and not (out / "Phantom-09111.json").exists()
    assert list(out.glob(".Phantom-09111.json.*.partial.json")), "the staged JSON should be left by the kill"
    assert (out / ".brats-ensemble" / "Phantom-09111.lock").is_file(), "the dead process's lock should be left"

    resumed = cli("batch", cohort, "-o", out, *MODEL, "--progress", "json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    written = [e["case"] for e in events(resumed.stdout) if e["event"] == "written"]
    assert written == ["Phantom-09111", "Phantom-09112"]
    for case_id in ("Phantom-09111", "Phantom-09112"):
        result = json.loads((out / f"{case_id}.json").read_text())
        assert result["labels_file"] == f"{case_id}.nii.gz"
    assert csv_cases(out / "statistics.csv") == ["Phantom-09111", "Phantom-09112"]
    assert not [p for p in out.rglob("*") if ".partial" in p.name or p.suffix == ".lock"]
    assert (out / "notes.txt").read_text() == "the user's notes\n"


def test_a_users_label_map_under_a_cases_name_is_not_replaced_unasked(tmp_path, phantoms):
    cohort = cohort_of(phantoms, tmp_path / "cohort", "Phantom-09111", "Phantom-09112")
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "Phantom-09112.nii.gz"
    theirs.write_bytes(b"the user's own label map\n")
    refused = cli("batch", cohort, "-o", out, *MODEL, "--progress", "none")
    assert refused.returncode == 1
    no_traceback(refused)
    assert f"error: {theirs}: exists, but Phantom-09112.json does not" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Phantom-09112.nii.gz"]  # before any work: nothing computed
    assert theirs.read_bytes() == b"the user's own label map\n"


# ================================================================================================================
# Concurrent runs


def test_two_batches_on_one_output_folder_share_the_work(tmp_path, phantoms):
    """Two batch processes at once: every case computed once, none reported as failed, both exit 0. The first is
    held (stopped by the test hook) in the middle of its first case until the second waits for that case, so that
    the two really overlap."""
    names = [f"Phantom-{seed:05d}" for seed in SEEDS]
    cohort = cohort_of(phantoms, tmp_path / "cohort", *names)
    out = tmp_path / "out"
    command = cli_command("batch", cohort, "-o", out, *MODEL, "--progress", "json")
    first = subprocess.Popen(command, cwd=ROOT, env={**os.environ, TEST_STOP_AFTER_ENV: f"{names[0]}.nii.gz"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run ended before it reached the rename"
        second = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second_lines = []
        for line in second.stdout:  # until the second waits for the case the first holds
            second_lines.append(line)
            if json.loads(line)["event"] == "case-waiting":
                break
        os.kill(first.pid, signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=600)
        second_out, second_err = second.communicate(timeout=600)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    second_out = "".join(second_lines) + second_out
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    first_events, second_events = events(first_out), events(second_out)
    assert not [e for e in first_events + second_events if e["event"] == "error"]
    assert [e["case"] for e in second_events if e["event"] == "case-waiting"][0] == names[0]
    written = collections.Counter(e["case"] for e in first_events + second_events if e["event"] == "written")
    assert written == collections.Counter(names), written  # every case exactly once
    assert second_events[-1]["message"] == first_events[-1]["message"] == "4/4 case(s) done"
    for run_events in (first_events, second_events):  # each run reports every case: written, or done by the other
        reported = {e["case"] for e in run_events if e["event"] in ("written", "case-skipped")}
        assert reported == set(names)
    assert sorted(csv_cases(out / "statistics.csv")) == names
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.partial*"))


# ================================================================================================================
# The cohort table


def test_unrelated_and_broken_json_files_do_not_break_statistics(tmp_path, phantoms):
    cohort = cohort_of(phantoms, tmp_path / "cohort", "Phantom-09113")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.json").write_text("{broken")
    (out / "config.json").write_text(json.dumps({"threshold": 3}))
    (out / ".Other-1.json.abcd1234.partial.json").write_text(json.dumps({"case_id": "Other-1", "regions": {}}))
    user_files = {p.name: sha256(p) for p in out.iterdir()}
    done = cli("batch", cohort, "-o", out, *MODEL, "--progress", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    no_traceback(done)
    assert csv_cases(out / "statistics.csv") == ["Phantom-09113"]
    assert "note: statistics.csv leaves out 2 JSON file(s)" in done.stderr
    assert "config.json (not a result of brats-ensemble)" in done.stderr and "notes.json (not readable" in done.stderr
    assert {name: sha256(out / name) for name in user_files} == user_files
