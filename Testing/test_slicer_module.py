"""Checks of the Slicer extension that run without Slicer.

* the library side of every module action (role auto-assign, case id, inputs checks, the command line, progress
  parsing, the process runner and its cancel, dependency lists, demo lookup) as plain functions;
* the module script: compiles, has the classes Slicer expects, calls only ``slicer.util`` functions that exist in
  Slicer's public API (names read from Slicer v5.12.3, Testing/data/slicer_util_api.txt), every ``self.ui.X`` it
  uses exists in the .ui;
* the .ui loads with PySide6's QUiLoader offscreen, with Slicer/CTK widget classes mapped to plain Qt classes;
* CMake files and the ExtensionsIndex entry: metadata complete, every listed file exists, every library file listed.

Set ``BRATS_UPDATE_SCREENSHOT=1`` to re-render Resources/Screenshots/panel.png from the .ui.
"""
from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from BraTSEnsembleLib import process, roles

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "BraTSEnsemble"
MODULE_PY = MODULE_DIR / "BraTSEnsemble.py"
MODULE_PACKAGE = MODULE_DIR / "BraTSEnsembleModule"
WIDGET_PY = MODULE_PACKAGE / "widget.py"
PARAMETERS_PY = MODULE_PACKAGE / "parameters.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BraTSEnsemble.ui"
LIB_DIR = ROOT / "BraTSEnsembleLib"
API_LIST = ROOT / "Testing" / "data" / "slicer_util_api.txt"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "panel.png"

# Slicer/CTK widget classes → the plain Qt class used to load the .ui here (and the property renames it needs).
QT_STAND_INS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkDirectoryButton": "QPushButton",
    "ctkCheckBox": "QCheckBox",
    "ctkComboBox": "QComboBox",
    "ctkSliderWidget": "QDoubleSpinBox",
    "qMRMLSliderWidget": "QDoubleSpinBox",
    "qMRMLSubjectHierarchyTreeView": "QTreeView",
    "qMRMLSegmentsTableView": "QTableView",
    "qMRMLTableView": "QTableView",
}


def module_files() -> list[Path]:
    """The module file and its package's files."""
    return [MODULE_PY] + sorted(MODULE_PACKAGE.glob("*.py"))


def module_source() -> str:
    """All of the module's Python source (module file and package)."""
    return "\n".join(path.read_text(encoding="utf-8") for path in module_files())


# ================================================================================================ roles and inputs


@pytest.mark.parametrize(
    "names, expected",
    [
        (["BraTS-GLI-00001-000-t1n", "BraTS-GLI-00001-000-t1c", "BraTS-GLI-00001-000-t2w", "BraTS-GLI-00001-000-t2f"],
         {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}),
        (["BraTS2021_00000_t1", "BraTS2021_00000_t1ce", "BraTS2021_00000_t2", "BraTS2021_00000_flair"],
         {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}),
        (["AX T1 PRE", "AX T1 POST GAD", "AX T2 FSE", "T2 FLAIR"], {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}),
        (["3: Sag MPRAGE", "7: AX T1 POST GAD", "4: AX T2", "5: AX T2 FLAIR"], {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}),
        (["T1", "T1 C+", "T2", "Dark fluid"], {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}),
    ],
)
def test_auto_assign_from_typical_slicer_node_names(names, expected):
    ids = {f"vtkMRMLScalarVolumeNode{i}": name for i, name in enumerate(names)}
    result = process.auto_assign_volumes(ids)
    assert result.assigned == {role: f"vtkMRMLScalarVolumeNode{i}" for role, i in expected.items()}
    assert result.summary() == ""
    # The same answer as the library's assign_roles on the names alone.
    assert {r: names[int(i[-1])] for r, i in result.assigned.items()} == roles.assign_roles(names)


def test_auto_assign_leaves_ambiguous_and_unknown_names_to_the_user():
    result = process.auto_assign_volumes({
        "a": "BraTS-GLI-00001-000-t1c", "b": "AX T1 POST GAD", "c": "T2 FLAIR", "d": "Segmentation preview",
    })
    assert result.assigned == {"t2f": "c"}
    assert result.ambiguous == {"t1c": ["BraTS-GLI-00001-000-t1c", "AX T1 POST GAD"]}
    assert result.unmatched == ["Segmentation preview"]
    summary = result.summary()
    assert "t1c: several candidates" in summary and "not assigned: t1n, t1c, t2w" in summary
    assert "Segmentation preview" in summary


def test_auto_assign_does_not_guess_between_nodes_with_the_same_name():
    result = process.auto_assign_volumes({"a": "T2 FLAIR", "b": "T2 FLAIR", "c": "T2"})
    assert result.assigned == {"t2w": "c"}


