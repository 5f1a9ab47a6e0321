"""The bad-input matrix (docs/bad-input.md): every row through the real ``brats-ensemble`` command line.

A refusal row checks four things (:func:`assert_refused`):

1. a non-zero exit status (1; 130 for a cancel);
2. an ``error:`` message that names the offending file, volume, folder or manifest and says the fix;
3. nothing that looks complete in the output folder (no ``<id>.nii.gz``, ``<id>.json`` or uncertainty map) and no
   temporary file;
4. nothing of the user's changed: every file in the watched folders (inputs, models, the output folder with the
   user's earlier files) has the SHA-256 it had before the run, and no file was added.

The integer-type rows are PASS rows: integer volumes give the labels of the float32 volumes of the same values.

The command line runs in this process (``cli.main``) unless a process-level effect is the point of the row (a
signal, a file-size limit, dropped privileges, no visible GPU): then it runs as a subprocess.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib import cli
from BraTSEnsembleLib.demo.phantom import Phantom, make_phantom
from test_downloads import FileServer, server, sha  # noqa: F401 (server: the local HTTP server fixture)

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--folds", "0", "--no-mirroring", "--device", "cpu", "--progress", "none")
OTHER_CASE = "Other-00001"  # an earlier result of another case in the user's output folder


# ----------------------------------------------------------------------------------------------------------------
# Running the command line


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The ``error: …`` lines of stderr, joined."""
        return "\n".join(line for line in self.stderr.splitlines() if line.startswith("error: "))


def run_cli(*args: str | Path) -> Run:
    """``brats-ensemble ARGS`` in this process (the SIGTERM handler it installs is put back afterwards)."""
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return Run(code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str | Path, prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                    preexec_fn: Callable[[], None] | None = None, timeout: float = 600) -> Run:
    """``brats-ensemble ARGS`` as a subprocess (``prefix`` goes before the interpreter, e.g. setpriv)."""
    command = [*prefix, sys.executable, "-m", "BraTSEnsembleLib.cli", *[str(a) for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, preexec_fn=preexec_fn,
                          timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


# ----------------------------------------------------------------------------------------------------------------
# The user's files


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Workspace:
    """A case folder, an output folder holding the user's earlier files, and the folders whose files must not
    change. :meth:`freeze` records the SHA-256 of every watched file once the row's bad input is in place."""

    case_dir: Path
    out: Path
    case_id: str
    watched: list[Path]
    before: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, str]:
        files = {}
        for folder in self.watched:
            if folder.is_dir():
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        files[str(path)] = sha256_of(path)
        return files

    def freeze(self) -> None:
        self.before = self.snapshot()
        assert self.before, "nothing to watch"

    def watch(self, *folders: Path) -> None:
        self.watched.extend(folders)


def write_image(array: np.ndarray, phantom: Phantom, path: Path) -> Path:
    sitk.WriteImage(phantom.to_sitk(array), str(path))
    return path


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A small phantom (fast to segment), never used for training."""
    return make_phantom(9101, shape=(40, 44, 40))


@pytest.fixture
def workspace(tmp_path: Path, phantom: Phantom) -> Workspace:
    case_dir = phantom.write(tmp_path / "cases")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes, in the output folder\n")
    write_image(phantom.labels, phantom, out / f"{OTHER_CASE}.nii.gz")
    (out / f"{OTHER_CASE}.json").write_text(json.dumps({"case_id": OTHER_CASE, "regions": {}}))
    return Workspace(case_dir, out, phantom.case_id, [case_dir.parent, out])


def case_file(ws: Workspace, role: str) -> Path:
    return ws.case_dir / f"{ws.case_id}-{role}.nii.gz"


def outputs_of(ws: Workspace) -> list[str]:
    """Files in the output folder that belong to this case or are temporary (partial) files."""
    return sorted(p.name for p in ws.out.glob("*") if p.name.startswith((ws.case_id, f".{ws.case_id}"))
                  or ".partial" in p.name) if ws.out.is_dir() else []


def assert_refused(run: Run, ws: Workspace, names: Sequence[str | Path], fix: str, code: int = 1) -> None:
    """The four checks of a refusal row (see the module docstring)."""
    assert run.code == code, f"exit {run.code}, expected {code}\n{run.stderr[-4000:]}"
    message = run.error
    assert message, f"no 'error: …' line on stderr:\n{run.stderr[-4000:]}"
    for name in names:
        assert str(name) in message, f"{name!r} not named in:\n{message}"
    assert re.search(fix, message), f"no fix ({fix!r}) in:\n{message}"
    assert outputs_of(ws) == [], f"left in the output folder: {outputs_of(ws)}"
    after = ws.snapshot()
    added = sorted(set(after) - set(ws.before))
    changed = sorted(p for p in ws.before if after.get(p) != ws.before[p])
    assert not added and not changed, f"files added: {added}; changed or removed: {changed}"


def predict(ws: Workspace, model: Path, *extra: str, out: Path | None = None) -> Run:
    """``predict`` of the workspace's case with one model, fast options (fold 0, no mirroring, CPU)."""
    return run_cli("predict", ws.case_dir, "-o", out or ws.out, "-m", model, *FAST, *extra)


# ================================================================================================================
# Case folders


def test_missing_role(workspace: Workspace, trained_models) -> None:
    case_file(workspace, "t2f").unlink()
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, ["needs t2f (T2-FLAIR)", f"case {workspace.case_id} ({workspace.case_dir})",
                                    "found: "], r"Add the missing sequence\(s\) or choose a model")


