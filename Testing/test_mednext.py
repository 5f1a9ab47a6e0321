"""Tests of the MedNeXt member: architecture vs. the published figures, nnU-Net v1 model folders, safe loading, v1
preprocessing / sliding window / export, and predict on a small synthetic case."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import BACKGROUND, ET, NETC, SNFH
from BraTSEnsembleLib.members.base import Member, Probabilities
from BraTSEnsembleLib.members.mednext import (
    V1_BRATS_TASK_CLASS_LABELS,
    MedNeXtMember,
    create_mednext,
    gaussian_importance_map,
    load_plain_pickle,
    nonzero_mask,
    bounding_box,
    parse_mednext_trainer,
    predict_sliding_window,
    preprocess_v1,
    preprocessing_from_plans,
    sliding_window_starts,
)

from mednext_fixtures import (
    PLANS_ID,
    TRAINER_S3,
    FakeCase,
    NotPlainData,
    save_pickle,
    to_monai_key,
    v1_plans,
    write_v1_model_folder,
)

ROLES = ("t1n", "t1c", "t2w", "t2f")

# Published figures (4 inputs, 4 classes, deep supervision): state_dict keys and parameters in millions.
EXPECTED_KEYS = {"S": 237, "B": 237, "M": 365, "L": 525}
EXPECTED_PARAMS_M = {
    ("S", 3): 5.55, ("B", 3): 10.53, ("M", 3): 17.55, ("L", 3): 61.78,
    ("S", 5): 5.98, ("B", 5): 10.96, ("M", 5): 18.26, ("L", 5): 63.00,
}


def _random_s3_state(seed: int = 0, scale: float = 0.05, n_classes: int = 4,
                     out_bias: tuple[float, ...] | None = None) -> dict[str, torch.Tensor]:
    """State dict of a MedNeXt-S kernel 3 with random (non-default) values in every parameter."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_mednext("S", 3, 4, n_classes).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        state[key] = torch.randn(shape, generator=generator) * scale + (1.0 if key.endswith("norm.weight") else 0.0)
    if out_bias is not None:
        state["out_0.conv_out.bias"] = torch.tensor(out_bias)
    return state


@pytest.fixture(scope="module")
def s3_state() -> dict[str, torch.Tensor]:
    return _random_s3_state()


# ------------------------------------------------------------------------------------------------ architecture

@pytest.mark.parametrize("size", ["S", "B", "M", "L"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_state_dict_keys_and_parameter_counts(size: str, kernel: int) -> None:
    with torch.device("meta"):
        network = create_mednext(size, kernel, in_channels=4, n_classes=4, deep_supervision=True)
    state = network.state_dict()
    assert len(state) == EXPECTED_KEYS[size]
    n_params = sum(v.numel() for v in state.values())
    assert round(n_params / 1e6, 2) == pytest.approx(EXPECTED_PARAMS_M[(size, kernel)], abs=1e-9)
    assert n_params == sum(p.numel() for p in network.parameters())


def test_example_key_shapes() -> None:
    with torch.device("meta"):
        state = create_mednext("S", 3, 4, 4).state_dict()
    assert tuple(state["enc_block_0.0.conv1.weight"].shape) == (32, 1, 3, 3, 3)
    assert tuple(state["down_0.res_conv.weight"].shape) == (64, 32, 1, 1, 1)
    assert tuple(state["up_3.res_conv.weight"].shape) == (512, 256, 1, 1, 1)
    assert tuple(state["out_0.conv_out.weight"].shape) == (32, 4, 1, 1, 1)
    assert tuple(state["dummy_tensor"].shape) == (1,)
    for k in range(1, 5):
        assert tuple(state[f"out_{k}.conv_out.weight"].shape) == (32 * 2 ** k, 4, 1, 1, 1)
    with torch.device("meta"):
        large = create_mednext("L", 5, 4, 4).state_dict()
    # down_i uses the next stage's expansion ratio (L: exp_r[1] = 4 for down_0).
    assert tuple(large["down_0.conv2.weight"].shape) == (128, 32, 1, 1, 1)
    assert tuple(large["enc_block_0.0.conv1.weight"].shape) == (32, 1, 5, 5, 5)
    assert "enc_block_0.2.conv1.weight" in large and "enc_block_0.3.conv1.weight" not in large


def test_forward_shapes_and_deep_supervision(s3_state: dict[str, torch.Tensor]) -> None:
    network = create_mednext("S", 3, 4, 4)
    network.load_state_dict(s3_state, strict=True)
    network.eval()
    x = torch.randn(1, 4, 32, 16, 16)
    with torch.inference_mode():
        logits = network(x)
        network.do_ds = True
        outputs = network(x)
    assert tuple(logits.shape) == (1, 4, 32, 16, 16)
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 16, 16), (16, 8, 8), (8, 4, 4), (4, 2, 2), (2, 1, 1)]
    torch.testing.assert_close(outputs[0], logits)


