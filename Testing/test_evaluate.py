"""``brats-ensemble evaluate`` through the real command line (a subprocess on real files): the layouts it finds,
what it refuses (and how briefly), the official task list, missing predictions, and the documented rules of the
brats2025 quantities. Every expected number is derived by hand in the test's docstring.

Label maps are written with SimpleITK from (z, y, x) arrays; "cube [a:b, c:d, e:f]" means array[a:b, c:d, e:f].
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.demo.phantom import make_phantom

ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "evaluate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def boxes(shape, *items) -> np.ndarray:
    """Label map with ``(label, z0, z1, y0, y1, x0, x1)`` boxes written in order."""
    out = np.zeros(shape, dtype=np.uint8)
    for label, z0, z1, y0, y1, x0, x1 in items:
        out[z0:z1, y0:y1, x0:x1] = label
    return out


def rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (out / "per_case.csv").open() as handle:
        return {(r["case"], r["region"]): r for r in csv.DictReader(handle)}


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


CUBE = boxes((12, 12, 12), (3, 4, 8, 4, 8, 4, 8))


# ================================================================================================================
# Layouts


def test_flat_and_case_folder_layouts_images_and_uncertainty_maps_ignored(tmp_path):
    """Ground truth in every layout at once: a BraTS 2023 case folder (images + ``-seg``), a BraTS 2020/21 case
    folder (images + ``_seg``), flat ``-seg``, flat ``_seg`` as uncompressed ``.nii``, flat ``<id>.nii.gz``, and a
    case folder with images only (no ground truth: it is not a case). Predictions: flat ``<id>.nii.gz`` with this
    tool's ``_disagreement``/``_entropy`` maps beside them, a case folder ``<id>/<id>.nii.gz`` and a ``-seg``-named
    file.

    Were an image taken as ground truth, its case would have two ground truths (refused) or intensity values
    (refused); were an uncertainty map taken as a prediction, it would lack ground truth (refused). So exit 0 with
    exactly the five cases shows each file was read as what it is. Every prediction equals its ground truth but
    in case 3, whose ET is relabelled SNFH: ET lesion-wise Dice 0 there (its lesions are missed), 1 elsewhere; WT 1
    everywhere (the whole tumour is unchanged).
    """
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    shape = (40, 44, 40)
    p1 = make_phantom(11, shape=shape, case_id="BraTS-GLI-00001-000")
    p1.write(gt, naming="brats2023", with_labels=True)
    p2 = make_phantom(12, shape=shape, case_id="BraTS2021_00002")
    p2.write(gt, naming="brats2021", with_labels=True)
    make_phantom(16, shape=shape, case_id="BraTS-GLI-00006-000").write(gt, naming="brats2023")  # images only
    p3, p4, p5 = (make_phantom(seed, shape=shape) for seed in (13, 14, 15))

    def put(path: Path, phantom, array: np.ndarray) -> None:  # on the phantom's grid, as a prediction would be
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom.to_sitk(array), str(path))

    put(gt / "BraTS-GLI-00003-000-seg.nii.gz", p3, p3.labels)
    put(gt / "BraTS2021_00004_seg.nii", p4, p4.labels)
    put(gt / "case5.nii.gz", p5, p5.labels)

    put(pred / "BraTS-GLI-00001-000.nii.gz", p1, p1.labels)
    for kind in ("disagreement", "entropy"):
        put(pred / f"BraTS-GLI-00001-000_{kind}.nii.gz", p1, np.full(shape, 0.25, dtype=np.float32))
    put(pred / "BraTS2021_00002" / "BraTS2021_00002.nii.gz", p2, p2.labels)
    no_et = p3.labels.copy()
    no_et[no_et == 3] = 2
    put(pred / "BraTS-GLI-00003-000.nii.gz", p3, no_et)
    put(pred / "BraTS2021_00004.nii.gz", p4, p4.labels)
    put(pred / "case5-seg.nii.gz", p5, p5.labels)

    done = evaluate(pred, gt, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    scores = rows(tmp_path / "out")
    cases = {"BraTS-GLI-00001-000", "BraTS2021_00002", "BraTS-GLI-00003-000", "BraTS2021_00004", "case5"}
    assert {case for case, _ in scores} == cases
    for case in cases:
        assert float(scores[(case, "WT")]["lesion_dice"]) == 1.0
        assert float(scores[(case, "ET")]["lesion_dice"]) == (0.0 if case == "BraTS-GLI-00003-000" else 1.0)
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["ignored"] == {"ground truth folder": {"image": 12}, "prediction folder": {"uncertainty map": 2}}
    assert "2 uncertainty map(s)" in done.stdout and "12 image(s)" in done.stdout


def test_ground_truth_and_predictions_in_one_folder(tmp_path):
    """One folder holding ``c1.nii.gz`` (prediction) and ``c1-seg.nii.gz`` (ground truth), as a user may keep them:
    the ``-seg`` file is the ground truth, the plain one the prediction — not two ground truths of one case."""
    folder = tmp_path / "both"
    write(folder / "c1-seg.nii.gz", CUBE)
    shifted = np.roll(CUBE, 2, axis=2)  # 4×4×4 cubes overlapping in 4×4×2 → Dice 2·32 / 128 = 0.5
    write(folder / "c1.nii.gz", shifted)
    done = evaluate(folder, folder, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(rows(tmp_path / "out")[("c1", "ET")]["legacy_dice"]) == 0.5


# ================================================================================================================
# Earlier results, refusals


def test_earlier_results_kept_unless_overwrite(tmp_path):
    """A second run into the same folder is refused naming the first table it would replace, and touches nothing;
    ``--overwrite`` replaces the evaluation, and removes box plots of regions the new protocol does not score
    (brats2024 adds NETC; a later brats2023 run must not leave boxplot_NETC.png behind). The user's own file in the
    folder stays."""
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    write(gt / "c1-seg.nii.gz", CUBE)
    write(pred / "c1.nii.gz", CUBE)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert evaluate(pred, gt, "-o", out).returncode == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    again = evaluate(pred, gt, "-o", out, "--protocol", "brats2024")
    assert again.returncode == 1
    assert error_line(again) == (f"error: {out / 'per_case.csv'}: exists already (an earlier evaluation). Pass "
                                 "--overwrite to replace the evaluation in that folder, or choose another output "
                                 "folder.")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert evaluate(pred, gt, "-o", out, "--protocol", "brats2024", "--overwrite").returncode == 0
    assert (out / "boxplot_NETC.png").is_file()
    assert json.loads((out / "summary.json").read_text())["protocol"] == "brats2024"
    assert evaluate(pred, gt, "-o", out, "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["boxplot_ET.png", "boxplot_TC.png", "boxplot_WT.png",
                                                     "notes.txt", "per_case.csv", "summary.csv", "summary.json"]
    assert (out / "notes.txt").read_text() == "mine"


def _intensity_image(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1-seg.nii.gz", CUBE)
    rng = np.random.default_rng(0)
    write(pred / "c1.nii.gz", rng.normal(500, 100, CUBE.shape), dtype=np.float32)  # an MRI, not a label map
    return [str(pred / "c1.nii.gz"), "label values [", "and 1723 other values", "export the labels again"]


def _two_ground_truths(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1-seg.nii.gz", CUBE)
    write(gt / "c1_seg.nii.gz", CUBE)
    write(pred / "c1.nii.gz", CUBE)
    return [str(gt / "c1-seg.nii.gz"), str(gt / "c1_seg.nii.gz"), "two label maps for case 'c1'", "Keep one"]


def _predictions_without_ground_truth(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1-seg.nii.gz", CUBE)
    for i in range(1, 9):
        write(pred / f"c{i}.nii.gz", CUBE)
    return [str(pred), "7 prediction(s) without ground truth", "c2, c3, c4, c5, c6 and 2 more", "paired by case id"]


def _two_label_maps_in_a_case_folder(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1" / "c1-seg.nii.gz", CUBE)
    write(gt / "c1" / "c1_seg.nii.gz", CUBE)
    write(pred / "c1.nii.gz", CUBE)
    return [str(gt / "c1"), "more than one ground truth label map (c1-seg.nii.gz, c1_seg.nii.gz)"]


def _only_images(gt: Path, pred: Path) -> list[str]:
    make_phantom(7, shape=(24, 28, 24), case_id="c1").write(gt)  # a cohort folder: images, no -seg
    write(pred / "c1.nii.gz", CUBE)
    return [str(gt), "no ground-truth label map found", "<id>/<id>-seg.nii.gz"]


def _only_uncertainty_maps(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1-seg.nii.gz", CUBE)
    write(pred / "c1_entropy.nii.gz", np.zeros(CUBE.shape), dtype=np.float32)
    return [str(pred), "no prediction found"]


def _brats2021_labels_asked_for_a_2023_map(gt: Path, pred: Path) -> list[str]:
    write(gt / "c1-seg.nii.gz", CUBE)  # 3 = ET: a BraTS 2023+ map, which has no 3 in the 2020/21 labels
    write(pred / "c1.nii.gz", CUBE)
    return [str(gt / "c1-seg.nii.gz"), "label values [3] are not BraTS 2020/21 labels",
            "Leave --labels brats2021 out"]


@pytest.mark.parametrize("make", [_intensity_image, _two_ground_truths, _predictions_without_ground_truth,
                                  _two_label_maps_in_a_case_folder, _only_images, _only_uncertainty_maps,
                                  _brats2021_labels_asked_for_a_2023_map],
                         ids=lambda f: f.__name__.strip("_"))
def test_refusals_are_one_short_line_naming_the_file_and_the_fix(tmp_path, make):
    """Each refusal: exit 1, one ``error:`` line of at most 600 characters naming the file(s) and the fix, nothing
    written. The intensity image (a 12³ float MRI: 1728 distinct values, none a label) shows the first five values
    and counts the other 1723 — the old message listed all of them (~6 KB for a real image)."""
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    gt.mkdir()
    pred.mkdir()
    expected = make(gt, pred)
    labels = ["--labels", "brats2021"] if make is _brats2021_labels_asked_for_a_2023_map else []
    done = evaluate(pred, gt, "-o", out, *labels)
    assert done.returncode == 1
    line = error_line(done)
    assert len(line) <= 600, line
    for text in expected:
        assert text in line, (text, line)
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--protocol", "brats2025", "--task", "GLIO"],
     "brats2025 has no task 'GLIO'; its tasks are GoAT, GLI, MET, PED, MenPre, MenRT."),
    (["--protocol", "brats2023", "--task", "GoAT"], "brats2023 has no task 'GoAT'; its tasks are GLI, SSA, MEN, PED, "
                                                    "MET."),
    (["--protocol", "brats2024", "--task", "PED"], "brats2024 is reproduced for task GLI only"),
    (["--protocol", "brats2025", "--task", "PED", "--labels", "brats2021"],
     "--labels brats2021 converts the glioma labels of BraTS 2020/21 (4 = ET); task PED has labels of its own"),
], ids=["brats2025-typo", "brats2023-GoAT", "brats2024-PED", "PED-brats2021-labels"])
def test_tasks_outside_the_official_list_are_refused(tmp_path, args, expected):
    """A task is one of the protocol's official tasks (a typo never falls back to another task's regions)."""
    write(tmp_path / "gt" / "c1-seg.nii.gz", CUBE)
    write(tmp_path / "pred" / "c1.nii.gz", CUBE)
    done = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "out", *args)
    assert done.returncode == 1
    assert expected in error_line(done)
    assert not (tmp_path / "out").exists()


# ================================================================================================================
# The official task list


def test_each_2025_task_scores_its_own_label_groups(tmp_path):
    """brats2025 PED (config_ped.yaml: 1 ET, 2 NETC, 3 CC, 4 ED; TC 1–3, WT 1–4) and MenRT (1 = GTV).

    PED ground truth: label 1 cube [2:6,2:6,2:6] (64 voxels) and label 4 cube [2:6,2:6,8:12] (64); the prediction
    has the label 4 cube only. ET (label 1): the GT lesion is unmatched → lesion DSC 0, F1 0, FN 1. ED (label 4):
    DSC 1, TP 1. WT (1–4): the cubes are 2 voxels apart, so the GT has two WT instances and the prediction one,
    matched to the ED cube → lesion DSC 1, FN 1, F1 1/(1 + ½) = 2/3; whole-region DSC 2·64 / (128 + 64) = 2/3.
    NETC and CC are empty in both → NaN.
    Under GoAT the same files are refused (4 is no GoAT label). MenRT: one label-1 cube, predicted exactly → GTV
    lesion DSC 1, the only region.
    """
    gt = boxes((8, 8, 14), (1, 2, 6, 2, 6, 2, 6), (4, 2, 6, 2, 6, 8, 12))
    pred = boxes((8, 8, 14), (4, 2, 6, 2, 6, 8, 12))
    write(tmp_path / "gt" / "p1-seg.nii.gz", gt)
    write(tmp_path / "pred" / "p1.nii.gz", pred)
    done = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "ped", "--protocol", "brats2025",
                    "--task", "ped")
    assert done.returncode == 0, done.stderr[-3000:]
    s = rows(tmp_path / "ped")
    assert sorted(region for _, region in s) == sorted(["ET", "NETC", "CC", "ED", "TC", "WT"])
    assert (float(s[("p1", "ET")]["lesion_dice"]), float(s[("p1", "ET")]["f1"]), s[("p1", "ET")]["fn"]) == (0, 0, "1")
    assert float(s[("p1", "ED")]["lesion_dice"]) == 1.0 and s[("p1", "ED")]["tp"] == "1"
    assert float(s[("p1", "WT")]["lesion_dice"]) == 1.0 and s[("p1", "WT")]["fn"] == "1"
    assert float(s[("p1", "WT")]["f1"]) == pytest.approx(2 / 3)
    assert float(s[("p1", "WT")]["legacy_dice"]) == pytest.approx(2 / 3)
    assert math.isnan(float(s[("p1", "NETC")]["lesion_dice"])) and math.isnan(float(s[("p1", "CC")]["f1"]))
    goat = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "goat", "--protocol", "brats2025",
                    "--task", "GoAT")
    assert goat.returncode == 1
    assert f"{tmp_path / 'gt' / 'p1-seg.nii.gz'}: label values [4] are not valid" in error_line(goat)

    write(tmp_path / "gt_rt" / "r1-seg.nii.gz", boxes((8, 8, 8), (1, 2, 6, 2, 6, 2, 6)))
    write(tmp_path / "pred_rt" / "r1.nii.gz", boxes((8, 8, 8), (1, 2, 6, 2, 6, 2, 6)))
    rt = evaluate(tmp_path / "pred_rt", tmp_path / "gt_rt", "-o", tmp_path / "rt", "--protocol", "brats2025",
                  "--task", "MenRT")
    assert rt.returncode == 0, rt.stderr[-3000:]
    assert list(rows(tmp_path / "rt")) == [("r1", "GTV")]
    assert float(rows(tmp_path / "rt")[("r1", "GTV")]["lesion_dice"]) == 1.0


def test_2025_met_follows_the_mets_parser(tmp_path):
    """brats2025 MET: brats-parse-metrics ``mets`` with brats-infra's thresholds (large ≥ 27 mm³, detected at
    DSC ≥ 0.2).

    GT: ET cube L [2:6,2:6,2:6] (64 mm³, large) and ET cube S [2:4,2:4,20:22] (8 mm³, small). Prediction: L exactly
    and a 3×3×3 false positive F [2:5,2:5,12:15]. Matching: L ↔ L (DSC 1); S and F unmatched.
    Lesion-wise means over the large lesions and the false positives: DSC (1 + 0)/2 = 0.5, HD95 (0 + 373)/2 = 186.5,
    NSD 0.5. Large: TP 1, FN 0, FP 1, F1 2/(2 + 1) = 2/3. Small: TP 0, FN 1, FP 1, F1 0. All instances: TP 1, FP 1,
    FN 1, F1 1/(1 + ½ + ½) = 0.5. RC is empty in both: lesion-wise NaN, no large or small lesion → NaN.
    """
    gt = boxes((8, 8, 24), (3, 2, 6, 2, 6, 2, 6), (3, 2, 4, 2, 4, 20, 22))
    pred = boxes((8, 8, 24), (3, 2, 6, 2, 6, 2, 6), (3, 2, 5, 2, 5, 12, 15))
    write(tmp_path / "gt" / "m1-seg.nii.gz", gt)
    write(tmp_path / "pred" / "m1.nii.gz", pred)
    done = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "out", "--protocol", "brats2025",
                    "--task", "MET")
    assert done.returncode == 0, done.stderr[-3000:]
    et = {k: float(v) for k, v in rows(tmp_path / "out")[("m1", "ET")].items() if k not in ("case", "region")}
    assert (et["lesion_dice"], et["lesion_hd95"], et["lesion_nsd_1"]) == (0.5, 186.5, 0.5)
    assert (et["large_tp"], et["large_fn"], et["large_fp"]) == (1, 0, 1)
    assert et["large_f1"] == pytest.approx(2 / 3)
    assert (et["small_tp"], et["small_fn"], et["small_fp"], et["small_f1"]) == (0, 1, 1, 0)
    assert (et["tp"], et["fp"], et["fn"], et["f1"]) == (1, 1, 1, 0.5)
    rc = rows(tmp_path / "out")[("m1", "RC")]
    assert all(math.isnan(float(rc[k])) for k in ("lesion_dice", "large_f1", "small_tp", "f1"))


# ================================================================================================================
# Missing predictions


def test_missing_prediction_scored_as_the_official_parser(tmp_path):
    """Two ground truths, one prediction. brats2025: brats-parse-metrics gives a missing subject HD95 373 and 0 for
    every other number (``_handle_missing_data``) — also for a region the ground truth lacks (here TC and ET: the
    GT is one SNFH cube), where an empty prediction would score NaN. The counts are the one documented departure:
    TP 0, FP 0, FN = the ground truth's lesions (WT: 1), not 0. brats2023 defines nothing for a missing file: it is
    scored as an empty prediction (WT: lesion Dice 0, HD95 374; ET: both empty → Dice 1, HD95 0).
    A warning on stderr names the case and the rule; summary.json lists it."""
    snfh = boxes((12, 12, 12), (2, 4, 8, 4, 8, 4, 8))
    write(tmp_path / "gt" / "c1-seg.nii.gz", snfh)
    write(tmp_path / "gt" / "c2-seg.nii.gz", snfh)
    write(tmp_path / "pred" / "c1.nii.gz", snfh)
    done = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "out25", "--protocol", "brats2025",
                    "--task", "GoAT")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: 1 case(s) have no prediction" in done.stderr and "c2" in done.stderr
    assert "HD95 373, every other score 0" in done.stderr
    s = rows(tmp_path / "out25")
    for region in ("WT", "TC", "ET"):
        row = s[("c2", region)]
        assert row["missing_prediction"] == "1"
        for metric in ("lesion_dice", "lesion_nsd_1", "f1", "legacy_dice", "legacy_nsd_1"):
            assert float(row[metric]) == 0.0, (region, metric)
        assert float(row["lesion_hd95"]) == 373.0 and float(row["legacy_hd95"]) == 373.0
        assert (row["tp"], row["fp"], row["fn"]) == ("0", "0", "1" if region == "WT" else "0")
    assert json.loads((tmp_path / "out25" / "summary.json").read_text())["missing"] == ["c2"]

    done = evaluate(tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "out23")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored as an empty prediction" in done.stderr
    s = rows(tmp_path / "out23")
    assert (float(s[("c2", "WT")]["lesion_dice"]), float(s[("c2", "WT")]["lesion_hd95"])) == (0.0, 374.0)
    assert (float(s[("c2", "ET")]["lesion_dice"]), float(s[("c2", "ET")]["lesion_hd95"])) == (1.0, 0.0)


# ================================================================================================================
# The brats2025 quantities: which equal brats-evaluation, which follow a documented rule


def test_2025_quantities_follow_their_documented_rules(tmp_path):
    """Three GoAT cases, each showing one documented rule (docs/evaluation.md):

    ``apart``: GT ET cube [4:8,4:8,4:8], predicted ET cube [4:8,4:8,13:17] (5 voxels apart). Nothing matched:
    lesion DSC 0, F1 0 (as official), lesion HD95 373 (official: inf). Whole-region HD95: the masks do not
    overlap, so panoptica reports 373; here the true HD95: border voxels per x slice 16/12/12/16 at distances
    9/8/7/6 (GT) and 6/7/8/9 (prediction) → pooled 112 values, 32 of them 9, the 95th percentile (index 105.45)
    is 9 mm.
    ``snfh``: GT and prediction one SNFH cube, no ET or NETC: ET and TC are empty in both → NaN for every ET/TC
    score (as official), left out of the summary (n counts the others).
    ``thick``: spacing (x, y, z) = (1, 1, 3) mm, GT ET cube [4:8]³, prediction shifted one slice along z (3 mm).
    Border voxels (6-connected erosion; each cube 56): GT — the z=4 face (16) is 3 mm from the prediction, the 4
    inner voxels of its z=7 face 1 mm (a side of the prediction), the rest 0; the prediction mirrored. Pooled: 72×0,
    8×1, 32×3 → 95th percentile (index 105.45) 3 mm, lesion-wise and whole-region. Panoptica would give 1 (it
    pairs the z·y·x array with the x·y·z spacing, so the 3 mm goes to x).
    summary.csv and summary.json name each quantity's official column and whether it equals it.
    """
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    write(gt / "apart-seg.nii.gz", boxes((12, 12, 20), (3, 4, 8, 4, 8, 4, 8)))
    write(pred / "apart.nii.gz", boxes((12, 12, 20), (3, 4, 8, 4, 8, 13, 17)))
    snfh = boxes((12, 12, 12), (2, 4, 8, 4, 8, 4, 8))
    write(gt / "snfh-seg.nii.gz", snfh)
    write(pred / "snfh.nii.gz", snfh)
    write(gt / "thick-seg.nii.gz", CUBE, spacing=(1.0, 1.0, 3.0))
    write(pred / "thick.nii.gz", np.roll(CUBE, 1, axis=0), spacing=(1.0, 1.0, 3.0))
    done = evaluate(pred, gt, "-o", out, "--protocol", "brats2025", "--task", "GoAT")
    assert done.returncode == 0, done.stderr[-3000:]
    s = rows(out)
    apart = s[("apart", "ET")]
    assert (float(apart["lesion_dice"]), float(apart["f1"]), float(apart["lesion_hd95"])) == (0.0, 0.0, 373.0)
    assert float(apart["legacy_hd95"]) == 9.0 and float(apart["legacy_dice"]) == 0.0
    for region in ("ET", "TC"):
        for metric in ("lesion_dice", "lesion_hd95", "lesion_nsd_1", "f1", "legacy_dice", "legacy_hd95"):
            assert math.isnan(float(s[("snfh", region)][metric])), (region, metric)
    assert float(s[("thick", "ET")]["lesion_hd95"]) == 3.0 and float(s[("thick", "ET")]["legacy_hd95"]) == 3.0

    report = json.loads((out / "summary.json").read_text())
    assert report["summary"]["ET"]["lesion_dice"]["n"] == 2  # apart and thick; snfh's NaN left out
    assert report["summary"]["WT"]["lesion_dice"]["n"] == 3
    metrics = [m for m in next(iter(s.values())) if m not in ("case", "region", "missing_prediction")]
    assert sorted(report["quantities"]) == sorted(metrics)
    assert report["quantities"]["lesion_dice"]["official"] == "lesionwise_dsc_mean"
    assert report["quantities"]["lesion_dice"]["equals_official"] == "yes"
    assert "inf in the official output" in report["quantities"]["lesion_hd95"]["rule"]
    assert report["quantities"]["legacy_hd95"]["equals_official"].startswith("only at 1 mm isotropic spacing")
    assert report["quantities"]["legacy_nsd_1"]["equals_official"].startswith("no")
    with (out / "summary.csv").open() as handle:
        summary = {(r["region"], r["metric"]): r for r in csv.DictReader(handle)}
    assert summary[("ET", "f1")]["official"] == "all_instance_f1" and summary[("ET", "f1")]["equals_official"] == "yes"
    assert summary[("WT", "fn")]["equals_official"] == "yes, except for a missing prediction"
