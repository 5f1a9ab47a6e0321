"""U-Mamba member networks: weight compatibility with the official checkpoints, and the pure-torch Mamba block.

Oracles: the figures of ../shared/reference/mednext-umamba.md (397 keys / 42.12M parameters for the BraTS-like
6-stage UMambaBot, Mamba shapes at d_model 320); PyPI ``mambapy`` 1.2.0 (``MambaBlock`` has mamba_ssm's parameter
names) for the Mamba numerics; a plain one-pass scan for the chunked scan; nnunetv2's own predictor for the
nnU-Net-network contract. The UMambaEnc figures (518 keys, 42,755,220 parameters) were measured on the official
``UMambaEnc_3d.py`` (bowang-lab/U-Mamba) with a stand-in ``mamba_ssm.Mamba``.
"""
from __future__ import annotations

import json
import math
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from BraTSEnsembleLib.members.mamba import (Mamba, mamba_ssm_kernel, selective_scan_chunked,
                                            selective_scan_reference)
from BraTSEnsembleLib.members.umamba import (MambaLayer, UMambaBot, UMambaEnc, build_umamba_network,
                                             is_umamba_trainer, umamba_architecture_from_plans)

BOT, ENC, ENC_NOAMP = "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc", "nnUNetTrainerUMambaEncNoAMP"


# ----------------------------------------------------------------------------------------------------------------
# Plans in nnU-Net 2.1.1's format (what U-Mamba's fork writes)
# ----------------------------------------------------------------------------------------------------------------

def plans_v211(patch, base, top, kernels, strides, n_enc, n_dec, n_channels=4) -> dict:
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [max(p, 20) for p in patch],
        "spacing": [1.0] * len(patch), "normalization_schemes": ["ZScoreNormalization"] * n_channels,
        "use_mask_for_norm": [True] * n_channels, "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": base, "n_conv_per_stage_encoder": list(n_enc),
        "n_conv_per_stage_decoder": list(n_dec),
        "num_pool_per_axis": [sum(1 for s in strides if s[a] > 1) for a in range(len(patch))],
        "pool_op_kernel_sizes": [list(s) for s in strides], "conv_kernel_sizes": [list(k) for k in kernels],
        "unet_max_num_features": top,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset901_UMambaTest", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * len(patch),
        "original_median_shape_after_transp": [max(p, 20) for p in patch],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 5.0, "mean": 1.0, "median": 1.0, "min": -1.0, "percentile_00_5": -1.0,
                     "percentile_99_5": 4.0, "std": 1.0} for c in range(n_channels)},
    }


def brats_plans() -> dict:
    """The BraTS-like plans of the reference: 6 stages, features 32..320, 128^3 patch, 3x3x3 kernels."""
    return plans_v211([128, 128, 128], 32, 320, [[3, 3, 3]] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5, [2] * 6, [2] * 5)


