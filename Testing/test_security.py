"""Untrusted model folders, manifests and downloads (issue 12): every attack is a real hostile file run through the
real ``brats-ensemble`` command line in a subprocess, which must exit non-zero with one ``error: …`` line naming the
file and the fix, run no code (no marker file appears) and leave nothing behind (no cache entry, no output).

Where a payload could be inert by mistake, a positive control shows it is real: nnU-Net's own
``get_network_from_plans`` runs the hostile plans, ``pickle`` runs the hostile pickle, and the trusted run of a
hostile checkpoint or TorchScript file does write its marker. Variants of one attack that differ only in the key
they use are checked in-process (the same code path, without a subprocess per variant).

The models are the shipped demo models (BraTSEnsembleLib/demo/models: nnU-Net v2 and MedNeXt v1 trained here), copied
and then altered; the case is a phantom.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from BraTSEnsembleLib import downloads
from BraTSEnsembleLib.allowlist import check_nnunet_plans
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.jsonfiles import MANIFEST_MAX_BYTES, nesting_depth
from BraTSEnsembleLib.members.nnunet import NnUNetMember
from BraTSEnsembleLib.modelset import load_model_set

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ROOT / "BraTSEnsembleLib" / "demo" / "models"
NNUNET_DEMO = DEMO_MODELS / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"
MEDNEXT_DEMO = DEMO_MODELS / "nnUNetTrainerV2_MedNeXt_S_kernel3__nnUNetPlansv2.1_trgSp_2x2x2"
EVIL_MODULE = "evil_plans_module"


# ------------------------------------------------------------------------------------------------ helpers

def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``brats-ensemble ARGS`` in a subprocess (the real command line)."""
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def refusal(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single ``error: …`` line of a refused run, after checking exit 1, no traceback and the fragments."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def predict(case_dir: Path, out: Path, *models: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli("predict", str(case_dir), "-o", str(out), *models, "--device", "cpu", "--progress", "none", env=env)


def write_manifest(folder: Path, members: list[dict], name: str = "set.json", **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"postprocess": "none", **top, "members": members}))
    return path


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class RunsShell:
    """Pickles to a call of ``os.system(command)``: what a hostile checkpoint or pickle does when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def case_dir(phantom_cases: Path) -> Path:
    return sorted(phantom_cases.iterdir())[0]


# ------------------------------------------------------------------------------------------------ plans.json

def hostile_plans(model: Path, change: Any) -> Path:
    """Apply ``change(plans, 3d_fullres configuration)`` to the model's plans.json."""
    path = model / "plans.json"
    plans = json.loads(path.read_text())
    change(plans, plans["configurations"]["3d_fullres"])
    path.write_text(json.dumps(plans, indent=1))
    return path


def shell_nonlin(marker: Path):
    def change(plans: dict, configuration: dict) -> None:
        kwargs = configuration["architecture"]["arch_kwargs"]
        kwargs["nonlin"] = "subprocess.call"
        kwargs["nonlin_kwargs"] = {"args": ["sh", "-c", f"echo ran > {marker}"]}
    return change


