"""Compare ``brats-ensemble evaluate --protocol brats2025`` with the official ``brats-evaluation`` package.

Not part of the test suite: the official package (AGPL, over panoptica) pins older numpy/pandas than this project,
so it lives in a venv of its own and both tools are run as black boxes through their command lines.

    python3 -m venv /tmp/official && /tmp/official/bin/pip install brats-evaluation==0.0.10
    .venv/bin/python bench/compare_brats_evaluation.py --official /tmp/official/bin --work /tmp/compare \\
        [--real-labels FOLDER_OF_SEG_FILES] [--real-predictions FOLDER]

Pairs: every ground truth (the real label maps given, and phantoms) against itself, dilated, eroded, shifted, with a
lesion removed, with a far false positive, without ET, with 2 % of its voxels near the tumour relabelled at random,
moved half the field of view away, empty; the real predictions given; an empty ground truth; a ground truth without
ET predicted exactly (regions empty in both); a missing prediction. Each once at its own spacing and once relabelled 1 mm isotropic. Both tools score the same
folders (``--config GoAT`` / ``gli`` ↔ ``--task GoAT`` / ``GLI``); the official CSV comes from
``brats-parse-metrics seg``. Prints, per quantity and kind of case, how many values agree and the largest
difference; writes the table as JSON to ``WORK/comparison.json``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from BraTSEnsembleLib.demo.phantom import make_phantom  # noqa: E402
from BraTSEnsembleLib.metrics import protocol_regions  # noqa: E402

#: ours → official column stem of ``brats-parse-metrics seg`` (``<stem>_<region>``).
OFFICIAL_COLUMN = {
    "tp": "all_instance_tp", "fp": "all_instance_fp", "fn": "all_instance_fn", "f1": "all_instance_f1",
    "lesion_dice": "lesionwise_dsc_mean", "lesion_hd95": "lesionwise_hd95_mean", "lesion_nsd_1": "lesionwise_nsd_mean",
    "legacy_dice": "global_dsc", "legacy_hd95": "global_hd95", "legacy_nsd_1": "global_nsd",
}
#: MET adds the size-stratified columns of ``brats-parse-metrics mets``.
OFFICIAL_COLUMN_MET = {**OFFICIAL_COLUMN, **{f"{size}_{count}": f"{size}_instance_{count}"
                                             for size in ("large", "small") for count in ("tp", "fp", "fn", "f1")}}
TASK_CONFIG = {"GoAT": "GoAT", "GLI": "gli", "MET": "mets"}
#: brats-infra's parser call per task (evaluation/segmentation/score.py): MET with its thresholds, the rest ``seg``.
PARSER = {"MET": ["mets", "--vol_threshold", "27", "--overlap_threshold", "0.2"]}


def perturbations(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Predictions made from a (z, y, x) ground truth."""
    out = {"identical": labels.copy()}
    grown = labels.copy()
    for value in (2, 1, 3, 4):  # outer tissue first, so inner labels win where they grow into each other
        grown[ndimage.binary_dilation(labels == value) & (grown == 0)] = value
    out["dilated"] = grown
    eroded = labels.copy()
    for value in (1, 2, 3, 4):
        mask = labels == value
        eroded[mask & ~ndimage.binary_erosion(mask)] = 0
    out["eroded"] = eroded
    out["shifted"] = np.roll(labels, (1, 2, -1), axis=(0, 1, 2))
    et = labels == 3
    components, n = ndimage.label(et, structure=np.ones((3, 3, 3)))
    if n:
        sizes = np.bincount(components.ravel())[1:]
        removed = labels.copy()
        removed[components == 1 + int(np.argmin(sizes))] = 0
        out["lesion_removed"] = removed
    far = labels.copy()
    corner = tuple(slice(2, 6) if s > 12 else slice(0, 1) for s in labels.shape)
    if not far[corner].any():
        far[corner] = 3
        out["far_false_positive"] = far
    no_et = labels.copy()
    no_et[no_et == 3] = 2
    out["no_et"] = no_et
    out["empty"] = np.zeros_like(labels)
    moved = np.roll(labels, labels.shape[2] // 2, axis=2)  # half the field of view away: no overlap
    if not ((moved > 0) & (labels > 0)).any():
        out["moved_apart"] = moved
    noisy = labels.copy()
    flip = (rng.random(labels.shape) < 0.02) & ndimage.binary_dilation(labels > 0, iterations=2)
    noisy[flip] = rng.choice(np.array([0, 1, 2, 3], dtype=labels.dtype), size=int(flip.sum()))
    out["noisy"] = noisy
    return out


def write(array: np.ndarray, like: sitk.Image, path: Path, spacing: tuple[float, ...] | None) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)