def tiny_plans() -> dict:
    """4 stages, features 4, 8, 16, 16, patch 16^3: stage feature maps 16^3, 8^3, 4^3, 4x2x2 (16 voxels, which is
    no more than its 16 channels: UMambaEnc switches to channel tokens there)."""
    return plans_v211([16, 16, 16], 4, 16, [[3, 3, 3]] * 3 + [[1, 3, 3]],
                      [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [2] * 4, [2] * 3)


DATASET_JSON = {"channel_names": {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
                "labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3},
                "numTraining": 10, "file_ending": ".nii.gz"}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def brats_bot() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_umamba_network(BOT, brats_plans(), "3d_fullres", 4, 4)


@pytest.fixture(scope="module")
def brats_enc() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_umamba_network(ENC, brats_plans(), "3d_fullres", 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# State-dict layout of the BraTS-like networks
# ----------------------------------------------------------------------------------------------------------------

def test_brats_umambabot_key_and_parameter_counts(brats_bot):
    state = brats_bot.state_dict()
    assert isinstance(brats_bot, UMambaBot)
    assert len(state) == 397                                   # the reference's figure for this network
    assert round(n_params(brats_bot) / 1e6, 2) == 42.12        # the reference's 42.12M
    assert n_params(brats_bot) == 42_124_692
    # the aliases of the official tree
    for key in ("decoder.encoder.stem.0.conv3.weight", "encoder.stages.0.1.conv1.all_modules.0.weight",
                "decoder.encoder.stages.0.1.conv1.all_modules.1.bias", "encoder.stages.0.1.conv1.conv.weight",
                "encoder.stages.0.1.conv1.norm.weight", "encoder.stem.1.conv2.all_modules.1.weight",
                "decoder.upsample_layers.0.conv.weight", "decoder.stages.2.1.conv2.conv.bias",
                "decoder.seg_layers.4.weight", "mamba_layer.norm.weight", "mamba_layer.mamba.A_log"):
        assert key in state, key
    # U-Mamba keeps one block in the deeper half: stages 3..5 and decoder stages 3, 4 hold no BasicBlockD
    assert "encoder.stages.2.1.conv1.conv.weight" in state and "encoder.stages.3.1.conv1.conv.weight" not in state
    assert "decoder.stages.2.1.conv1.conv.weight" in state and "decoder.stages.3.1.conv1.conv.weight" not in state
    assert state["decoder.seg_layers.4.weight"].shape == (4, 32, 1, 1, 1)
    assert state["encoder.stem.0.conv1.weight"].shape == (32, 4, 3, 3, 3)
    assert state["decoder.stages.0.0.conv1.weight"].shape == (320, 640, 3, 3, 3)
    # every alias is the very same tensor
    assert state["decoder.encoder.stem.0.conv1.weight"].data_ptr() == state["encoder.stem.0.conv1.weight"].data_ptr()


def test_mamba_parameter_shapes_at_d_model_320(brats_bot):
    expected = {"in_proj.weight": (1280, 320), "conv1d.weight": (640, 1, 4), "conv1d.bias": (640,),
                "x_proj.weight": (52, 640), "dt_proj.weight": (640, 20), "dt_proj.bias": (640,),
                "A_log": (640, 16), "D": (640,), "out_proj.weight": (320, 640)}
    shapes = {k: tuple(v.shape) for k, v in brats_bot.mamba_layer.mamba.state_dict().items()}
    assert shapes == expected                                  # no in_proj/out_proj/x_proj bias
    assert {k: tuple(v.shape) for k, v in Mamba(320).state_dict().items()} == expected
    assert tuple(brats_bot.mamba_layer.norm.weight.shape) == (320,)


def test_brats_umambaenc_layout_and_channel_token_switch(brats_enc):
    state = brats_enc.state_dict()
    assert isinstance(brats_enc, UMambaEnc)
    assert len(state) == 518
    assert n_params(brats_enc) == 42_755_220
    assert brats_enc.feature_map_sizes == [[128] * 3, [64] * 3, [32] * 3, [16] * 3, [8] * 3, [4] * 3]
    # only the last stage has no more voxels (4^3 = 64) than channels (320): channel tokens of width 64
    assert brats_enc.channel_token == [False] * 5 + [True]
    layers = brats_enc.encoder.mamba_layers
    assert [layer.dim for layer in layers] == [32, 64, 128, 256, 320, 64]
    assert [layer.channel_token for layer in layers] == [False] * 5 + [True]
    assert state["encoder.mamba_layers.5.mamba.in_proj.weight"].shape == (256, 64)
    assert state["decoder.encoder.mamba_layers.5.mamba.x_proj.weight"].shape == (4 + 32, 128)
    assert state["encoder.mamba_layers.0.mamba.dt_proj.weight"].shape == (64, 2)
    assert "mamba_layer.norm.weight" not in state


# ----------------------------------------------------------------------------------------------------------------
# Building from plans
# ----------------------------------------------------------------------------------------------------------------

def test_trainer_names():
    assert is_umamba_trainer(BOT) and is_umamba_trainer(ENC) and is_umamba_trainer(ENC_NOAMP)
    assert not is_umamba_trainer("nnUNetTrainer") and not is_umamba_trainer("nnUNetTrainerV2_MedNeXt_S_kernel3")
    with pytest.raises(ValueError):
        build_umamba_network("nnUNetTrainer", tiny_plans(), "3d_fullres", 4, 4)
    with pytest.raises(ValueError):
        build_umamba_network(BOT, tiny_plans(), "2d", 4, 4)
    assert isinstance(build_umamba_network(ENC_NOAMP, tiny_plans(), "3d_fullres", 4, 4), UMambaEnc)


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
def test_old_and_new_plans_formats_build_the_same_network():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    old = tiny_plans()
    # nnunetv2 2.8 converts 2.1.1 configurations to `architecture: {network_class_name, arch_kwargs}`
    new = deepcopy(old)
    converted = PlansManager(deepcopy(old)).get_configuration("3d_fullres").configuration
    assert "architecture" in converted and "UNet_base_num_features" not in converted
    new["configurations"]["3d_fullres"] = converted
    # and a configuration that only inherits
    new["configurations"]["3d_child"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    arch_old = umamba_architecture_from_plans(old, "3d_fullres")
    assert arch_old["features_per_stage"] == [4, 8, 16, 16]
    assert arch_old == umamba_architecture_from_plans(new, "3d_fullres")
    assert arch_old == umamba_architecture_from_plans(new, "3d_child")
    for trainer in (BOT, ENC):
        shapes = [{k: v.shape for k, v in build_umamba_network(trainer, p, c, 4, 3).state_dict().items()}
                  for p, c in ((old, "3d_fullres"), (new, "3d_fullres"), (new, "3d_child"))]
        assert shapes[0] == shapes[1] == shapes[2]
    assert old == tiny_plans()                                 # the caller's plans are not modified


# ----------------------------------------------------------------------------------------------------------------
# Synthetic checkpoint in nnU-Net v2's format
# ----------------------------------------------------------------------------------------------------------------

def write_results_folder(root: Path, trainer: str, network: torch.nn.Module, plans: dict) -> Path:
    folder = root / "Dataset901_UMambaTest" / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-2, "momentum": 0.99, "params": []}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [0.1], "ema_fg_dice": [0.1], "epoch_start_timestamps": [0.0]},
        "_best_ema": 0.1,
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": DATASET_JSON,
                      "unpack_dataset": True, "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


@pytest.mark.parametrize("trainer", [BOT, ENC])
def test_synthetic_checkpoint_reloads_strictly(tmp_path, trainer):
    torch.manual_seed(1)
    original = build_umamba_network(trainer, tiny_plans(), "3d_fullres", 4, 4).eval()
    folder = write_results_folder(tmp_path, trainer, original, tiny_plans())

    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    init = checkpoint["init_args"]
    assert is_umamba_trainer(checkpoint["trainer_name"])
    n_in = len(init["dataset_json"]["channel_names"])
    n_out = len(init["dataset_json"]["labels"])
    torch.manual_seed(2)                                       # a different initialisation, then the weights
    rebuilt = build_umamba_network(checkpoint["trainer_name"], init["plans"], init["configuration"], n_in, n_out)
    rebuilt.load_state_dict(checkpoint["network_weights"], strict=True)
    rebuilt.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))
    # a missing or an extra key is refused
    broken = dict(checkpoint["network_weights"])
    broken.pop(next(k for k in broken if "mamba" in k and k.endswith("A_log")))
    with pytest.raises(RuntimeError):
        rebuilt.load_state_dict(broken, strict=True)


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
def test_runs_in_nnunet_predictor():
    """The network plugged into nnunetv2 2.8.1's own predictor (mirroring, sliding window, export)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(3)
    plans = tiny_plans()
    network = build_umamba_network(ENC, plans, "3d_fullres", 4, 4)
    plans_manager = PlansManager(deepcopy(plans))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], DATASET_JSON, ENC, (1,))
    # two sliding-window positions along y, each predicted plain and mirrored
    image = np.random.default_rng(0).normal(size=(4, 16, 20, 15)).astype(np.float32)
    labels, probabilities = predictor.predict_single_npy_array(image, {"spacing": (1.0, 1.0, 1.0)}, None, None,
                                                               True)
    assert labels.shape == (16, 20, 15)
    assert probabilities.shape == (4, 16, 20, 15)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer", [BOT, ENC])
def test_tiny_forward_shapes(trainer):
    torch.manual_seed(4)
    net = build_umamba_network(trainer, tiny_plans(), "3d_fullres", 4, 3).eval()
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16, 16)
        assert torch.isfinite(out).all()
        net.decoder.deep_supervision = True                  # how nnU-Net switches it
        outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    assert torch.allclose(outs[0], out, atol=1e-6)
    built_ds = build_umamba_network(trainer, tiny_plans(), "3d_fullres", 4, 3, deep_supervision=True)
    assert built_ds.decoder.deep_supervision is True


def test_umambaenc_channel_token_stage_and_patch_size():
    net = build_umamba_network(ENC, tiny_plans(), "3d_fullres", 4, 3).eval()
    # stage 3: 4x2x2 = 16 voxels <= 16 channels -> channel tokens; stage 2: 64 voxels > 16 channels
    assert net.feature_map_sizes == [[16, 16, 16], [8, 8, 8], [4, 4, 4], [4, 2, 2]]
    assert net.channel_token == [False, False, False, True]
    assert [(m.dim, m.channel_token) for m in net.encoder.mamba_layers] == [(4, False), (8, False), (16, False),
                                                                            (16, True)]
    # a channel-token layer mixes channels, not voxels: the output at one voxel depends on all channels
    layer = net.encoder.mamba_layers[3]
    x = torch.randn(1, 16, 4, 2, 2)
    with torch.no_grad():
        y = layer(x)
        x2 = x.clone()
        x2[0, 0, 3, 1, 1] += 1.0                              # token 0 (channel 0) changes ...
        y2 = layer(x2)
    assert y.shape == x.shape
    assert not torch.allclose(y[0, 5], y2[0, 5])              # ... and later tokens (channels) see it
    # such a network only runs on its patch size
    with pytest.raises(ValueError):
        with torch.no_grad():
            net(torch.randn(1, 4, 32, 16, 16))


def test_mamba_layer_float32_with_autocast_off():
    layer = MambaLayer(8).eval()
    x = torch.randn(1, 8, 3, 4, 5)
    with torch.no_grad():
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x.to(torch.bfloat16).float()).detach())
    # voxel order: C-order flattening of (z, y, x)
    tokens = layer.norm(x.reshape(1, 8, 60).transpose(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(reference, layer.mamba(tokens).transpose(1, 2).reshape(1, 8, 3, 4, 5))


# ----------------------------------------------------------------------------------------------------------------
# Mamba numerics
# ----------------------------------------------------------------------------------------------------------------

def test_mamba_matches_mambapy_oracle():
    mambapy = pytest.importorskip("mambapy.mamba", reason="test oracle: pip install mambapy==1.2.0")
    torch.manual_seed(5)
    for d_model, length, chunks in ((320, 64, (None, 7)), (32, 300, (None, 1, 2, 64, 299)), (64, 320, (None, 50))):
        ours = Mamba(d_model).eval()
        with torch.no_grad():                                  # trained-looking values, not just the init
            for p in ours.parameters():
                p.add_(0.05 * torch.randn_like(p))
        oracle = mambapy.MambaBlock(mambapy.MambaConfig(d_model=d_model, n_layers=1)).eval()
        oracle.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, length, d_model)
        with torch.no_grad():
            expected = oracle(x)
            for chunk in chunks:
                ours.chunk_size = chunk
                got = ours(x)
                assert (got - expected).abs().max().item() <= 1e-5, (d_model, length, chunk)


def _scan_inputs(b=2, d=6, n=5, length=97, dtype=torch.float64, seed=6, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.exp(torch.rand(d, n, generator=g, dtype=dtype) * 3)   # -1 .. -20
    return dict(u=r(b, d, length), delta=delta_scale * r(b, d, length), A=A, B=r(b, n, length),
                C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d), delta_softplus=True)


def test_chunked_scan_equals_one_pass():
    args = _scan_inputs()
    expected, last = selective_scan_reference(**args, return_last_state=True)
    for chunk in (1, 2, 3, 5, 16, 32, 96, 97, 98, 500, None):     # dividing L (97) or not, shorter or longer
        got, got_last = selective_scan_chunked(**args, return_last_state=True, chunk_size=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_last, last, rtol=1e-10, atol=1e-10)
    # float32 gives the same to float32 precision
    args32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in args.items()}
    for chunk in (7, None):
        got = selective_scan_chunked(**args32, chunk_size=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the state carries: two halves with the state handed over equal one scan
    first = {k: (v[..., :40] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in args.items()}
    second = {k: (v[..., 40:] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in args.items()}
    y1, h1 = selective_scan_chunked(**first, return_last_state=True, chunk_size=9)
    y2 = selective_scan_chunked(**second, initial_state=h1, chunk_size=13)
    torch.testing.assert_close(torch.cat([y1, y2], -1), expected, rtol=1e-10, atol=1e-10)


def test_chunked_scan_is_safe_with_strong_decay():
    # delta * |A| up to several hundred per step: exp(-cumsum) formulations overflow, products of decays do not
    args = {k: (v.float() if torch.is_tensor(v) else v) for k, v in _scan_inputs(delta_scale=30.0).items()}
    expected = selective_scan_reference(**args)
    got = selective_scan_chunked(**args, chunk_size=64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_streamed_mamba_forward_is_chunk_invariant_and_differentiable():
    torch.manual_seed(7)
    m = Mamba(12, d_conv=4).double()
    x = torch.randn(2, 45, 12, dtype=torch.float64)
    with torch.no_grad():
        m.chunk_size = 45
        full = m(x)
        for chunk in (1, 2, 3, 4, 10, 44):                     # chunks shorter than the conv window included
            m.chunk_size = chunk
            torch.testing.assert_close(m(x), full, rtol=1e-12, atol=1e-12)
    m.chunk_size = 8
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()                                     # the scan also works under autograd
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_no_cuda_kernel_on_cpu():
    if not torch.cuda.is_available():
        assert mamba_ssm_kernel() is None
    m = Mamba(8)
    assert m(torch.randn(1, 5, 8)).shape == (1, 5, 8)
    assert math.ceil(8 / 16) == m.dt_rank == 1


def test_cuda_kernel_path_plumbing_with_the_reference_scan():
    """The mamba_ssm-kernel forward (layouts, delta bias, gating) checked on CPU with the reference scan in the
    kernel's place: it must equal the streamed pure-torch forward."""
    torch.manual_seed(8)
    m = Mamba(24).double().eval()
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    with torch.no_grad():
        m.chunk_size = 10
        torch.testing.assert_close(m._forward_kernel(x, selective_scan_reference), m._forward_streamed(x),
                                   rtol=1e-10, atol=1e-10)