def test_plans_json_whose_nonlin_is_subprocess_call_is_refused_before_nnunet_imports_it(case_dir: Path,
                                                                                        tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = copy_model(NNUNET_DEMO, tmp_path / "models" / NNUNET_DEMO.name)
    plans = hostile_plans(model, shell_nonlin(marker))

    # positive control: nnU-Net's own network builder runs the shell command of these plans
    control = subprocess.run([sys.executable, "-c", (
        "import json, sys\n"
        "from nnunetv2.utilities.get_network_from_plans import get_network_from_plans\n"
        "a = json.load(open(sys.argv[1]))['configurations']['3d_fullres']['architecture']\n"
        "get_network_from_plans(a['network_class_name'], a['arch_kwargs'], a['_kw_requires_import'], 4, 4, "
        "allow_init=False, deep_supervision=False)\n"), str(plans)], capture_output=True, text=True, timeout=300)
    assert marker.read_text().strip() == "ran", control.stderr[-2000:]
    marker.unlink()

    out = tmp_path / "out"
    done = predict(case_dir, out, "--model", str(model))
    message = refusal(done, str(plans), "configurations.3d_fullres.architecture.arch_kwargs.nonlin",
                      "'subprocess.call'", "allow-list", "Use a plans.json written by nnU-Net")
    assert "torch.nn" in message  # what it may name instead
    manifest = write_manifest(tmp_path / "sets", [{"framework": "nnunetv2", "path": str(model), "folds": [0]}])
    done = predict(case_dir, out, "--model-set", str(manifest))
    refusal(done, str(manifest), "member 1", str(plans), "'subprocess.call'")
    assert not marker.exists()
    assert files_under(out) == []


def write_evil_module(folder: Path, marker: Path) -> Path:
    """A module that writes ``marker`` when imported: naming it in plans.json must not even import it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "class Net:\n    def __init__(self, *args, **kwargs):\n        pass\n"
        "Conv = Norm = Preprocessor = Net\n")
    return folder


def test_plans_json_naming_an_importable_module_does_not_import_it(case_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    path_dir = write_evil_module(tmp_path / "pythonpath", marker)
    env = {"PYTHONPATH": str(path_dir)}
    model = copy_model(NNUNET_DEMO, tmp_path / NNUNET_DEMO.name)

    def change(plans: dict, configuration: dict) -> None:
        configuration["architecture"]["network_class_name"] = f"{EVIL_MODULE}.Net"

    plans = hostile_plans(model, change)
    control = subprocess.run([sys.executable, "-c", f"import pydoc; pydoc.locate('{EVIL_MODULE}.Net')"],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert marker.read_text() == "imported", control.stderr  # nnU-Net's pydoc.locate would import it
    marker.unlink()
    done = predict(case_dir, tmp_path / "out", "--model", str(model), env=env)
    refusal(done, str(plans), "configurations.3d_fullres.architecture.network_class_name", f"'{EVIL_MODULE}.Net'",
            "network class of dynamic_network_architectures")
    assert not marker.exists()


def _set(path: tuple[str, ...], value: Any):
    def change(plans: dict, configuration: dict) -> None:
        target = plans if path[0] == "<plans>" else configuration
        keys = path[1:] if path[0] == "<plans>" else path
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _extra_import(plans: dict, configuration: dict) -> None:
    architecture = configuration["architecture"]
    architecture["arch_kwargs"]["extra_op"] = f"{EVIL_MODULE}.Net"
    architecture["_kw_requires_import"] = [*architecture["_kw_requires_import"], "extra_op"]


PLANS_NAMES = [
    ("conv-op", _set(("architecture", "arch_kwargs", "conv_op"), f"{EVIL_MODULE}.Conv"), "arch_kwargs.conv_op"),
    ("norm-op", _set(("architecture", "arch_kwargs", "norm_op"), "os.system"), "arch_kwargs.norm_op"),
    ("dropout-op", _set(("architecture", "arch_kwargs", "dropout_op"), "builtins.exec"), "arch_kwargs.dropout_op"),
    ("conv-op-relu", _set(("architecture", "arch_kwargs", "conv_op"), "torch.nn.ReLU"), "arch_kwargs.conv_op"),
    ("extra-import-key", _extra_import, "arch_kwargs.extra_op"),
    ("torch-load", _set(("architecture", "network_class_name"), "torch.load"), "network_class_name"),
    ("preprocessor", _set(("preprocessor_name",), f"{EVIL_MODULE}.Preprocessor"), "preprocessor_name"),
    ("normalization", _set(("normalization_schemes",), ["ZScoreNormalization", f"{EVIL_MODULE}.Norm"] * 2),
     "normalization_schemes[1]"),
    ("resampling", _set(("resampling_fn_data",), "rmtree"), "resampling_fn_data"),
    ("resampling-kwargs", _set(("resampling_fn_seg_kwargs",), {"hook": {"_target_": "os.system"}}),
     "resampling_fn_seg_kwargs"),
    ("label-manager", _set(("<plans>", "label_manager"), f"{EVIL_MODULE}.Net"), "label_manager"),
    ("old-plans-class", lambda plans, c: (c.pop("architecture"), c.update(UNet_class_name="os.system")),
     "UNet_class_name"),
]


@pytest.mark.parametrize("change, key", [p[1:] for p in PLANS_NAMES], ids=[p[0] for p in PLANS_NAMES])
def test_every_name_plans_json_can_make_nnunet_import_is_checked(tmp_path: Path, change: Any, key: str) -> None:
    """The other names nnU-Net resolves from plans.json (network class, _kw_requires_import entries, predictor
    lookups, label manager): refused when the member is built, before the evil module is imported."""
    marker = tmp_path / "imported"
    sys.path.insert(0, str(write_evil_module(tmp_path / "pythonpath", marker)))
    try:
        model = copy_model(NNUNET_DEMO, tmp_path / NNUNET_DEMO.name)
        plans = hostile_plans(model, change)
        with pytest.raises(ModelError) as raised:
            NnUNetMember(model)
        assert str(raised.value).startswith(f"{plans}: ") and key in str(raised.value), str(raised.value)
        assert "not on its allow-list" in str(raised.value) or "plain values" in str(raised.value)
        assert EVIL_MODULE not in sys.modules and not marker.exists()
    finally:
        sys.path.remove(str(tmp_path / "pythonpath"))


def test_real_plans_pass_the_check() -> None:
    """The shipped demo plans (nnU-Net v2 and U-Mamba folders) and the dotted names nnU-Net itself writes."""
    for folder in DEMO_MODELS.glob("*/plans.json"):
        check_nnunet_plans(json.loads(folder.read_text()), folder)
    plans = json.loads((NNUNET_DEMO / "plans.json").read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs.update(conv_op="torch.nn.Conv3d", norm_op="torch.nn.modules.batchnorm.BatchNorm3d",
                  dropout_op="torch.nn.modules.dropout.Dropout3d", nonlin="torch.nn.modules.activation.GELU")
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
    check_nnunet_plans(plans, Path("plans.json"))


# ------------------------------------------------------------------------------------------------ v1 pickles

def test_mednext_plans_pkl_that_runs_code_is_refused(case_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = copy_model(MEDNEXT_DEMO, tmp_path / MEDNEXT_DEMO.name)
    plans_path = model / "plans.pkl"
    plans = pickle.loads(plans_path.read_bytes())
    plans["conv_per_stage"] = RunsShell(f"echo ran > {marker}")
    plans_path.write_bytes(pickle.dumps(plans))
    manifest = write_manifest(tmp_path, [{"framework": "mednext", "path": str(model)}])
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest))
    refusal(done, str(manifest), str(plans_path), "something other than plain data", "system",
            f"--trust-checkpoint {plans_path}")
    assert not marker.exists()
    pickle.loads(plans_path.read_bytes())  # positive control: unpickling it runs the command
    assert marker.read_text().strip() == "ran"


# ------------------------------------------------------------------------------------------------ trust is exact

def add_to_checkpoint(path: Path, key: str, value: Any) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint[key] = value
    torch.save(checkpoint, path)


def test_trust_is_exact_across_folds(case_dir: Path, tmp_path: Path) -> None:
    """``--trust-checkpoint fold_0/checkpoint_final.pth --folds 0 1`` must not run fold 1's payload; the file
    alone, or the model folder itself (DIR included), is trusted; the JSON lists the files loaded trusted."""
    marker = tmp_path / "marker"
    model = copy_model(NNUNET_DEMO, tmp_path / "model")
    shutil.copytree(model / "fold_0", model / "fold_1")
    fold0, fold1 = (model / f"fold_{f}" / "checkpoint_final.pth" for f in (0, 1))
    add_to_checkpoint(fold0, "trained_on", datetime.date(2025, 1, 1))  # harmless, but not plain weights
    add_to_checkpoint(fold1, "hook", RunsShell(f"echo ran > {marker}"))
    out = tmp_path / "out"

    done = predict(case_dir, out, "--model", str(model), "--folds", "0", "--no-mirroring")
    refusal(done, str(fold0), "refused to load", f"--trust-checkpoint {fold0}")
    done = predict(case_dir, out, "--model", str(model), "--folds", "0", "1", "--no-mirroring",
                   "--trust-checkpoint", str(fold0))
    refusal(done, str(fold1), "posix.system", f"--trust-checkpoint {fold1}")
    assert not marker.exists() and files_under(out) == []

    done = predict(case_dir, out, "--model", str(model), "--folds", "0", "--no-mirroring",
                   "--trust-checkpoint", str(fold0))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(out.glob("*.json")).read_text())
    assert result["trusted_files"] == [str(fold0)] == result["members"][0]["trusted_files"]
    assert not marker.exists()

    # positive control, and DIR itself included: the folder trusts both folds, and fold 1's payload is real
    done = predict(case_dir, out, "--model", str(model), "--folds", "0", "1", "--no-mirroring", "--overwrite",
                   "--trust-checkpoint", str(model))
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.read_text().strip() == "ran"
    assert json.loads(next(out.glob("*.json")).read_text())["trusted_files"] == [str(fold0), str(fold1)]


def test_mednext_members_honour_exact_trust(case_dir: Path, tmp_path: Path) -> None:
    model = copy_model(MEDNEXT_DEMO, tmp_path / MEDNEXT_DEMO.name)
    checkpoint = model / "fold_0" / "model_final_checkpoint.model"
    add_to_checkpoint(checkpoint, "trained_on", datetime.date(2025, 1, 1))
    manifest = write_manifest(tmp_path, [{"name": "mednext", "framework": "mednext", "path": str(model),
                                          "mirroring": False, "tile_step": 1.0}])
    out = tmp_path / "out"
    done = predict(case_dir, out, "--model-set", str(manifest))
    refusal(done, str(checkpoint), "refused to load", f"--trust-checkpoint {checkpoint}")
    done = predict(case_dir, out, "--model-set", str(manifest), "--trust-checkpoint", str(model / "plans.pkl"))
    refusal(done, str(checkpoint), f"--trust-checkpoint {checkpoint}")  # trusting plans.pkl is not trusting this
    assert files_under(out) == []
    done = predict(case_dir, out, "--model-set", str(manifest), "--trust-checkpoint", str(checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(out.glob("*.json")).read_text())
    assert result["trusted_files"] == [str(checkpoint)] == result["members"][0]["trusted_files"]


def test_trust_options_are_explained_and_checked(tmp_path: Path) -> None:
    done = cli("predict", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--trust-checkpoint FILE|DIR" in text and "DIR itself included" in text and "A manifest cannot" in text
    done = predict(tmp_path, tmp_path / "out", "--model", str(NNUNET_DEMO), "--trust-checkpoint",
                   str(tmp_path / "typo.pth"))
    refusal(done, f"--trust-checkpoint {tmp_path / 'typo.pth'}: no such file or folder")


# ------------------------------------------------------------------------------------------------ TorchScript

class WritesAFile(nn.Module):
    """A TorchScript program whose forward maps a file of its choosing and writes into it."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.conv = nn.Conv3d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.target, shared=True, size=16, dtype=torch.uint8)
        written.fill_(65)
        return self.conv(x) + written.sum().float() * 0.0


def torchscript_member(path: Path, **extra: Any) -> dict:
    return {"name": "ts", "framework": "torchscript", "path": str(path), "channel_roles": ["t1n", "t1c", "t2w", "t2f"],
            "activation": "softmax", "class_labels": {"0": "background", "1": "NETC", "2": "SNFH", "3": "ET"},
            "roi_size": [64, 64, 64], "normalization": "zscore-nonzero", **extra}


def test_torchscript_runs_only_when_the_user_trusts_that_file(case_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "written-by-torchscript"
    ts = tmp_path / "models" / "writer.ts"
    ts.parent.mkdir()
    torch.jit.save(torch.jit.script(WritesAFile(str(marker))), str(ts))
    (tmp_path / "models" / "other.pt").write_bytes(b"another file")
    manifest = write_manifest(tmp_path, [torchscript_member(ts)])
    out = tmp_path / "out"

    done = predict(case_dir, out, "--model-set", str(manifest))
    refusal(done, str(manifest), str(ts), "a TorchScript file is a program", f"--trust-checkpoint {ts}",
            "A manifest cannot grant this")
    done = predict(case_dir, out, "--model-set", str(manifest), "--trust-checkpoint", str(tmp_path / "models"
                                                                                            / "other.pt"))
    refusal(done, str(ts), f"--trust-checkpoint {ts}")
    manifest_granting = write_manifest(tmp_path, [torchscript_member(ts, trust=True)], name="grants.json")
    done = predict(case_dir, out, "--model-set", str(manifest_granting))
    refusal(done, "unknown key(s) 'trust'")
    assert not marker.exists() and files_under(out) == []

    done = predict(case_dir, out, "--model-set", str(manifest), "--trust-checkpoint", str(ts))
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.read_bytes() == b"A" * 16  # positive control: the program does write when it is run
    result = json.loads(next(out.glob("*.json")).read_text())
    assert result["trusted_files"] == [str(ts)] == result["members"][0]["trusted_files"]


# ------------------------------------------------------------------------------------------------ MONAI arguments

class Recorder(ThreadingHTTPServer):
    """127.0.0.1 server that records each request and answers with ``body`` (optionally without Content-Length)."""

    daemon_threads = True

    def __init__(self, body: bytes = b"", content_length: bool = True, announce: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.body, self.content_length, self.announce = body, content_length, announce
        self.requests: list[str] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RecorderHandler(BaseHTTPRequestHandler):
    server: Recorder
    timeout = 10

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)
        self.send_response(200)
        if self.server.content_length:
            self.send_header("Content-Length", str(self.server.announce or len(self.server.body)))
        self.end_headers()
        try:
            for start in range(0, len(self.server.body), 1 << 16):
                self.wfile.write(self.server.body[start:start + (1 << 16)])
        except OSError:  # the client stopped reading: what a bounded download does
            pass
        self.close_connection = True


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Recorder] = []

    def start(**options: Any) -> Recorder:
        httpd = Recorder(**options)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return httpd

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_monai_pretrained_url_is_refused_before_anything_is_fetched(case_dir: Path, tmp_path: Path,
                                                                    serve: Any) -> None:
    server = serve(body=b"not weights")
    weights = tmp_path / "models" / "hovernet.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"never read")
    member = {"name": "hovernet", "framework": "monai", "path": str(weights), "channel_roles": ["t1n", "t1c", "t2w"],
              "activation": "sigmoid", "regions": ["TC", "WT", "ET"], "roi_size": [64, 64, 64],
              "normalization": "zscore", "network": {"_target_": "HoVerNet", "in_channels": 3, "out_classes": 3,
                                                     "pretrained_url": server.url("preact-resnet50.pth")}}
    manifest = write_manifest(tmp_path, [member])
    torch_home = tmp_path / "torch-home"
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest), env={"TORCH_HOME": str(torch_home)})
    refusal(done, str(manifest), "member 1 ('hovernet')", "pretrained_url=", "would download or read weights",
            '"pretrained_url": null', "only from the member's own file")
    assert server.requests == [] and files_under(torch_home) == []


