"""Numbers and headers checked before any work (docs/bad-input.md, rows "Numbers" and "Headers").

Every row runs the real ``brats-ensemble`` command line as a subprocess on real files built here: weights and tile
steps on the command line and in manifests (``Infinity``/``NaN`` as Python's json reads them), image headers that
promise gigabytes (a 3 kB ``.nii.gz`` claiming 1024³ float32 voxels, a sparse 1200³ ``.nii``), spacings of 100 mm
and 0.01 mm, and sheared directions in every format. A row passes when the run ends with exit 1, one ``error:`` line
naming the file (or option, or manifest and member), the range or budget and the fix, nothing written and nothing of
the user's changed (:func:`test_bad_input_matrix.assert_refused`). Header rows also read the peak memory (maximum
resident set size) of the refused process: well below what the header promises, so nothing big was allocated.

The model is the shipped demo nnU-Net v2 model (real, trained; no training needed for these rows).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib import demo
from BraTSEnsembleLib.case import case_from_images
from BraTSEnsembleLib.errors import InputError
from test_bad_input_matrix import (ROOT, Run, Workspace, assert_refused, case_file, phantom,  # noqa: F401
                                   workspace)

MODEL = demo.MODELS_DIR / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"
FAST = ("--device", "cpu", "--progress", "none")
#: Peak memory a refused run may reach: importing torch, nnU-Net and SimpleITK takes about 370 MiB here; the images
#: refused below promise 3.2 to 4 GiB as stored (before the fix they cost 4.6 GB and 7.2 GB to refuse).
REFUSAL_PEAK_BYTES = 1 * 2 ** 30


#: The command line, which writes its peak resident memory (VmHWM: the high-water mark of this process image since
#: exec, unlike ru_maxrss, which Linux carries over from the forking parent) to the file $PEAK_FILE as it exits.
PEAK_WRAPPER = """
import atexit, os, sys
def _write_peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as out:
        out.write(peak)  # kB
atexit.register(_write_peak)
from BraTSEnsembleLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_measured(*args: str | Path) -> tuple[Run, int]:
    """``brats-ensemble ARGS`` as a subprocess; (its run, its peak resident memory in bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PEAK_FILE": str(peak_file)}, timeout=600)
        peak = int(peak_file.read_text()) * 1024
    return Run(done.returncode, done.stdout, done.stderr), peak


def predict(ws: Workspace, *extra: str | Path) -> tuple[Run, int]:
    return run_measured("predict", ws.case_dir, "-o", ws.out, "-m", MODEL, *FAST, *extra)


# ================================================================================================================
# Numbers


@pytest.mark.parametrize("value", ["inf", "1e39", "1e-46", "nan", "0"])
def test_weight_option_out_of_range(workspace: Workspace, value: str) -> None:
    workspace.freeze()
    run, _ = predict(workspace, "--weight", value)
    assert_refused(run, workspace, ["--weight", "a weight must be", "between 0.001 and 1000"],
                   r"Weights are relative \(1 = the default")


@pytest.mark.parametrize("value", ["0", "nan", "-0.5", "1e-6"])
def test_tile_step_option_out_of_range(workspace: Workspace, value: str) -> None:
    """Before: 0, nan and -0.5 gave an AssertionError traceback after the models were loaded; 1e-6 took 8.7 GB and
    more. Now one error line before anything is read."""
    workspace.freeze()
    run, _ = predict(workspace, "--tile-step", value)
    assert_refused(run, workspace, ["--tile-step", "the sliding-window step must be", "between 0.1 and 1"],
                   r"Use e\.g\. 0\.5")
    assert "Traceback" not in run.stderr


MANIFEST_NUMBERS: dict[str, tuple[str, str, str]] = {
    # JSON text of the member's value (Infinity and NaN as Python's json reads them), key, what the error says
    "weight-Infinity": ('"weight": Infinity', "weight", "weight must be a finite number, got Infinity"),
    "weight-NaN": ('"weight": NaN', "weight", "weight must be a finite number, got NaN"),
    "weight-1e39": ('"weight": 1e39', "weight", "weight must be between 0.001 and 1000"),
    "weight-1e-46": ('"weight": 1e-46', "weight", "weight must be between 0.001 and 1000"),
    "class-weight-Infinity": ('"class_weights": {"ET": Infinity}', "class_weights['ET']",
                              "class_weights['ET'] must be a finite number, got Infinity"),
    "tile-step-1e-6": ('"tile_step": 1e-6', "tile_step", "tile_step must be between 0.1 and 1"),
    "tile-step-0": ('"tile_step": 0', "tile_step", "tile_step must be a positive number"),
    "tile-step-NaN": ('"tile_step": NaN', "tile_step", "tile_step must be a finite number, got NaN"),
}


@pytest.mark.parametrize("row", list(MANIFEST_NUMBERS))
def test_manifest_numbers_out_of_range(workspace: Workspace, tmp_path: Path, row: str) -> None:
    """Before: "weight": Infinity gave an empty segmentation with exit 0, "class_weights": {"ET": Infinity} made
    every voxel ET, "tile_step": 1e-6 ran out of memory."""
    text, key, problem = MANIFEST_NUMBERS[row]
    manifest = tmp_path / "sets" / "set.json"
    manifest.parent.mkdir()
    manifest.write_text('{"members": [{"name": "toy", "framework": "nnunetv2", "path": %s, %s}]}'
                        % (json.dumps(str(MODEL)), text))
    workspace.watch(manifest.parent)
    workspace.freeze()
    run, _ = run_measured("predict", workspace.case_dir, "-o", workspace.out, "--model-set", manifest, *FAST)
    assert_refused(run, workspace, [manifest, "member 1 ('toy')", key, problem], r"between 0\.\d+ and 1")


# ================================================================================================================
# Headers


def nifti_header(shape: tuple[int, ...], dtype: type) -> bytes:
    """A NIfTI-1 header (348 bytes) and the 4-byte extension flag, for voxels of ``shape`` and ``dtype`` at 1 mm."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    header.set_qform(np.eye(4), code=1)
    return header.binaryblock + b"\0" * 4


