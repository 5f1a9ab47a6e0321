"""TorchScript and MONAI-network members (members/torchscript.py), their manifest entries, the CUDA out-of-memory
fallback, and a four-framework ensemble (nnU-Net v2, MedNeXt, U-Mamba, TorchScript) through ``brats-ensemble
predict --model-set``.

Oracle for the members: MONAI's own ``sliding_window_inference``, ``NormalizeIntensity`` and ``Spacing`` called
directly here on the case's arrays with the original (Python) network, then brought back to the case grid by hand.
Oracle for the ensemble: the class-weighted mean written out in numpy (float64) from each member's probabilities.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from BraTSEnsembleLib.case import case_from_images, read_case_folder
from BraTSEnsembleLib.errors import DeviceError, ModelError
from BraTSEnsembleLib.labels import BACKGROUND, ET, NETC, SNFH
from BraTSEnsembleLib.members import torchscript
from BraTSEnsembleLib.members.base import LABEL_SPACE, REGION_SPACE, Probabilities
from BraTSEnsembleLib.members.torchscript import MonaiNetworkMember, TorchScriptMember, monai_network_class
from BraTSEnsembleLib.members.umamba import build_umamba_network
from BraTSEnsembleLib.modelset import load_model_set
from BraTSEnsembleLib.uncertainty import normalised_entropy

from mednext_fixtures import v1_plans, write_v1_model_folder
from test_modelset import _nnunet_member, brats_ensemble, mednext_state, write_manifest
from test_umamba import BOT, tiny_plans, write_results_folder

ROLES = ("t1n", "t1c", "t2w", "t2f")


# ------------------------------------------------------------------------------------------------ helpers

class TinyNet(nn.Module):
    """A small convolutional network with asymmetric kernels (so axis order and mirroring change its output)."""

    def __init__(self, n_in: int = 4, n_out: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(n_in, hidden, 3, padding=1)
        self.conv2 = nn.Conv3d(hidden, n_out, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


def tiny_net(seed: int, n_in: int = 4, n_out: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(n_in, n_out).eval()


def save_torchscript(network: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(network), str(path))
    return path


def make_case(shape_zyx: tuple[int, int, int] = (22, 27, 25), spacing_xyz: tuple[float, float, float] = (0.9, 1.1, 1.6),
              seed: int = 3):
    """A Case (real SimpleITK images) with random intensities inside a box and zeros outside it."""
    rng = np.random.default_rng(seed)
    box = tuple(slice(2, s - 3) for s in shape_zyx)
    images = {}
    for index, role in enumerate(ROLES):
        array = np.zeros(shape_zyx, np.float32)
        array[box] = rng.uniform(50, 400, size=[b.stop - b.start for b in box]) * (1 + 0.4 * index)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing_xyz)
        images[role] = image
    return case_from_images("tiny-001", images)


def oracle(network: nn.Module, case: Any, roles: tuple[str, ...], roi: tuple[int, ...], *, overlap: float, mode: str,
           axis_order: str, activation: str, mirroring: bool = False, nonzero: bool = True,
           target_spacing: tuple[float, ...] | None = None, sw_batch_size: int = 1) -> np.ndarray:
    """MONAI called directly: the case's arrays on the model's axes, (Spacing,) NormalizeIntensity,
    sliding_window_inference, (Spacing.inverse,) activation, back to (z, y, x)."""
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity, Spacing

    zyx = np.stack([sitk.GetArrayFromImage(case.images[r]).astype(np.float32) for r in roles])
    spacing_zyx = tuple(reversed(case.reference.GetSpacing()))
    array = zyx.transpose(0, 3, 2, 1) if axis_order == "xyz" else zyx
    spacing = spacing_zyx[::-1] if axis_order == "xyz" else spacing_zyx
    data = torch.from_numpy(np.ascontiguousarray(array))
    spacing_transform = resampled = None
    if target_spacing is not None:
        spacing_transform = Spacing(pixdim=target_spacing, mode="bilinear")
        resampled = spacing_transform(MetaTensor(data, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))))
        data = resampled.as_tensor()
    data = torch.as_tensor(NormalizeIntensity(nonzero=nonzero, channel_wise=True)(data))

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if not mirroring:
            return network(x)
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        return sum(torch.flip(network(torch.flip(x, f) if f else x), f) if f else network(x) for f in flips) / 8

    with torch.inference_mode():
        logits = sliding_window_inference(data[None].float(), roi, sw_batch_size, predictor, overlap=overlap,
                                          mode=mode)[0]
    if spacing_transform is not None:
        stitched = MetaTensor(logits)
        stitched.copy_meta_from(resampled, copy_attr=True)
        logits = spacing_transform.inverse(stitched).as_tensor()
    probabilities = torch.softmax(logits, 0) if activation == "softmax" else torch.sigmoid(logits)
    out = probabilities.numpy()
    return out.transpose(0, 3, 2, 1) if axis_order == "xyz" else out


def torchscript_entry(path: Path, **extra: Any) -> dict:
    return {"name": "ts", "framework": "torchscript", "path": str(path), "channel_roles": list(ROLES),
            "activation": "softmax", "class_labels": {"0": "background", "1": "ET", "2": "NETC", "3": "SNFH"},
            "roi_size": [16, 16, 16], "normalization": "zscore-nonzero", **extra}


SEGRESNET = {"_target_": "SegResNet", "init_filters": 4, "norm": ["GROUP", {"num_groups": 2}], "in_channels": 3,
             "out_channels": 3, "blocks_down": [1, 1], "blocks_up": [1]}


def monai_entry(path: Path, **extra: Any) -> dict:
    return {"name": "segresnet", "framework": "monai", "path": str(path), "channel_roles": ["FLAIR", "t1c", "t2w"],
            "activation": "sigmoid", "regions": ["TC", "WT", "ET"], "roi_size": [16, 16, 16],
            "normalization": "zscore-nonzero", "network": dict(SEGRESNET), **extra}


def build_monai(spec: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return monai_network_class(spec["_target_"])(**{k: v for k, v in spec.items() if k != "_target_"}).eval()


def one_member(tmp_path: Path, entry: dict, **options: Any):
    manifest = write_manifest(tmp_path, {"postprocess": "none", "members": [entry]})
    return load_model_set(manifest, **options).members[0]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ TorchScript

def test_torchscript_softmax_member_equals_monai_sliding_window_on_the_case_grid(tmp_path: Path) -> None:
    network = tiny_net(1)
    path = save_torchscript(network, tmp_path / "models" / "tiny.ts")
    entry = torchscript_entry(path, overlap=0.5, mode="gaussian", mirroring=True)
    member = one_member(tmp_path, entry, trusted_checkpoints=[path])  # TorchScript runs only when trusted
    assert isinstance(member, TorchScriptMember) and member.space == LABEL_SPACE
    assert member.labels == (BACKGROUND, ET, NETC, SNFH) and member.roles == ROLES
    case = make_case()
    steps: list[str] = []
    probabilities = member.predict(case, torch.device("cpu"), lambda step, fraction=None: steps.append(step))
    assert probabilities.labels == (BACKGROUND, ET, NETC, SNFH) and probabilities.space == LABEL_SPACE
    assert probabilities.array.dtype == np.float32 and probabilities.grid_shape == case.shape_zyx
    expected = oracle(network, case, ROLES, (16, 16, 16), overlap=0.5, mode="gaussian", axis_order="xyz",
                      activation="softmax", mirroring=True)
    assert np.abs(probabilities.array - expected).max() <= 1e-5
    np.testing.assert_allclose(probabilities.array.sum(0), 1.0, atol=1e-5)
    assert probabilities.array.std(axis=(1, 2, 3)).min() > 1e-3  # a real, varying prediction
    assert any("sliding window" in s for s in steps)
    # the axis order matters for this network: reading the case as z, y, x gives another result
    other = one_member(tmp_path, {**entry, "axis_order": "zyx"}, trusted_checkpoints=[path]).predict(
        case, torch.device("cpu"))
    assert np.abs(other.array - probabilities.array).max() > 1e-3
    described = member.describe()
    assert described["framework"] == "torchscript" and described["mirroring"] is True
    assert described["labels"] == [0, 3, 1, 2] and described["roi_size"] == [16, 16, 16]


# ------------------------------------------------------------------------------------------------ MONAI networks

SWIN = {"_target_": "monai.networks.nets.SwinUNETR", "in_channels": 4, "out_channels": 4, "feature_size": 12,
        "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def swin_entry(path: Path) -> dict:
    return {"name": "swin", "framework": "monai", "path": str(path), "channel_roles": list(ROLES),
            "activation": "softmax", "class_labels": {"1": "NETC", "2": "SNFH", "3": "ET"}, "roi_size": [64, 64, 64],
            "mode": "gaussian", "normalization": "zscore", "network": dict(SWIN)}


@pytest.mark.parametrize("variant", ["segresnet-sigmoid-resampled", "swinunetr-softmax"])
def test_monai_network_member_equals_monai_sliding_window(tmp_path: Path, variant: str) -> None:
    case = make_case()
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    if variant.startswith("segresnet"):
        spec, roles, roi, activation = SEGRESNET, ("t2f", "t1c", "t2w"), (16, 16, 16), "sigmoid"
        entry = monai_entry(checkpoint, axis_order="zyx", target_spacing=[1.2, 1.0, 1.0])
    else:
        spec, roles, roi, activation = SWIN, ROLES, (64, 64, 64), "softmax"
        entry = swin_entry(checkpoint)
    network = build_monai(spec, seed=5)
    # DataParallel names, nested under "state_dict" as training scripts often save them
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}, "epoch": 3}, checkpoint)
    member = one_member(tmp_path, entry)
    assert isinstance(member, MonaiNetworkMember) and member.roles == roles
    probabilities = member.predict(case, torch.device("cpu"))
    assert probabilities.grid_shape == case.shape_zyx and probabilities.array.dtype == np.float32
    expected = oracle(network, case, roles, roi, overlap=0.25, mode=entry.get("mode", "constant"),
                      axis_order=entry.get("axis_order", "xyz"), activation=activation,
                      nonzero=entry["normalization"] == "zscore-nonzero",
                      target_spacing=tuple(entry["target_spacing"]) if "target_spacing" in entry else None)
    assert np.abs(probabilities.array - expected).max() <= 1e-5
    assert probabilities.array.std(axis=(1, 2, 3)).min() > 1e-4
    if activation == "sigmoid":
        # the bundle's channel order TC, WT, ET, kept as it is: region space, labels from the regions
        assert probabilities.space == REGION_SPACE and probabilities.labels == ("TC", "WT", "ET")
        assert member.labels == (BACKGROUND, NETC, SNFH, ET)
        assert member.describe()["regions"] == ["TC", "WT", "ET"]
        assert member.describe()["target_spacing"] == [1.2, 1.0, 1.0]
    else:
        assert probabilities.labels == (BACKGROUND, NETC, SNFH, ET)
        np.testing.assert_allclose(probabilities.array.sum(0), 1.0, atol=1e-5)
    assert member.describe()["network"]["_target_"] == spec["_target_"]


def test_monai_checkpoint_must_be_plain_weights_and_fit_the_network(tmp_path: Path) -> None:
    from mednext_fixtures import NotPlainData

    network = build_monai(SEGRESNET, seed=1)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": network.state_dict(), "hook": NotPlainData()}, path)
    case = make_case()
    member = one_member(tmp_path, monai_entry(path))
    with pytest.raises(ModelError, match=r"refused to load .*--trust-checkpoint"):
        member.predict(case, torch.device("cpu"))
    trusted = one_member(tmp_path, monai_entry(path), trusted_checkpoints=[tmp_path])  # --trust-checkpoint DIR
    assert trusted.predict(case, torch.device("cpu")).labels == ("TC", "WT", "ET")
    torch.save(build_monai({**SEGRESNET, "init_filters": 8}, 1).state_dict(), path)
    with pytest.raises(ModelError, match=r"set\.json: member 1 \('segresnet'\): .*model\.pt: the weights do not fit "
                                         r"SegResNet .*Give the network arguments"):
        member.predict(case, torch.device("cpu"))
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "epoch": 1}, path)
    with pytest.raises(ModelError, match=r"cannot find the network weights \(top-level keys: optimizer, epoch\)"):
        member.predict(case, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ refusals

# (id, framework of the entry, changes to the entry, words of the problem, words of the fix)
REFUSALS = [
    ("folds-on-torchscript", "torchscript", {"folds": [0]}, "unknown key(s) 'folds'", "a member has only"),
    ("tile-step-on-monai", "monai", {"tile_step": 0.5}, "unknown key(s) 'tile_step'", "overlap"),
    ("network-on-torchscript", "torchscript", {"network": SEGRESNET}, "unknown key(s) 'network'", "Remove them"),
    ("no-channel-roles", "torchscript", {"channel_roles": None}, "no channel_roles", '"channel_roles": ['),
    ("duplicate-roles", "torchscript", {"channel_roles": ["t1n", "T1", "t2w", "t2f"]}, "name one role twice",
     '"channel_roles": ['),
    ("bad-activation", "torchscript", {"activation": "relu"}, "activation must be", '"activation": "softmax"'),
    ("softmax-without-labels", "torchscript", {"class_labels": None}, "needs class_labels", '"class_labels": {'),
    ("regions-on-softmax", "torchscript", {"regions": ["WT", "TC", "ET"]}, "regions is for sigmoid",
     "Remove it and write"),
    ("labels-on-sigmoid", "monai", {"class_labels": {"1": "ET"}}, "class_labels is for softmax", '"regions"'),
    ("region-twice", "monai", {"regions": ["TC", "WT", "WT"]}, "each of WT, TC, ET once", "Name every output channel"),
    ("unknown-class-label", "torchscript", {"class_labels": {"1": "EDEMA"}}, "unknown class", "Use one of"),
    ("label-twice", "torchscript", {"class_labels": {"1": "ET", "2": "ET"}}, "distinct BraTS labels",
     "Name every output channel"),
    ("no-roi", "torchscript", {"roi_size": None}, "no roi_size", '"roi_size": [128, 128, 128]'),
    ("2d-roi", "torchscript", {"roi_size": [16, 16]}, "three positive integers", "roi_size"),
    ("no-normalization", "torchscript", {"normalization": None}, "no normalization", "zscore-nonzero"),
    ("overlap-one", "monai", {"overlap": 1.0}, "overlap must be a number between 0 and 0.9", "0.5"),
    ("bad-mode", "monai", {"mode": "mean"}, 'mode must be "constant" or "gaussian"', "blend mode"),
    ("bad-axis-order", "torchscript", {"axis_order": "yxz"}, "axis_order", '"xyz"'),
    ("bad-spacing", "monai", {"target_spacing": [1, 0, 1]}, "target_spacing must be", "[1.0, 1.0, 1.0]"),
    ("no-network", "monai", {"network": None}, "no network", '"_target_": "SegResNet"'),
    ("unknown-class", "monai", {"network": {**SEGRESNET, "_target_": "SegResNetXL"}},
     "'SegResNetXL' is not a network class of monai.networks.nets", "Name a class of monai.networks.nets"),
    ("import-elsewhere", "monai", {"network": {**SEGRESNET, "_target_": "os.system"}},
     "'os.system' is not a network class", "monai.networks.nets"),
    ("not-a-network", "monai", {"network": {**SEGRESNET, "_target_": "monai.networks.nets.__builtins__"}},
     "is not a network class", "monai.networks.nets"),
    ("expression", "monai", {"network": {**SEGRESNET, "init_filters": "$4 * 4"}}, "need evaluation",
     "plain JSON values"),
    ("unknown-argument", "monai", {"network": {**SEGRESNET, "feature_size": 12}}, "does not take these arguments",
     "Name a class"),
    ("wrong-in-channels", "monai", {"network": {**SEGRESNET, "in_channels": 4}},
     "in_channels=4 but channel_roles names 3", "in_channels/out_channels must match"),
    ("wrong-out-channels", "monai", {"network": {k: v for k, v in SEGRESNET.items() if k != "out_channels"}},
     "out_channels=2 (its default) but the manifest declares 3", "in_channels/out_channels must match"),
]


@pytest.mark.parametrize("case_id, framework, changes, problem, fix", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_manifest_refusals_name_the_manifest_the_member_and_the_fix(tmp_path: Path, case_id, framework, changes,
                                                                    problem, fix) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"never read: the manifest is refused first")
    entry = torchscript_entry(path) if framework == "torchscript" else monai_entry(path)
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    manifest = write_manifest(tmp_path, {"members": [entry]})
    with pytest.raises(ModelError) as raised:
        load_model_set(manifest)
    message = str(raised.value)
    assert message.startswith(f"{manifest.resolve()}: member 1 ('{entry['name']}'): "), message
    assert problem in message and fix in message, message


def test_network_that_does_not_fit_the_declared_channels_is_refused_naming_manifest_member_and_fix(
        tmp_path: Path) -> None:
    case = make_case()
    five_outputs = save_torchscript(tiny_net(2, n_out=5), tmp_path / "five.ts")
    member = one_member(tmp_path, torchscript_entry(five_outputs), trusted_checkpoints=[five_outputs])
    with pytest.raises(ModelError) as raised:
        member.predict(case, torch.device("cpu"))
    message = str(raised.value)
    assert message.startswith(f"{(tmp_path / 'set.json').resolve()}: member 1 ('ts'): {five_outputs}"), message
    assert "returns shape (1, 5, 16, 16, 16)" in message and "declares 4 output channel(s)" in message
    assert "Fix class_labels/regions" in message
    three_inputs = save_torchscript(tiny_net(2, n_in=3), tmp_path / "three.ts")
    member = one_member(tmp_path, torchscript_entry(three_inputs), trusted_checkpoints=[three_inputs])
    with pytest.raises(ModelError, match=r"member 1 \('ts'\): .*three\.ts: the network failed on windows of shape "
                                         r"\(1, 4, 16, 16, 16\) .*Check that channel_roles lists its 4 input"):
        member.predict(case, torch.device("cpu"))
    state_dict_file = tmp_path / "weights.pt"
    torch.save(tiny_net(2).state_dict(), state_dict_file)
    member = one_member(tmp_path, torchscript_entry(state_dict_file), trusted_checkpoints=[state_dict_file])
    with pytest.raises(ModelError, match=r"weights\.pt: not a TorchScript file .*framework \"monai\""):
        member.predict(case, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ out of memory

class OutOfMemoryFirst(nn.Module):
    """Wraps a loaded network: its first ``times`` calls raise CUDA out-of-memory, as a GPU does when the device-side
    buffers leave no room for a window; later calls return the network's own output, unchanged."""

    def __init__(self, network: Any, times: int = 1) -> None:
        super().__init__()
        self.network, self.times, self.calls = network, times, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)