MONAI_ARGUMENTS = [
    ("default-pretrained", {"_target_": "EfficientNetBN", "model_name": "efficientnet-b0", "spatial_dims": 3,
                            "in_channels": 4, "num_classes": 4},
     "pretrained=True (its default)", '"pretrained": false'),
    ("pretrained-true", {"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 4, "out_channels": 4,
                         "pretrained": True}, "pretrained=True", '"pretrained": false'),
    ("path-argument", {"_target_": "SegResNet", "in_channels": 4, "out_channels": 4, "act": "/tmp/x.pth"},
     "network.act = '/tmp/x.pth' names a URL or a file", "Remove it"),
]


@pytest.mark.parametrize("network, problem, fix", [a[1:] for a in MONAI_ARGUMENTS], ids=[a[0] for a in MONAI_ARGUMENTS])
def test_monai_arguments_that_would_read_files_are_refused(tmp_path: Path, network: dict, problem: str,
                                                           fix: str) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"never read")
    member = {"name": "net", "framework": "monai", "path": str(weights), "channel_roles": ["t1n", "t1c", "t2w", "t2f"],
              "activation": "softmax", "class_labels": {"0": 0, "1": 1, "2": 2, "3": 3}, "roi_size": [32, 32, 32],
              "normalization": "zscore", "network": network}
    manifest = write_manifest(tmp_path, [member])
    with pytest.raises(ModelError) as raised:
        load_model_set(manifest)
    assert str(raised.value).startswith(f"{manifest}: member 1 ('net'): ") and problem in str(raised.value)
    assert fix in str(raised.value)