def assert_small_peak(peak: int) -> None:
    assert peak < REFUSAL_PEAK_BYTES, f"the refusal took {peak / 2 ** 20:.0f} MiB"


def test_header_of_a_small_gz_promising_1024_cubed(workspace: Workspace) -> None:
    """A 3 kB .nii.gz whose header claims 1024³ float32 voxels (4 GiB): refused from its header."""
    path = case_file(workspace, "t1c")
    with gzip.open(path, "wb") as handle:
        handle.write(nifti_header((1024, 1024, 1024), np.float32) + b"\1" * 3000)
    assert path.stat().st_size < 10_000
    workspace.freeze()
    run, peak = predict(workspace)
    assert_refused(run, workspace, [path, "1024 × 1024 × 1024 voxels of 32-bit float", "4.0 GiB as stored",
                                    "needs about 68.0 GiB", "memory budget of 16.0 GiB"],
                   r"raise the budget with --memory-budget GIB")
    assert_small_peak(peak)


def test_header_of_a_sparse_nii_of_1200_cubed(tmp_path: Path, phantom) -> None:  # noqa: F811
    """A sparse .nii of 1200³ int16 voxels (3.2 GiB that occupy almost no disk): refused from its header. (The
    sparse file itself is not hashed by the workspace: reading it would take 3.2 GiB here.)"""
    sparse = phantom.write(tmp_path / "sparse")
    ws = workspace_without(sparse, phantom, tmp_path, "t1c")
    path = sparse / f"{phantom.case_id}-t1c.nii"
    with path.open("wb") as handle:
        handle.write(nifti_header((1200, 1200, 1200), np.int16))
        handle.truncate(352 + 2 * 1200 ** 3)
    if path.stat().st_blocks * 512 > 2 ** 20:
        pytest.skip("this file system does not keep sparse files")
    before, files = path.stat(), sorted(sparse.iterdir())
    ws.freeze()
    run, peak = predict(ws)
    assert_refused(run, ws, [path, "1200 × 1200 × 1200 voxels of 16-bit signed integer",
                             "memory budget of 16.0 GiB"], r"raise the budget with --memory-budget GIB")
    assert_small_peak(peak)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert sorted(sparse.iterdir()) == files


def workspace_without(case_dir: Path, phantom, tmp_path: Path, role: str) -> Workspace:  # noqa: F811
    """A workspace on ``case_dir`` without the ``role`` file, watching only the output folder (with the user's
    notes)."""
    (case_dir / f"{phantom.case_id}-{role}.nii.gz").unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes\n")
    return Workspace(case_dir, out, phantom.case_id, [out])


