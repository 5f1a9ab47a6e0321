"""Train the demo model set (nnU-Net v2, U-Mamba Bot, MedNeXt-S) on phantoms and write it with the demo case.

``python -m BraTSEnsembleLib.demo.train OUT_DIR`` writes, reproducibly (fixed seeds, single-threaded data loading):

* ``OUT_DIR/models/`` — three model folders holding only what inference needs, and the manifest
  ``demo-ensemble.json`` that ensembles them with the GoAT 2025 ratio-adaptive postprocessing:

  - ``nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres`` — nnU-Net v2's own planner, preprocessor and trainer
    (``nnUNetTrainerAdam1en3``, nnunetv2's ``nnUNetTrainer`` with AdamW at lr 1e-3: with the default SGD a narrow
    network had found only the oedema after 600 CPU iterations, see :mod:`~BraTSEnsembleLib.demo.trainers`) —
    ``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``;
  - ``nnUNetTrainerUMambaBot__nnUNetPlans__3d_fullres`` — the same plans and data, U-Mamba's UMambaBot network
    (:class:`~BraTSEnsembleLib.demo.trainers.nnUNetTrainerUMambaBot`, same optimiser), a U-Mamba results folder;
  - ``nnUNetTrainerV2_MedNeXt_S_kernel3__nnUNetPlansv2.1_trgSp_2x2x2`` — MedNeXt-S kernel 3 trained on the same
    preprocessed data, written as the nnU-Net v1 folder of the official trainer (``plans.pkl``,
    ``fold_0/model_final_checkpoint.model`` and ``.model.pkl``; see :mod:`BraTSEnsembleLib.demo.v1_export`).

* ``OUT_DIR/case/`` — the demo case: phantom seed 777 (never used for training) at 1 mm on a 160×192×160 grid,
  four int16 sequences in BraTS 2023 naming and the ground truth ``-seg.nii.gz``, and ``case.json`` with the
  SHA-256 of each file (what the Slicer module registers as Sample Data).

The networks are narrow (nnU-Net and U-Mamba: 8, 16, 32, 32, 32 features per stage through the plans; MedNeXt:
8 channels in the first stage instead of 32; official parameter names everywhere), and the training phantoms are
made at 2 mm over the same 160×192×160 mm field of view (80×96×80 voxels), so that each checkpoint is a few MB
and training runs on a laptop CPU. The models resample a 1 mm case to 2 mm and back themselves, as their plans
say. The shipped checkpoints leave out the optimiser state (needed only to resume training). Each member is
trained on fold 0 of nnU-Net's 5-fold split of the 40 training phantoms (``TRAINING``: seeds 100–139; 20 with
one large tumour, 10 multifocal, 10 with small lesions), 20 epochs × 20 iterations.

Members train on a GPU when torch sees one (``--device auto``, the default), otherwise on the CPU.

``--held-out`` writes the held-out evaluation phantoms instead (``HELD_OUT``, never used for training; see the
docs/demo.md for the evaluation). ``--work DIR`` keeps nnU-Net's work folder: a finished member there is reused and an
interrupted one is continued.

Run time: see ``MEASURED_RUN_TIME``. These models are trained on synthetic phantoms for minutes. They demonstrate
the software; they know nothing about real tumours. Never use them on patient data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..downloads import file_sha256
from .phantom import ROLES, make_phantom

#: The "Total time" this script printed on the 2-core development machine (at times shared with test runs) for
#: ``nice -n 5 .venv/bin/python -m BraTSEnsembleLib.demo.train OUT --work WORK`` with an empty WORK.
MEASURED_RUN_TIME = "59 min (3529 s: nnU-Net 652 s, U-Mamba Bot 1436 s, MedNeXt-S 1379 s) on 2 CPU cores"

#: The training phantoms (seed, tumour layout): 20 standard, 10 multifocal, 10 with small lesions. The demo case
#: (777) and the held-out evaluation phantoms are never among them.
TRAINING: tuple[tuple[int, str], ...] = (tuple((seed, "standard") for seed in range(100, 120))
                                         + tuple((seed, "multifocal") for seed in range(120, 130))
                                         + tuple((seed, "small") for seed in range(130, 140)))
TRAIN_SEEDS: tuple[int, ...] = tuple(seed for seed, _ in TRAINING)
#: The held-out phantoms of the evaluation in docs/demo.md and the tests, (seed, layout): 10 standard, 5 multifocal and
#: 5 with small lesions (see :func:`~BraTSEnsembleLib.demo.phantom.make_phantom`); never used for training.
HELD_OUT: tuple[tuple[int, str], ...] = (tuple((seed, "standard") for seed in range(5000, 5010))
                                         + tuple((seed, "multifocal") for seed in range(5010, 5015))
                                         + tuple((seed, "small") for seed in range(5020, 5025)))
HELD_OUT_SEEDS: tuple[int, ...] = tuple(seed for seed, _ in HELD_OUT)
#: Voxel size (x, y, z mm) and grid (z, y, x) of the training phantoms: 2 mm over the demo case's field of view.
TRAIN_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
TRAIN_SHAPE: tuple[int, int, int] = (80, 96, 80)
#: The demo case: seed, id and grid (z, y, x) at 1 mm.
DEMO_CASE_SEED = 777
DEMO_CASE_ID = "DemoPhantom-777"
DEMO_CASE_SHAPE: tuple[int, int, int] = (160, 192, 160)
DATASET_ID = 900
DATASET_NAME = "DemoPhantoms"
CHANNEL_ORDER: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
BASE_FEATURES, MAX_FEATURES = 8, 32
FOLD = 0
MANIFEST_NAME = "demo-ensemble.json"
CASE_INFO_NAME = "case.json"


@dataclass(frozen=True)
class MemberPlan:
    """How one demo member is trained: nnU-Net trainer class name, epochs × iterations per epoch, seed."""

    name: str
    framework: str
    trainer: str
    epochs: int
    iterations: int
    seed: int


MEMBERS: tuple[MemberPlan, ...] = (
    MemberPlan("nnunet", "nnunetv2", "nnUNetTrainerAdam1en3", 20, 20, 1),
    MemberPlan("umamba-bot", "umamba", "nnUNetTrainerUMambaBot", 20, 20, 2),
    MemberPlan("mednext-s", "mednext", "nnUNetTrainerV2_MedNeXt_S_kernel3", 20, 20, 3),
)


def write_demo_case(folder: Path) -> Path:
    """Write the demo case into ``folder`` (files directly in it) and ``case.json``; returns ``folder``."""
    phantom = make_phantom(DEMO_CASE_SEED, shape=DEMO_CASE_SHAPE, case_id=DEMO_CASE_ID)
    with tempfile.TemporaryDirectory() as tmp:
        written = phantom.write(tmp, with_labels=True, integer_images=True)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(written.iterdir()):
            shutil.copyfile(path, folder / path.name)
    files = {role: f"{DEMO_CASE_ID}-{role}.nii.gz" for role in (*ROLES, "seg")}
    info = {
        "case_id": DEMO_CASE_ID,
        "description": "Synthetic brain-tumour phantom (BraTSEnsembleLib.demo.phantom), not patient data.",
        "seed": DEMO_CASE_SEED,
        "grid_zyx": list(DEMO_CASE_SHAPE),
        "spacing_mm": list(phantom.spacing),
        "files": {role: {"file": name, "sha256": file_sha256(folder / name)} for role, name in files.items()},
    }
    (folder / CASE_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def held_out_case_id(seed: int, layout: str) -> str:
    """``HeldOut-<seed>`` for a standard phantom, ``HeldOut-<seed>-<layout>`` otherwise."""
    return f"HeldOut-{seed}" if layout == "standard" else f"HeldOut-{seed}-{layout}"


def write_held_out_cases(cases_dir: Path, ground_truth_dir: Path,
                         held_out: Sequence[tuple[int, str]] = HELD_OUT) -> None:
    """Held-out phantoms (seed, layout) at the demo case's size: case folders in ``cases_dir`` (int16, BraTS 2023
    naming) and their label maps as ``<id>-seg.nii.gz`` in ``ground_truth_dir`` (what ``brats-ensemble evaluate``
    reads)."""
    import SimpleITK as sitk

    ground_truth_dir.mkdir(parents=True, exist_ok=True)
    for seed, layout in held_out:
        phantom = make_phantom(seed, shape=DEMO_CASE_SHAPE, case_id=held_out_case_id(seed, layout), layout=layout)
        phantom.write(cases_dir, integer_images=True)
        sitk.WriteImage(phantom.to_sitk(phantom.labels), str(ground_truth_dir / f"{phantom.case_id}-seg.nii.gz"))


def _trainer_class(name: str) -> type:
    """nnU-Net's own ``nnUNetTrainerAdam1en3``, or one of :mod:`BraTSEnsembleLib.demo.trainers`."""
    if name == "nnUNetTrainerAdam1en3":
        from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam1en3

        return nnUNetTrainerAdam1en3
    from . import trainers

    return getattr(trainers, name)


