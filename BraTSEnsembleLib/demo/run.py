"""``brats-ensemble demo`` / ``make demo``: the whole product on the shipped synthetic case, in one command.

1. Runs ``brats-ensemble predict --model-set demo-ensemble.json --save-uncertainty`` on the shipped demo case
   (``BraTSEnsembleLib/demo/case``) with the shipped demo model set (``BraTSEnsembleLib/demo/models``: nnU-Net v2,
   U-Mamba Bot and MedNeXt-S members trained on phantoms, fused, then the GoAT 2025 ratio-adaptive
   postprocessing) — the real command line; nothing is trained.
2. Adds, beside the CLI's results, the Slicer segmentation ``<id>.seg.nrrd``, the statistics table
   ``<id>_statistics.csv`` and a one-page PNG report ``<id>_report.png`` (slices with the segmentation, volumes,
   the agreement of each member with the ensemble, the ensemble's uncertainty); prints where every file is and the
   Dice of each region against the phantom's ground truth.

Results go to the demo's own folder in the user cache (``$BRATS_ENSEMBLE_CACHE/demo/output`` or
``~/.cache/brats-ensemble/demo/output``), which each run refreshes. With ``-o DIR`` they go to ``DIR/result`` and
existing files there are never replaced unless ``--overwrite`` is given.

The models are trained on synthetic phantoms for minutes: they demonstrate the software, they are no tumour models.
Never use them on patients.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import demo_case_folder, demo_case_info, demo_model_set

#: Regions whose Dice against the ground truth the demo prints (NETC too: the hard one for these models).
DICE_REGIONS: tuple[str, ...] = ("ET", "TC", "WT", "NETC")
#: How the report's title names each member's framework.
FRAMEWORK_TITLES: dict[str, str] = {"nnunetv2": "nnU-Net v2", "umamba": "U-Mamba", "mednext": "MedNeXt"}
REPORT_FOOTER = ("Synthetic phantom; demo models trained on phantoms for minutes. Research use only: not a medical "
                 "device, never for diagnosis or for patients.")
DESCRIPTIONS: dict[str, str] = {
    "labels": "label map (1 NETC, 2 SNFH, 3 ET)", "statistics": "statistics and provenance (JSON)",
    "disagreement": "model disagreement map", "entropy": "entropy map", "segmentation": "3D Slicer segmentation",
    "table": "statistics table (CSV)", "report": "report (PNG)"}


def demo_cache_dir() -> Path:
    """The demo's folder in the user's cache (``$BRATS_ENSEMBLE_CACHE/demo`` or ``~/.cache/brats-ensemble/demo``)."""
    from ..downloads import default_cache_dir

    return default_cache_dir() / "demo"


def result_files(result_dir: Path, case_id: str) -> dict[str, Path]:
    """Every file the demo writes for ``case_id`` in ``result_dir``, by kind."""
    return {"labels": result_dir / f"{case_id}.nii.gz", "statistics": result_dir / f"{case_id}.json",
            "disagreement": result_dir / f"{case_id}_disagreement.nii.gz",
            "entropy": result_dir / f"{case_id}_entropy.nii.gz",
            "segmentation": result_dir / f"{case_id}.seg.nrrd",
            "table": result_dir / f"{case_id}_statistics.csv", "report": result_dir / f"{case_id}_report.png"}


def _uncertainty_note(members: int) -> str:
    if members == 1:
        return ("The demo ensemble has 1 model, so disagreement is 0 by definition;\n"
                "entropy: how unsure the model's probabilities are (0 … 1).")
    return (f"Share of the {members} models whose own label differs from the ensemble's;\n"
            "entropy of the fused probabilities (0 certain … 1 uniform).")


def agreement_table(summary: dict) -> dict[str, dict[str, float]] | None:
    """``{member: {region: Dice}}`` from the statistics JSON's ``member_agreement`` (None when absent)."""
    records = summary.get("member_agreement")
    if not records:
        return None
    table: dict[str, dict[str, float]] = {}
    for index, record in enumerate(records, start=1):
        name = str(record["member"])
        table[name if name not in table else f"{name} ({index})"] = dict(record["dice"])
    return table


def _array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """(z, y, x) array and (x, y, z) spacing of an image file."""
    import SimpleITK as sitk

    from ..case import read_image

    image = read_image(path)
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing())


def _run_predict(case_dir: Path, result_dir: Path, manifest: Path, device: str, overwrite: bool) -> int:
    command = [sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(result_dir),
               "--model-set", str(manifest), "--save-uncertainty", "--device", device]
    if overwrite:
        command.append("--overwrite")
    print("Running: brats-ensemble", *command[3:], flush=True)
    return subprocess.run(command, stdout=subprocess.DEVNULL).returncode  # the demo prints the list of files itself


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brats-ensemble demo", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="write into OUTPUT/result (default: the demo's folder in the user cache, refreshed "
                             "by each run)")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo's files in OUTPUT/result")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    manifest, case_dir = demo_model_set(), demo_case_folder()
    if manifest is None or not case_dir.is_dir():
        print(f"error: the demo model set or case is not installed ({manifest or case_dir}); they ship with the "
              "repository in BraTSEnsembleLib/demo/. Re-create them with: python -m BraTSEnsembleLib.demo.train "
              "BraTSEnsembleLib/demo --overwrite", file=sys.stderr)
        return 1
    info = demo_case_info()
    case_id = info["case_id"]
    own_folder = args.output is None
    output = (demo_cache_dir() / "output") if own_folder else args.output
    result_dir = output / "result"
    files = result_files(result_dir, case_id)
    overwrite = own_folder or args.overwrite  # the cache folder is the demo's own; anything else only when asked
    existing = [path for path in files.values() if path.exists()]
    if existing and not overwrite:
        print(f"error: {existing[0]} exists already. Choose another folder with -o, or pass --overwrite to "
              "replace the demo's files there.", file=sys.stderr)
        return 1

    code = _run_predict(case_dir, result_dir, manifest, args.device, overwrite)
    if code != 0:
        return code

    from ..segmentation import label_file_to_seg_nrrd, write_statistics_csv
    from ..uncertainty import region_dice
    from .report import write_report

    labels, spacing = _array(files["labels"])
    truth, _ = _array(case_dir / info["files"]["seg"]["file"])
    summary = json.loads(files["statistics"].read_text())
    label_file_to_seg_nrrd(files["labels"], files["segmentation"], include_derived=True)
    write_statistics_csv(summary, files["table"])
    members = summary.get("members", [])
    frameworks = " + ".join(FRAMEWORK_TITLES.get(m.get("framework"), str(m.get("framework"))) for m in members)
    scores = {r: region_dice(labels, truth, r) for r in DICE_REGIONS}
    dice_text = "Dice against the phantom's ground truth: " + ", ".join(f"{r} {v:.3f}" for r, v in scores.items())
    images = {role: _array(case_dir / info["files"][role]["file"])[0] for role in ("t1c", "t2f")}
    write_report(images, labels, spacing, summary, agreement_table(summary), files["report"],
                 f"{case_id}: demo ensemble ({frameworks}) on a synthetic phantom",
                 uncertainty=summary.get("uncertainty"), uncertainty_note=_uncertainty_note(len(members) or 1),
                 subtitle=dice_text, footer=REPORT_FOOTER)

    print(f"Results of {case_id} (input case: {case_dir}; model set: {manifest}):")
    for kind, path in files.items():
        if path.exists():
            print(f"  {DESCRIPTIONS[kind] + ':':36} {path}")
    print(dice_text)
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    print("Demo models: trained on synthetic phantoms for minutes; for trying the software only, never for patients.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