def test_size_s_matches_monai_mednext(s3_state: dict[str, torch.Tensor]) -> None:
    monai_nets = pytest.importorskip(
        "monai.networks.nets", minversion=None,
        reason="monai (>= 1.5, test-only dependency) is not installed: no numeric oracle for MedNeXt-S")
    import monai

    if tuple(int(p) for p in monai.__version__.split(".")[:2]) < (1, 5):
        pytest.skip(f"monai {monai.__version__} has no MedNeXt (needs >= 1.5)")
    oracle = monai_nets.MedNeXt(spatial_dims=3, init_filters=32, in_channels=4, out_channels=4,
                                encoder_expansion_ratio=2, decoder_expansion_ratio=2, bottleneck_expansion_ratio=2,
                                kernel_size=3, deep_supervision=True, use_residual_connection=True,
                                blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2),
                                norm_type="group", global_resp_norm=False)
    renamed = {to_monai_key(k): v for k, v in s3_state.items() if to_monai_key(k) is not None}
    oracle.load_state_dict(renamed, strict=True)
    ours = create_mednext("S", 3, 4, 4)
    ours.load_state_dict(s3_state, strict=True)
    torch.manual_seed(1)
    x = torch.randn(1, 4, 32, 16, 32)
    with torch.inference_mode():
        expected = oracle.eval()(x)
        got = ours.eval()(x)
    assert float((got - expected).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------------------ model folders

@pytest.mark.parametrize("numpy1_names", [True, False], ids=["numpy1-pickles", "numpy2-pickles"])
def test_loads_official_v1_folder_strictly(tmp_path: Path, s3_state: dict[str, torch.Tensor],
                                           numpy1_names: bool) -> None:
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans(), numpy1_names=numpy1_names)
    member = MedNeXtMember(folder)
    assert isinstance(member, Member)
    assert (member.size, member.kernel_size) == ("S", 3)
    assert member.folds == ["0"]
    assert member.roles == ROLES
    assert member.labels == (BACKGROUND, NETC, SNFH, ET)
    network = member.load_network(0)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, s3_state[key], rtol=0, atol=0)
    assert network.do_ds is False and not network.training
    described = member.describe()
    json.dumps(described)
    assert described["framework"] == "mednext"
    assert described["size"] == "S" and described["kernel"] == 3
    assert described["folds"] == ["0"] and described["checkpoint"] == "model_final_checkpoint"
    assert described["path"] == str(folder) and described["trainer"] == TRAINER_S3
    assert described["plans"] == PLANS_ID