# ------------------------------------------------------------------------------------------------ downloads

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tar_gz_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fetch(manifest: Path, cache: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli("models", "fetch", str(manifest), "--cache-dir", str(cache), "--no-progress", env=env, timeout=300)


def fetch_refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


BOMB = 20 << 20  # 20 MiB of zeros: ~20 KB compressed, a ratio of ~1000 (model checkpoints compress ~1.1x)


@pytest.mark.parametrize("make, suffix", [(zip_of, "zip"), (tar_gz_of, "tar.gz")], ids=["zip", "tar.gz"])
def test_archive_bomb_is_refused_before_extraction(tmp_path: Path, make: Any, suffix: str) -> None:
    archive = tmp_path / "src" / f"model.{suffix}"
    archive.parent.mkdir()
    archive.write_bytes(make({"model/plans.json": b"{}", "model/fold_0/checkpoint_final.pth": bytes(BOMB)}))
    assert archive.stat().st_size < BOMB // downloads.MAX_COMPRESSION_RATIO
    manifest = write_manifest(tmp_path, [{"name": "bomb", "framework": "nnunetv2", "path": "absent",
                                          "url": archive.as_uri(), "sha256": sha(archive.read_bytes())}])
    cache = tmp_path / "cache"
    done = fetch(manifest, cache)
    fetch_refused(done, "model." + suffix, f"entries declare {BOMB + 2} bytes", "implausible for model files",
                  "Nothing was kept")
    assert files_under(cache) == []  # no archive, no half-extracted folder, no empty cache entry


def test_extraction_cap_is_user_settable_and_stops_large_archives(tmp_path: Path, case_dir: Path) -> None:
    data = os.urandom(3 << 20)  # incompressible, like weights: only the cap stops it
    archive = tmp_path / "src" / "model.zip"
    archive.parent.mkdir()
    archive.write_bytes(zip_of({"model/fold_0/checkpoint_final.pth": data}))
    manifest = write_manifest(tmp_path, [{"name": "big", "framework": "nnunetv2", "path": "absent",
                                          "url": archive.as_uri(), "sha256": sha(archive.read_bytes())}])
    cache = tmp_path / "cache"
    done = fetch(manifest, cache, env={"BRATS_ENSEMBLE_MAX_EXTRACTED": "2M"})
    fetch_refused(done, f"entries declare {len(data)} bytes", "BRATS_ENSEMBLE_MAX_EXTRACTED")
    assert files_under(cache) == []
    # through predict: the same refusal, named by manifest and member
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest),
                   env={"BRATS_ENSEMBLE_MAX_EXTRACTED": "2M", "BRATS_ENSEMBLE_CACHE": str(cache)})
    refusal(done, str(manifest), "member 1 ('big')", "BRATS_ENSEMBLE_MAX_EXTRACTED")
    assert files_under(cache) == []
    done = fetch(manifest, cache, env={"BRATS_ENSEMBLE_MAX_EXTRACTED": "4M"})  # raised: it extracts
    assert done.returncode == 0, done.stderr
    assert (cache / sha(archive.read_bytes()) / "extracted" / "model" / "fold_0" / "checkpoint_final.pth"
            ).read_bytes() == data