@pytest.mark.parametrize("how", ["symlink", "hard-link", "copy"])
def test_same_file_for_two_roles(workspace: Workspace, trained_models, how: str) -> None:
    t1n, t1c = case_file(workspace, "t1n"), case_file(workspace, "t1c")
    t1n.unlink()
    {"symlink": lambda: t1n.symlink_to(t1c), "hard-link": lambda: os.link(t1c, t1n),
     "copy": lambda: shutil.copyfile(t1c, t1n)}[how]()
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, [t1n, t1c, "t1n", "t1c"], r"needs its own file|its own image file")


def test_two_files_for_one_role(workspace: Workspace, phantom: Phantom, trained_models) -> None:
    extra = write_image(phantom.images["t1c"] * 1.01, phantom, workspace.case_dir / f"{workspace.case_id}_t1ce.nii.gz")
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, [workspace.case_dir, extra.name, case_file(workspace, "t1c").name, "t1c"],
                   r"Keep one file per sequence")


GRID_CHANGES: dict[str, Callable[[sitk.Image], sitk.Image]] = {
    "size": lambda im: im[:, :, :-2],
    "spacing": lambda im: (im.SetSpacing((1.0, 1.0, 1.2)), im)[1],
    "origin": lambda im: (im.SetOrigin((5.0, 0.0, 0.0)), im)[1],
    "direction": lambda im: (im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), im)[1],
}


@pytest.mark.parametrize("what", list(GRID_CHANGES))
def test_grid_mismatch(workspace: Workspace, trained_models, what: str) -> None:
    """Size / spacing / origin / direction of one sequence differ from T1c's (one row each)."""
    path = case_file(workspace, "t2w")
    sitk.WriteImage(GRID_CHANGES[what](sitk.ReadImage(str(path))), str(path))
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, [path, case_file(workspace, "t1c"), f"differ in {what}"],
                   r"resample them onto the t1c image")


@pytest.mark.parametrize("dimension", ["2-D", "4-D"])
def test_not_a_3d_image(workspace: Workspace, phantom: Phantom, trained_models, dimension: str) -> None:
    path = case_file(workspace, "t1n")
    volume = phantom.to_sitk(phantom.images["t1n"])
    image = sitk.GetImageFromArray(phantom.images["t1n"][20]) if dimension == "2-D" else sitk.JoinSeries([volume] * 2)
    sitk.WriteImage(image, str(path))
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    fix = r"give a 3-D volume" if dimension == "2-D" else r"split the 4-D series into one 3-D volume per sequence"
    assert_refused(run, workspace, [path, f"is a {dimension} image"], fix)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["NaN", "Inf"])