def test_model_best_and_fold_selection(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    folder = write_v1_model_folder(tmp_path, {1: s3_state, 0: s3_state}, v1_plans(), checkpoint="model_best")
    member = MedNeXtMember(folder, checkpoint="model_best")
    assert member.folds == ["0", "1"]
    assert MedNeXtMember(folder, folds=[1], checkpoint="model_best").folds == ["1"]
    with pytest.raises(ModelError, match=r"fold_3.model_best\.model"):
        MedNeXtMember(folder, folds=[3], checkpoint="model_best")
    with pytest.raises(ModelError, match="model_final_checkpoint.model"):
        MedNeXtMember(folder)  # only model_best exists


def test_missing_plans_is_a_model_error(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans())
    (folder / "plans.pkl").unlink()
    with pytest.raises(ModelError, match=r"plans\.pkl"):
        MedNeXtMember(folder)
    with pytest.raises(ModelError, match="not found"):
        MedNeXtMember(tmp_path / "nowhere")


def test_unsupported_plans_are_model_errors(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    plans = v1_plans()
    plans["preprocessor_name"] = "PreprocessorFor2D"
    folder = write_v1_model_folder(tmp_path / "a", {0: s3_state}, plans)
    with pytest.raises(ModelError, match="PreprocessorFor2D"):
        MedNeXtMember(folder)
    folder = write_v1_model_folder(tmp_path / "b", {0: s3_state}, v1_plans(patch_size=(16, 16, 16)))
    with pytest.raises(ModelError, match="patch size"):
        MedNeXtMember(folder)


def test_checkpoint_with_wrong_shapes_names_the_file(tmp_path: Path) -> None:
    five_classes = _random_s3_state(n_classes=5)  # plans say 3 foreground classes (4 outputs)
    folder = write_v1_model_folder(tmp_path, {0: five_classes}, v1_plans())
    member = MedNeXtMember(folder)
    with pytest.raises(ModelError) as info:
        member.load_network(0)
    message = str(info.value)
    assert str(folder / "fold_0" / "model_final_checkpoint.model") in message
    assert "out_0.conv_out" in message and "size=" in message


def test_size_mismatch_between_trainer_and_weights(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans(),
                                   trainer="nnUNetTrainerV2_MedNeXt_B_kernel3")
    with pytest.raises(ModelError, match="MedNeXt-B"):
        MedNeXtMember(folder).load_network(0)
    # The override fixes it.
    MedNeXtMember(folder, size="S", kernel_size=3).load_network(0)


def test_checkpoint_needing_arbitrary_classes_is_refused(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans(), checkpoint_extra={"x": NotPlainData()})
    member = MedNeXtMember(folder)
    with pytest.raises(ModelError, match=r"fold_0.model_final_checkpoint\.model.*refused"):
        member.load_network(0)


def test_pickle_needing_arbitrary_classes_is_refused(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans())
    plans = v1_plans()
    plans["evil"] = NotPlainData()
    save_pickle(plans, folder / "plans.pkl", numpy1_names=False)
    with pytest.raises(ModelError, match=r"plans\.pkl.*operator\.add"):
        MedNeXtMember(folder)
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"ok": np.arange(3), "fn": NotPlainData()}, protocol=2))
    with pytest.raises(ModelError, match="other.pkl"):
        load_plain_pickle(path)