@pytest.mark.parametrize(
    "names, fallback, expected",
    [
        ({"t1c": "BraTS-GLI-00001-000-t1c", "t1n": "BraTS-GLI-00001-000-t1n"}, "x", "BraTS-GLI-00001-000"),
        ({"t1n": "BraTS2021_00042_t1", "t1c": "T1 POST"}, "x", "BraTS2021_00042"),
        ({"t1c": "AX T1 POST GAD", "t2f": "T2 FLAIR"}, "Doe^John", "Doe_John"),
        ({"t1c": "AX T1 POST GAD"}, "", "BraTSCase"),
    ],
)
def test_case_id_from_names(names, fallback, expected):
    assert process.case_id_from_names(names, fallback=fallback) == expected


def test_input_file_names_follow_brats_2023_naming():
    assert process.input_file_name("BraTS-GLI-00001-000", "t2f") == "BraTS-GLI-00001-000-t2f.nii.gz"
    with pytest.raises(ValueError):
        process.input_file_name("c", "flair")


def test_duplicate_roles_warn_when_one_volume_is_given_twice():
    assert process.duplicate_roles({"t1n": "v1", "t1c": "v1", "t2w": "v2", "t2f": None}) == [("t1n", "t1c")]
    assert process.duplicate_roles({"t1n": "v1", "t1c": "v2"}) == []


def test_grid_mismatches_name_what_differs():
    eye = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    ref = process.Grid((240, 240, 155), (1.0, 1.0, 1.0), (0.0, -239.0, 0.0), eye)
    same = process.Grid((240, 240, 155), (1.0, 1.0, 1.00001), (0.0, -239.0, 0.0005), eye)
    other = process.Grid((256, 256, 30), (0.9, 0.9, 5.0), (1.0, -239.0, 0.0), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    assert process.grid_mismatches({"t1c": ref, "t1n": same, "t2f": other}) == {
        "t2f": ["size", "spacing", "origin", "direction"]}
    assert process.grid_mismatches({"t1n": ref}) == {}


# ================================================================================================ command line


def test_predict_command_with_every_option():
    args = process.build_predict_command(
        "/tmp/case", "/tmp/out", ["/m/a", Path("/m/b")], python="/opt/Slicer/bin/PythonSlicer", weights=[1, 0.5],
        device="cuda", postprocess=["ratio-adaptive", "et-to-netc"], folds="0 1,2", checkpoint="best",
        mirroring=False, tile_step=0.7, overwrite=True, progress=True, save_uncertainty=True)
    assert args == [
        "/opt/Slicer/bin/PythonSlicer", "-m", "BraTSEnsembleLib.cli", "predict", "/tmp/case", "-o", "/tmp/out",
        "--model", "/m/a", "--model", "/m/b", "--weight", "1", "--weight", "0.5", "--device", "cuda",
        "--postprocess", "ratio-adaptive,et-to-netc", "--folds", "0", "1", "2", "--checkpoint", "best",
        "--no-mirroring", "--tile-step", "0.7", "--progress", "json", "--overwrite", "--save-uncertainty",
    ]


def test_predict_command_defaults_leave_model_set_choices_alone():
    args = process.build_predict_command("c", "o", "/models/goat2025.json", tile_step=0.7, mirroring=False)
    assert args == ["brats-ensemble", "predict", "c", "-o", "o", "--model-set", "/models/goat2025.json",
                    "--device", "auto", "--progress", "json", "--overwrite"]
    assert process.build_predict_command("c", "o", "/models/goat2025.json", save_uncertainty=True)[-1] == \
        "--save-uncertainty"
    with pytest.raises(ValueError, match="one manifest"):
        process.build_predict_command("c", "o", ["/models/goat2025.json", "/models/folder"])
    assert "--postprocess" not in process.build_predict_command("c", "o", "m", postprocess="default")
    assert process.build_predict_command("c", "o", "m", folds="all")[-5:-3] == ["--folds", "all"]
    assert process.build_predict_command("c", "o", "m", postprocess="none")[-5:-3] == ["--postprocess", "none"]
    assert process.build_predict_command("c", "o", "m", device="cuda:1")[7:9] == ["--device", "cuda:1"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"models": []}, "no model"),
        ({"device": "gpu"}, "device"),
        ({"postprocess": "largest"}, "unknown postprocessing"),
        ({"postprocess": "none,min-size"}, "cannot be combined"),
        ({"folds": "0 x"}, "folds"),
        ({"checkpoint": "latest"}, "checkpoint"),
        ({"tile_step": 0.0}, "tile step"),
        ({"tile_step": 1.5}, "tile step"),
        ({"weights": [1.0, 2.0]}, "weight"),
        ({"weights": [-1.0]}, "weights"),
    ],
)
def test_predict_command_refuses_what_the_cli_would_refuse(kwargs, message):
    models = kwargs.pop("models", ["m"])
    with pytest.raises(ValueError, match=message):
        process.build_predict_command("c", "o", models, **kwargs)