def test_nan_or_inf_voxels(workspace: Workspace, phantom: Phantom, trained_models, bad: float) -> None:
    array = phantom.images["t2w"].copy()
    array[3, 4, 5] = bad
    array[6, 7, 8] = -bad
    path = write_image(array, phantom, case_file(workspace, "t2w"))
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, [path, "2 NaN/Inf voxel(s)"], r"Replace them \(e\.g\. with 0\)")


@pytest.mark.parametrize("value, word", [(0.0, "all zero (empty)"), (7.0, "constant (7)")], ids=["empty", "constant"])
def test_constant_or_empty_image(workspace: Workspace, phantom: Phantom, trained_models, value: float,
                                 word: str) -> None:
    path = write_image(np.full_like(phantom.images["t1c"], value), phantom, case_file(workspace, "t1c"))
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path)
    assert_refused(run, workspace, [path, word], r"check that the right volume/file was chosen")


# Integer volumes: each turns the phantom's intensities into values of the type (near its limits where that is
# where overflow would show); the row passes when they give exactly the labels of the float32 volumes holding the
# same values. float32 is what the models compute in (nnU-Net's own reader casts to float32 too): integers up to
# 2**24 are exact in float32, larger ones are rounded to 24 significant bits (a relative 6e-8, far below any
# intensity normalisation's resolution), the same rounding nnUNetv2_predict applies.
INTEGER_TYPES: dict[str, tuple[type, Callable[[np.ndarray, float], np.ndarray]]] = {
    # 30535 … 65535: crosses 32767, so a signed 16-bit wrap would not be a mere shift of every value
    "uint16-near-65535": (np.uint16, lambda a, top: np.clip(65535 - (top - a) / top * 35000, 0, 65535)),
    "int8": (np.int8, lambda a, top: np.clip(a / top * 254 - 127, -128, 127)),
    "uint32-large": (np.uint32, lambda a, top: a.astype(np.float64) / top * 4.2e9),
    "int64-large": (np.int64, lambda a, top: a.astype(np.float64) / top * 9.0e15 - 4.0e15),
}


@pytest.mark.parametrize("name", list(INTEGER_TYPES))
def test_integer_overflow_prone_types(tmp_path: Path, phantom: Phantom, trained_models, name: str) -> None:
    """PASS row: integer volumes are read without wrapping and give the labels of the same values in float32."""
    dtype, convert = INTEGER_TYPES[name]
    top = max(float(a.max()) for a in phantom.images.values())
    labels = {}
    for kind in (name, "float32"):
        case_dir = tmp_path / kind / phantom.case_id
        case_dir.mkdir(parents=True)
        for role, array in phantom.images.items():
            values = convert(array, top).astype(dtype)
            write_image(values if kind == name else values.astype(np.float32), phantom,
                        case_dir / f"{phantom.case_id}-{role}.nii.gz")
        written = sitk.ReadImage(str(case_dir / f"{phantom.case_id}-t1c.nii.gz"))
        assert sitk.GetArrayViewFromImage(written).dtype == (np.dtype(dtype) if kind == name else np.float32)
        run = run_cli("predict", case_dir, "-o", tmp_path / f"out-{kind}", "-m", trained_models["A"].path, *FAST,
                      "--postprocess", "none")
        assert run.code == 0, run.stderr[-3000:]
        labels[kind] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"out-{kind}" / f"{phantom.case_id}.nii.gz")))
    assert np.count_nonzero(labels["float32"]) > 0, "the model found no tumour: the comparison would say little"
    assert np.array_equal(labels[name], labels["float32"])


# ================================================================================================================
# Evaluation


@dataclass
class EvaluationFolders:
    pred: Path
    gt: Path
    out: Path
    case_id: str


@pytest.fixture
def evaluation(tmp_path: Path, phantom: Phantom) -> EvaluationFolders:
    folders = EvaluationFolders(tmp_path / "pred", tmp_path / "gt", tmp_path / "scores", phantom.case_id)
    for folder in (folders.pred, folders.gt, folders.out):
        folder.mkdir()
    write_image(phantom.labels, phantom, folders.pred / f"{phantom.case_id}.nii.gz")
    write_image(phantom.labels, phantom, folders.gt / f"{phantom.case_id}-seg.nii.gz")
    (folders.out / "notes.txt").write_text("the user's notes\n")
    return folders