def test_body_without_content_length_stops_at_the_cap(tmp_path: Path, serve: Any) -> None:
    body = bytes(4 << 20)
    server = serve(body=body, content_length=False)
    manifest = write_manifest(tmp_path, [{"name": "endless", "framework": "nnunetv2", "path": "absent",
                                          "url": server.url("m.zip"), "sha256": sha(body)}])
    cache = tmp_path / "cache"
    done = fetch(manifest, cache, env={"BRATS_ENSEMBLE_MAX_DOWNLOAD": "1M"})
    fetch_refused(done, server.url("m.zip"), "the transfer went past 1048576 bytes",
                  "download was stopped and deleted", "BRATS_ENSEMBLE_MAX_DOWNLOAD")
    assert files_under(cache) == []


def test_download_stops_at_the_manifest_size_and_at_content_length(tmp_path: Path, serve: Any) -> None:
    body = bytes(2 << 20)
    cache = tmp_path / "cache"
    unannounced = serve(body=body, content_length=False)
    manifest = write_manifest(tmp_path, [{"name": "sized", "framework": "nnunetv2", "path": "absent",
                                          "url": unannounced.url("m.zip"), "sha256": sha(body), "archive_size": 1000}])
    fetch_refused(fetch(manifest, cache), "went past 1000 bytes", "manifest's \"archive_size\"")
    assert files_under(cache) == []
    announced = serve(body=body, announce=len(body))
    manifest = write_manifest(tmp_path, [{"name": "announced", "framework": "nnunetv2", "path": "absent",
                                          "url": announced.url("m.zip"), "sha256": sha(body)}])
    fetch_refused(fetch(manifest, cache, env={"BRATS_ENSEMBLE_MAX_DOWNLOAD": "1M"}),
                  f"the server announces {len(body)} bytes (Content-Length)", "BRATS_ENSEMBLE_MAX_DOWNLOAD")
    assert files_under(cache) == []