def test_cli_environment_puts_the_library_first_and_unbuffers_output():
    env = process.cli_environment({"PYTHONPATH": os.pathsep.join(["/a", "/lib"]), "HOME": "/h"}, "/lib")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib", "/a"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/h"


def test_python_executable_prefers_pythonslicer():
    assert process.python_executable(lambda name: "/S/bin/PythonSlicer") == "/S/bin/PythonSlicer"
    assert process.python_executable(lambda name: None) == sys.executable


# ================================================================================================ progress


def test_progress_lines_parse_and_malformed_lines_are_skipped():
    good = process.parse_progress_line(
        '{"event": "member-step", "case": "C1", "fraction": 0.42, "message": "nnU-Net 3d_fullres fold 0: 12/40"}\n')
    assert good == process.ProgressEvent("member-step", "C1", 0.42, "nnU-Net 3d_fullres fold 0: 12/40")
    assert process.parse_progress_line(b'{"event": "finished", "fraction": 1}').event == "finished"
    for line in ["", "   ", "Using device cuda", '{"event": "member-step", "fraction": 0.5',  # truncated JSON
                 "[1, 2]", '{"fraction": 0.5}', '{"event": "exploded"}', '{"event": 3}', "{" * 5000, "\x00\xff"]:
        assert process.parse_progress_line(line) is None, line


@pytest.mark.parametrize("value, expected", [(1.7, 1.0), (-0.2, 0.0), ("0.5", None), (True, None), (None, None),
                                             (float("nan"), None)])
def test_progress_fraction_is_clamped_or_dropped(value, expected):
    line = json.dumps({"event": "member-step", "fraction": value, "message": None, "case": None})
    event = process.parse_progress_line(line)
    assert event.fraction == expected
    assert event.message == "" and event.case == ""


def test_progress_state_shows_member_and_step_and_never_goes_back():
    state = process.ProgressState()
    lines = [
        {"event": "case-start", "case": "C", "fraction": 0.0, "message": "BraTS-GLI-00001-000"},
        {"event": "member-start", "case": "C", "fraction": 0.05, "message": "member 1/2: nnU-Net 3d_fullres"},
        {"event": "member-step", "case": "C", "fraction": 0.30, "message": "tile 10/40"},
        {"event": "member-step", "case": "C", "fraction": 0.20, "message": "tile 11/40"},
        {"event": "written", "case": "C", "fraction": 0.98, "message": "/out/C.nii.gz"},
    ]
    for line in lines:
        state.update(process.parse_progress_line(json.dumps(line)))
    assert state.fraction == pytest.approx(0.98) and state.percent == 98
    assert state.written == ["/out/C.nii.gz"]
    state = process.ProgressState()
    for line in lines[:4]:
        state.update(process.parse_progress_line(json.dumps(line)))
    assert state.status == "member 1/2: nnU-Net 3d_fullres: tile 11/40"
    assert state.fraction == pytest.approx(0.30)
    # The CLI may already prefix steps with the member (as BraTSEnsembleLib.cli does): no doubled prefix then.
    state.update(process.ProgressEvent("member-step", "C", 0.4, "member 1/2: nnU-Net 3d_fullres: predicting"))
    assert state.status == "member 1/2: nnU-Net 3d_fullres: predicting"
    state.update(process.ProgressEvent("finished", "C", None, "done"))
    assert state.finished and state.percent == 100


def test_error_message_prefers_cli_error_lines():
    assert process.error_message(2, ["Traceback…", "error: t1c: file not found", "error: t1c: file not found"]) == \
        "t1c: file not found"
    state = process.ProgressState(errors=["CUDA out of memory"])
    assert process.error_message(1, [], state) == "CUDA out of memory"
    text = process.error_message(1, ["Traceback (most recent call last):", "  File x", "KeyError: 'foo'"])
    assert text.startswith("brats-ensemble failed with exit code 1") and "KeyError: 'foo'" in text
    assert "signal 9" in process.error_message(-9, [])


# ================================================================================================ the process