def build_pairs(work: Path, real_labels: Path | None, real_predictions: Path | None) -> dict[str, dict]:
    """Write ref/ and pred/ (BraTS names the official pairing understands); return case id → description."""
    ref_dir, pred_dir = work / "ref", work / "pred"
    for folder in (ref_dir, pred_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases: list[tuple[str, sitk.Image, np.ndarray, np.ndarray | None]] = []
    if real_labels is not None:
        for path in sorted(real_labels.glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            prediction = None
            if real_predictions is not None:
                digits = path.name.split("-seg")[0][-9:]  # "00132-000"
                found = [p for p in real_predictions.glob("*.nii.gz") if p.name.endswith(f"{digits}.nii.gz")]
                if found:
                    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(found[0]))).astype(np.uint8)
            bases.append((path.name, image, sitk.GetArrayFromImage(image).astype(np.uint8), prediction))
    for seed, layout in ((3, "standard"), (4, "multifocal"), (5, "small")):
        phantom = make_phantom(seed, shape=(48, 56, 52), layout=layout, spacing=(1.0, 1.0, 1.0))
        bases.append((f"phantom {seed} {layout}", phantom.to_sitk(phantom.labels), phantom.labels, None))
    cases: dict[str, dict] = {}
    counter = 10000
    for name, image, labels, real_prediction in bases:
        variants = [("own spacing", None)]
        if image.GetSpacing() != (1.0, 1.0, 1.0):
            variants.append(("relabelled 1 mm", (1.0, 1.0, 1.0)))
        for spacing_name, spacing in variants:
            preds = perturbations(labels, rng)
            if real_prediction is not None:
                preds["real_prediction"] = real_prediction
            for kind, pred in preds.items():
                counter += 1
                case = f"BraTS-GLI-{counter:05d}-000"
                write(labels, image, ref_dir / f"{case}-seg.nii.gz", spacing)
                write(pred, image, pred_dir / f"{case}.nii.gz", spacing)
                cases[case] = {"base": name, "spacing": spacing_name, "kind": kind}
            counter += 1
            case = f"BraTS-GLI-{counter:05d}-000"  # empty ground truth, the dilated prediction
            write(np.zeros_like(labels), image, ref_dir / f"{case}-seg.nii.gz", spacing)
            write(preds["dilated"], image, pred_dir / f"{case}.nii.gz", spacing)
            cases[case] = {"base": name, "spacing": spacing_name, "kind": "empty_ground_truth"}
            counter += 1
            case = f"BraTS-GLI-{counter:05d}-000"  # no ET anywhere (relabelled NETC), predicted exactly
            without_et = np.where(labels == 3, 1, labels).astype(labels.dtype)
            write(without_et, image, ref_dir / f"{case}-seg.nii.gz", spacing)
            write(without_et, image, pred_dir / f"{case}.nii.gz", spacing)
            cases[case] = {"base": name, "spacing": spacing_name, "kind": "no_et_in_either"}
            counter += 1
            case = f"BraTS-GLI-{counter:05d}-000"  # no prediction file
            write(labels, image, ref_dir / f"{case}-seg.nii.gz", spacing)
            cases[case] = {"base": name, "spacing": spacing_name, "kind": "missing_prediction"}
    return cases


def run_official(official_bin: Path, work: Path, task: str, reuse: bool) -> dict[tuple[str, str], dict[str, float]]:
    config = TASK_CONFIG[task]
    json_path, csv_path = work / f"official_{config}.json", work / f"official_{config}.csv"
    if not (reuse and json_path.is_file()):
        subprocess.run([str(official_bin / "brats-evaluate"), "--config", config, "--ref_path", str(work / "ref"),
                        "--pred_path", str(work / "pred"), "--summary_json", str(json_path)], check=True,
                       capture_output=True)
    subprocess.run([str(official_bin / "brats-parse-metrics"), *PARSER.get(task, ["seg"]), "--json_path",
                    str(json_path), "--output_csv_path", str(csv_path)], check=True, capture_output=True)
    values: dict[tuple[str, str], dict[str, float]] = {}
    with csv_path.open() as handle:
        for row in csv.DictReader(handle):
            subject = row["subject_id"]
            if subject in ("mean", "std", "median"):
                values[(subject, "")] = {k: _number(v) for k, v in row.items() if k != "subject_id"}
                continue
            case = subject[: -len("-seg.nii.gz")]
            for key, value in row.items():
                if key == "subject_id":
                    continue
                stem, region = key.rsplit("_", 1)
                values.setdefault((case, region.upper()), {})[stem] = _number(value)
    return values