def evaluation_workspace(folders: EvaluationFolders) -> Workspace:
    ws = Workspace(folders.pred, folders.out, folders.case_id, [folders.pred, folders.gt, folders.out])
    ws.freeze()
    return ws


@pytest.mark.parametrize("which, value, dtype", [
    ("prediction", 5, np.int16),
    ("prediction", 1.5, np.float32),
    ("ground truth", -1, np.int16),
    ("prediction", 4, np.uint8),  # ET in the BraTS 2020/21 convention
], ids=["prediction-5", "prediction-1.5", "ground-truth-minus-1", "prediction-4-brats2021-et"])
def test_label_map_with_unexpected_values(evaluation: EvaluationFolders, phantom: Phantom, which: str,
                                          value: float, dtype: type) -> None:
    path = (evaluation.pred / f"{phantom.case_id}.nii.gz" if which == "prediction"
            else evaluation.gt / f"{phantom.case_id}-seg.nii.gz")
    labels = phantom.labels.astype(dtype)
    if value == 4:
        labels[phantom.labels == 3] = 4  # a whole BraTS 2021 label map: every ET voxel is 4
    else:
        labels[1, 2, 3] = value  # one stray voxel is enough
    write_image(labels, phantom, path)
    ws = evaluation_workspace(evaluation)
    run = run_cli("evaluate", evaluation.pred, evaluation.gt, "-o", evaluation.out)
    fix = r"needs --labels brats2021" if value == 4 else r"not a BraTS label map .*export the labels again"
    assert_refused(run, ws, [path, f"label values [{value:g}]"], fix)
    assert not any(evaluation.out.glob("*.csv")) and not any(evaluation.out.glob("*.png"))


# ================================================================================================================
# Damaged files


@pytest.mark.parametrize("where", ["case-input", "evaluate-ground-truth"])
def test_truncated_nii_gz(workspace: Workspace, evaluation: EvaluationFolders, trained_models, where: str) -> None:
    """Half of a .nii.gz: ITK's reader would fill the missing voxels with zeros without a word."""
    path = case_file(workspace, "t1c") if where == "case-input" else evaluation.gt / f"{evaluation.case_id}-seg.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if where == "case-input":
        workspace.freeze()
        run, ws = predict(workspace, trained_models["A"].path), workspace
    else:
        ws = evaluation_workspace(evaluation)
        run = run_cli("evaluate", evaluation.pred, evaluation.gt, "-o", evaluation.out)
    assert_refused(run, ws, [path, "cannot be read"], r"truncated or damaged; copy or export it again")


# ================================================================================================================
# Models


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.png", "*.txt", "debug.json"))
    return target


MODEL_FOLDER_DAMAGE: dict[str, tuple[Callable[[Path], None], Callable[[Path], list], str]] = {
    # damage, what the message must name (given the model folder), fix
    "no-plans.json": (lambda m: (m / "plans.json").unlink(), lambda m: [m, "no plans.json"],
                      r"holds dataset\.json, plans\.json and fold_N/checkpoint_final\.pth"),
    "no-dataset.json": (lambda m: (m / "dataset.json").unlink(), lambda m: [m, "no dataset.json"],
                        r"holds dataset\.json, plans\.json and fold_N/checkpoint_final\.pth"),
    "no-checkpoints": (lambda m: [p.unlink() for p in m.glob("fold_*/checkpoint_*.pth")],
                       lambda m: [m, "no fold_N/checkpoint_final.pth found"], r"Train the model, copy its fold folders"),
    "missing-fold": (lambda m: shutil.rmtree(m / "fold_0"), lambda m: [m / "fold_0" / "checkpoint_final.pth",
                                                                       "not found", "available: 1"],
                     r"Choose available folds with --folds"),
}