@pytest.mark.parametrize("source", ["dev-zero", "fifo", "folder"])
def test_file_url_must_be_a_regular_file(tmp_path: Path, source: str) -> None:
    if source == "dev-zero":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    elif source == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        path = tmp_path / "pipe"
        os.mkfifo(path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
    manifest = write_manifest(tmp_path, [{"name": "device", "framework": "nnunetv2", "path": "absent",
                                          "url": path.as_uri(), "sha256": "a" * 64}])
    cache = tmp_path / "cache"
    done = fetch(manifest, cache)
    fetch_refused(done, path.as_uri(), "not a regular file")
    assert files_under(cache) == []


def test_file_dev_zero_through_predict(tmp_path: Path, case_dir: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    manifest = write_manifest(tmp_path, [{"name": "zero", "framework": "nnunetv2", "path": "absent",
                                          "url": "file:///dev/zero", "sha256": "a" * 64}])
    cache = tmp_path / "cache"
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest), env={"BRATS_ENSEMBLE_CACHE": str(cache)})
    refusal(done, str(manifest), "member 1 ('zero')", "file:///dev/zero: not a regular file")
    assert files_under(cache) == []


def test_archive_with_too_many_entries_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads, "MAX_ARCHIVE_ENTRIES", 50)  # the real cap is 100 000; same code path
    for make, suffix in ((zip_of, "zip"), (tar_gz_of, "tar.gz")):
        archive = tmp_path / f"many.{suffix}"
        archive.write_bytes(make({f"model/f{i}": b"" for i in range(51)}))
        with pytest.raises(downloads.DownloadRefused, match=r"holds (51|more than 50) entries"):
            downloads.extract_archive(archive, tmp_path / f"x-{suffix}" / "extracted")
        assert files_under(tmp_path / f"x-{suffix}") == []