def run_ours(work: Path, task: str) -> dict[tuple[str, str], dict[str, float]]:
    out = work / f"ours_{task}"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "brats-ensemble"), "evaluate", str(work / "pred"),
                           str(work / "ref"), "-o", str(out), "--protocol", "brats2025", "--task", task],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"brats-ensemble evaluate failed:\n{done.stderr}")
    values: dict[tuple[str, str], dict[str, float]] = {}
    with (out / "per_case.csv").open() as handle:
        for row in csv.DictReader(handle):
            values[(row["case"], row["region"])] = {k: _number(v) for k, v in row.items()
                                                    if k not in ("case", "region")}
    return values


def _number(text: str) -> float:
    if text in ("", None):
        return math.nan
    return float(text)


def same(a: float, b: float, tolerance: float = 1e-9) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


@functools.lru_cache(maxsize=2)
def label_maps(work: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    return (sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ref" / f"{case}-seg.nii.gz"))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(work / "pred" / f"{case}.nii.gz"))))


def situation(work: Path, case: str, labels: tuple[int, ...], kind: str) -> str:
    """Kind of (case, region) for the table: missing, both empty, one empty, no overlap, overlapping."""
    if kind == "missing_prediction":
        return "missing prediction"
    gt, pred = (np.isin(a, labels) for a in label_maps(work, case))
    if not gt.any() and not pred.any():
        return "both empty"
    if not gt.any() or not pred.any():
        return "one empty"
    return "overlapping" if (gt & pred).any() else "no overlap"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="bin/ of a venv with brats-evaluation")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--real-labels", type=Path, help="folder of real BraTS ground-truth label maps")
    parser.add_argument("--real-predictions", type=Path, help="folder of predictions for them (<…id>.nii.gz)")
    parser.add_argument("--tasks", nargs="+", default=["GoAT", "GLI", "MET"], choices=list(TASK_CONFIG))
    parser.add_argument("--reuse", action="store_true", help="keep the pairs and official JSON of an earlier run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.reuse and (args.work / "cases.json").is_file():
        cases = json.loads((args.work / "cases.json").read_text())
    else:
        cases = build_pairs(args.work, args.real_labels, args.real_predictions)
        (args.work / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(cases)} pairs written to {args.work}")
    table: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    kinds_cache: dict[tuple[str, str], str] = {}
    for task in args.tasks:
        official = run_official(args.official, args.work, task, args.reuse)
        ours = run_ours(args.work, task)
        columns = OFFICIAL_COLUMN_MET if task == "MET" else OFFICIAL_COLUMN
        for case, info in cases.items():
            for region, labels in protocol_regions("brats2025", task).items():
                key = (case, region)
                if key not in kinds_cache:
                    kinds_cache[key] = situation(args.work, case, labels, info["kind"])
                spacing = "1 mm" if info["spacing"] == "relabelled 1 mm" or info["base"].startswith("phantom") \
                    else "anisotropic/≠1 mm"
                group = f"{kinds_cache[key]}, {spacing}"
                for metric, column in columns.items():
                    name = f"{metric} ({task})" if task == "MET" and metric.startswith(("lesion", "large", "small")) \
                        else metric
                    a, b = ours[key][metric], official[key][column]
                    table[name][group]["agree" if same(a, b) else "differ"].append(
                        (case, region, a, b, info["kind"]))
    summary = {}
    for metric, groups in table.items():
        print(f"\n{metric} (official {OFFICIAL_COLUMN_MET[metric.split()[0]]})")
        summary[metric] = {}
        for group in sorted(groups):
            agree, differ = groups[group]["agree"], groups[group]["differ"]
            finite = [abs(a - b) for _, _, a, b, _ in differ if math.isfinite(a) and math.isfinite(b)]
            example = differ[0] if differ else None
            summary[metric][group] = {"agree": len(agree), "differ": len(differ),
                                      "max_abs_difference": max(finite) if finite else None,
                                      "example": example}
            line = f"  {group:38} {len(agree):4} agree, {len(differ):4} differ"
            if finite:
                line += f", max |diff| {max(finite):.4g}"
            if example:
                line += f"  e.g. {example[4]} {example[1]}: ours {example[2]:.6g}, official {example[3]:.6g}"
            print(line)
    (args.work / "comparison.json").write_text(json.dumps({"cases": cases, "table": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