@pytest.mark.parametrize("damage", list(MODEL_FOLDER_DAMAGE))
def test_model_folder_missing_files(workspace: Workspace, trained_models, tmp_path: Path, damage: str) -> None:
    """A model folder without plans.json, dataset.json or checkpoints (or without the fold asked for)."""
    model = copy_model(trained_models["A"].path, tmp_path / "models" / trained_models["A"].path.name)
    spoil, names, fix = MODEL_FOLDER_DAMAGE[damage]
    spoil(model)
    workspace.watch(model)
    workspace.freeze()
    folds = ("--folds", "0") if damage == "missing-fold" else ()  # else every fold present (none, with no checkpoints)
    run = run_cli("predict", workspace.case_dir, "-o", workspace.out, "-m", model, *folds, "--no-mirroring",
                  "--device", "cpu", "--progress", "none")
    assert_refused(run, workspace, names(model), fix)


def test_weights_that_do_not_fit_the_plans(workspace: Workspace, trained_models, tmp_path: Path) -> None:
    model = copy_model(trained_models["B"].path, tmp_path / "models" / trained_models["B"].path.name)
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f * 2 for f in arch["features_per_stage"]]
    (model / "plans.json").write_text(json.dumps(plans))
    workspace.watch(model)
    workspace.freeze()
    run = predict(workspace, model)
    assert_refused(run, workspace, [model / "fold_0" / "checkpoint_final.pth", "its weights do not fit"],
                   r"copy plans\.json from the results folder the checkpoint was trained in")


def test_manifest_member_with_wrong_sha256(workspace: Workspace, trained_models, server: FileServer,  # noqa: F811
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model-set member downloaded from a (local) server whose archive does not have the manifest's sha256."""
    model = trained_models["A"].path
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
            bundle.write(model / name, f"PhantomsA/{name}")
    server.files["PhantomsA.zip"] = buffer.getvalue()
    wrong = "0123456789abcdef" * 4
    manifest = tmp_path / "set" / "ensemble.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"members": [{"name": "phantoms-a", "framework": "nnunetv2",
                                                 "path": "models/PhantomsA", "folds": ["0"], "mirroring": False,
                                                 "url": server.url("PhantomsA.zip"), "sha256": wrong}]}))
    cache = tmp_path / "cache"
    monkeypatch.setenv("BRATS_ENSEMBLE_CACHE", str(cache))
    workspace.watch(manifest.parent, cache)
    workspace.freeze()
    run = run_cli("predict", workspace.case_dir, "-o", workspace.out, "--model-set", manifest, "--device", "cpu",
                  "--progress", "none")
    assert_refused(run, workspace, [manifest, "phantoms-a", server.url("PhantomsA.zip"), "checksum mismatch",
                                    f"expected sha256 {wrong}", f"got {sha(buffer.getvalue())}"],
                   r"ask its publisher for the right sha256")
    assert not [p for p in cache.rglob("*") if p.is_file()], "the bad download must be deleted"
    assert len(server.requests) == 1


# ================================================================================================================
# Environment


def test_cuda_requested_where_there_is_none(workspace: Workspace, trained_models) -> None:
    """--device cuda on a machine (here: a process) that sees no GPU."""
    workspace.freeze()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU, whatever the machine has
    run = run_cli_process("predict", workspace.case_dir, "-o", workspace.out, "-m", trained_models["A"].path,
                          "--device", "cuda", "--progress", "none", env=env)
    assert_refused(run, workspace, ["--device cuda", "sees no CUDA GPU"],
                   r"Use --device cpu \(slower\) or install a CUDA build of torch")