def _train_member(work: Path, plan: MemberPlan, plans: dict, dataset_json: dict, device: str = "auto") -> Path:
    """Train one member in ``work`` unless an earlier run with the same settings finished there (then it is reused)
    or was interrupted (then it is continued from its last epoch); returns the v2 results folder."""
    from .nnunet_train import train_fold
    from .trainers import MEDNEXT_CHANNELS

    results = work / "results" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}" / f"{plan.trainer}__nnUNetPlans__3d_fullres"
    stamp = results / "member-plan.json"
    settings = {**asdict(plan), "mednext_channels": MEDNEXT_CHANNELS, "training": [list(item) for item in TRAINING],
                "features": plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]}
    same = stamp.is_file() and json.loads(stamp.read_text()) == settings
    if same and (results / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
        print(f"  {plan.name}: reusing the finished training in {results}", flush=True)
        return results
    if not same:
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        stamp.write_text(json.dumps(settings))
    started = time.perf_counter()
    trained = train_fold(plans, dataset_json, str(FOLD), plan.epochs, plan.iterations, _trainer_class(plan.trainer),
                         seed=plan.seed, resumable=True, device=device)
    print(f"  {plan.name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return trained


def export_v2_folder(results: Path, target: Path) -> Path:
    """Copy what inference needs from a v2 results folder: plans.json, dataset.json and fold_N/checkpoint_final.pth
    as nnU-Net wrote it, except that the optimiser's state (two or three tensors per weight, needed only to resume
    training) is set to None, which keeps the shipped checkpoints small."""
    import torch

    (target / f"fold_{FOLD}").mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(results / name, target / name)
    checkpoint_name = f"fold_{FOLD}/checkpoint_final.pth"
    checkpoint = torch.load(results / checkpoint_name, map_location="cpu", weights_only=False)  # our own training's
    torch.save({**checkpoint, "optimizer_state": None, "grad_scaler_state": None}, target / checkpoint_name)
    return target


def write_manifest(models_dir: Path, folders: dict[str, Path]) -> Path:
    """The demo manifest: the three members (fold 0 each, equal weights) and ratio-adaptive postprocessing."""
    manifest = {
        "name": "brats-ensemble-demo",
        "description": ("Demo ensemble of nnU-Net v2, U-Mamba Bot and MedNeXt-S trained for minutes on synthetic "
                        "phantoms (python -m BraTSEnsembleLib.demo.train). Shows the software; never use it on "
                        "patients."),
        "demo": True,  # warns when run on anything but the shipped phantom (BraTSEnsembleLib.demo.guard)
        "postprocess": "ratio-adaptive",
        "members": [
            {"name": plan.name, "framework": plan.framework, "path": folders[plan.name].name, "folds": [FOLD]}
            for plan in MEMBERS
        ],
    }
    path = models_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def train_demo_set(out_dir: Path, work: Path, members: Sequence[str] | None = None, device: str = "auto") -> Path:
    """Plan, preprocess, train every member on ``device`` (``auto``: a GPU when torch sees one, else the CPU), write
    ``out_dir/models`` (folders + manifest); returns the manifest."""
    from .nnunet_train import plan_and_preprocess, resolve_training_device, set_nnunet_folders

    set_nnunet_folders(work)  # before nnunetv2 is imported anywhere
    import torch

    from .trainers import MEDNEXT_CHANNELS
    from .v1_export import write_mednext_v1_folder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    print(f"Planning and preprocessing {len(TRAIN_SEEDS)} training phantoms with nnU-Net in {work} …", flush=True)
    plans, dataset_json = plan_and_preprocess(work, DATASET_ID, DATASET_NAME, TRAIN_SEEDS, CHANNEL_ORDER, "brats2023",
                                              TRAIN_SHAPE, BASE_FEATURES, MAX_FEATURES, spacing=TRAIN_SPACING,
                                              layouts=dict(TRAINING))
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    models_dir = out_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for plan in MEMBERS:
        if members and plan.name not in members:
            continue
        print(f"Training {plan.name} ({plan.trainer}, {plan.epochs} epochs × {plan.iterations} iterations) on "
              f"{resolve_training_device(device)} …",
              flush=True)
        results = _train_member(work, plan, plans, dataset_json, device)
        for old in models_dir.glob(f"{plan.trainer}__*"):
            shutil.rmtree(old)
        if plan.framework == "mednext":
            folders[plan.name] = write_mednext_v1_folder(results, models_dir, plan.trainer, FOLD, MEDNEXT_CHANNELS)
        else:
            folders[plan.name] = export_v2_folder(results, models_dir / results.name)
    for plan in MEMBERS:  # members not (re)trained this time keep their folders
        if plan.name not in folders:
            found = sorted(models_dir.glob(f"{plan.trainer}__*"))
            if not found:
                raise SystemExit(f"error: {plan.name} was not trained and {models_dir} has no {plan.trainer} folder")
            folders[plan.name] = found[0]
    return write_manifest(models_dir, folders)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m BraTSEnsembleLib.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="writes OUT_DIR/models and OUT_DIR/case")
    parser.add_argument("--work", type=Path, default=None,
                        help="nnU-Net work folder (raw, preprocessed, results), kept: finished members in it are "
                             "reused, interrupted ones continued. Default: a temporary folder, removed at the end")
    parser.add_argument("--members", default=None,
                        help=f"comma-separated subset of {','.join(p.name for p in MEMBERS)} to train; the "
                             "others must already be in OUT_DIR/models")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to train: auto (default: a GPU when torch sees one, else the CPU), cpu or cuda")
    parser.add_argument("--case-only", action="store_true", help="only write the demo case")
    parser.add_argument("--held-out", action="store_true",
                        help=f"only write the {len(HELD_OUT)} held-out evaluation phantoms (seeds "
                             f"{HELD_OUT_SEEDS[0]}-{HELD_OUT_SEEDS[-1]}: standard, multifocal and small lesions; demo "
                             "case size) as OUT_DIR/cases/<id>/ and "
                             "their ground truth as OUT_DIR/ground_truth/<id>-seg.nii.gz")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT_DIR holds already")
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    if args.held_out:
        if (out_dir / "cases").exists() and not args.overwrite:
            parser.error(f"{out_dir / 'cases'} exists; pass --overwrite to replace it")
        write_held_out_cases(out_dir / "cases", out_dir / "ground_truth")
        print(f"Held-out phantoms: {out_dir / 'cases'}; ground truth: {out_dir / 'ground_truth'}")
        return 0
    existing = [p for p in (out_dir / "models", out_dir / "case") if p.exists()]
    if existing and not args.overwrite:
        parser.error(f"{existing[0]} exists; pass --overwrite to replace it")
    members = args.members.split(",") if args.members else None
    unknown = sorted(set(members or []) - {p.name for p in MEMBERS})
    if unknown:
        parser.error(f"unknown member(s) {', '.join(unknown)}")
    started = time.perf_counter()
    case = write_demo_case(out_dir / "case")
    print(f"Demo case: {case}", flush=True)
    if args.case_only:
        return 0
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="brats-demo-train-"))
    try:
        manifest = train_demo_set(out_dir, work, members, args.device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Demo model set: {manifest}")
    print(f"Total time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