# ------------------------------------------------------------------------------------------------ manifests

def test_duplicate_keys_are_refused(tmp_path: Path, case_dir: Path) -> None:
    manifest = tmp_path / "dup.json"
    member = json.dumps({"framework": "nnunetv2", "path": str(NNUNET_DEMO), "folds": [0]})
    manifest.write_text('{"members": [' + member[:-1] + ', "weight": 1, "weight": 5}]}')
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest))
    refusal(done, str(manifest), "the key 'weight' appears twice", "Keep one of them")
    done = cli("models", "list", str(manifest))
    refusal(done, str(manifest), "appears twice")


def test_deep_nesting_is_refused_before_parsing(tmp_path: Path, case_dir: Path) -> None:
    manifest = tmp_path / "deep.json"
    manifest.write_text('{"members": [], "description": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert nesting_depth(manifest.read_text()) == 100_001
    done = predict(case_dir, tmp_path / "out", "--model-set", str(manifest))
    refusal(done, str(manifest), "nested 100001 levels deep", "more than the 32")
    done = cli("models", "fetch", str(manifest))
    refusal(done, str(manifest), "nested")
    model = copy_model(NNUNET_DEMO, tmp_path / "model")  # model folders' JSON too
    (model / "dataset.json").write_text("[" * 50_000 + "]" * 50_000)
    done = predict(case_dir, tmp_path / "out", "--model", str(model))
    refusal(done, str(model / "dataset.json"), "nested 50000 levels deep")


def test_oversized_manifest_and_description_are_refused(tmp_path: Path, case_dir: Path) -> None:
    members = [{"framework": "nnunetv2", "path": str(NNUNET_DEMO), "folds": [0]}]
    huge = write_manifest(tmp_path, members, name="huge.json", description="x" * (MANIFEST_MAX_BYTES + 10))
    done = predict(case_dir, tmp_path / "out", "--model-set", str(huge))
    refusal(done, str(huge), f"larger than {MANIFEST_MAX_BYTES} bytes")
    long = write_manifest(tmp_path, members, name="long.json", description="y" * 20_000)
    done = predict(case_dir, tmp_path / "out", "--model-set", str(long))
    refusal(done, str(long), "description has 20000 characters", "Shorten it")
    assert files_under(tmp_path / "out") == []


def test_manifest_archive_size_key_is_checked(tmp_path: Path) -> None:
    for size, problem in ((-1, "archive_size must be the archive's size in bytes"), ("1G", "archive_size must be"),
                          (None, "has an archive_size but no url")):
        member = {"framework": "nnunetv2", "path": "absent", "archive_size": 5 if size is None else size}
        if size is not None:
            member.update(url="https://example.org/m.zip", sha256="a" * 64)
        with pytest.raises(ModelError, match=problem):
            load_model_set(write_manifest(tmp_path, [member]))
    # a MedNeXt member's "size" stays the network size (S/B/M/L), not a byte count
    member = {"framework": "mednext", "path": str(MEDNEXT_DEMO), "size": "S", "kernel_size": 3,
              "url": "https://example.org/m.zip", "sha256": "a" * 64, "archive_size": 123}
    assert load_model_set(write_manifest(tmp_path, [member])).members[0].size == "S"