@pytest.mark.slow
def test_cancel_in_the_middle_of_a_member(tmp_path: Path, trained_models, phantom_cases: Path) -> None:
    """SIGTERM (what a scheduler or the Slicer module's Cancel sends) while a model is predicting: exit 130."""
    case_dir = sorted(phantom_cases.iterdir())[0]  # full-size phantom, two folds with mirroring: seconds of work
    ws = Workspace(case_dir, tmp_path / "out", case_dir.name, [case_dir, tmp_path / "out"])
    ws.out.mkdir()
    (ws.out / "notes.txt").write_text("the user's notes\n")
    ws.freeze()
    process = subprocess.Popen([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o",
                                str(ws.out), "-m", str(trained_models["A"].path), "--device", "cpu", "--progress",
                                "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in process.stdout:  # wait until the member is predicting
            if "predicting" in json.loads(line)["message"]:
                break
        time.sleep(0.3)
        assert process.poll() is None, "the run ended before it could be cancelled"
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        process.kill()
    run = Run(code, "", process.stderr.read())
    assert_refused(run, ws, ["cancelled", "no result of the unfinished case was written"], r"cancelled", code=130)


def _without_root_bypass() -> list[str]:
    """A command prefix under which root obeys file permissions (it drops CAP_DAC_OVERRIDE); [] for other users."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root ignores folder permissions")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("how", ["read-only-folder", "cannot-be-created"])
def test_output_folder_not_writable(workspace: Workspace, trained_models, how: str) -> None:
    """An existing output folder without write permission (as a subprocess: root must obey the permissions), and
    an output folder that cannot be created because a file is in the way."""
    if how == "read-only-folder":
        workspace.freeze()
        prefix = _without_root_bypass()
        os.chmod(workspace.out, 0o555)
        try:
            run = run_cli_process("predict", workspace.case_dir, "-o", workspace.out, "-m", trained_models["A"].path,
                                  *FAST, prefix=prefix)
        finally:
            os.chmod(workspace.out, 0o755)
        assert_refused(run, workspace, [workspace.out, "not writable"], r"Choose an output folder you can write to")
        return
    blocker = workspace.out / "results"  # the user's file, where the output folder should be made
    blocker.write_text("a file, not a folder\n")
    workspace.freeze()
    run = predict(workspace, trained_models["A"].path, out=blocker / "case-results")
    assert_refused(run, workspace, [blocker, blocker / "case-results", "is a file"], r"Choose another output folder")


# Disk full: the command line runs under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so that writing past it
# fails with EFBIG as on a full disk. The limit is placed between the sizes of the files of a run without a limit,
# so that exactly the named file is the first that cannot be written. SimpleITK does not report such a failure: it
# leaves a truncated file, which the library must detect by reading it back.
DISK_FULL_ROWS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    # the file that cannot be written, --save-uncertainty, the files written before it (in write_result's order)
    "label-map": ("labels", True, ()),
    "uncertainty-map": ("entropy", True, ("labels", "disagreement")),
    "statistics-json": ("statistics", False, ("labels",)),
}


@pytest.fixture(scope="module")
def output_sizes(tmp_path_factory: pytest.TempPathFactory, phantom: Phantom, trained_models) -> dict[str, int]:
    """Sizes of every file of a complete run (with uncertainty maps) on the workspace's case."""
    root = tmp_path_factory.mktemp("sizes")
    case_dir = phantom.write(root / "cases")
    run = run_cli("predict", case_dir, "-o", root / "out", "-m", trained_models["A"].path, *FAST, "--save-uncertainty")
    assert run.code == 0, run.stderr[-3000:]
    names = {"labels": "", "disagreement": "_disagreement", "entropy": "_entropy"}
    sizes = {kind: (root / "out" / f"{phantom.case_id}{suffix}.nii.gz").stat().st_size for kind, suffix in names.items()}
    sizes["statistics"] = (root / "out" / f"{phantom.case_id}.json").stat().st_size
    return sizes


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("row", list(DISK_FULL_ROWS))
def test_disk_full_while_writing(workspace: Workspace, trained_models, output_sizes: dict[str, int], row: str) -> None:
    failing, uncertainty, written_before = DISK_FULL_ROWS[row]
    fitting = max((output_sizes[k] for k in written_before), default=0)
    limit = (fitting + output_sizes[failing]) // 2
    assert fitting < limit < output_sizes[failing], (
        f"sizes {output_sizes} do not let a file-size limit stop exactly at {failing}")
    workspace.freeze()
    run = run_cli_process("predict", workspace.case_dir, "-o", workspace.out, "-m", trained_models["A"].path, *FAST,
                          *(["--save-uncertainty"] if uncertainty else []), preexec_fn=_file_size_limit(limit))
    suffix = {"labels": ".nii.gz", "entropy": "_entropy.nii.gz", "statistics": ".json"}[failing]
    assert_refused(run, workspace, [workspace.out / f"{workspace.case_id}{suffix}", "could not be written",
                                    "the disk is full or a quota / file-size limit was reached"],
                   r"Free space on that disk .*or choose another output folder")