def test_2d_networks():
    kernels, strides = [[3, 3]] * 5, [[1, 1]] + [[2, 2]] * 4
    plans = plans_v211([32, 32], 4, 32, kernels, strides, [2] * 5, [2] * 4, n_channels=1)
    plans["configurations"] = {"2d": plans["configurations"]["3d_fullres"]}
    x = torch.randn(2, 1, 32, 32)
    bot = build_umamba_network(BOT, plans, "2d", 1, 3).eval()
    enc = build_umamba_network(ENC, plans, "2d", 1, 3).eval()
    # 2d U-Mamba: the last decoder stage takes no skip (its first conv sees only the upsampled features)
    assert bot.state_dict()["decoder.stages.3.0.conv1.weight"].shape == (4, 4, 3, 3)
    assert bot.state_dict()["decoder.stages.2.0.conv1.weight"].shape == (8, 16, 3, 3)
    # 2d UMambaEnc: Mamba on every other stage, ending with the last (stage 4: 2x2 voxels -> channel tokens)
    assert [type(m).__name__ for m in enc.encoder.mamba_layers] == ["MambaLayer", "Identity"] * 2 + ["MambaLayer"]
    assert enc.channel_token == [False, False, False, True, True]
    with torch.no_grad():
        assert bot(x).shape == (2, 3, 32, 32)
        assert enc(x).shape == (2, 3, 32, 32)
