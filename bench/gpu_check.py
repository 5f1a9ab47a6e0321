#!/usr/bin/env python
"""The GPU check of issue 16: the ensemble on a CUDA device against the CPU, in one command.

    python bench/gpu_check.py --out FOLDER [--device cuda|cpu] [--dry-run] [--parts demo,mamba,goat,oom]

Writes ``FOLDER/gpu_check.json`` (every figure; rewritten after each part, so a run stopped at its time limit
still leaves the parts it finished) and ``FOLDER/gpu_check.md`` (a short table). Parts:

* ``demo`` — the shipped demo model set (nnU-Net v2, U-Mamba Bot, MedNeXt-S) on the shipped demo case through
  :func:`BraTSEnsembleLib.pipeline.segment_case`, on ``--device`` and on the CPU: share of voxels with equal labels
  (goal >= 99.9 %) and each run's Dice against the phantom's ground truth.
* ``mamba`` — the library's own Mamba block (:mod:`BraTSEnsembleLib.members.mamba`, chunked scan) with random
  weights on ``--device`` against the CPU, at U-Mamba Bot's bottleneck size and at UMambaEnc's first stage (every
  voxel of a 128³ patch a token); its chunked scan against the one-pass reference on the device; and
  ``mamba_ssm``'s fused kernel against the library when ``mamba_ssm`` imports ("not available" otherwise).
* ``oom`` — a real CUDA out-of-memory: the demo nnU-Net member (nnU-Net's own fallback, results moved to the CPU)
  and the demo MedNeXt member (the library's :func:`~BraTSEnsembleLib.members.base.with_cpu_results_on_oom`) on a
  large case, with the process's GPU memory capped (``torch.cuda.set_per_process_memory_fraction``) between what
  the pass with the results on the CPU needs and what the pass with everything on the GPU needs (found by
  bisection); proven when the fallback's notice appears and its labels equal the uncapped run's. On the CPU the
  part is reported as skipped with the reason: it is never simulated.
* ``goat`` — the timing of a GoAT-2025-sized ensemble: nnU-Net ResEnc M, L and XL plans made by nnU-Net's own
  planners (``nnUNetPlannerResEncM/L/XL``) for a BraTS-like dataset fingerprint (4 channels, 1 mm, 240×240×155
  images whose brain crop is that of the real BraTS case in shared/data/real), twice each, plus U-Mamba Bot on
  nnU-Net's default plans; random weights saved as nnU-Net checkpoints (fold_all); one 240×240×155 phantom case;
  the GoAT 2025 label rule and postprocessing. Seconds end to end and per stage, peak GPU memory, without mirroring
  (a cold run that loads the networks, then a warm one) and with mirroring.

``--dry-run`` runs every part at tiny sizes (a crop of the demo case, short sequences, a tiny fingerprint and case,
narrow networks) so that the whole check runs on a CPU in well under a minute; its figures say nothing about speed.
Exit status 0 when every part ran (skipped parts included), 1 when a part failed (its error is in the JSON).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the project
    sys.path.insert(0, str(REPO))

PARTS = ("demo", "mamba", "goat", "oom")  # the open-ended bisection of "oom" last
AGREEMENT_GOAL = 0.999
GOAT_SECONDS_GOAL = 20.0
CHANNELS = ("t1n", "t1c", "t2w", "t2f")
#: z, y, x extent of the nonzero voxels of the real BraTS case in shared/data/real (BraTS-GLI-00001-000, 1 mm,
#: 155×240×240): the "shapes_after_crop" of the BraTS-like fingerprint the planners get.
BRATS_CROP_ZYX = (137, 190, 140)


@dataclass(frozen=True)
class Sizes:
    """What each part runs on: full sizes for a device, tiny ones for --dry-run."""

    demo_crop: tuple[int, int, int] | None   # crop of the demo case around its tumour (None: the whole case)
    mamba: tuple[tuple[str, int, int], ...]  # (what, d_model, tokens)
    scan_tokens: int                         # chunked scan against the one-pass reference
    oom_case: tuple[int, int, int]           # z, y, x of the large case (the demo case mirrored out)
    oom_attempts: int
    oom_seconds: float                       # time budget of the bisection per member
    goat_case: tuple[int, int, int]          # z, y, x, 1 mm
    goat_crop: tuple[int, int, int]          # fingerprint's shapes_after_crop
    goat_features: tuple[int, int] | None    # (base, max) features to narrow the planned networks to (dry run)
    goat_mirrored_members: tuple[str, ...] | None  # members of the mirroring run (None: all seven)


FULL = Sizes(demo_crop=None,
             mamba=(("U-Mamba Bot bottleneck (320 channels, 5x6x5 tokens)", 320, 150),
                    ("UMambaEnc stage 0 (32 channels, 128^3 tokens)", 32, 128 ** 3)),
             scan_tokens=512, oom_case=(256, 320, 256), oom_attempts=5, oom_seconds=75.0,
             goat_case=(155, 240, 240), goat_crop=BRATS_CROP_ZYX, goat_features=None, goat_mirrored_members=None)
DRY = Sizes(demo_crop=(48, 56, 48),
            mamba=(("bottleneck-like (32 channels, 64 tokens)", 32, 64),
                   ("stage-0-like (8 channels, 16^3 tokens)", 8, 16 ** 3)),
            scan_tokens=64, oom_case=(64, 64, 64), oom_attempts=1, oom_seconds=10.0,
            goat_case=(16, 24, 16), goat_crop=(16, 20, 16), goat_features=(2, 8),
            goat_mirrored_members=("resenc-m", "umamba-bot"))


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (so that host timestamps mean something on CUDA)."""
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(device: Any) -> dict[str, Any]:
    """Peak GPU memory since the last reset (allocated and reserved by torch's caching allocator), in GiB."""
    torch = _torch()
    if torch.device(device).type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None, "note": "not a CUDA device"}
    return {"allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 3)}


def reset_peak(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def label_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Share of voxels with the same label, and how many differ."""
    if a.shape != b.shape:
        raise RuntimeError(f"label maps of different shapes {a.shape} and {b.shape}")
    differing = int(np.count_nonzero(a != b))
    return {"agreement": 1.0 - differing / a.size, "differing_voxels": differing, "voxels": int(a.size)}


def crop_box(labels: np.ndarray, size: tuple[int, int, int]) -> tuple[slice, ...]:
    """A box of ``size`` (z, y, x) centred on the tumour of ``labels`` (clipped to the grid)."""
    where = np.argwhere(labels > 0)
    centre = where.mean(axis=0).round().astype(int) if len(where) else np.array(labels.shape) // 2
    box = []
    for c, s, n in zip(centre, size, labels.shape):
        start = int(min(max(0, c - s // 2), max(0, n - s)))
        box.append(slice(start, start + min(s, n)))
    return tuple(box)


def sitk_crop(image: Any, box: tuple[slice, ...]) -> Any:
    """Crop a SimpleITK image by a (z, y, x) box, keeping its geometry (SimpleITK slices x, y, z)."""
    z, y, x = box
    return image[x.start:x.stop, y.start:y.stop, z.start:z.stop]


# --------------------------------------------------------------------------------------------------------------
# Part demo: the demo ensemble on the device and on the CPU
# --------------------------------------------------------------------------------------------------------------

def demo_set(manifest: Path, mirroring: bool) -> Any:
    """The shipped demo model set, read through the manifest reader; with ``mirroring`` False every member's
    test-time mirroring is switched off (the dry run: 8 times fewer network passes)."""
    from BraTSEnsembleLib.modelset import model_set_from_manifest

    data = json.loads(manifest.read_text())
    if not mirroring:
        data["members"] = [{**member, "mirroring": False} for member in data["members"]]
    return model_set_from_manifest(data, manifest, manifest.parent)


def part_demo(device: str, sizes: Sizes) -> dict[str, Any]:
    import SimpleITK as sitk

    from BraTSEnsembleLib.case import case_from_images, read_case_folder, read_image
    from BraTSEnsembleLib.demo import demo_case_folder, demo_case_info, demo_model_set
    from BraTSEnsembleLib.pipeline import segment_case
    from BraTSEnsembleLib.uncertainty import region_dice

    manifest, case_dir = demo_model_set(), demo_case_folder()
    if manifest is None:
        raise RuntimeError("the demo model set is not installed (BraTSEnsembleLib/demo/models)")
    info = demo_case_info()
    case = read_case_folder(case_dir)
    truth_image = read_image(case_dir / info["files"]["seg"]["file"])
    truth = sitk.GetArrayFromImage(truth_image)
    what = f"demo case {case.case_id}, {'x'.join(map(str, case.shape_zyx))} (z, y, x)"
    if sizes.demo_crop is not None:
        box = crop_box(truth, sizes.demo_crop)
        case = case_from_images(case.case_id, {r: sitk_crop(case.images[r], box) for r in case.roles})
        truth = truth[box]
        what = f"crop {'x'.join(map(str, case.shape_zyx))} of the demo case around its tumour (dry run)"
    runs: dict[str, dict[str, Any]] = {}
    labels: dict[str, np.ndarray] = {}
    # on the CPU (dry run) the reference is a second CPU run: the comparison itself is what is checked there
    for key, dev in (("device", device), ("cpu", "cpu")):
        model_set = demo_set(manifest, mirroring=sizes.demo_crop is None)  # fresh members per run
        reset_peak(dev)
        started = time.perf_counter()
        result = segment_case(case, model_set, dev)
        synchronize(dev)
        seconds = time.perf_counter() - started
        labels[key] = result.labels
        runs[key] = {"device": dev, "seconds": round(seconds, 2), "peak_gpu_memory": peak_memory(dev),
                     "dice_vs_truth": {r: round(region_dice(result.labels, truth, r), 4)
                                       for r in ("ET", "TC", "WT", "NETC")}}
        del model_set, result
        free_memory()
    agreement = label_agreement(labels["device"], labels["cpu"])
    mirroring = "mirroring as shipped (on)" if sizes.demo_crop is None else "mirroring off (dry run)"
    return {"status": "ran", "case": what, "members": f"nnU-Net v2, U-Mamba Bot, MedNeXt-S (demo set, {mirroring})",
            **agreement, "goal": AGREEMENT_GOAL, "meets_goal": agreement["agreement"] >= AGREEMENT_GOAL,
            "runs": runs}


# --------------------------------------------------------------------------------------------------------------
# Part mamba: the library's scan on the device against the CPU, and mamba_ssm's kernel if it imports
# --------------------------------------------------------------------------------------------------------------

def _differences(a: Any, b: Any) -> dict[str, float]:
    a, b = a.double().cpu(), b.double().cpu()
    return {"max_abs_diff": float((a - b).abs().max()),
            "rel_l2_diff": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def _timed(call: Callable[[], Any], device: str) -> tuple[Any, float]:
    synchronize(device)
    started = time.perf_counter()
    value = call()
    synchronize(device)
    return value, time.perf_counter() - started


def mamba_ssm_status() -> tuple[Any, str]:
    """(kernel or None, why): mamba_ssm's selective_scan_fn, as the library would use it."""
    from BraTSEnsembleLib.members.mamba import mamba_ssm_kernel

    kernel = mamba_ssm_kernel()
    if kernel is not None:
        return kernel, "imported"
    torch = _torch()
    if not torch.cuda.is_available():
        return None, "not available: no CUDA device"
    try:
        import mamba_ssm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"not available: import mamba_ssm failed ({type(exc).__name__}: {str(exc)[:200]})"
    return None, "not available: mamba_ssm imports but its selective_scan_fn does not"


def part_mamba(device: str, sizes: Sizes) -> dict[str, Any]:
    torch = _torch()
    from BraTSEnsembleLib.members.mamba import Mamba, selective_scan_chunked, selective_scan_reference

    kernel, kernel_status = mamba_ssm_status()
    blocks = []
    with torch.inference_mode():
        for index, (what, d_model, tokens) in enumerate(sizes.mamba):
            torch.manual_seed(index)
            block = Mamba(d_model, use_kernel=False).eval()
            x = torch.randn(1, tokens, d_model)
            y_cpu, cpu_seconds = _timed(lambda: block(x), "cpu")
            block_dev = block.to(device)
            x_dev = x.to(device)
            block_dev(x_dev[:, :min(tokens, 256)])  # warm-up (kernels load, allocator)
            y_dev, dev_seconds = _timed(lambda: block_dev(x_dev), device)
            record = {"what": what, "tokens": tokens, "d_model": d_model, "cpu_seconds": round(cpu_seconds, 3),
                      "device_seconds": round(dev_seconds, 3), **_differences(y_dev, y_cpu)}
            if kernel is not None:
                block_dev.use_kernel = True
                y_kernel, kernel_seconds = _timed(lambda: block_dev(x_dev), device)
                record["mamba_ssm"] = {"device_seconds": round(kernel_seconds, 3), **_differences(y_kernel, y_dev)}
            blocks.append(record)
            del block, block_dev, x, x_dev, y_cpu, y_dev
            free_memory()
        # the chunked scan against the one-pass reference, on the device (small chunks: many carries)
        torch.manual_seed(99)
        b, d, n, length = 1, 64, 16, sizes.scan_tokens
        args = dict(u=torch.randn(b, d, length), delta=torch.randn(b, d, length), A=-torch.rand(d, n) - 0.1,
                    B=torch.randn(b, n, length), C=torch.randn(b, n, length), D=torch.randn(d),
                    z=torch.randn(b, d, length), delta_bias=torch.randn(d), delta_softplus=True)
        args_dev = {k: v.to(device) if hasattr(v, "to") else v for k, v in args.items()}
        chunked = selective_scan_chunked(**args_dev, chunk_size=max(8, length // 8))
        reference = selective_scan_reference(**args_dev)
        scan = {"tokens": length, "d_inner": d, "d_state": n, "device": device, **_differences(chunked, reference)}
        if kernel is not None:
            scan["mamba_ssm_vs_reference"] = _differences(kernel(**args_dev), reference)
    tolerance = 1e-3
    worst = max(r["rel_l2_diff"] for r in blocks)
    return {"status": "ran", "device": device, "blocks": blocks, "chunked_vs_reference": scan,
            "mamba_ssm": kernel_status, "rel_l2_tolerance": tolerance,
            "within_tolerance": worst <= tolerance and scan["rel_l2_diff"] <= tolerance}


# --------------------------------------------------------------------------------------------------------------
# Part oom: a real CUDA out-of-memory and the fallback
# --------------------------------------------------------------------------------------------------------------

def large_demo_case(shape: tuple[int, int, int]) -> Any:
    """The demo case mirrored out (``np.pad(mode='symmetric')``) to ``shape`` (z, y, x), same 1 mm voxels: a large
    case for the memory test (its labels are only compared between runs)."""
    import SimpleITK as sitk

    from BraTSEnsembleLib.case import case_from_images, read_case_folder
    from BraTSEnsembleLib.demo import demo_case_folder

    case = read_case_folder(demo_case_folder())
    images = {}
    for role in case.roles:
        array = sitk.GetArrayFromImage(case.images[role]).astype(np.float32)
        pad = [(max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for s, n in zip(shape, array.shape)]
        array = np.pad(array, pad, mode="symmetric")[tuple(slice(0, s) for s in shape)]
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(case.images[role].GetSpacing())
        image.SetDirection(case.images[role].GetDirection())
        images[role] = image
    return case_from_images("LargeDemo", images)


def _member_labels(member: Any, case: Any, device: str) -> tuple[np.ndarray, str, list[str]]:
    """The member's own labels, with nnU-Net's stdout and the warnings raised while it ran."""
    from BraTSEnsembleLib.ensemble import fused_labels

    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        probabilities = member.predict(case, _torch().device(device))
    return fused_labels(probabilities, None), printed.getvalue(), [str(w.message) for w in caught]


def _fallback_noticed(printed: str, warned: list[str]) -> str | None:
    """The fallback's own notice: nnU-Net prints one, the library warns (RuntimeWarning)."""
    for line in printed.splitlines():
        if "Prediction on device was unsuccessful" in line:
            return "nnU-Net: " + line.strip()[:200]
    for message in warned:
        if "CUDA out of memory" in message and "results on the CPU" in message:
            return "library: " + message[:300]
    return None


def _oom_member(make_member: Callable[[], Any], case: Any, device: str, sizes: Sizes) -> dict[str, Any]:
    torch = _torch()
    total = torch.cuda.get_device_properties(device).total_memory
    free_memory()
    member = make_member()
    reference, _, _ = _member_labels(member, case, device)  # warm-up: network built, cuDNN chosen
    del member
    free_memory()
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    reset_peak(device)
    member = make_member()
    started = time.perf_counter()
    reference, _, _ = _member_labels(member, case, device)
    uncapped_seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_reserved(device)
    del member
    attempts: list[dict[str, Any]] = []
    low, high = 0, peak  # the cap: below `low` even the fallback fails; at `high` nothing runs out
    began = time.perf_counter()
    proven = None
    try:
        while len(attempts) < sizes.oom_attempts and time.perf_counter() - began < sizes.oom_seconds:
            cap = (low + high) // 2
            free_memory()
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
            reset_peak(device)
            record: dict[str, Any] = {"cap_gib": round(cap / 2 ** 30, 3)}
            member = make_member()
            started = time.perf_counter()
            try:
                labels, printed, warned = _member_labels(member, case, device)
            except Exception as exc:  # noqa: BLE001 - an out-of-memory the fallback could not absorb: cap too low
                record.update(outcome="failed even with the fallback", error=f"{type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}")
                low = cap
            else:
                notice = _fallback_noticed(printed, warned)
                same = label_agreement(labels, reference)
                record.update(seconds=round(time.perf_counter() - started, 2), **same,
                              outcome="out of memory, fallback completed" if notice else "no out-of-memory",
                              notice=notice)
                if notice is None:
                    high = cap
                else:
                    proven = record
            finally:
                del member
                free_memory()
            attempts.append(record)
            if proven is not None:
                break
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        free_memory()
    return {"uncapped_peak_reserved_gib": round(peak / 2 ** 30, 3), "uncapped_seconds": round(uncapped_seconds, 2),
            "attempts": attempts, "fallback_proven": bool(proven and proven["differing_voxels"] == 0),
            "fallback_labels_agreement": proven["agreement"] if proven else None}


def part_oom(device: str, sizes: Sizes) -> dict[str, Any]:
    torch = _torch()
    if torch.device(device).type != "cuda":
        return {"status": "skipped", "reason": f"--device {device}: a real CUDA out-of-memory needs a CUDA device; "
                "it is never simulated here, so the fallback is not proven by this run"}
    from BraTSEnsembleLib.demo import MODELS_DIR
    from BraTSEnsembleLib.members.mednext import MedNeXtMember
    from BraTSEnsembleLib.members.nnunet import NnUNetMember

    case = large_demo_case(sizes.oom_case)
    makers = {
        "nnunet (nnU-Net's own fallback)": lambda: NnUNetMember(
            MODELS_DIR / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres", use_mirroring=False),
        "mednext (library's with_cpu_results_on_oom)": lambda: MedNeXtMember(
            MODELS_DIR / "nnUNetTrainerV2_MedNeXt_S_kernel3__nnUNetPlansv2.1_trgSp_2x2x2", use_mirroring=False),
    }
    members = {name: _oom_member(make, case, device, sizes) for name, make in makers.items()}
    return {"status": "ran", "case": f"the demo case mirrored out to {'x'.join(map(str, sizes.oom_case))} (z, y, x), "
            "1 mm", "members": members, "fallback_proven": all(m["fallback_proven"] for m in members.values())}


# --------------------------------------------------------------------------------------------------------------
# Part goat: a GoAT-2025-sized ensemble, random weights, timed
# --------------------------------------------------------------------------------------------------------------

GOAT_DATASET_ID, GOAT_DATASET = 990, "Dataset990_GoATSized"
#: (member name, planner class, plans name, trainer name, seed of its random weights)
GOAT_MEMBERS = (
    ("resenc-m", "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "nnUNetTrainer", 1),
    ("resenc-l", "nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "nnUNetTrainer", 2),
    ("resenc-xl", "nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", "nnUNetTrainer", 3),
    ("resenc-m-ft", "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "nnUNetTrainer", 4),
    ("resenc-l-ft", "nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "nnUNetTrainer", 5),
    ("resenc-xl-ft", "nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", "nnUNetTrainer", 6),
    ("umamba-bot", "ExperimentPlanner", "nnUNetPlans", "nnUNetTrainerUMambaBot", 7),
)
DATASET_JSON = {"channel_names": {str(i): role for i, role in enumerate(CHANNELS)},
                "labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3},
                "numTraining": 1251, "file_ending": ".nii.gz",
                "description": "BraTS-like fingerprint for timing (bench/gpu_check.py); no images, no training"}


def plan_goat(work: Path, sizes: Sizes) -> dict[str, dict]:
    """nnU-Net's own planners on a BraTS-like fingerprint; returns {plans name: plans}. nnU-Net's folder variables
    must point into ``work`` before nnunetv2 is first imported (see :func:`main`)."""
    import SimpleITK as sitk

    raw = work / "raw" / GOAT_DATASET
    preprocessed = work / "preprocessed" / GOAT_DATASET
    for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
        folder.mkdir(parents=True, exist_ok=True)
    # the planner reads one image only to choose its reader; the fingerprint holds what it plans from
    tiny = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    for channel in range(len(CHANNELS)):
        sitk.WriteImage(tiny, str(raw / "imagesTr" / f"BraTSLike_{channel:04d}.nii.gz"))
    sitk.WriteImage(sitk.Cast(tiny, sitk.sitkUInt8), str(raw / "labelsTr" / "BraTSLike.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=2))
    intensity = {"mean": 500.0, "median": 480.0, "std": 200.0, "min": 0.0, "max": 3000.0,
                 "percentile_99_5": 1800.0, "percentile_00_5": 20.0}
    cases = 10
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * cases, "shapes_after_crop": [list(sizes.goat_crop)] * cases,
                   "median_relative_size_after_cropping": float(np.prod(sizes.goat_crop) / np.prod(sizes.goat_case)),
                   "foreground_intensity_properties_per_channel": {str(c): intensity for c in range(len(CHANNELS))}}
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))

    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners

    from BraTSEnsembleLib.demo.nnunet_train import narrow_plans

    planners = {"ExperimentPlanner": default_experiment_planner.ExperimentPlanner,
                **{name: getattr(residual_encoder_unet_planners, name)
                   for name in ("nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL")}}
    plans: dict[str, dict] = {}
    for _, planner_name, plans_name, _, _ in GOAT_MEMBERS:
        if plans_name in plans:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            planners[planner_name](GOAT_DATASET_ID).plan_experiment()
        planned = json.loads((preprocessed / f"{plans_name}.json").read_text())
        if sizes.goat_features is not None:
            planned = narrow_plans(planned, "3d_fullres", sizes.goat_features[1], sizes.goat_features[0])
        plans[plans_name] = planned
    return plans


def _random_network(plans: dict, trainer: str, seed: int) -> Any:
    torch = _torch()
    torch.manual_seed(seed)
    if trainer == "nnUNetTrainerUMambaBot":
        from BraTSEnsembleLib.members.umamba import build_umamba_network

        return build_umamba_network(trainer, plans, "3d_fullres", len(CHANNELS), 4)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  len(CHANNELS), 4, allow_init=True, deep_supervision=False)


def write_goat_models(models: Path, plans: dict[str, dict]) -> dict[str, Any]:
    """One results folder per member (``<name>/<trainer>__<plans>__3d_fullres``: plans.json, dataset.json,
    fold_all/checkpoint_final.pth holding random weights in nnU-Net's checkpoint layout); returns a description."""
    torch = _torch()
    described = {}
    for name, _, plans_name, trainer, seed in GOAT_MEMBERS:
        folder = models / name / f"{trainer}__{plans_name}__3d_fullres"
        (folder / "fold_all").mkdir(parents=True, exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(plans[plans_name], indent=2))
        (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=2))
        network = _random_network(plans[plans_name], trainer, seed)
        checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                      "current_epoch": 0, "_best_ema": None, "trainer_name": trainer,
                      "inference_allowed_mirroring_axes": (0, 1, 2),
                      "init_args": {"plans": plans[plans_name], "configuration": "3d_fullres", "fold": "all",
                                    "dataset_json": DATASET_JSON}}
        torch.save(checkpoint, folder / "fold_all" / "checkpoint_final.pth")
        configuration = plans[plans_name]["configurations"]["3d_fullres"]
        described[name] = {"plans": plans_name, "trainer": trainer, "patch_size": configuration["patch_size"],
                           "features_per_stage": configuration["architecture"]["arch_kwargs"]["features_per_stage"],
                           "parameters_millions": round(sum(p.numel() for p in network.parameters()) / 1e6, 2)}
        del network, checkpoint
    return described


def write_goat_manifest(models: Path, mirroring: bool, only: tuple[str, ...] | None = None) -> Path:
    """The GoAT 2025 recipe's manifest over the members written by :func:`write_goat_models` (``only``: a subset)."""
    path = models / f"goat-sized{'-mirrored' if mirroring else ''}.json"
    path.write_text(json.dumps({
        "name": "goat2025-sized, random weights (bench/gpu_check.py)",
        "description": "GoAT 2025's seven members in size and kind, random weights: timing only",
        "labels": "sequential-threshold", "postprocess": "ratio-adaptive",
        "members": [{"name": name, "framework": "umamba" if "UMamba" in trainer else "nnunetv2",
                     "path": f"{name}/{trainer}__{plans_name}__3d_fullres", "folds": ["all"], "mirroring": mirroring}
                    for name, _, plans_name, trainer, _ in GOAT_MEMBERS if only is None or name in only]},
                   indent=2))
    return path


class StageClock:
    """Seconds per stage of one segment_case run, from its progress events, each member's predict() and nnU-Net's
    network pass (``ProgressPredictor.predict_logits_from_preprocessed_data``); CUDA is synchronised at each
    boundary so the host clock measures the device's work. Stages: load (network built, weights read), preprocessing
    (nnU-Net's, on the CPU), network (sliding window over all folds), export (back to the case grid), fusion (member
    labels, weighted sum, fused labels), postprocessing (rules, statistics, uncertainty)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stages = {k: 0.0 for k in ("load", "preprocessing", "network", "export", "fusion", "postprocessing")}
        self.per_member: list[dict[str, float]] = []
        self._marks: dict[str, float] = {}

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def progress(self, event: Any) -> None:
        t = self.now()
        if event.event == "member-start":
            self._marks = {"start": t}
        elif event.event == "member-step" and "predicting" in event.message and "loaded" not in self._marks:
            self._marks["loaded"] = t
        elif event.event == "member-done":
            self.stages["fusion"] += t - self._marks["returned"]
            self._marks["done"] = t
            self._last_done = t
        elif event.event == "postprocess":
            self.stages["fusion"] += t - self._last_done
            self._marks["postprocess"] = t

    def network_started(self) -> None:
        self._marks["network"] = self.now()

    def network_finished(self) -> None:
        self._marks["network_done"] = self.now()

    def member_returned(self) -> None:
        t = self.now()
        m = self._marks
        m["returned"] = t
        loaded = m.get("loaded", m["start"])
        split = {"load": loaded - m["start"], "preprocessing": m["network"] - loaded,
                 "network": m["network_done"] - m["network"], "export": t - m["network_done"]}
        for key, value in split.items():
            self.stages[key] += value
        self.per_member.append({k: round(v, 3) for k, v in split.items()})

    def finished(self) -> None:
        self.stages["postprocessing"] += self.now() - self._marks["postprocess"]


@contextlib.contextmanager
def instrumented(model_set: Any, clock: StageClock):
    """Hook the clock into nnU-Net's network pass and each member's predict(), for the duration only."""
    from BraTSEnsembleLib.members.nnunet_progress import ProgressPredictor

    original = ProgressPredictor.predict_logits_from_preprocessed_data

    def network_pass(self: Any, data: Any) -> Any:
        clock.network_started()
        logits = original(self, data)
        clock.network_finished()
        return logits

    def timed(predict: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            probabilities = predict(*args, **kwargs)
            clock.member_returned()
            return probabilities
        return wrapper

    ProgressPredictor.predict_logits_from_preprocessed_data = network_pass
    for member in model_set.members:
        member.predict = timed(member.predict)
    try:
        yield
    finally:
        ProgressPredictor.predict_logits_from_preprocessed_data = original
        for member in model_set.members:
            del member.predict


def timed_run(model_set: Any, case_dir: Path, out_dir: Path, device: str) -> dict[str, Any]:
    """Read the case, segment it, write the results: seconds end to end and per stage, peak GPU memory."""
    from BraTSEnsembleLib.case import read_case_folder
    from BraTSEnsembleLib.pipeline import segment_case, write_result

    clock = StageClock(device)
    free_memory()
    reset_peak(device)
    with instrumented(model_set, clock):
        started = clock.now()
        case = read_case_folder(case_dir)
        read = clock.now()
        result = segment_case(case, model_set, device, progress=clock.progress)
        clock.finished()
        segmented = clock.now()
        write_result(result, out_dir, overwrite=True)
        written = clock.now()
    stages = {"read_case": read - started, **clock.stages, "write_results": written - segmented}
    return {"seconds_end_to_end": round(written - started, 2),
            "seconds_per_stage": {k: round(v, 2) for k, v in stages.items()},
            "seconds_per_member": clock.per_member, "peak_gpu_memory": peak_memory(device),
            "labels": result.labels}


def part_goat(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    from BraTSEnsembleLib.demo.phantom import make_phantom
    from BraTSEnsembleLib.modelset import load_model_set

    started = time.perf_counter()
    plans = plan_goat(Path(os.environ["nnUNet_raw"]).parent, sizes)  # nnU-Net's folders (set in main)
    models = work / "goat-models"
    described = write_goat_models(models, plans)
    phantom = make_phantom(2025, shape=sizes.goat_case)
    case_dir = phantom.write(work / "goat-case", integer_images=True)
    prepared = time.perf_counter() - started
    runs = {}
    labels = {}
    for key, mirroring in (("no_mirroring_cold", False), ("no_mirroring_warm", False), ("mirroring", True)):
        if key != "no_mirroring_warm":  # the warm run reuses the cold run's members (networks already built)
            model_set = load_model_set(write_goat_manifest(models, mirroring,
                                                           sizes.goat_mirrored_members if mirroring else None))
        run = timed_run(model_set, case_dir, work / f"goat-out-{key}", device)
        labels[key] = run.pop("labels")
        runs[key] = run
    del model_set
    free_memory()
    warm = runs["no_mirroring_warm"]["seconds_end_to_end"]
    return {"status": "ran", "device": device, "case": f"phantom {'x'.join(map(str, sizes.goat_case))} (z, y, x), 1 mm",
            "fingerprint_shapes_after_crop": list(sizes.goat_crop),
            "narrowed_to_features": list(sizes.goat_features) if sizes.goat_features else None,
            "members": described, "mirroring_run_members": list(sizes.goat_mirrored_members or described),
            "seconds_preparing": round(prepared, 1), "runs": runs,
            "cold_vs_warm_labels": label_agreement(labels["no_mirroring_cold"], labels["no_mirroring_warm"]),
            "goal_seconds_no_mirroring": GOAT_SECONDS_GOAL, "meets_goal_warm": warm <= GOAT_SECONDS_GOAL,
            "meets_goal_cold": runs["no_mirroring_cold"]["seconds_end_to_end"] <= GOAT_SECONDS_GOAL}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.4f} %"


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# GPU check ({'DRY RUN, tiny sizes: no speed figures' if meta['dry_run'] else 'full sizes'})", "",
             f"device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, python {meta['python']}, "
             f"{meta['seconds']} s in all", "", "| part | figure | value |", "| --- | --- | --- |"]
    parts = report["parts"]
    for name in PARTS:
        part = parts.get(name)
        if part is None:
            continue
        if part["status"] != "ran":
            lines.append(f"| {name} | {part['status']} | {part.get('reason') or part.get('error', '')} |")
            continue
        if name == "demo":
            lines.append(f"| demo | labels equal, {part['runs']['device']['device']} vs cpu | "
                         f"{_pct(part['agreement'])} ({part['differing_voxels']} voxels differ; goal "
                         f"{_pct(part['goal'])}) |")
            for key, run in part["runs"].items():
                dice = ", ".join(f"{r} {v:.3f}" for r, v in run["dice_vs_truth"].items())
                lines.append(f"| demo | {run['device']}: seconds; Dice vs truth | {run['seconds']} s; {dice} |")
        elif name == "mamba":
            for block in part["blocks"]:
                lines.append(f"| mamba | {block['what']}: rel. L2 diff {part['device']} vs cpu; s cpu / device | "
                             f"{block['rel_l2_diff']:.2e}; {block['cpu_seconds']} / {block['device_seconds']} |")
            lines.append(f"| mamba | chunked vs one-pass scan on {part['device']} (rel. L2) | "
                         f"{part['chunked_vs_reference']['rel_l2_diff']:.2e} |")
            lines.append(f"| mamba | mamba_ssm kernel | {part['mamba_ssm']} |")
        elif name == "oom":
            for member, record in part["members"].items():
                last = record["attempts"][-1] if record["attempts"] else {}
                lines.append(f"| oom | {member} | proven: {record['fallback_proven']}; {len(record['attempts'])} "
                             f"cap(s) tried, last {last.get('cap_gib')} GiB: {last.get('outcome')} |")
        elif name == "goat":
            for key, run in part["runs"].items():
                stages = ", ".join(f"{k} {v}" for k, v in run["seconds_per_stage"].items())
                memory = run["peak_gpu_memory"]["allocated_gib"]
                lines.append(f"| goat | {key}: seconds end to end (per stage); peak GPU GiB | "
                             f"{run['seconds_end_to_end']} ({stages}); {memory} |")
    return "\n".join(lines) + "\n"


def run_check(out: Path, device: str, dry_run: bool, parts: list[str]) -> int:
    sizes = DRY if dry_run else FULL
    torch = _torch()
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device}, but this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
              "(with --dry-run for the quick check)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"meta": {
        "device": device, "dry_run": dry_run, "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
        or platform.machine(), "cpu_threads": torch.get_num_threads(), "parts": parts,
        "note": ("CPU dry run at tiny sizes: it checks that the check runs, its times are not GPU figures"
                 if dry_run else "full sizes")}, "parts": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for name in parts:
            print(f"[gpu_check] {name} ...", flush=True)
            part_started = time.perf_counter()
            try:
                if name == "demo":
                    result = part_demo(device, sizes)
                elif name == "mamba":
                    result = part_mamba(device, sizes)
                elif name == "oom":
                    result = part_oom(device, sizes)
                else:
                    result = part_goat(device, sizes, work)
            except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
                failed = True
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
                print(result["traceback"], file=sys.stderr, flush=True)
            result["seconds_part"] = round(time.perf_counter() - part_started, 1)
            report["parts"][name] = result
            report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "gpu_check.md").write_text(markdown(report))
            print(f"[gpu_check] {name}: {result['status']} in {result['seconds_part']} s", flush=True)
            free_memory()
    print(markdown(report), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: the whole check on a CPU in < 60 s")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    # nnU-Net reads its folder variables when first imported: point them into a folder of this run's own first
    with tempfile.TemporaryDirectory(prefix="gpu-check-nnunet-") as nn_work:
        from BraTSEnsembleLib.demo.nnunet_train import set_nnunet_folders

        set_nnunet_folders(Path(nn_work))
        return run_check(args.out, args.device, args.dry_run, parts)


if __name__ == "__main__":
    sys.exit(main())