def test_out_of_memory_retries_with_results_on_the_cpu_and_says_so(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_torchscript(tiny_net(4), tmp_path / "tiny.ts")
    case = make_case()
    plain = one_member(tmp_path, torchscript_entry(path), trusted_checkpoints=[path]).predict(case, torch.device("cpu"))

    member = one_member(tmp_path, torchscript_entry(path), trusted_checkpoints=[path])
    wrappers: list[OutOfMemoryFirst] = []
    load = member.load_network

    def load_failing_once(device: torch.device) -> OutOfMemoryFirst:
        wrappers.append(OutOfMemoryFirst(load(device)))
        return wrappers[-1]

    monkeypatch.setattr(member, "load_network", load_failing_once)
    results_devices: list[torch.device] = []
    sliding_window = torchscript.sliding_window_logits

    def spy(predictor, data, settings, device, results_device):
        results_devices.append(results_device)
        return sliding_window(predictor, data, settings, device, results_device)

    monkeypatch.setattr(torchscript, "sliding_window_logits", spy)
    steps: list[str] = []
    with pytest.warns(RuntimeWarning, match="CUDA out of memory"):
        retried = member.predict(case, torch.device("cpu"), lambda step, fraction=None: steps.append(step))
    assert np.array_equal(retried.array, plain.array)  # the retry is the same computation
    assert results_devices == [torch.device("cpu"), torch.device("cpu")]  # first on the device, then on the CPU
    assert wrappers[0].calls > 2  # the network kept running after the failed first call
    assert any("CUDA out of memory" in s and "results on the CPU" in s for s in steps), steps

    member = one_member(tmp_path, torchscript_entry(path), trusted_checkpoints=[path])
    monkeypatch.setattr(member, "load_network", lambda device: OutOfMemoryFirst(load(device), times=10**6))
    with pytest.warns(RuntimeWarning), pytest.raises(DeviceError, match="even with the results on the CPU.*--device cpu"):
        member.predict(case, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ end to end

def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
def test_four_framework_manifest_through_the_cli_equals_the_class_weighted_mean(trained_models, phantom_cases,
                                                                                tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net v2 + MedNeXt + U-Mamba + TorchScript in one manifest, run by ``brats-ensemble predict --model-set``:
    the JSON lists the four members, and labels and entropy are those of the class-weighted mean of the members'
    probabilities computed here in numpy."""
    models = tmp_path / "models"
    mednext_dir = write_v1_model_folder(models, {0: mednext_state(21)}, v1_plans(patch_size=(32, 32, 32)))
    torch.manual_seed(0)
    umamba_dir = write_results_folder(models, BOT, build_umamba_network(BOT, tiny_plans(), "3d_fullres", 4, 4),
                                      tiny_plans())
    ts_path = save_torchscript(tiny_net(7), models / "tiny.ts")
    members = [
        _nnunet_member(trained_models["A"], weight=1.0, class_weights={"ET": 2.0}),
        {"name": "mednext", "framework": "mednext", "path": str(mednext_dir), "mirroring": False, "tile_step": 1.0,
         "class_labels": {"1": "SNFH", "2": "NETC", "3": "ET"}, "weight": 0.5},
        {"name": "umamba", "framework": "umamba", "path": str(umamba_dir), "folds": [0], "mirroring": False,
         "tile_step": 1.0, "weight": 0.5},
        {**torchscript_entry(ts_path, channel_roles=["t2f", "t1c", "t1n", "t2w"], roi_size=[32, 32, 32]),
         "weight": 0.75, "class_weights": {"NETC": 1.5, "background": 0.5}},
    ]
    manifest = write_manifest(tmp_path, {"name": "four", "postprocess": "none", "members": members})
    case_dir = sorted(phantom_cases.iterdir())[0]
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread there as here: the same float32 summation order
    done = brats_ensemble("predict", str(case_dir), "-o", str(out), "--model-set", str(manifest), "--device", "cpu",
                          "--progress", "none", "--save-uncertainty", "--trust-checkpoint", str(ts_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    recorded = summary["members"]
    assert [m["framework"] for m in recorded] == ["nnunetv2", "mednext", "umamba", "torchscript"]
    assert [m["name"] for m in recorded] == ["A", "mednext", "umamba", "ts"]
    assert [m["weight"] for m in recorded] == [1.0, 0.5, 0.5, 0.75]
    assert recorded[3]["class_weights"] == {"background": 0.5, "NETC": 1.5, "SNFH": 1.0, "ET": 1.0}
    assert summary["fusion"] == "class-weighted-mean"
    assert summary["trusted_files"] == [str(ts_path.resolve())] == recorded[3]["trusted_files"]  # ran as trusted

    model_set = load_model_set(manifest, trusted_checkpoints=[ts_path])
    case = read_case_folder(case_dir)
    labels = (BACKGROUND, NETC, SNFH, ET)
    numerator = np.zeros((4, *case.shape_zyx))
    denominator = np.zeros(4)
    for member, weight, factors in zip(model_set.members, model_set.weights, model_set.class_weights):
        probabilities = member.predict(case, torch.device("cpu"))
        assert probabilities.grid_shape == case.shape_zyx and set(probabilities.labels) == set(labels)
        for index, label in enumerate(labels):
            w = weight * (factors or {}).get(label, 1.0)
            numerator[index] += w * probabilities.channel(label).astype(np.float64)
            denominator[index] += w
    fused = numerator / denominator[:, None, None, None]
    expected_labels = np.asarray(labels, np.uint8)[fused.argmax(0)]
    written = read_array(out / f"{case_dir.name}.nii.gz")
    assert len(np.unique(written)) > 1, "the ensemble found no tumour: the comparison would be weak"
    agree = np.mean(written == expected_labels)
    assert agree > 0.9999, f"{1 - agree:.4%} of voxels differ from the direct computation"
    entropy = normalised_entropy(Probabilities(fused.astype(np.float32), labels))
    written_entropy = read_array(out / f"{case_dir.name}_entropy.nii.gz")
    # the normalised entropy of the fused probabilities (a continuous function of them) agrees to float32 rounding
    assert np.abs(written_entropy - entropy).max() <= 1e-5