def test_memory_budget_option_sets_the_budget(workspace: Workspace) -> None:
    """--memory-budget is the budget the header is checked against: 2 MiB refuses the 40×44×40 phantom."""
    workspace.freeze()
    run, _ = predict(workspace, "--memory-budget", str(2 / 1024))
    assert_refused(run, workspace, [case_file(workspace, "t1n"), "40 × 44 × 40 voxels of 32-bit float",
                                    "memory budget of 2.0 MiB"], r"--memory-budget GIB")
    run, _ = predict(workspace, "--memory-budget", "0")
    assert_refused(run, workspace, ["--memory-budget 0.0", "a number > 0"], r"in GiB")


def set_spacing(ws: Workspace, spacing: float) -> None:
    for role in ("t1n", "t1c", "t2w", "t2f"):
        image = sitk.ReadImage(str(case_file(ws, role)))
        image.SetSpacing((spacing,) * 3)
        sitk.WriteImage(image, str(case_file(ws, role)))


@pytest.mark.parametrize("spacing", [100.0, 0.01], ids=["100mm", "0.01mm"])
def test_implausible_spacing(workspace: Workspace, spacing: float) -> None:
    """Before: 100 mm tried to allocate 590 GiB (MemoryError traceback), 0.01 mm gave a ValueError traceback."""
    set_spacing(workspace, spacing)
    workspace.freeze()
    run, peak = predict(workspace)
    assert_refused(run, workspace, [case_file(workspace, "t1n"), f"voxel spacing {spacing:g} × {spacing:g} × "
                                    f"{spacing:g} mm", "outside what MRI and CT use (0.1 to 10 mm per axis)"],
                   r"Fix the spacing in the header, or pass --allow-unusual-spacing")
    assert_small_peak(peak)


@pytest.mark.parametrize("spacing, problem", [
    (100.0, "a grid of 2000 × 2200 × 2000 voxels; segmenting it needs about 524.5 GiB of memory, more than the "
            "memory budget of 16.0 GiB"),
    (0.01, "a grid of 0 × 0 × 0 voxels: the image is smaller than one voxel of the model"),
], ids=["100mm", "0.01mm"])
def test_unusual_spacing_allowed_still_fits_the_model_grid(workspace: Workspace, spacing: float,
                                                           problem: str) -> None:
    """With --allow-unusual-spacing the grid each model resamples to is checked against the memory budget before
    any model runs (the demo model works at 2 mm)."""
    set_spacing(workspace, spacing)
    workspace.freeze()
    run, peak = predict(workspace, "--allow-unusual-spacing")
    assert_refused(run, workspace, [f"case {workspace.case_id}", f"model {MODEL.name} resamples it from spacing "
                                    f"{spacing:g} × {spacing:g} × {spacing:g} mm to its spacing 2 × 2 × 2 mm",
                                    problem], r"--memory-budget GIB|Check the spacing in the header")
    assert_small_peak(peak)


SHEAR = (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_sheared(image: sitk.Image, path: Path) -> None:
    """``image`` with a sheared direction: through ITK for NRRD/MetaImage (which keep it), through nibabel's sform
    for NIfTI (ITK's NIfTI writer would coerce it)."""
    if path.name.endswith((".nii", ".nii.gz")):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's LPS → NIfTI's RAS
        affine[0, 1] = 0.3
        nibabel.save(nibabel.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine), str(path))
    else:
        image.SetDirection(SHEAR)
        sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("ending", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_non_orthonormal_direction(workspace: Workspace, ending: str) -> None:
    """Before: an .mha with a sheared direction was accepted and its volumes computed from the spacing alone; ITK's
    NIfTI reader turns a sheared sform into a rotation without a word."""
    original = case_file(workspace, "t2w")
    image = sitk.ReadImage(str(original))
    original.unlink()
    path = workspace.case_dir / f"{workspace.case_id}-t2w{ending}"
    write_sheared(image, path)
    workspace.freeze()
    run, _ = predict(workspace)
    assert_refused(run, workspace, [path, "non-orthonormal direction matrix", "sheared or scaled axes"],
                   r"resample the image onto an orthogonal grid")


def test_images_in_memory_are_checked_too(phantom) -> None:  # noqa: F811
    """What the Slicer module and the Python console hand over (no file): spacing and direction are checked."""
    images = {role: phantom.to_sitk(array) for role, array in phantom.images.items()}
    images["t2w"].SetDirection(SHEAR)
    with pytest.raises(InputError, match="non-orthonormal direction"):
        case_from_images("x", images)
    images["t2w"].SetDirection(np.eye(3).ravel().tolist())
    images["t1n"].SetSpacing((100.0, 100.0, 100.0))
    with pytest.raises(InputError, match="--allow-unusual-spacing"):
        case_from_images("x", images)