def fake_cli(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_cli.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_cli_process_reads_progress_and_errors(tmp_path):
    args = fake_cli(tmp_path, """
        import json, sys
        print(json.dumps({"event": "case-start", "case": "C", "fraction": 0.0, "message": "C"}), flush=True)
        print("some log line", flush=True)
        print('{"event": "member-step", "frac', flush=True)
        print(json.dumps({"event": "member-step", "case": "C", "fraction": 0.5, "message": "tile 1/2"}), flush=True)
        print("error: C-t1c.nii.gz: cannot be read", file=sys.stderr, flush=True)
        sys.exit(2)
    """)
    run = process.CliProcess(args)
    events = []
    assert run.wait(timeout=30, callback=events.append) == 2
    assert [e.event for e in events] == ["case-start", "member-step"]
    assert run.stdout_lines[1] == "some log line"
    assert not run.succeeded
    assert run.failure_message() == "C-t1c.nii.gz: cannot be read"
    assert not run.running


def test_cli_process_poll_does_not_block(tmp_path):
    args = fake_cli(tmp_path, """
        import json, time
        print(json.dumps({"event": "case-start", "case": "C", "fraction": 0.1, "message": "go"}), flush=True)
        time.sleep(30)
    """)
    run = process.CliProcess(args)
    try:
        deadline = time.monotonic() + 20
        events = []
        while not events and time.monotonic() < deadline:
            started = time.monotonic()
            events = run.poll()
            assert time.monotonic() - started < 2.0  # generous: CI machines can be loaded
            time.sleep(0.02)
        assert events and events[0].message == "go" and run.running
    finally:
        run.cancel()
    assert not run.running and run.cancelled and not run.succeeded


@pytest.mark.skipif(os.name == "nt", reason="checks POSIX process groups")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    args = fake_cli(tmp_path, f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print('{{"event": "member-start", "case": "C", "fraction": 0.1, "message": "m"}}', flush=True)
        time.sleep(60)
    """)
    run = process.CliProcess(args)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "fake CLI did not start its worker"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    run.cancel()
    assert run.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        # A killed child of a killed parent is re-parented and reaped by init; until then it is a zombie.
        status = Path(f"/proc/{grandchild}/status")
        if status.exists() and "zombie" in status.read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker process survived Cancel")
    run.cancel()  # a second cancel is harmless


def test_cli_process_runs_the_library_cli_module(tmp_path):
    """The real CLI module starts through the same command line the module builds (argument errors → exit ≠ 0)."""
    if not (LIB_DIR / "cli.py").is_file():
        pytest.skip("BraTSEnsembleLib/cli.py not written yet")
    env = process.cli_environment(os.environ, ROOT)
    run = process.CliProcess([sys.executable, "-m", process.CLI_MODULE, "--help"], env=env, cwd=ROOT)
    assert run.wait(timeout=60) == 0, run.stderr_lines
    assert "predict" in "\n".join(run.stdout_lines)


# ================================================================================================ dependencies, demo


def test_requirements_to_install_keep_pins_and_skip_what_slicer_provides():
    dependencies = process.project_dependencies((ROOT / "pyproject.toml").read_text())
    wanted = process.requirements_to_install("\n".join(dependencies))
    names = [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in wanted]
    assert "nnunetv2" in names and "numpy" not in names and "simpleitk" not in names and "torch" not in names
    assert any(r.replace(" ", "").startswith("nnunetv2==") for r in wanted), "nnunetv2 must stay pinned"
    assert process.requirements_to_install("# c\n-r other.txt\nnumpy>=1\nSimpleITK\ntorch==2\nfoo==1  # x\n") == \
        ["foo==1"]


def test_project_dependencies_without_tomllib(monkeypatch):
    text = (ROOT / "pyproject.toml").read_text()
    expected = process.project_dependencies(text)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Slicer 5.6 (Python 3.9)
    assert process.project_dependencies(text) == expected
    with pytest.raises(ValueError):
        process.project_dependencies("[tool.x]\n")


def test_constraints_pin_slicers_packages():
    assert process.constraints_for_installed({"numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": None}) == \
        "SimpleITK==2.4.0\nnumpy==1.26.4\n"


def test_find_demo(tmp_path, monkeypatch):
    from BraTSEnsembleLib import demo

    # the shipped demo case and manifest are found through BraTSEnsembleLib.demo
    assert process.find_demo(tmp_path, environ={}) == (demo.CASE_DIR, demo.MANIFEST)
    monkeypatch.setattr(demo, "demo_model_set", lambda: None)  # as in a package without the demo models
    assert process.find_demo(tmp_path, environ={}) is None
    (tmp_path / "demo" / "case").mkdir(parents=True)
    (tmp_path / "demo" / "models").mkdir()
    assert process.find_demo(tmp_path, environ={}) == (tmp_path / "demo" / "case", tmp_path / "demo" / "models")
    env = {"BRATSENSEMBLE_DEMO_CASE": str(tmp_path / "demo" / "case"),
           "BRATSENSEMBLE_DEMO_MODELS": str(tmp_path / "demo" / "models")}
    assert process.find_demo(tmp_path / "nowhere", environ=env) == (tmp_path / "demo" / "case",
                                                                    tmp_path / "demo" / "models")


def test_list_case_folders(tmp_path):
    for case in ("B", "A"):
        (tmp_path / case).mkdir()
        (tmp_path / case / f"{case}-t1c.nii.gz").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    assert process.list_case_folders(tmp_path) == [tmp_path / "A", tmp_path / "B"]
    assert process.list_case_folders(tmp_path / "A") == [tmp_path / "A"]


# ================================================================================================ module script


def module_tree(path: Path = MODULE_PY) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_constant(name: str, path: Path = PARAMETERS_PY):
    for node in module_tree(path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def test_module_compiles(tmp_path):
    for path in module_files():
        py_compile.compile(str(path), cfile=str(tmp_path / "m.pyc"), doraise=True)


def classes_in(path: Path) -> dict[str, list[str]]:
    return {n.name: [ast.unparse(b) for b in n.bases] for n in module_tree(path).body if isinstance(n, ast.ClassDef)}


def test_module_has_the_classes_slicer_expects():
    """Slicer looks up BraTSEnsemble, BraTSEnsembleWidget, BraTSEnsembleLogic and BraTSEnsembleTest in the module
    file; the widget and the logic are imported there from the package (SlicerNNUnet's split)."""
    classes = classes_in(MODULE_PY)
    assert classes["BraTSEnsemble"] == ["ScriptedLoadableModule"]
    assert classes["BraTSEnsembleTest"] == ["ScriptedLoadableModuleTest"]
    imported = {alias.asname or alias.name for node in module_tree().body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {"BraTSEnsembleWidget", "BraTSEnsembleLogic"} <= imported
    assert classes_in(WIDGET_PY)["BraTSEnsembleWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes_in(MODULE_PACKAGE / "application.py")["BraTSEnsembleLogic"] == ["SegmentationLogic"]
    assert classes_in(MODULE_PACKAGE / "logic.py")["SegmentationLogic"] == []
    assert "BraTSEnsembleParameterNode" in classes_in(PARAMETERS_PY)
    source = module_source()
    assert 'self.parent.title = _("' in source and "translate(\"qSlicerAbstractCoreModule\"" in source
    assert not re.search(r"^\s*import imp\b", source, re.M)


@pytest.mark.parametrize("path", module_files(), ids=lambda p: p.name)
def test_module_uses_no_undefined_names(path):
    """A crude pyflakes: every name a module file reads is bound somewhere in it, imported, or a builtin."""
    import builtins

    defined = set(dir(builtins)) | {"__file__"}
    tree = module_tree(path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used <= defined, sorted(used - defined)


def test_module_calls_only_public_slicer_util_functions():
    api = {line.strip() for line in API_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {"loadUI", "exportNode", "pip_install", "launchConsoleProcess"} <= api
    used = set(re.findall(r"slicer\.util\.([A-Za-z_]\w*)", module_source()))
    assert used, "the module should use slicer.util"
    assert used <= api, f"not in Slicer's slicer.util: {sorted(used - api)}"


def test_module_choices_match_the_cli():
    assert module_constant("DEVICE_CHOICES") == list(process.DEVICES)
    assert set(module_constant("POSTPROCESS_CHOICES")) == set(process.POSTPROCESS_RULES) | {"default"}
    assert module_constant("CHECKPOINT_CHOICES") == list(process.CHECKPOINTS)
    assert module_constant("ROLES", MODULE_PACKAGE / "__init__.py") == roles.BRATS_ROLES


def parameter_node_fields() -> dict[str, str]:
    for node in module_tree(PARAMETERS_PY).body:
        if isinstance(node, ast.ClassDef) and node.name == "BraTSEnsembleParameterNode":
            assert [ast.unparse(d) for d in node.decorator_list] == ["parameterNodeWrapper"]
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no parameter node class")


def test_library_files_never_import_slicer_qt_or_vtk():
    for path in LIB_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"slicer", "qt", "vtk", "ctk"}, f"{path} imports {name}"


# ================================================================================================ .ui


def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def used_ui_names() -> set[str]:
    source = module_source()
    names = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", source))
    for loop in re.findall(r"for name in \(([^)]*)\):\s*\n\s*getattr\(self\.ui, name\)", source):
        names |= set(re.findall(r'"(\w+)"', loop))
    return names


def test_every_widget_the_module_uses_exists_in_the_ui():
    widgets = ui_widgets()
    used = used_ui_names()
    assert {"applyButton", "cancelButton", "progressBar", "autoAssignButton", "inputsCollapsibleButton"} <= used
    assert used <= set(widgets), f"missing in the .ui: {sorted(used - set(widgets))}"


def test_parameter_names_in_the_ui_are_parameter_node_fields():
    fields = parameter_node_fields()
    bound = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) <= set(fields)
    # the model list and the server's model-set choice (filled by Connect) are synchronised by hand
    assert set(fields) - set(bound) == {"modelPaths", "serverModelSet"}
    expected_class = {"vtkMRMLScalarVolumeNode": "qMRMLNodeComboBox", "vtkMRMLSegmentationNode": "qMRMLNodeComboBox",
                      "vtkMRMLTableNode": "qMRMLNodeComboBox", "bool": "QCheckBox", "str": "QLineEdit"}
    for name, widget_class in bound.items():
        annotation = fields[name]
        if "Choice" in annotation:
            assert widget_class == "QComboBox", name
        elif "WithinRange" in annotation:
            assert widget_class == "QDoubleSpinBox", name
        else:
            assert widget_class == expected_class[annotation], name


def test_ui_connections_and_custom_widgets_are_consistent():
    tree, widgets = ui_tree(), ui_widgets()
    for connection in tree.iter("connection"):
        assert connection.find("sender").text in widgets
        assert connection.find("receiver").text in widgets
    mrml_widgets = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert connected == mrml_widgets, "every MRML widget needs the scene"
    declared = {c.find("class").text for c in tree.iter("customwidget")}
    custom = {c for c in widgets.values() if not c.startswith("Q")}
    assert custom <= declared <= set(QT_STAND_INS)
    node_types = {w.get("name"): [s.text for s in w.find("property[@name='nodeTypes']/stringlist")]
                  for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert node_types["t1cSelector"] == ["vtkMRMLScalarVolumeNode"]
    assert node_types["outputSegmentationSelector"] == ["vtkMRMLSegmentationNode"]
    assert node_types["outputTableSelector"] == ["vtkMRMLTableNode"]


def plain_qt_ui() -> bytes:
    """The .ui with Slicer/CTK classes replaced by plain Qt stand-ins, loadable by PySide6's QUiLoader."""
    tree = ui_tree()
    root = tree.getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in QT_STAND_INS:
            widget.set("class", QT_STAND_INS[cls])
            if cls == "ctkCollapsibleButton":
                for prop in widget.findall("property"):
                    if prop.get("name") == "text":
                        prop.set("name", "title")
            for prop in list(widget.findall("property")):
                if prop.get("name") in ("nodeTypes", "collapsed", "noneDisplay"):
                    widget.remove(prop)
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8")


@pytest.fixture(scope="module")
def qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="install PySide6-Essentials to load the .ui")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["test"])
    app.setStyle("Fusion")
    return app


def load_panel(qt_app):
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader

    buffer = QBuffer()
    buffer.setData(QByteArray(plain_qt_ui()))
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
    return widget


def test_ui_loads_with_pyside6_offscreen(qt_app):
    from PySide6.QtCore import QObject

    panel = load_panel(qt_app)
    for name in used_ui_names():
        assert panel.findChild(QObject, name) is not None, name
    assert panel.findChild(QObject, "tileStepSpinBox").value() == pytest.approx(0.5)
    assert panel.findChild(QObject, "mirroringCheckBox").isChecked()
    assert not panel.findChild(QObject, "applyButton").isEnabled()


def render_panel(qt_app, path: Path) -> tuple[int, int]:
    """Render the panel as a user sees it with a BraTS case loaded, roles auto-assigned and a model set chosen."""
    from PySide6.QtCore import QObject

    panel = load_panel(qt_app)
    find = lambda name: panel.findChild(QObject, name)  # noqa: E731
    for role in ("t1n", "t1c", "t2w", "t2f"):
        find(f"{role}Selector").addItem(f"BraTS-GLI-00001-000-{role}")
    find("outputSegmentationSelector").addItem("Create new segmentation")
    find("outputTableSelector").addItem("Create new table")
    find("modelsListWidget").addItems(["~/BraTSModels/goat2025/ensemble.json",
                                       "~/nnUNet_results/Dataset137_BraTS2021/nnUNetTrainer__nnUNetPlans__3d_fullres"])
    find("deviceComboBox").addItems(["auto", "cuda", "cpu"])
    find("postprocessComboBox").addItems(["default", "ratio-adaptive", "min-size", "et-to-netc", "none"])
    find("checkpointComboBox").addItems(["final", "best"])
    find("runOnComboBox").addItems(["this computer", "server"])
    for name in ("serverUrlLineEdit", "serverTokenLineEdit", "serverModelSetComboBox", "serverConnectButton"):
        find(name).setEnabled(False)  # as the module shows them while running on this computer
    # Ready to run (what the module shows once the four inputs and a model set are chosen). While a run is in
    # progress the sections are disabled, Cancel is enabled and a progress bar with the member/step is shown.
    find("applyButton").setEnabled(True)
    find("cancelButton").setEnabled(False)
    find("progressBar").setVisible(False)
    find("statusLabel").setText("")
    panel.resize(440, 10)
    panel.adjustSize()
    image = panel.grab()
    assert image.save(str(path), "PNG")
    return image.width(), image.height()


def test_panel_renders(qt_app, tmp_path):
    width, height = render_panel(qt_app, tmp_path / "panel.png")
    assert width >= 400 and height >= 500
    if os.environ.get("BRATS_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        render_panel(qt_app, SCREENSHOT)
    assert png_size(SCREENSHOT)[0] >= 400


# ================================================================================================ CMake, index entry


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def cmake_set(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{re.escape(variable)}\b(.*?)\)", text, re.S)
    assert match, f"set({variable} …) not found"
    body = re.sub(r"#.*", "", match.group(1))
    return re.findall(r'"[^"]*"|[^\s"]+', body)


def test_top_level_cmake_has_complete_extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        values = cmake_set(text, variable)
        assert values and values[0].strip('"'), variable
    assert cmake_set(text, "EXTENSION_CATEGORY") == ['"Segmentation"']
    assert cmake_set(text, "EXTENSION_DEPENDS") == ['"PyTorch"']
    assert cmake_set(text, "EXTENSION_ICONURL")[0].strip('"').endswith("Resources/BraTSEnsemble.png")
    assert cmake_set(text, "EXTENSION_SCREENSHOTURLS")[0].strip('"').endswith("Resources/Screenshots/panel.png")
    order = ["project(BraTSEnsemble)", "find_package(Slicer 5.10 REQUIRED)", "include(${Slicer_USE_FILE})",
             "add_subdirectory(BraTSEnsemble)", "## NEXT_MODULE", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)
    assert png_size(ROOT / "Resources" / "BraTSEnsemble.png") == (128, 128)
    assert (ROOT / "Resources" / "Screenshots" / "panel.png").is_file()


def test_module_cmake_lists_every_library_file_and_existing_resources():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed_py = cmake_set(text, "BRATSENSEMBLE_LIB_SCRIPTS")
    actual_py = sorted(p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(listed_py) == len(set(listed_py)), "a library file is listed twice"
    assert sorted(listed_py) == actual_py, (
        f"add to BRATSENSEMBLE_LIB_SCRIPTS in BraTSEnsemble/CMakeLists.txt: {sorted(set(actual_py) - set(listed_py))}; "
        f"remove: {sorted(set(listed_py) - set(actual_py))}")
    # every other file the library ships (manifests, recipes, the demo case and demo models) is data to install
    data_files = sorted(p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*")
                        if p.is_file() and p.suffix not in (".py", ".pyc") and not p.name.startswith(".")
                        and "__pycache__" not in p.parts)
    assert sorted(cmake_set(text, "BRATSENSEMBLE_LIB_DATA")) == data_files
    assert cmake_set(text, "MODULE_PYTHON_SCRIPTS")[:2] == ["${MODULE_NAME}.py", "${MODULE_PACKAGE_SCRIPTS}"]
    listed_package = cmake_set(text, "MODULE_PACKAGE_SCRIPTS")
    actual_package = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_PACKAGE.glob("*.py"))
    assert listed_package == actual_package, "list the module package's files in MODULE_PACKAGE_SCRIPTS"
    resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    listed_resources = {r.replace("${MODULE_NAME}", "BraTSEnsemble") for r in cmake_set(text, "MODULE_PYTHON_RESOURCES")}
    assert listed_resources == resources, "list every file of BraTSEnsemble/Resources in MODULE_PYTHON_RESOURCES"
    assert cmake_set(text, "MODULE_NAME") == ["BraTSEnsemble"]
    for resource in cmake_set(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "BraTSEnsemble")).is_file(), resource
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS\s*\)", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\)\s*.*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert "../pyproject.toml ${_module_lib_dir}/pyproject.toml" in text  # read by the dependency installer
    assert (ROOT / "pyproject.toml").is_file()
    assert "file(GLOB" not in text.upper().replace(" ", "")
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "BraTSEnsemble.png") == (128, 128)


# Property names of the ExtensionsIndex catalog entry schema v1.0.2 (Slicer/ExtensionsIndex schemas/).
INDEX_SCHEMA_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                           "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
INDEX_SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}


def test_extensions_index_entry():
    entry = json.loads((ROOT / "BraTSEnsemble.json").read_text())
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert INDEX_SCHEMA_REQUIRED <= set(entry) <= INDEX_SCHEMA_PROPERTIES
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert entry["category"] == cmake_set(cmake, "EXTENSION_CATEGORY")[0].strip('"')
    assert entry["build_dependencies"] == cmake_set(cmake, "EXTENSION_DEPENDS")[0].strip('"').split()
    assert cmake_set(cmake, "EXTENSION_HOMEPAGE")[0].strip('"').startswith(entry["scm_url"])
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5


# ================================================================================================ what Slicer's Python needs


def _library_modules_imported_in_slicers_process() -> set[Path]:
    """Library files the module imports inside Slicer's own process (not the CLI's): those the module package names,
    and everything they import in turn (module-level and function-level imports)."""
    def library_targets(tree: ast.AST, path: Path) -> set[Path]:
        targets = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("BraTSEnsembleLib"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0 and path.is_relative_to(LIB_DIR):
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                prefix = ".".join(base.relative_to(ROOT).parts)
                module = f"{prefix}.{node.module}" if node.module else prefix
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            for name in names:
                candidate = ROOT.joinpath(*name.split("."))
                for file in (candidate.with_suffix(".py"), candidate / "__init__.py"):
                    if file.is_file():
                        targets.add(file)
        return targets

    seen: set[Path] = set()
    todo = set()
    for path in module_files():
        todo |= library_targets(module_tree(path), path)
    todo.add(LIB_DIR / "process.py")  # importLibrary(): process, roles, segmentation
    todo |= {LIB_DIR / "roles.py", LIB_DIR / "segmentation.py"}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo |= library_targets(module_tree(path), path) - seen
    return seen


def test_every_package_the_module_imports_in_slicers_python_is_a_required_import():
    """What the module's own process imports from the library (finishSegmentation reads the label map, writes the
    .seg.nrrd, ...) must be checked and installed before the first run: nibabel was missing from the list."""
    files = _library_modules_imported_in_slicers_process()
    assert LIB_DIR / "case.py" in files and LIB_DIR / "segmentation.py" in files
    third_party = set()
    for path in files:
        tree = module_tree(path)
        optional = set()  # imports guarded by try/except ImportError or Exception (optional: mamba_ssm)
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    h.type is not None and any(n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFound", "Exception"))
                    for h in node.handlers):
                optional |= {id(n) for statement in node.body for n in ast.walk(statement)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                third_party.add(node.module.split(".")[0])
    third_party -= set(sys.stdlib_module_names) | {"BraTSEnsembleLib", "__future__"}
    assert "nibabel" in third_party
    assert third_party <= set(process.REQUIRED_IMPORTS), sorted(third_party - set(process.REQUIRED_IMPORTS))
    requirement_names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower()
                         for r in process.project_dependencies((ROOT / "pyproject.toml").read_text())}
    provided = {"numpy", "simpleitk", "torch"}  # Slicer ships them; torch through the PyTorch extension
    assert {p.lower() for p in process.REQUIRED_IMPORTS.values()} <= requirement_names | provided


def test_missing_imports_names_pip_packages():
    assert process.missing_imports(lambda module: None if module == "nibabel" else object()) == ["nibabel"]
    assert process.missing_imports(lambda module: object()) == []


# ================================================================================================ minimum Slicer version


def test_minimum_python_is_the_projects_and_older_slicers_are_told_what_to_do():
    requires = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert tuple(int(v) for v in requires.groups()) == process.MINIMUM_PYTHON
    assert process.python_version_problem((3, 12, 10)) is None
    assert process.python_version_problem((3, 10)) is None
    message = process.python_version_problem((3, 9, 10))  # Slicer 5.6 / 5.8
    assert "Slicer 5.10 or later" in message and "Python 3.9" in message and "nothing was installed" in message


def test_dependency_installer_checks_the_python_version_first():
    tree = module_tree(MODULE_PACKAGE / "install.py")
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "ensureDependencies")
    statements = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    first_calls = [ast.unparse(s) for s in statements[:3]]
    assert "problem = process.python_version_problem()" in first_calls[1]
    assert ast.unparse(statements[2]).startswith("if problem:\n    raise RuntimeError(problem)")


def test_minimum_slicer_version_is_where_slicer_and_the_readers_look():
    assert process.MINIMUM_SLICER == "5.10"
    assert "find_package(Slicer 5.10 REQUIRED)" in (ROOT / "CMakeLists.txt").read_text()
    for doc in (ROOT / "README.md", ROOT / "docs" / "slicer.md"):
        text = doc.read_text()
        assert "Slicer 5.10 or later" in text, doc
        assert "5.6 or later" not in text, doc
