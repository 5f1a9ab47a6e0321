"""``brats-ensemble demo`` / ``make demo``: the whole product on a synthetic case, in one command.

1. Builds (once, then reuses) a small genuine nnU-Net v2 model: phantoms → nnU-Net's planner, preprocessor and
   ``nnUNetTrainer`` for a few CPU epochs (:mod:`BraTSEnsembleLib.demo.nnunet_train`).
2. Writes a held-out phantom case (a seed never used for training) in BraTS 2023 naming.
3. Runs ``brats-ensemble predict --save-uncertainty`` on it through the real pipeline (GoAT 2025 ratio-adaptive
   postprocessing).
4. Adds, beside the CLI's results, the Slicer segmentation ``<id>.seg.nrrd``, the statistics table
   ``<id>_statistics.csv`` and a one-page PNG report ``<id>_report.png`` (slices with the segmentation, volumes, the
   ensemble's uncertainty summary from the statistics JSON); prints where every file is and the Dice of ET, TC and
   WT against the phantom's ground truth.

The model is trained on synthetic phantoms for a few minutes: it demonstrates the software, it is no tumour model.
Never use it on patients.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .phantom import make_phantom

PACKAGE = Path(__file__).resolve().parent
DEMO_CASE_SEED = 777  # training uses seeds 100..; this case is held out
DEMO_CASE_ID = "DemoPhantom-777"
TRAINING = ["--dataset-id", "900", "--name", "DemoPhantoms", "--cases", "8", "--seed", "100", "--epochs", "20",
            "--iterations", "20", "--fold", "0"]


def demo_cache_dir() -> Path:
    """The demo's folder in the user's cache (``$BRATS_ENSEMBLE_CACHE`` or ``~/.cache/brats-ensemble``)."""
    from ..downloads import default_cache_dir

    return default_cache_dir() / "demo"


def cached_demo_model(cache_root: Path | None = None) -> Path | None:
    """The demo's trained results folder when ``brats-ensemble demo`` has made it, else None (nothing trained)."""
    marker = _model_cache(cache_root or demo_cache_dir()) / "results-folder.txt"
    if marker.is_file() and Path(marker.read_text().strip()).is_dir():
        return Path(marker.read_text().strip())
    return None


def _model_cache(root: Path) -> Path:
    digest = hashlib.sha256(repr(TRAINING).encode())
    for name in ("nnunet_train.py", "phantom.py"):
        digest.update((PACKAGE / name).read_bytes())
    return root / f"demo-model-{digest.hexdigest()[:12]}"


def ensure_demo_model(cache_root: Path) -> Path:
    """The demo's nnU-Net results folder, trained here on first use (about three minutes on 2 CPU cores)."""
    work = _model_cache(cache_root)
    marker = work / "results-folder.txt"
    cached = cached_demo_model(cache_root)
    if cached is not None:
        return cached
    print(f"Training the demo's nnU-Net v2 model on phantoms (once; cached in {work}) …", flush=True)
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.demo.nnunet_train", "--work", str(work),
                           *TRAINING], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit("error: training the demo model failed (output above)")
    results = done.stdout.strip().splitlines()[-1]
    marker.write_text(results)
    return Path(results)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _uncertainty_note(members: int) -> str:
    if members == 1:
        return ("The demo ensemble has 1 model, so disagreement is 0 by definition;\n"
                "entropy: how unsure the model's probabilities are (0 … 1).")
    return (f"Share of the {members} models whose own label differs from the ensemble's;\n"
            "entropy of the fused probabilities (0 certain … 1 uniform).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brats-ensemble demo", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the demo model is kept (default: the user's brats-ensemble cache folder, where "
                             "the Slicer self-test finds it too)")
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    from ..case import read_image
    from ..labels import region_mask
    from ..segmentation import label_file_to_seg_nrrd, write_statistics_csv
    from .report import write_report

    model = ensure_demo_model((args.cache or demo_cache_dir()).resolve())
    phantom = make_phantom(DEMO_CASE_SEED, case_id=DEMO_CASE_ID)
    case_dir = phantom.write(args.output / "case", with_labels=True)
    result_dir = args.output / "result"
    command = [sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(result_dir),
               "-m", str(model), "--postprocess", "ratio-adaptive", "--save-uncertainty", "--overwrite"]
    print("Running:", "brats-ensemble", *command[3:], flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL)  # the demo prints the list of files itself
    if done.returncode != 0:
        return done.returncode

    case_id = phantom.case_id
    files = {"labels": result_dir / f"{case_id}.nii.gz", "statistics": result_dir / f"{case_id}.json",
             "disagreement": result_dir / f"{case_id}_disagreement.nii.gz",
             "entropy": result_dir / f"{case_id}_entropy.nii.gz"}
    image = read_image(files["labels"])
    labels = sitk.GetArrayFromImage(image)
    summary = json.loads(files["statistics"].read_text())
    files["segmentation"] = label_file_to_seg_nrrd(files["labels"], result_dir / f"{case_id}.seg.nrrd",
                                                   include_derived=True)
    files["table"] = write_statistics_csv(summary, result_dir / f"{case_id}_statistics.csv")
    members = len(summary.get("members", [])) or 1
    scores = {r: dice(region_mask(labels, r), region_mask(phantom.labels, r)) for r in ("ET", "TC", "WT")}
    dice_text = "Dice against the phantom's ground truth: " + ", ".join(f"{r} {v:.3f}" for r, v in scores.items())
    files["report"] = write_report(
        {role: phantom.images[role] for role in ("t1c", "t2f")}, labels, image.GetSpacing(), summary,
        None, result_dir / f"{case_id}_report.png",
        f"{case_id}: demo nnU-Net v2 model ({members} model{'s' if members != 1 else ''}) on a synthetic phantom",
        uncertainty=summary.get("uncertainty"), uncertainty_note=_uncertainty_note(members), subtitle=dice_text)

    descriptions = {"labels": "label map (1 NETC, 2 SNFH, 3 ET)", "statistics": "statistics and provenance (JSON)",
                    "disagreement": "model disagreement map", "entropy": "entropy map",
                    "segmentation": "3D Slicer segmentation", "table": "statistics table (CSV)",
                    "report": "report (PNG)"}
    print(f"Results of {case_id} (input case: {case_dir}):")
    for kind, path in files.items():
        if path.exists():
            print(f"  {descriptions[kind] + ':':36} {path}")
    print(dice_text)
    print("Demo model: trained on synthetic phantoms for a few minutes; for trying the software only, never for patients.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