def test_architecture_from_arguments_or_model_pkl(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    assert parse_mednext_trainer("nnUNetTrainerV2_MedNeXt_L_kernel5_lr_1e_4") == ("L", 5)
    assert parse_mednext_trainer("nnUNetTrainerV2") is None
    folder = write_v1_model_folder(tmp_path / "a", {0: s3_state}, v1_plans(), trainer="MyTrainer")
    with pytest.raises(ModelError, match="kernel_size"):
        MedNeXtMember(folder)
    member = MedNeXtMember(folder, size="s", kernel_size=3)
    assert (member.size, member.kernel_size) == ("S", 3)
    # A renamed folder still works when the .model.pkl names the trainer.
    renamed = write_v1_model_folder(tmp_path / "b", {0: s3_state}, v1_plans())
    moved = renamed.rename(renamed.parent / "mednext_model")
    assert MedNeXtMember(moved).size == "S"


def test_roles_and_class_labels(tmp_path: Path, s3_state: dict[str, torch.Tensor]) -> None:
    modalities = {0: "t1c", 1: "t1n", 2: "t2f", 3: "t2w"}
    folder = write_v1_model_folder(tmp_path, {0: s3_state}, v1_plans(modalities=modalities))
    member = MedNeXtMember(folder, class_labels=V1_BRATS_TASK_CLASS_LABELS)
    assert member.roles == ("t1c", "t1n", "t2f", "t2w")
    assert member.labels == (BACKGROUND, SNFH, NETC, ET)
    assert MedNeXtMember(folder, channel_roles=ROLES).roles == ROLES
    with pytest.raises(ModelError, match="4 input channels"):
        MedNeXtMember(folder, channel_roles=("t1n", "t1c"))
    with pytest.raises(ModelError, match="class_labels"):
        MedNeXtMember(folder, class_labels={0: 0, 1: 1, 2: 1, 3: 3})
    with pytest.raises(ModelError, match="channel 0"):
        MedNeXtMember(folder, class_labels={0: 1, 1: 0, 2: 2, 3: 3})
    with pytest.raises(ModelError, match="every output channel"):
        MedNeXtMember(folder, class_labels={0: 0, 1: 1, 2: 2})


# ------------------------------------------------------------------------------------------------ v1 inference parts

def test_sliding_window_starts_and_gaussian() -> None:
    assert sliding_window_starts((128, 128, 128), (155, 169, 138), 0.5) == [[0, 27], [0, 41], [0, 10]]
    assert sliding_window_starts((32, 32, 32), (32, 80, 33), 0.5) == [[0], [0, 16, 32, 48], [0, 1]]
    weights = gaussian_importance_map((32, 32, 32))
    assert weights.dtype == np.float32 and weights.shape == (32, 32, 32)
    assert weights[16, 16, 16] == 1.0 and weights.max() == 1.0 and weights.min() > 0
    assert weights[0, 16, 16] < 0.01 and weights[0, 16, 16] == pytest.approx(weights[16, 16, 0])


def test_window_softmax_is_averaged_over_mirrors() -> None:
    torch.manual_seed(3)
    network = torch.nn.Conv3d(4, 4, kernel_size=3, padding=1).eval()  # not mirror-symmetric
    data = torch.randn(4, 16, 16, 16)
    got = predict_sliding_window(network, data.numpy(), (16, 16, 16), 4, torch.device("cpu"), 0.5, (0, 1, 2))
    expected = torch.zeros(4, 16, 16, 16)
    with torch.inference_mode():
        for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
            flipped = torch.flip(data[None], dims) if dims else data[None]
            probs = torch.softmax(network(flipped), 1)  # v1 averages probabilities, not logits
            expected += (torch.flip(probs, dims) if dims else probs)[0] / 8
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    no_mirror = predict_sliding_window(network, data.numpy(), (16, 16, 16), 4, torch.device("cpu"), 0.5, ())
    assert np.abs(no_mirror - got).max() > 1e-3


def test_sliding_window_reassembles_voxelwise_network() -> None:
    torch.manual_seed(4)
    network = torch.nn.Conv3d(2, 3, kernel_size=1).eval()
    for shape in [(40, 21, 57), (20, 16, 18)]:  # larger than the patch / smaller (padded)
        data = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
        got = predict_sliding_window(network, data, (16, 16, 16), 3, torch.device("cpu"), 0.5, ())
        with torch.inference_mode():
            full = torch.softmax(network(torch.from_numpy(data)[None]), 1)[0].numpy()
        assert got.shape == (3, *shape)
        np.testing.assert_allclose(got, full, atol=1e-5)


def test_preprocessing_crops_resamples_and_normalises() -> None:
    rng = np.random.default_rng(5)
    data = np.zeros((2, 30, 34, 26), dtype=np.float32)
    data[0, 3:25, 4:30, 2:20] = rng.uniform(50, 150, size=(22, 26, 18))
    data[1, 5:27, 6:31, 3:21] = rng.uniform(10, 20, size=(22, 25, 18))
    mask = nonzero_mask(data)
    assert bounding_box(mask) == (slice(3, 27), slice(4, 31), slice(2, 21))
    plans = v1_plans(patch_size=(32, 32, 32), spacing=(1.0, 1.5, 0.8), transpose_forward=(2, 0, 1),
                     modalities={0: "T1", 1: "FLAIR"}, schemes=["nonCT", "CT"], use_mask=[True, False])
    prep = preprocessing_from_plans(plans, 0, Path("plans.pkl"))
    spacing = (1.2, 0.9, 1.1)
    result = preprocess_v1(data, spacing, prep)
    assert result.bbox == (slice(3, 27), slice(4, 31), slice(2, 21))
    assert result.cropped_shape == (24, 27, 19) and result.original_shape == (30, 34, 26)
    # Transposed order (x, z, y): spacing (1.1, 1.2, 0.9) → target (1.0, 1.5, 0.8).
    expected_shape = (round(19 * 1.1 / 1.0), round(24 * 1.2 / 1.5), round(27 * 0.9 / 0.8))
    assert result.data.shape == (2, *expected_shape)
    assert result.data.dtype == np.float32
    # nonCT with mask: zero outside the (resampled) mask, z-scored inside.
    channel0 = result.data[0]
    inside = channel0 != 0
    assert abs(channel0[inside].mean()) < 0.05 and abs(channel0[inside].std() - 1) < 0.05
    # CT: clipped to the 0.5/99.5 percentiles (-100, 300) and z-scored with mean 30, sd 50.
    assert result.data[1].min() >= (-100 - 30) / 50 - 1e-6 and result.data[1].max() <= (300 - 30) / 50 + 1e-6


# ------------------------------------------------------------------------------------------------ predict

def _synthetic_case(shape: tuple[int, int, int], box: tuple[slice, slice, slice], spacing: tuple[float, ...],
                    roles: tuple[str, ...] = ROLES, seed: int = 7) -> FakeCase:
    rng = np.random.default_rng(seed)
    images = {}
    for i, role in enumerate(roles):
        image = np.zeros(shape, dtype=np.float32)
        image[box] = rng.uniform(100, 400, size=[s.stop - s.start for s in box]) * (1 + 0.3 * i)
        images[role] = image
    return FakeCase("synthetic-001", images, spacing)


BIAS_TO_CLASS_2 = (0.0, 0.0, 3.0, 0.0)


def test_predict_returns_probabilities_on_the_case_grid(tmp_path: Path) -> None:
    # Small random weights with a bias that favours model class 2: the prediction inside the brain is class 2.
    states = {0: _random_s3_state(seed=11, scale=0.02, out_bias=BIAS_TO_CLASS_2),
              1: _random_s3_state(seed=12, scale=0.02, out_bias=BIAS_TO_CLASS_2)}
    # Transposed axes (x, z, y); the case's spacing differs, so the crop (31, 35, 35) is resampled to (35, 30, 29)
    # in transposed order: two 32³ windows along the first axis.
    plans = v1_plans(patch_size=(32, 32, 32), spacing=(1.1, 1.3, 1.1), transpose_forward=(2, 0, 1))
    folder = write_v1_model_folder(tmp_path, states, plans)
    box = (slice(4, 35), slice(6, 41), slice(3, 38))
    case = _synthetic_case((40, 48, 44), box, spacing=(1.25, 0.9, 1.1))
    steps: list[str] = []
    member = MedNeXtMember(folder, use_mirroring=False)
    probs = member.predict(case, torch.device("cpu"), lambda step, fraction=None: steps.append(step))
    assert isinstance(probs, Probabilities)
    assert probs.array.dtype == np.float32
    assert probs.array.shape == (4, 40, 48, 44) and probs.grid_shape == case.shape_zyx
    assert probs.labels == (BACKGROUND, NETC, SNFH, ET)
    np.testing.assert_allclose(probs.array.sum(axis=0), 1.0, atol=1e-5)
    assert probs.array.min() >= 0
    outside = np.ones(case.shape_zyx, dtype=bool)
    outside[box] = False
    assert np.all(probs.array[0][outside] == 1.0)
    assert np.all(probs.array[1:][:, outside] == 0.0)
    inside = probs.array[(slice(None), *box)]
    assert np.all(probs.channel(SNFH)[box] > 0.5)  # model class 2 = SNFH in BraTS 2023 values
    assert inside.std(axis=(1, 2, 3)).min() > 1e-5  # varies over the case: a real prediction
    assert any("fold 0" in s for s in steps) and any("fold 1" in s for s in steps)


def test_predict_with_mirroring_and_v1_class_order_on_a_small_case(tmp_path: Path) -> None:
    state = _random_s3_state(seed=13, scale=0.02, out_bias=BIAS_TO_CLASS_2)
    folder = write_v1_model_folder(tmp_path, {0: state}, v1_plans(patch_size=(32, 16, 16)))
    box = (slice(2, 14), slice(3, 17), slice(1, 15))
    case = _synthetic_case((20, 28, 22), box, spacing=(1.0, 1.0, 1.0), seed=9)  # crop (12, 14, 14): one window
    # v1's own BraTS conversion: model class 2 is 'non-enhancing' → NETC; channels keep the model's order.
    member = MedNeXtMember(folder, use_mirroring=True, class_labels=V1_BRATS_TASK_CLASS_LABELS)
    probs = member.predict(case, torch.device("cpu"))
    assert probs.labels == (BACKGROUND, SNFH, NETC, ET)
    assert probs.array.shape == (4, 20, 28, 22)
    np.testing.assert_allclose(probs.array.sum(axis=0), 1.0, atol=1e-5)
    outside = np.ones(case.shape_zyx, dtype=bool)
    outside[box] = False
    assert np.all(probs.array[0][outside] == 1.0)
    assert np.all(probs.channel(NETC)[box] > 0.5)  # model channel 2, listed third
    np.testing.assert_array_equal(probs.array[2], probs.channel(NETC))
    assert np.all(probs.channel(SNFH)[box] < 0.5)
    inside = probs.array[(slice(None), *box)]
    assert inside.std(axis=(1, 2, 3)).max() > 1e-5  # a real prediction, not a constant


def test_out_of_memory_retries_the_fold_with_results_on_the_cpu(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA out-of-memory in the first sliding window: the fold is run again with the accumulation on the CPU, the
    step reporter and a RuntimeWarning say so, and the result is the one without the failure. (On this CPU-only
    machine the device is the CPU, so both runs accumulate there; what is exercised is the catch, the retry with
    results_device=cpu and the report, not GPU memory.)"""
    from BraTSEnsembleLib.members import mednext

    from test_torchscript_member import OutOfMemoryFirst

    folder = write_v1_model_folder(tmp_path, {0: _random_s3_state(seed=14, scale=0.02, out_bias=BIAS_TO_CLASS_2)},
                                   v1_plans(patch_size=(32, 16, 16)))
    case = _synthetic_case((14, 18, 18), (slice(1, 13), slice(2, 16), slice(1, 15)), spacing=(1.0, 1.0, 1.0))
    plain = MedNeXtMember(folder, use_mirroring=False).predict(case, torch.device("cpu"))

    member = MedNeXtMember(folder, use_mirroring=False)
    load = member.load_network
    monkeypatch.setattr(member, "load_network", lambda fold, device: OutOfMemoryFirst(load(fold, device)))
    results_devices = []
    sliding_window = mednext.predict_sliding_window

    def spy(*args, **kwargs):
        results_devices.append(kwargs["results_device"])
        return sliding_window(*args, **kwargs)

    monkeypatch.setattr(mednext, "predict_sliding_window", spy)
    steps: list[str] = []
    with pytest.warns(RuntimeWarning, match="CUDA out of memory"):
        retried = member.predict(case, torch.device("cpu"), lambda step, fraction=None: steps.append(step))
    assert np.array_equal(retried.array, plain.array)
    assert results_devices == [torch.device("cpu"), torch.device("cpu")]  # device first, then the CPU
    assert any("out of memory" in s and "results on the CPU" in s for s in steps), steps
